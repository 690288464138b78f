"""The one frozen model configuration shared by every transformer in jaxlm.

`ModelConfig` is built from the `model` section of an experiment config
(`ModelConfig.from_config(config.model)`); it validates itself on
construction, so an inconsistent size fails before anything is compiled, with
a message that names the `model.*` key and the fix.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxlm.errors import ConfigError, check
from jaxlm.models import quantize

FAMILIES = ("decoder", "encoder", "encoder_decoder")
POSITIONS = ("learned", "rotary", "relative")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "gelu_exact", "relu", "swiglu", "geglu")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blocks", "pallas")
ROPE_SCALING_TYPES = ("none", "llama3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Model-size presets: overrides of ModelConfig's defaults (`jaxlm.configs.model_config_dict(preset)`).
# The large-vocabulary presets chunk the loss (`loss_chunk_size`): at V >= 32K and T >= 1024 the float32 logits,
# log-probabilities and their gradient (3 x 4 B T V bytes; 10 GB at B = 16, T = 1024, V = 50304) outweigh all
# other activations; 256-position chunks keep a quarter of that or less, for one more V x D matmul per token
# (each chunk's logits are recomputed in the backward pass). The small presets' logits are small: no chunks.
PRESETS = {
  # The two small presets unroll their layer loop (scan_unroll): about 10% faster train steps on CPU.
  # A few hundred K parameters: unit tests and CI end-to-end runs.
  "tiny": dict(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=128, scan_unroll=2),
  # The quickstart model: trains on 2 CPU cores in minutes.
  "small": dict(vocab_size=4096, embed_dim=192, num_layers=4, num_heads=4, mlp_dim=512, max_len=512, scan_unroll=4),
  # GPT-2 small (124M with a 50257-row vocabulary; padded to 50304 for fast matmuls).
  "gpt2_124m": dict(
    vocab_size=50304,
    embed_dim=768,
    num_layers=12,
    num_heads=12,
    mlp_dim=3072,
    max_len=1024,
    position="learned",
    norm="layernorm",
    mlp="gelu",
    use_bias=True,
    norm_eps=1e-5,
    loss_chunk_size=256,
  ),
  # GPT-2 medium (350M).
  "gpt2_350m": dict(
    vocab_size=50304,
    embed_dim=1024,
    num_layers=24,
    num_heads=16,
    mlp_dim=4096,
    max_len=1024,
    position="learned",
    norm="layernorm",
    mlp="gelu",
    use_bias=True,
    norm_eps=1e-5,
    loss_chunk_size=256,
  ),
  # Llama-3.2-1B shape with a 32K vocabulary (1.0B parameters): GQA, RoPE, RMSNorm, SwiGLU.
  "llama_1b": dict(
    vocab_size=32000,
    embed_dim=2048,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    mlp_dim=8192,
    max_len=4096,
    rope_theta=500000.0,
    norm_eps=1e-5,
    loss_chunk_size=256,
  ),
  # bert-base-uncased (109,482,240 parameters without the MLM head): post-norm, embedding LayerNorm, pooler.
  "bert_base": dict(
    family="encoder",
    vocab_size=30522,
    embed_dim=768,
    num_layers=12,
    num_heads=12,
    mlp_dim=3072,
    max_len=512,
    position="learned",
    norm="layernorm",
    norm_position="post",
    embed_norm=True,
    mlp="gelu_exact",
    use_bias=True,
    norm_eps=1e-12,
    type_vocab_size=2,
    pooler=True,
  ),
  # t5-base (222,903,552 parameters, embeddings tied): relative position bias, unscaled attention, ReLU MLP.
  "t5_base": dict(
    family="encoder_decoder",
    vocab_size=32128,
    embed_dim=768,
    num_layers=12,
    num_heads=12,
    mlp_dim=3072,
    max_len=512,
    position="relative",
    norm="rmsnorm",
    mlp="relu",
    norm_eps=1e-6,
    scale_attention=False,
    tied_logits_scale=True,
    init_std=0.05,
  ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and switches of a transformer. GPT-2 and Llama are two settings of it.

  `num_kv_heads` and `head_dim` given as 0 are resolved on construction (to `num_heads` and
  `embed_dim // num_heads`), so the fields always hold the sizes the model uses.
  """

  family: str = "decoder"  # "decoder" (GPT-2, Llama), "encoder" (BERT) or "encoder_decoder" (T5); the task builds it
  vocab_size: int = 4096  # rows of the embedding table; >= the tokenizer's vocabulary
  embed_dim: int = 256  # D, the model width
  num_layers: int = 4  # L, transformer blocks (stacked with nn.scan); encoder_decoder: the encoder's
  num_decoder_layers: int = 0  # encoder_decoder: blocks of the decoder; 0 = num_layers
  num_heads: int = 4  # N, query heads
  num_kv_heads: int = 0  # K, key/value heads; 0 = num_heads (multi-head); < N = grouped-query
  head_dim: int = 0  # H; 0 = embed_dim // num_heads
  mlp_dim: int = 1024  # F, hidden width of the MLP
  max_len: int = 1024  # longest sequence (size of the learned position table)
  position_offset: int = 0  # encoders: learned position p reads row p + offset (RoBERTa: padding_idx + 1 = 2)
  position: str = "rotary"  # "learned" (GPT-2, BERT), "rotary" (Llama) or "relative" (T5 bias; not the decoder family)
  rope_theta: float = 10000.0  # rotary base frequency
  # Rotary frequency scaling for long contexts: "none", or "llama3" (Llama 3.1+: frequencies with wavelengths
  # beyond original_max_len / low_freq_factor divided by factor, those below original_max_len / high_freq_factor
  # kept, and a smooth blend between; Hugging Face `rope_type: llama3`).
  rope_scaling_type: str = "none"
  rope_scaling_factor: float = 8.0  # llama3: how much longer than rope_original_max_len the context becomes
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are fully scaled
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
  rope_original_max_len: int = 8192  # llama3: the context length the model was pretrained at
  relative_buckets: int = 32  # position="relative": buckets of T5's relative position bias (shared across layers)
  relative_max_distance: int = 128  # position="relative": distances from here on share the last bucket
  norm: str = "rmsnorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
  norm_position: str = "pre"  # "pre": x + f(norm(x)), then a final norm; "post" (BERT): norm(x + f(x)), no final norm
  norm_eps: float = 1e-6  # epsilon of the norms
  embed_norm: bool = False  # a norm on the summed embeddings (BERT)
  type_vocab_size: int = 0  # encoder: token-type (sentence A/B) embeddings, BERT: 2; 0 = none
  pooler: bool = False  # encoder: dense + tanh on the first token (BERT's pooler; classification.pooling="pooler")
  # "gelu" (tanh approximation, GPT-2), "gelu_exact" (BERT), "relu" (T5), "swiglu" (Llama) or "geglu"
  # (gated tanh GELU, T5 v1.1)
  mlp: str = "swiglu"
  scale_attention: bool = True  # softmax(q k / sqrt(H)); False: T5's unscaled attention (the scale is in the init)
  tied_logits_scale: bool = False  # tied output head reads x * D**-0.5 (T5)
  use_bias: bool = False  # biases in dense layers and LayerNorm (GPT-2: True)
  tie_embeddings: bool = True  # output projection = transposed input embedding
  # The token framing an encoder_decoder was trained with (Hugging Face T5: 0 and True). jaxlm's own start the
  # decoder with the tokenizer's bos (-1) and feed the encoder `[bos] prompt`; T5 starts it with its
  # decoder_start_token_id (pad) and feeds the encoder `prompt </s>` (its tokenizer has no bos).
  decoder_start_id: int = -1  # encoder_decoder: the decoder's first token; -1 = the tokenizer's bos
  encoder_eos: bool = False  # encoder_decoder: prompts reach the encoder with eos at their end
  dropout_rate: float = 0.0  # dropout on embeddings and residual branches
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"  # storage dtype of parameters (master weights)
  remat: str = "none"  # rematerialise each block: "none", "full" or "save_dots"
  scan_unroll: int = 1  # blocks per iteration of the layer scan (nn.scan's unroll); >= num_layers: no loop
  # auto/xla/cudnn: jax.nn.dot_product_attention; blocks: causal self-attention in query blocks that skip the keys
  # after them (layers.causal_block_attention; "auto" does this on CPU); pallas: flash kernel with segment ids
  attention: str = "auto"
  quantize: str = ""  # weight-only quantized Einsum kernels (models/quantize.py), e.g. "int8", "int4-g64"; '' = none
  fake_quantize: str = ""  # quantization-aware training: kernels through this scheme's fake quant (STE); '' = none
  loss_chunk_size: int = 0  # positions per chunk of the LM loss (never all [B, T, V] logits at once); 0 = off
  init_std: float = 0.02  # stddev of the normal initialiser of weights
  lora_rank: int = 0  # rank r of LoRA adapters (models/lora.py) on the targeted Einsum kernels; 0 = none
  lora_alpha: float = 16.0  # LoRA scale numerator: the update is (alpha / r) * A @ B
  lora_targets: str = "attention/(query|value)"  # regex searched in module paths, e.g. "layers/mlp/up"

  def __post_init__(self):
    for key in ("vocab_size", "embed_dim", "num_layers", "num_heads", "mlp_dim", "max_len"):
      check(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}.")
    check(self.position in POSITIONS, "model.position", f"{self.position!r} is not one of {POSITIONS}.")
    check(self.family in FAMILIES, "model.family", f"{self.family!r} is not one of {FAMILIES}.")
    check(self.norm in NORMS, "model.norm", f"{self.norm!r} is not one of {NORMS}.")
    check(
      self.norm_position in NORM_POSITIONS,
      "model.norm_position",
      f"{self.norm_position!r} is not one of {NORM_POSITIONS}.",
    )
    check(self.num_decoder_layers >= 0, "model.num_decoder_layers", "must be >= 0 (0 means num_layers).")
    check(self.type_vocab_size >= 0, "model.type_vocab_size", "must be >= 0 (0 = no token types).")
    check(
      self.position != "relative" or self.family != "decoder",
      "model.position",
      "'relative' (T5's bias) is for the encoder and encoder_decoder families; use 'rotary' or 'learned'.",
    )
    check(self.position != "relative" or 2 <= self.relative_buckets, "model.relative_buckets", "must be >= 2.")
    check(self.position_offset >= 0, "model.position_offset", "must be >= 0.")
    check(
      self.position == "learned" or not self.position_offset,
      "model.position_offset",
      f"shifts learned positions only; model.position={self.position!r}.",
    )
    for key in ("norm_position", "embed_norm", "type_vocab_size", "pooler", "position_offset"):
      default = {field.name: field.default for field in dataclasses.fields(self)}[key]
      check(
        self.family != "decoder" or getattr(self, key) == default,
        f"model.{key}",
        f"is an encoder option; the decoder family keeps its default {default!r}.",
      )
    for key in ("decoder_start_id", "encoder_eos"):
      default = {field.name: field.default for field in dataclasses.fields(self)}[key]
      check(
        self.family == "encoder_decoder" or getattr(self, key) == default,
        f"model.{key}",
        f"is an encoder_decoder option; the {self.family} family keeps its default {default!r}.",
      )
    check(
      -1 <= self.decoder_start_id < self.vocab_size,
      "model.decoder_start_id",
      f"must be a token id below model.vocab_size={self.vocab_size}, or -1 (the tokenizer's bos).",
    )
    check(self.mlp in MLPS, "model.mlp", f"{self.mlp!r} is not one of {MLPS}.")
    check(self.remat in REMAT_POLICIES, "model.remat", f"{self.remat!r} is not one of {REMAT_POLICIES}.")
    check(
      self.scan_unroll >= 1, "model.scan_unroll", f"must be >= 1 (1 = a loop over the layers), got {self.scan_unroll}."
    )
    check(
      self.attention in ATTENTION_IMPLEMENTATIONS,
      "model.attention",
      f"{self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}.",
    )
    for key in ("dtype", "param_dtype"):
      check(getattr(self, key) in DTYPES, f"model.{key}", f"{getattr(self, key)!r} is not one of {tuple(DTYPES)}.")
    check(0.0 <= self.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {self.dropout_rate}.")
    check(
      self.loss_chunk_size >= 0,
      "model.loss_chunk_size",
      f"must be >= 0 (0 = the loss reads all logits at once), got {self.loss_chunk_size}.",
    )
    check(
      self.loss_chunk_size == 0 or self.family == "decoder",
      "model.loss_chunk_size",
      "the chunked loss projects with the decoder's output layer; set 0 for the encoder families.",
    )
    check(
      self.attention != "pallas" or self.family == "decoder",
      "model.attention",
      "'pallas' (causal flash attention over packed rows) is for the decoder family; use 'auto'.",
    )
    for key in ("quantize", "fake_quantize"):
      if getattr(self, key):
        quantize.scheme(getattr(self, key), f"model.{key}")
    check(
      not (self.quantize and self.fake_quantize),
      "model.fake_quantize",
      "a quantized model is not trained; fake quantization is for the float model it is converted from.",
    )
    check(
      not (self.quantize and self.lora_rank),
      "model.quantize",
      "quantized kernels take no LoRA adapters; merge them first (jaxlm.models.lora.merge_lora, lora_rank=0).",
    )
    check(self.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0 = no adapters), got {self.lora_rank}.")
    check(self.num_kv_heads >= 0, "model.num_kv_heads", "must be >= 0 (0 means num_heads).")
    check(self.head_dim >= 0, "model.head_dim", "must be >= 0 (0 means embed_dim // num_heads).")
    if not self.head_dim:
      check(
        self.embed_dim % self.num_heads == 0,
        "model.num_heads",
        f"{self.num_heads} heads do not divide embed_dim={self.embed_dim}; "
        "change model.num_heads or model.embed_dim, or set model.head_dim explicitly.",
      )
      object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
    if not self.num_kv_heads:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    check(
      self.num_heads % self.num_kv_heads == 0,
      "model.num_kv_heads",
      f"{self.num_kv_heads} key/value heads do not divide num_heads={self.num_heads}.",
    )
    if self.position == "rotary":
      check(self.head_dim % 2 == 0, "model.head_dim", f"rotary positions need an even head_dim, got {self.head_dim}.")
    check(
      self.rope_scaling_type in ROPE_SCALING_TYPES,
      "model.rope_scaling_type",
      f"{self.rope_scaling_type!r} is not one of {ROPE_SCALING_TYPES}.",
    )
    if self.rope_scaling_type == "llama3":
      check(
        self.position == "rotary",
        "model.rope_scaling_type",
        f"'llama3' scales rotary positions; it needs model.position='rotary', got {self.position!r}.",
      )
      check(
        self.rope_scaling_factor >= 1, "model.rope_scaling_factor", f"must be >= 1, got {self.rope_scaling_factor}."
      )
      check(
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
        "model.rope_high_freq_factor",
        f"need 0 < model.rope_low_freq_factor ({self.rope_low_freq_factor}) < model.rope_high_freq_factor "
        f"({self.rope_high_freq_factor}).",
      )
      check(
        self.rope_original_max_len > 0,
        "model.rope_original_max_len",
        f"must be positive, got {self.rope_original_max_len}.",
      )

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
  def decoder_layers(self) -> int:
    """Blocks of the decoder stack (0 for an encoder)."""
    if self.family == "encoder":
      return 0
    if self.family == "decoder":
      return self.num_layers
    return self.num_decoder_layers or self.num_layers

  @property
  def encoder_layers(self) -> int:
    """Blocks of the encoder stack (0 for a decoder)."""
    return 0 if self.family == "decoder" else self.num_layers

  @property
  def cross_attention_layers(self) -> int:
    """Blocks with a cross-attention sub-block (the decoder of an encoder-decoder)."""
    return self.decoder_layers if self.family == "encoder_decoder" else 0

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]
