"""The one frozen model configuration shared by every transformer in jaxlm.

`ModelConfig` is built from the `model` section of an experiment config
(`ModelConfig.from_config(config.model)`); it validates itself on
construction, so an inconsistent size fails before anything is compiled, with
a message that names the `model.*` key and the fix.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """An invalid configuration: the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and switches of a transformer. GPT-2 and Llama are two settings of it."""

  vocab_size: int = 4096  # rows of the embedding table; >= the tokenizer's vocabulary
  embed_dim: int = 256  # D, the model width
  num_layers: int = 4  # L, transformer blocks (stacked with nn.scan)
  num_heads: int = 4  # N, query heads
  num_kv_heads: int = 0  # K, key/value heads; 0 = num_heads (multi-head); < N = grouped-query
  head_dim: int = 0  # H; 0 = embed_dim // num_heads
  mlp_dim: int = 1024  # F, hidden width of the MLP
  max_len: int = 1024  # longest sequence (size of the learned position table)
  position: str = "rotary"  # "learned" (GPT-2) or "rotary" (Llama)
  rope_theta: float = 10000.0  # rotary base frequency
  norm: str = "rmsnorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
  norm_eps: float = 1e-6  # epsilon of the norms
  mlp: str = "swiglu"  # "gelu" (GPT-2) or "swiglu" (Llama)
  use_bias: bool = False  # biases in dense layers and LayerNorm (GPT-2: True)
  tie_embeddings: bool = True  # output projection = transposed input embedding
  dropout_rate: float = 0.0  # dropout on embeddings and residual branches
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"  # storage dtype of parameters (master weights)
  remat: str = "none"  # rematerialise each block: "none", "full" or "save_dots"
  attention: str = "auto"  # jax.nn.dot_product_attention implementation: auto/xla/cudnn
  init_std: float = 0.02  # stddev of the normal initialiser of weights
  lora_rank: int = 0  # rank r of LoRA adapters (models/lora.py) on the targeted Einsum kernels; 0 = none
  lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / r) * A @ B
  lora_targets: str = "attention/(query|value)"  # regex searched in module paths, e.g. "layers/mlp/up"

  def __post_init__(self):
    def check(ok: bool, key: str, message: str):
      if not ok:
        raise ConfigError(f"model.{key}: {message}")

    for key in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim", "max_len"):
      check(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}.")
    check(self.position in POSITIONS, "position", f"{self.position!r} is not one of {POSITIONS}.")
    check(self.norm in NORMS, "norm", f"{self.norm!r} is not one of {NORMS}.")
    check(self.mlp in MLPS, "mlp", f"{self.mlp!r} is not one of {MLPS}.")
    check(self.remat in REMAT_POLICIES, "remat", f"{self.remat!r} is not one of {REMAT_POLICIES}.")
    check(self.attention in ATTENTION_IMPLEMENTATIONS, "attention",
          f"{self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}.")
    for key in ("dtype", "param_dtype"):
      check(getattr(self, key) in DTYPES, key, f"{getattr(self, key)!r} is not one of {tuple(DTYPES)}.")
    check(0.0 <= self.dropout_rate < 1.0, "dropout_rate", f"must be in [0, 1), got {self.dropout_rate}.")
    check(self.lora_rank >= 0, "lora_rank", f"must be >= 0 (0 = no adapters), got {self.lora_rank}.")
    check(self.num_kv_heads >= 0, "num_kv_heads", "must be >= 0 (0 means num_heads).")
    if not self.head_dim:
      check(self.embed_dim % self.num_heads == 0, "num_heads",
            f"{self.num_heads} heads do not divide embed_dim={self.embed_dim}; "
            "change model.num_heads or model.embed_dim, or set model.head_dim explicitly.")
    check(self.num_heads % self.kv_heads == 0, "num_kv_heads",
          f"{self.kv_heads} key/value heads do not divide num_heads={self.num_heads}.")
    if self.position == "rotary":
      check(self.dim_per_head % 2 == 0, "head_dim", f"rotary positions need an even head_dim, got {self.dim_per_head}.")

  @classmethod
  def from_config(cls, model_config: Any) -> "ModelConfig":
    """Builds from a ConfigDict (or mapping), naming any key this class does not know."""
    values = dict(model_config)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"model.{unknown[0]}: unknown model option; known options are {sorted(known)}.")
    return cls(**values)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]
