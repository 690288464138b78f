"""Hugging Face checkpoints in and out (config.json + safetensors + tokenizer): GPT-2 and Llama decoders, BERT,
RoBERTa and MiniLM encoders (model_type bert / roberta), T5 encoder-decoders (v1.0 and v1.1 / Flan-T5).

    model, params, tokenizer, model_config = hf.load_pretrained("path/to/hf_dir", mesh=mesh)
    hf.save_pretrained("path/to/out", model_config, params, tokenizer)   # transformers.AutoModel loads it

A family is two things: a config translator (Hugging Face config.json <-> `ModelConfig` fields, refusing every
key it does not understand rather than approximating it) and a table of `Tensor`s (which Hugging Face tensor holds
which jaxlm parameter(s), and how its layout differs). Adding a family is adding one `Family` to `FAMILIES`.

Import reads the checkpoint tensor by tensor (safetensors files are memory-mapped; only the bytes of the tensor
at hand are read) and places each parameter straight into its sharding on the mesh with
`jax.make_array_from_callback`, each device getting only its slice: the host never holds a second full copy.

Layouts: jaxlm stacks the L blocks on a leading `layers` axis and keeps heads as their own axes
(query kernel [D, N, H], output kernel [N, H, D]); `torch.nn.Linear` (Llama) stores [out, in] and GPT-2's
`Conv1D` [in, out] with the query, key and value fused into one `c_attn` tensor.

Heads: an encoder always carries BERT's MLM head; a checkpoint of the bare `BertModel` lacks it, so it stays
freshly initialised (logged) and export writes the `*ForMaskedLM` layout. BERT's next-sentence head is skipped
(logged). Tied copies that some checkpoints store (T5's `encoder.embed_tokens`, BERT's MLM decoder) are checked
equal to their source and not written back.

Framing: a T5 comes with the token framing it was trained with, which jaxlm's tasks and generation then use: its
encoder reads `text </s>` (`model.encoder_eos`; its tokenizer has no bos, so nothing comes before the text) and its
decoder starts with `decoder_start_token_id` (`model.decoder_start_id`, pad for T5).
"""

import dataclasses
import functools
import json
import os
import re
import struct
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from absl import logging

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.models import params as params_lib
from jaxlm.models.config import DTYPES, ModelConfig
from jaxlm.models.transformer import backbone

SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
# config.json keys that never change the forward pass of any family: bookkeeping, token ids (the tokenizer has
# them), generation defaults, training-time dropout and initialisation.
IGNORED_KEYS = (
  "architectures",
  "model_type",
  "transformers_version",
  "dtype",
  "torch_dtype",
  "_name_or_path",
  "use_cache",
  "bos_token_id",
  "eos_token_id",
  "pad_token_id",
  "initializer_range",
  "output_attentions",
  "output_hidden_states",
  "return_dict",
  "task_specific_params",
  "id2label",
  "label2id",
)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor and the jaxlm parameter(s) it holds.

  `hf` is its name ('{layer}' marks one tensor per block, stacked on the jaxlm parameter's leading axis);
  `jaxlm` names the parameters (several when Hugging Face fuses them: split evenly along its output axis);
  `layout` is "copy" (same shape), "bias" (flattened output axes), "linear" ([out, in]) or "conv1d" ([in, out]);
  `inputs` is how many leading axes of the jaxlm kernel are input features (the output kernel [N, H, D]: 2);
  `optional`: a head that checkpoints of the bare base model lack (BERT's MLM head in a `BertModel`): when absent
  its parameters keep their fresh initialisation (logged), and export writes it.
  """

  hf: str
  jaxlm: tuple[str, ...]
  layout: str = "copy"
  inputs: int = 1
  optional: bool = False

  def to_jaxlm(self, array: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
    """One (per-layer) Hugging Face array -> the jaxlm arrays of `shapes` (per layer)."""
    if self.layout == "copy":
      return [array.reshape(shapes[0])]
    if self.layout == "linear":
      array = array.T
    parts = np.split(array, len(shapes), axis=-1)
    return [np.ascontiguousarray(part).reshape(shape) for part, shape in zip(parts, shapes)]

  def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
    """The jaxlm arrays (per layer) -> one Hugging Face array."""
    if self.layout == "copy":
      return arrays[0]
    if self.layout == "bias":
      return np.concatenate([a.reshape(-1) for a in arrays])
    fused = np.concatenate([a.reshape(int(np.prod(a.shape[: self.inputs])), -1) for a in arrays], axis=-1)
    return np.ascontiguousarray(fused.T if self.layout == "linear" else fused)


class _Keys:
  """The keys of a Hugging Face config.json, each to be read, checked or ignored exactly once: whatever is left
  at `finish` is a key this family does not understand, and an error. `tensor_names` are the checkpoint's (None
  when only the config is known): where a config does not say whether an optional part exists (BERT's pooler)."""

  def __init__(self, values: dict, family: str, tensor_names: set | None = None):
    self.values, self.family, self.used, self.tensor_names = values, family, set(IGNORED_KEYS), tensor_names

  def get(self, key: str, default=None):
    self.used.add(key)
    value = self.values.get(key)
    return default if value is None else value

  def require(self, key: str, allowed: tuple, default=None):
    """The value of `key`, which must be one of `allowed` (what jaxlm implements)."""
    value = self.get(key, default)
    if value not in allowed:
      raise ConfigError(
        f"config.json {key}={value!r}: jaxlm's {self.family} implements only {allowed}; this "
        "checkpoint cannot be imported exactly."
      )
    return value

  def ignore(self, *keys: str):
    self.used.update(keys)

  def finish(self):
    unknown = sorted(set(self.values) - self.used)
    if unknown:
      raise ConfigError(
        f"config.json {unknown[0]}={self.values[unknown[0]]!r}: a key jaxlm's {self.family} import "
        f"does not know (all unknown: {unknown}); it may change the model, so nothing is imported. "
        "If it does not change the forward pass, add it to the ignored keys in jaxlm/interop/hf.py."
      )


# ----------------------------------------------------------------------------------------------------- GPT-2


def _gpt2_config(keys: _Keys) -> dict:
  embed_dim = keys.get("n_embd")
  keys.require("activation_function", ("gelu_new", "gelu_pytorch_tanh"))  # both are tanh-approximated GELU
  keys.require("scale_attn_weights", (True,), True)
  keys.require("scale_attn_by_inverse_layer_idx", (False,), False)
  keys.require("add_cross_attention", (False,), False)
  keys.get("reorder_and_upcast_attn")  # float32 attention scores: what jaxlm computes anyway
  if keys.get("n_ctx", keys.values["n_positions"]) != keys.values["n_positions"]:
    raise ConfigError("config.json n_ctx differs from n_positions; jaxlm has one max_len.")
  keys.ignore(
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
  )
  return dict(
    vocab_size=keys.get("vocab_size"),
    embed_dim=embed_dim,
    num_layers=keys.get("n_layer"),
    num_heads=keys.get("n_head"),
    mlp_dim=keys.get("n_inner", 4 * embed_dim),
    max_len=keys.get("n_positions"),
    position="learned",
    norm="layernorm",
    mlp="gelu",
    use_bias=True,
    norm_eps=keys.get("layer_norm_epsilon"),
    tie_embeddings=keys.get("tie_word_embeddings", True),
  )


def _gpt2_hf_config(c: ModelConfig) -> dict:
  _check_exportable(
    c,
    "gpt2",
    position="learned",
    norm="layernorm",
    mlp="gelu",
    use_bias=True,
    rope_scaling_type="none",
    num_kv_heads=c.num_heads,
    head_dim=c.embed_dim // c.num_heads,
  )
  return dict(
    architectures=["GPT2LMHeadModel"],
    model_type="gpt2",
    vocab_size=c.vocab_size,
    n_embd=c.embed_dim,
    n_layer=c.num_layers,
    n_head=c.num_heads,
    n_inner=c.mlp_dim,
    n_positions=c.max_len,
    activation_function="gelu_new",
    layer_norm_epsilon=c.norm_eps,
    tie_word_embeddings=c.tie_embeddings,
    attn_pdrop=0.0,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
  )


def _gpt2_tensors(c: ModelConfig) -> list[Tensor]:
  block = "transformer.h.{layer}."
  tensors = [
    Tensor("transformer.wte.weight", ("token_embed/embedding",)),
    Tensor("transformer.wpe.weight", ("position_embed/embedding",)),
    Tensor("transformer.ln_f.weight", ("final_norm/scale",)),
    Tensor("transformer.ln_f.bias", ("final_norm/bias",)),
  ]
  for hf, jaxlm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
    tensors += [
      Tensor(f"{block}{hf}.weight", (f"layers/{jaxlm}/scale",)),
      Tensor(f"{block}{hf}.bias", (f"layers/{jaxlm}/bias",)),
    ]
  qkv = tuple(f"layers/attention/{name}" for name in ("query", "key", "value"))
  tensors += [
    Tensor(f"{block}attn.c_attn.weight", tuple(f"{name}/kernel" for name in qkv), "conv1d"),
    Tensor(f"{block}attn.c_attn.bias", tuple(f"{name}/bias" for name in qkv), "bias"),
    Tensor(f"{block}attn.c_proj.weight", ("layers/attention/out/kernel",), "conv1d", inputs=2),
    Tensor(f"{block}attn.c_proj.bias", ("layers/attention/out/bias",), "bias"),
  ]
  for hf, jaxlm in (("c_fc", "up"), ("c_proj", "down")):
    tensors += [
      Tensor(f"{block}mlp.{hf}.weight", (f"layers/mlp/{jaxlm}/kernel",), "conv1d"),
      Tensor(f"{block}mlp.{hf}.bias", (f"layers/mlp/{jaxlm}/bias",), "bias"),
    ]
  if not c.tie_embeddings:
    tensors.append(Tensor("lm_head.weight", ("lm_head/kernel",), "linear"))
  return tensors


# ----------------------------------------------------------------------------------------------------- Llama


def _llama_config(keys: _Keys) -> dict:
  keys.require("hidden_act", ("silu",))
  keys.require("attention_bias", (False,), False)
  keys.require("mlp_bias", (False,), False)
  keys.get("pretraining_tp")  # only splits the same matmuls in transformers
  keys.ignore("attention_dropout")
  # RoPE: transformers >= 5 writes `rope_parameters` (theta inside), earlier versions `rope_theta` + `rope_scaling`.
  rope_key = "rope_parameters" if keys.values.get("rope_parameters") else "rope_scaling"
  rope = dict(keys.get(rope_key, {}))
  keys.ignore("rope_parameters", "rope_scaling")
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  fields = dict(rope_theta=float(rope.pop("rope_theta", keys.get("rope_theta", 10000.0))))
  if rope.pop("partial_rotary_factor", keys.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConfigError("config.json partial_rotary_factor: jaxlm rotates the whole head dimension (1.0).")
  if rope_type == "llama3":
    fields.update(
      rope_scaling_type="llama3",
      rope_scaling_factor=float(rope.pop("factor")),
      rope_low_freq_factor=float(rope.pop("low_freq_factor")),
      rope_high_freq_factor=float(rope.pop("high_freq_factor")),
      rope_original_max_len=int(rope.pop("original_max_position_embeddings")),
    )
  elif rope_type != "default":
    raise ConfigError(
      f"config.json {rope_key}.rope_type={rope_type!r}: jaxlm implements 'default' and 'llama3' "
      "RoPE only; this checkpoint cannot be imported exactly."
    )
  if rope:
    raise ConfigError(f"config.json {rope_key}: keys {sorted(rope)} are not understood for rope_type={rope_type!r}.")
  heads = keys.get("num_attention_heads")
  return dict(
    vocab_size=keys.get("vocab_size"),
    embed_dim=keys.get("hidden_size"),
    num_layers=keys.get("num_hidden_layers"),
    num_heads=heads,
    num_kv_heads=keys.get("num_key_value_heads", heads),
    head_dim=keys.get("head_dim", 0),
    mlp_dim=keys.get("intermediate_size"),
    max_len=keys.get("max_position_embeddings"),
    position="rotary",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    norm_eps=keys.get("rms_norm_eps"),
    tie_embeddings=keys.get("tie_word_embeddings", False),
    **fields,
  )


def _llama_hf_config(c: ModelConfig) -> dict:
  _check_exportable(c, "llama", position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False)
  rope = dict(rope_type="default")
  if c.rope_scaling_type == "llama3":
    rope = dict(
      rope_type="llama3",
      factor=c.rope_scaling_factor,
      low_freq_factor=c.rope_low_freq_factor,
      high_freq_factor=c.rope_high_freq_factor,
      original_max_position_embeddings=c.rope_original_max_len,
    )
  # rope_theta + rope_scaling: what every transformers version reads (>= 5 converts them to rope_parameters).
  return dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=c.vocab_size,
    hidden_size=c.embed_dim,
    num_hidden_layers=c.num_layers,
    num_attention_heads=c.num_heads,
    num_key_value_heads=c.num_kv_heads,
    head_dim=c.head_dim,
    intermediate_size=c.mlp_dim,
    max_position_embeddings=c.max_len,
    hidden_act="silu",
    rms_norm_eps=c.norm_eps,
    tie_word_embeddings=c.tie_embeddings,
    rope_theta=c.rope_theta,
    rope_scaling=None if c.rope_scaling_type == "none" else rope,
    attention_bias=False,
    mlp_bias=False,
  )


def _llama_tensors(c: ModelConfig) -> list[Tensor]:
  block = "model.layers.{layer}."
  tensors = [
    Tensor("model.embed_tokens.weight", ("token_embed/embedding",)),
    Tensor("model.norm.weight", ("final_norm/scale",)),
    Tensor(f"{block}input_layernorm.weight", ("layers/attention_norm/scale",)),
    Tensor(f"{block}post_attention_layernorm.weight", ("layers/mlp_norm/scale",)),
  ]
  for hf, jaxlm in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    tensors.append(Tensor(f"{block}self_attn.{hf}.weight", (f"layers/attention/{jaxlm}/kernel",), "linear"))
  tensors.append(Tensor(f"{block}self_attn.o_proj.weight", ("layers/attention/out/kernel",), "linear", inputs=2))
  for name in ("gate", "up", "down"):
    tensors.append(Tensor(f"{block}mlp.{name}_proj.weight", (f"layers/mlp/{name}/kernel",), "linear"))
  if not c.tie_embeddings:
    tensors.append(Tensor("lm_head.weight", ("lm_head/kernel",), "linear"))
  return tensors


# ----------------------------------------------------------------------------------- BERT, RoBERTa, MiniLM

BERT_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
# The MLM head's three tensors (transform dense, transform LayerNorm, output bias) in each family's names.
BERT_HEAD = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias")
ROBERTA_HEAD = ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias")


def _bert_config(keys: _Keys, position_offset: int = 0) -> dict:
  """BERT (and MiniLM, a BERT config); RoBERTa's learned positions start at row `position_offset`. The pooler
  is part of the model when the checkpoint holds one (`BertModel`, `BertForPreTraining`; not `BertForMaskedLM`)."""
  activation = keys.require("hidden_act", tuple(BERT_ACTIVATIONS))
  keys.require("position_embedding_type", ("absolute",), "absolute")
  keys.require("is_decoder", (False,), False)
  keys.require("add_cross_attention", (False,), False)
  keys.require("tie_word_embeddings", (True,), True)  # the MLM output is the transposed word embedding
  keys.ignore(
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "chunk_size_feed_forward",
    "gradient_checkpointing",
  )
  names = keys.tensor_names
  pooler = names is None or any(re.search(r"(^|\.)pooler\.dense\.weight$", name) for name in names)
  return dict(
    family="encoder",
    vocab_size=keys.get("vocab_size"),
    embed_dim=keys.get("hidden_size"),
    num_layers=keys.get("num_hidden_layers"),
    num_heads=keys.get("num_attention_heads"),
    mlp_dim=keys.get("intermediate_size"),
    max_len=keys.get("max_position_embeddings") - position_offset,
    position_offset=position_offset,
    position="learned",
    norm="layernorm",
    norm_position="post",
    embed_norm=True,
    mlp=BERT_ACTIVATIONS[activation],
    use_bias=True,
    norm_eps=keys.get("layer_norm_eps"),
    type_vocab_size=keys.get("type_vocab_size", 2),
    pooler=pooler,
    tie_embeddings=True,
  )


def _roberta_config(keys: _Keys) -> dict:
  """RoBERTa numbers positions from padding_idx + 1 (= pad_token_id + 1): `model.position_offset`."""
  return _bert_config(keys, position_offset=keys.get("pad_token_id") + 1)


def _bert_hf_config(c: ModelConfig, model_type: str = "bert") -> dict:
  _check_exportable(
    c,
    model_type,
    family="encoder",
    position="learned",
    norm="layernorm",
    norm_position="post",
    embed_norm=True,
    use_bias=True,
    tie_embeddings=True,
    scale_attention=True,
    num_kv_heads=c.num_heads,
    head_dim=c.embed_dim // c.num_heads,
  )
  activations = {value: key for key, value in BERT_ACTIVATIONS.items() if key != "gelu_pytorch_tanh"}
  if c.mlp not in activations or not c.type_vocab_size:
    raise ConfigError(
      f"model.mlp={c.mlp!r}, model.type_vocab_size={c.type_vocab_size}: a Hugging Face "
      f"{model_type} model needs mlp in {tuple(activations)} and type_vocab_size >= 1."
    )
  config = dict(
    architectures=[f"{'Roberta' if model_type == 'roberta' else 'Bert'}ForMaskedLM"],
    model_type=model_type,
    vocab_size=c.vocab_size,
    hidden_size=c.embed_dim,
    num_hidden_layers=c.num_layers,
    num_attention_heads=c.num_heads,
    intermediate_size=c.mlp_dim,
    hidden_act=activations[c.mlp],
    max_position_embeddings=c.max_len + c.position_offset,
    type_vocab_size=c.type_vocab_size,
    layer_norm_eps=c.norm_eps,
    position_embedding_type="absolute",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    tie_word_embeddings=True,
  )
  if model_type == "roberta":
    config.update(pad_token_id=c.position_offset - 1)  # RoBERTa's padding_idx: where its positions start
  elif c.position_offset:
    raise ConfigError(f"model.position_offset={c.position_offset}: BERT numbers positions from 0.")
  return config


def _dense(hf: str, jaxlm: str, inputs: int = 1, bias: bool = True, optional: bool = False) -> list[Tensor]:
  """A torch.nn.Linear `hf` ([out, in] weight, bias) as the jaxlm Einsum `jaxlm` (kernel, bias)."""
  tensors = [Tensor(f"{hf}.weight", (f"{jaxlm}/kernel",), "linear", inputs=inputs, optional=optional)]
  if bias:
    tensors.append(Tensor(f"{hf}.bias", (f"{jaxlm}/bias",), "bias", optional=optional))
  return tensors


def _layer_norm(hf: str, jaxlm: str, bias: bool = True, optional: bool = False) -> list[Tensor]:
  tensors = [Tensor(f"{hf}.weight", (f"{jaxlm}/scale",), optional=optional)]
  if bias:
    tensors.append(Tensor(f"{hf}.bias", (f"{jaxlm}/bias",), optional=optional))
  return tensors


def _bert_tensors(c: ModelConfig, base: str = "bert.", head: tuple = BERT_HEAD) -> list[Tensor]:
  embeddings, block, layers = f"{base}embeddings.", f"{base}encoder.layer.{{layer}}.", "encoder/layers/"
  tensors = [
    Tensor(f"{embeddings}word_embeddings.weight", ("token_embed/embedding",)),
    Tensor(f"{embeddings}position_embeddings.weight", ("position_embed/embedding",)),
    *_layer_norm(f"{embeddings}LayerNorm", "embed_norm"),
  ]
  if c.type_vocab_size:
    tensors.append(Tensor(f"{embeddings}token_type_embeddings.weight", ("type_embed/embedding",)))
  for hf, jaxlm in (
    ("attention.self.query", "attention/query"),
    ("attention.self.key", "attention/key"),
    ("attention.self.value", "attention/value"),
    ("attention.output.dense", "attention/out"),
    ("intermediate.dense", "mlp/up"),
    ("output.dense", "mlp/down"),
  ):
    tensors += _dense(block + hf, layers + jaxlm, inputs=2 if jaxlm == "attention/out" else 1)
  tensors += _layer_norm(f"{block}attention.output.LayerNorm", f"{layers}attention_norm")
  tensors += _layer_norm(f"{block}output.LayerNorm", f"{layers}mlp_norm")
  if c.pooler:
    tensors += _dense(f"{base}pooler.dense", "pooler")
  transform, norm, bias = head
  return tensors + [
    *_dense(transform, "mlm_transform", optional=True),
    *_layer_norm(norm, "mlm_norm", optional=True),
    Tensor(bias, ("mlm_bias",), optional=True),
  ]


def _roberta_tensors(c: ModelConfig) -> list[Tensor]:
  return _bert_tensors(c, "roberta.", ROBERTA_HEAD)


# ------------------------------------------------------------------------------------------------------- T5

T5_MLPS = {"relu": "relu", "gated-gelu": "geglu"}  # feed_forward_proj -> model.mlp (v1.0, v1.1 / Flan-T5)
T5_MAX_LEN = 512  # T5 has no position table; max_len only bounds data.seq_len (T5 was pretrained at 512)


def _t5_config(keys: _Keys) -> dict:
  mlp = T5_MLPS[keys.require("feed_forward_proj", tuple(T5_MLPS), "relu")]
  keys.ignore("dense_act_fn", "is_gated_act")  # derived from feed_forward_proj by transformers
  keys.require("is_encoder_decoder", (True,), True)
  keys.require("is_decoder", (False,), False)
  keys.ignore("dropout_rate", "classifier_dropout", "initializer_factor")
  # T5 starts its decoder with decoder_start_token_id (pad, 0); configs transformers >= 5 writes in code lack it,
  # and T5's convention is its pad token (what transformers' own error message asks for).
  start = keys.get("decoder_start_token_id", keys.values.get("pad_token_id"))
  if start is None:
    raise ConfigError("config.json names no decoder_start_token_id (nor pad_token_id); T5 starts its decoder with 0.")
  tie = keys.get("tie_word_embeddings", True)
  # transformers >= 5 writes scale_decoder_outputs (and always ties); before, untied (v1.1) meant unscaled.
  scale = keys.get("scale_decoder_outputs", tie)
  if scale and not tie:
    raise ConfigError(
      "config.json scale_decoder_outputs=True with tie_word_embeddings=False: jaxlm scales only "
      "the tied output head (model.tied_logits_scale)."
    )
  layers = keys.get("num_layers")
  return dict(
    family="encoder_decoder",
    vocab_size=keys.get("vocab_size"),
    embed_dim=keys.get("d_model"),
    num_layers=layers,
    num_decoder_layers=keys.get("num_decoder_layers", layers),
    num_heads=keys.get("num_heads"),
    head_dim=keys.get("d_kv"),
    mlp_dim=keys.get("d_ff"),
    max_len=T5_MAX_LEN,
    position="relative",
    relative_buckets=keys.get("relative_attention_num_buckets"),
    relative_max_distance=keys.get("relative_attention_max_distance"),
    norm="rmsnorm",
    mlp=mlp,
    use_bias=False,
    norm_eps=keys.get("layer_norm_epsilon"),
    scale_attention=False,
    tied_logits_scale=bool(scale),
    tie_embeddings=tie,
    decoder_start_id=start,
    encoder_eos=True,  # T5's tokenizer ends every input with </s>
  )


def _t5_hf_config(c: ModelConfig) -> dict:
  _check_exportable(
    c,
    "t5",
    family="encoder_decoder",
    position="relative",
    norm="rmsnorm",
    norm_position="pre",
    use_bias=False,
    scale_attention=False,
    num_kv_heads=c.num_heads,
  )
  projections = {value: key for key, value in T5_MLPS.items()}
  if c.mlp not in projections:
    raise ConfigError(f"model.mlp={c.mlp!r}: a Hugging Face t5 model needs one of {tuple(projections)}.")
  scale = c.tie_embeddings and c.tied_logits_scale
  return dict(
    architectures=["T5ForConditionalGeneration"],
    model_type="t5",
    vocab_size=c.vocab_size,
    d_model=c.embed_dim,
    d_kv=c.head_dim,
    d_ff=c.mlp_dim,
    num_layers=c.num_layers,
    num_decoder_layers=c.decoder_layers,
    num_heads=c.num_heads,
    relative_attention_num_buckets=c.relative_buckets,
    relative_attention_max_distance=c.relative_max_distance,
    layer_norm_epsilon=c.norm_eps,
    feed_forward_proj=projections[c.mlp],
    is_encoder_decoder=True,
    dropout_rate=0.0,
    tie_word_embeddings=c.tie_embeddings,
    scale_decoder_outputs=scale,
    **({"decoder_start_token_id": c.decoder_start_id} if c.decoder_start_id >= 0 else {}),
  )


def _t5_tensors(c: ModelConfig) -> list[Tensor]:
  mlp = {"wi_0": "gate", "wi_1": "up"} if c.mlp == "geglu" else {"wi": "up"}
  tensors = [Tensor("shared.weight", ("token_embed/embedding",))]
  for stack, sublayers in (
    ("encoder", ("SelfAttention", "DenseReluDense")),
    ("decoder", ("SelfAttention", "EncDecAttention", "DenseReluDense")),
  ):
    tensors += [
      Tensor(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (f"{stack}/relative_bias/embedding",)
      ),
      Tensor(f"{stack}.final_layer_norm.weight", (f"{stack}/final_norm/scale",)),
    ]
    for index, hf in enumerate(sublayers):
      block, jaxlm = (
        f"{stack}.block.{{layer}}.layer.{index}.",
        f"{stack}/layers/"
        + {"SelfAttention": "attention", "EncDecAttention": "cross_attention", "DenseReluDense": "mlp"}[hf],
      )
      tensors += _layer_norm(f"{block}layer_norm", f"{jaxlm}_norm", bias=False)
      if hf == "DenseReluDense":
        for name, target in {**mlp, "wo": "down"}.items():
          tensors += _dense(f"{block}{hf}.{name}", f"{jaxlm}/{target}", bias=False)
      else:
        for name, target in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
          tensors += _dense(f"{block}{hf}.{name}", f"{jaxlm}/{target}", inputs=2 if name == "o" else 1, bias=False)
  if not c.tie_embeddings:
    tensors.append(Tensor("lm_head.weight", ("lm_head/kernel",), "linear"))
  return tensors


# ---------------------------------------------------------------------------------------------- the families


@dataclasses.dataclass(frozen=True)
class Family:
  """How one Hugging Face model type maps onto a jaxlm model."""

  model_type: str  # config.json "model_type"
  to_model_config: Callable[[_Keys], dict]  # config.json keys -> ModelConfig fields (refusing what jaxlm lacks)
  to_hf_config: Callable[[ModelConfig], dict]  # ModelConfig -> config.json (refusing what the family lacks)
  tensors: Callable[[ModelConfig], list[Tensor]]  # the tensor table of a model of that config
  base_prefix: str  # the base model's prefix inside *ForCausalLM / *ForMaskedLM names; bare base models lack it
  buffers: str = r"$^"  # regex of checkpoint entries that are buffers, not parameters (skipped)
  # Entries that are copies of another tensor (tied weights some checkpoints store twice): checked equal, skipped.
  tied: tuple[tuple[str, str], ...] = ()
  dropped: str = r"$^"  # regex of heads jaxlm has no place for (BERT's next-sentence head): skipped, logged


FAMILIES = {
  "gpt2": Family(
    "gpt2", _gpt2_config, _gpt2_hf_config, _gpt2_tensors, "transformer.", buffers=r"\.attn\.(masked_)?bias$"
  ),
  "llama": Family(
    "llama", _llama_config, _llama_hf_config, _llama_tensors, "model.", buffers=r"\.rotary_emb\.inv_freq$"
  ),
  "bert": Family(
    "bert",
    _bert_config,
    _bert_hf_config,
    _bert_tensors,
    "bert.",
    buffers=r"\.position_ids$",
    tied=(
      ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
      ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    ),
    dropped=r"^cls\.seq_relationship\.",
  ),
  "roberta": Family(
    "roberta",
    _roberta_config,
    functools.partial(_bert_hf_config, model_type="roberta"),
    _roberta_tensors,
    "roberta.",
    buffers=r"\.position_ids$",
    tied=(
      ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
      ("lm_head.decoder.bias", "lm_head.bias"),
    ),
  ),
  "t5": Family(
    "t5",
    _t5_config,
    _t5_hf_config,
    _t5_tensors,
    "",
    buffers=r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",
    tied=(
      ("encoder.embed_tokens.weight", "shared.weight"),
      ("decoder.embed_tokens.weight", "shared.weight"),
      ("lm_head.weight", "shared.weight"),
    ),
  ),
}


def export_family(c: ModelConfig) -> Family:
  """The Hugging Face family a jaxlm model leaves as: decoders by position (learned: GPT-2, rotary: Llama),
  encoders as BERT (RoBERTa with a position offset), encoder-decoders as T5."""
  if c.family == "encoder":
    return FAMILIES["roberta" if c.position_offset else "bert"]
  if c.family == "encoder_decoder":
    return FAMILIES["t5"]
  return FAMILIES["gpt2" if c.position == "learned" else "llama"]


def _check_exportable(c: ModelConfig, hf_family: str, **required):
  for key, value in required.items():
    if getattr(c, key) != value:
      raise ConfigError(f"model.{key}={getattr(c, key)!r}: a Hugging Face {hf_family} model needs {value!r}.")
  if c.lora_rank:
    raise ConfigError(
      f"model.lora_rank: merge or drop the LoRA adapters before exporting (Hugging Face {hf_family} has no adapters)."
    )


def model_config_from_hf(
  hf_config: dict, dtype: str | None = None, tensor_names: set | None = None
) -> tuple[Family, ModelConfig]:
  """The family and `ModelConfig` of a Hugging Face config.json (a ConfigError names any key jaxlm cannot honour).
  `dtype` ('float32', 'bfloat16', ...) sets the parameter and compute dtype; None keeps jaxlm's float32.
  `tensor_names`: the checkpoint's, which decide optional parts the config does not name (BERT's pooler)."""
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ConfigError(f"config.json model_type={model_type!r}: jaxlm imports {sorted(FAMILIES)}.")
  family = FAMILIES[model_type]
  keys = _Keys(hf_config, model_type, tensor_names)
  fields = family.to_model_config(keys)
  keys.finish()
  if dtype is not None:
    if dtype not in DTYPES:
      raise ConfigError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}.")
    fields.update(dtype=dtype, param_dtype=dtype)
  return family, ModelConfig(**fields)


# ----------------------------------------------------------------------------------------------- reading


class _SafetensorsFiles:
  """The tensors of one or more .safetensors files, each read on demand through a memory map of its bytes
  (the format: an 8-byte header size, a JSON header of {name: dtype, shape, data_offsets}, the data)."""

  def __init__(self, paths: list[str]):
    self.entries = {}
    for path in paths:
      with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
      header.pop("__metadata__", None)
      for name, entry in header.items():
        self.entries[name] = (path, 8 + size, entry)

  def names(self) -> list[str]:
    return list(self.entries)

  def get(self, name: str) -> np.ndarray:
    path, data_start, entry = self.entries[name]
    begin, end = entry["data_offsets"]
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(end - begin) // dtype.itemsize)
    return np.array(mapped).reshape(entry["shape"])  # a copy of this one tensor; the map closes with `mapped`


class _TorchFile:
  """`pytorch_model.bin` (only through torch's `weights_only` loader, memory-mapped)."""

  def __init__(self, path: str):
    try:
      import torch
    except ImportError as error:
      raise CheckpointError(
        f"{path} is a PyTorch pickle and torch is not installed; convert it to safetensors, or install torch."
      ) from error
    self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

  def names(self) -> list[str]:
    return list(self.state)

  def get(self, name: str) -> np.ndarray:
    import torch

    tensor = self.state[name]
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits as ml_dtypes'
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def _open_weights(path: str):
  """The weights of a Hugging Face model directory: model.safetensors, a sharded safetensors index, or
  (with torch installed) pytorch_model.bin."""
  single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    return _SafetensorsFiles([single])
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return _SafetensorsFiles([os.path.join(path, name) for name in files])
  if os.path.exists(os.path.join(path, "pytorch_model.bin")):
    return _TorchFile(os.path.join(path, "pytorch_model.bin"))
  raise CheckpointError(f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin.")


def _hf_name(template: str, layer: int | None, family: Family, names: set) -> str:
  """The checkpoint's name for `template` at `layer`: as in *ForCausalLM, or without the base model's prefix."""
  name = template.format(layer=layer)
  if name not in names and name.startswith(family.base_prefix) and name[len(family.base_prefix) :] in names:
    return name[len(family.base_prefix) :]
  return name


def _stacked_layers(tensor: Tensor, abstract: dict) -> list:
  """The layers a tensor has one Hugging Face entry for ([None]: one entry): its jaxlm parameter's leading axis."""
  return list(range(abstract[tensor.jaxlm[0]].shape[0])) if "{layer}" in tensor.hf else [None]


def _present_tensors(
  family: Family, table: list[Tensor], abstract: dict, names: set, path: str
) -> tuple[list[Tensor], dict]:
  """(the table's tensors this checkpoint holds (optional heads may be absent), {tied copy: its source}), after
  checking that it holds nothing else but buffers and dropped heads."""

  def entries(tensor):
    return {_hf_name(tensor.hf, layer, family, names) for layer in _stacked_layers(tensor, abstract)}

  present = [t for t in table if not t.optional or entries(t) <= names]
  expected = set().union(*(entries(t) for t in present))
  missing = sorted(expected - names)
  copies = {
    _hf_name(copy, None, family, names): _hf_name(source, None, family, names)
    for copy, source in family.tied
    if copy not in expected
  }
  unused = sorted(
    name
    for name in names - expected - set(copies)
    if not re.search(family.buffers, name) and not re.search(family.dropped, name)
  )
  if missing or unused:
    raise CheckpointError(
      f"The weights in {path} do not fit its config.json as a {family.model_type} model: "
      f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, not understood "
      f"{unused[:8]}{'...' if len(unused) > 8 else ''}; nothing is imported."
    )
  dropped = sorted(name for name in names if re.search(family.dropped, name))
  if dropped:
    logging.warning("%s: skipping %s (a head jaxlm's %s has no place for).", path, dropped, family.model_type)
  absent = sorted(name for t in table if t not in present for name in t.jaxlm)
  if absent:
    logging.warning("%s has no %s; jaxlm's %s keeps them freshly initialised.", path, absent, family.model_type)
  return present, copies


def load_params(path: str, family: Family, model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None):
  """The parameters of the Hugging Face model directory `path`, each placed straight into its sharding on `mesh`
  (default: the first device), read tensor by tensor. Optional heads the checkpoint lacks are freshly initialised."""
  model = backbone(model_config)
  abstract_tree = params_lib.abstract_params(model, mesh)
  abstract = params_lib.flatten(abstract_tree)
  weights = _open_weights(path)
  names = set(weights.names())
  table = family.tensors(model_config)
  present, copies = _present_tensors(family, table, abstract, names, path)
  for copy, source in copies.items():
    if copy in names and not np.array_equal(weights.get(copy), weights.get(source)):
      raise CheckpointError(
        f"{path}: {copy} differs from {source}; jaxlm's {family.model_type} ties them "
        "(untied weights cannot be imported exactly)."
      )
  where = {name: (tensor, position) for tensor in table for position, name in enumerate(tensor.jaxlm)}
  if set(where) != set(abstract):
    raise CheckpointError(
      f"jaxlm/interop/hf.py: the {family.model_type} table does not cover the model's "
      f"parameters: {sorted(set(where) ^ set(abstract))}."
    )

  def place(name: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    tensor, position = where[name]
    stacked = "{layer}" in tensor.hf
    shapes = [abstract[other].shape[1 if stacked else 0 :] for other in tensor.jaxlm]
    read = {}  # slice -> array: devices that hold the same slice (replicas) share one read

    def convert(layer):
      hf_name = _hf_name(tensor.hf, layer, family, names)
      try:
        return tensor.to_jaxlm(weights.get(hf_name), shapes)[position]
      except ValueError as error:
        raise CheckpointError(
          f"{path}: tensor {hf_name} does not fit jaxlm's {name} of shape {leaf.shape} "
          f"({error}); its config.json does not describe its weights."
        ) from error

    def callback(index: tuple) -> np.ndarray:
      key = repr(index)
      if key not in read:
        if stacked:
          layers = range(leaf.shape[0])[index[0]]
          read[key] = np.stack([convert(layer)[index[1:]] for layer in layers]).astype(leaf.dtype)
        else:
          read[key] = convert(None)[index].astype(leaf.dtype)
      return read[key]

    target = leaf.sharding if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(leaf.shape, target, callback)

  absent = [name for tensor in table if tensor not in present for name in tensor.jaxlm]
  flat = params_lib.init_some_params(model, jax.random.key(0), absent, mesh)  # the model's own init, seed 0
  flat.update({name: place(name, leaf) for name, leaf in abstract.items() if name not in flat})
  return jax.tree_util.tree_map_with_path(lambda p, _: flat[params_lib.path_name(p)], abstract_tree)


def tokenizer_path(path: str) -> str | None:
  """The tokenizer file of a Hugging Face model directory: its tokenizer.json, else a SentencePiece
  tokenizer.model; None if it has neither."""
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  return None


def load_tokenizer(path: str) -> Tokenizer | None:
  """The tokenizer of a Hugging Face model directory (`tokenizer_path`); None if it has none."""
  found = tokenizer_path(path)
  return Tokenizer(found) if found else None


# `init_from = "hf:PATH"` starts a run from a Hugging Face directory: the model section is the checkpoint's
# architecture (`run_model_section`), the parameters are imported in memory, the tokenizer is the directory's.
INIT_FROM_PREFIX = "hf:"
# Model fields that say how a run computes, not what the checkpoint is: they stay the run config's.
RUN_FIELDS = (
  "dropout_rate",
  "dtype",
  "param_dtype",
  "remat",
  "attention",
  "init_std",
  "lora_rank",
  "lora_alpha",
  "lora_targets",
)


def run_model_section(path: str, model_section) -> dict:
  """The `model` section of a run starting from the Hugging Face directory `path`: every ModelConfig field from
  its config.json (and weights), except `RUN_FIELDS`, taken from `model_section` (the run's)."""
  with open(os.path.join(path, "config.json")) as f:
    _, model_config = model_config_from_hf(json.load(f), tensor_names=set(_open_weights(path).names()))
  return {**dataclasses.asdict(model_config), **{key: model_section[key] for key in RUN_FIELDS}}


def load_pretrained(path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None):
  """(model, params, tokenizer, model_config) of the Hugging Face model directory `path`.

  `mesh`: parameters are laid out on it by the training rules (default: on the first device). `dtype`: the
  parameter and compute dtype ('bfloat16', ...); None is float32 (exact for float16/bfloat16 checkpoints).
  The tokenizer is None when the directory has none.
  """
  with open(os.path.join(path, "config.json")) as f:
    family, model_config = model_config_from_hf(json.load(f), dtype, set(_open_weights(path).names()))
  params = load_params(path, family, model_config, mesh)
  return backbone(model_config), params, load_tokenizer(path), model_config


# ----------------------------------------------------------------------------------------------- writing


def save_pretrained(path: str, model_config: ModelConfig, params, tokenizer: Tokenizer | None = None) -> None:
  """Writes the Hugging Face layout of a jaxlm model (`export_family`) to `path`: config.json, model.safetensors
  (float32, or the parameters' dtype) and, for a tokenizer.json tokenizer, tokenizer.json + tokenizer_config.json.
  `transformers.AutoModelForCausalLM` (decoders), `AutoModelForMaskedLM` (encoders, with the MLM head) or
  `AutoModelForSeq2SeqLM` (T5) loads it. Runs on process 0's view of `params`."""
  from safetensors.numpy import save_file  # safetensors comes with transformers; only export needs it here

  family = export_family(model_config)
  hf_config = dict(
    dtype=str(np.dtype(model_config.weight_dtype)), bos_token_id=None, eos_token_id=None, pad_token_id=None
  )
  if tokenizer is not None:
    hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if model_config.family == "encoder_decoder":  # -1: jaxlm's own encoder-decoders start the decoder with bos
      hf_config.update(decoder_start_token_id=tokenizer.bos_id)
  if model_config.family == "encoder_decoder" and not model_config.encoder_eos:
    logging.warning(
      "model.encoder_eos=False: this encoder-decoder was trained on `[bos] prompt` encoder inputs; Hugging Face T5 "
      "frames `prompt </s>`, and so does jaxlm when it imports this export (feed it the framing it was trained on)."
    )
  hf_config.update(family.to_hf_config(model_config))  # the family's own ids win (RoBERTa's pad = its padding_idx)
  flat = params_lib.flatten(params)
  table = family.tensors(model_config)
  unused = sorted(set(flat) - {name for tensor in table for name in tensor.jaxlm})
  if unused:
    raise ConfigError(
      f"Parameters {unused} have no place in a Hugging Face {family.model_type} model; export the "
      "decoder's parameters alone (a task's head or adapters are not part of it)."
    )
  host = {name: np.asarray(jax.device_get(leaf)) for name, leaf in flat.items()}
  tensors = {}
  for tensor in table:
    for layer in _stacked_layers(tensor, host):
      arrays = [host[name] if layer is None else host[name][layer] for name in tensor.jaxlm]
      tensors[tensor.hf.format(layer=layer)] = np.ascontiguousarray(tensor.to_hf(arrays))
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  files = {"config.json": hf_config}
  if tokenizer is not None and tokenizer.kind == "tokenizers":
    files.update(tokenizer.hf_files())
  elif tokenizer is not None:  # a SentencePiece model travels as is (transformers' LlamaTokenizer reads the format)
    tokenizer.save(os.path.join(path, "tokenizer.model"))
  for name, content in files.items():
    with open(os.path.join(path, name), "w") as f:
      json.dump(content, f, indent=2, ensure_ascii=False)
