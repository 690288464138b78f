"""Hugging Face checkpoints in and out: GPT-2 and Llama decoders (config.json + safetensors + tokenizer).

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
"""

import dataclasses
import json
import os
import re
import struct
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.models import params as params_lib
from jaxlm.models.config import DTYPES, ModelConfig
from jaxlm.models.transformer import Decoder

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
# config.json keys that never change the forward pass of any family: bookkeeping, token ids (the tokenizer has
# them), generation defaults, training-time dropout and initialisation.
IGNORED_KEYS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
                "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_attentions",
                "output_hidden_states", "return_dict", "task_specific_params", "id2label", "label2id")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One Hugging Face tensor and the jaxlm parameter(s) it holds.

  `hf` is its name ('{layer}' marks one tensor per block, stacked on the jaxlm parameter's leading axis);
  `jaxlm` names the parameters (several when Hugging Face fuses them: split evenly along its output axis);
  `layout` is "copy" (same shape), "bias" (flattened output axes), "linear" ([out, in]) or "conv1d" ([in, out]);
  `inputs` is how many leading axes of the jaxlm kernel are input features (the output kernel [N, H, D]: 2).
  """

  hf: str
  jaxlm: tuple[str, ...]
  layout: str = "copy"
  inputs: int = 1

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
    fused = np.concatenate([a.reshape(int(np.prod(a.shape[:self.inputs])), -1) for a in arrays], axis=-1)
    return np.ascontiguousarray(fused.T if self.layout == "linear" else fused)


class _Keys:
  """The keys of a Hugging Face config.json, each to be read, checked or ignored exactly once: whatever is left
  at `finish` is a key this family does not understand, and an error."""

  def __init__(self, values: dict, family: str):
    self.values, self.family, self.used = values, family, set(IGNORED_KEYS)

  def get(self, key: str, default=None):
    self.used.add(key)
    value = self.values.get(key)
    return default if value is None else value

  def require(self, key: str, allowed: tuple, default=None):
    """The value of `key`, which must be one of `allowed` (what jaxlm implements)."""
    value = self.get(key, default)
    if value not in allowed:
      raise ConfigError(f"config.json {key}={value!r}: jaxlm's {self.family} implements only {allowed}; this "
                        "checkpoint cannot be imported exactly.")
    return value

  def ignore(self, *keys: str):
    self.used.update(keys)

  def finish(self):
    unknown = sorted(set(self.values) - self.used)
    if unknown:
      raise ConfigError(f"config.json {unknown[0]}={self.values[unknown[0]]!r}: a key jaxlm's {self.family} import "
                        f"does not know (all unknown: {unknown}); it may change the model, so nothing is imported. "
                        "If it does not change the forward pass, add it to the ignored keys in jaxlm/interop/hf.py.")


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
  keys.ignore("attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_activation", "summary_first_dropout",
              "summary_proj_to_labels", "summary_type", "summary_use_proj")
  return dict(vocab_size=keys.get("vocab_size"), embed_dim=embed_dim, num_layers=keys.get("n_layer"),
              num_heads=keys.get("n_head"), mlp_dim=keys.get("n_inner", 4 * embed_dim), max_len=keys.get("n_positions"),
              position="learned", norm="layernorm", mlp="gelu", use_bias=True, norm_eps=keys.get("layer_norm_epsilon"),
              tie_embeddings=keys.get("tie_word_embeddings", True))


def _gpt2_hf_config(c: ModelConfig) -> dict:
  _check_exportable(c, "gpt2", position="learned", norm="layernorm", mlp="gelu", use_bias=True,
                    rope_scaling_type="none", num_kv_heads=c.num_heads, head_dim=c.embed_dim // c.num_heads)
  return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size, n_embd=c.embed_dim,
              n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.mlp_dim, n_positions=c.max_len,
              activation_function="gelu_new", layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
              attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)


def _gpt2_tensors(c: ModelConfig) -> list[Tensor]:
  block = "transformer.h.{layer}."
  tensors = [Tensor("transformer.wte.weight", ("token_embed/embedding",)),
             Tensor("transformer.wpe.weight", ("position_embed/embedding",)),
             Tensor("transformer.ln_f.weight", ("final_norm/scale",)),
             Tensor("transformer.ln_f.bias", ("final_norm/bias",))]
  for hf, jaxlm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
    tensors += [Tensor(f"{block}{hf}.weight", (f"layers/{jaxlm}/scale",)),
                Tensor(f"{block}{hf}.bias", (f"layers/{jaxlm}/bias",))]
  qkv = tuple(f"layers/attention/{name}" for name in ("query", "key", "value"))
  tensors += [Tensor(f"{block}attn.c_attn.weight", tuple(f"{name}/kernel" for name in qkv), "conv1d"),
              Tensor(f"{block}attn.c_attn.bias", tuple(f"{name}/bias" for name in qkv), "bias"),
              Tensor(f"{block}attn.c_proj.weight", ("layers/attention/out/kernel",), "conv1d", inputs=2),
              Tensor(f"{block}attn.c_proj.bias", ("layers/attention/out/bias",), "bias")]
  for hf, jaxlm in (("c_fc", "up"), ("c_proj", "down")):
    tensors += [Tensor(f"{block}mlp.{hf}.weight", (f"layers/mlp/{jaxlm}/kernel",), "conv1d"),
                Tensor(f"{block}mlp.{hf}.bias", (f"layers/mlp/{jaxlm}/bias",), "bias")]
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
    fields.update(rope_scaling_type="llama3", rope_scaling_factor=float(rope.pop("factor")),
                  rope_low_freq_factor=float(rope.pop("low_freq_factor")),
                  rope_high_freq_factor=float(rope.pop("high_freq_factor")),
                  rope_original_max_len=int(rope.pop("original_max_position_embeddings")))
  elif rope_type != "default":
    raise ConfigError(f"config.json {rope_key}.rope_type={rope_type!r}: jaxlm implements 'default' and 'llama3' "
                      "RoPE only; this checkpoint cannot be imported exactly.")
  if rope:
    raise ConfigError(f"config.json {rope_key}: keys {sorted(rope)} are not understood for rope_type={rope_type!r}.")
  heads = keys.get("num_attention_heads")
  return dict(vocab_size=keys.get("vocab_size"), embed_dim=keys.get("hidden_size"),
              num_layers=keys.get("num_hidden_layers"), num_heads=heads,
              num_kv_heads=keys.get("num_key_value_heads", heads), head_dim=keys.get("head_dim", 0),
              mlp_dim=keys.get("intermediate_size"), max_len=keys.get("max_position_embeddings"),
              position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False, norm_eps=keys.get("rms_norm_eps"),
              tie_embeddings=keys.get("tie_word_embeddings", False), **fields)


def _llama_hf_config(c: ModelConfig) -> dict:
  _check_exportable(c, "llama", position="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False)
  rope = dict(rope_type="default")
  if c.rope_scaling_type == "llama3":
    rope = dict(rope_type="llama3", factor=c.rope_scaling_factor, low_freq_factor=c.rope_low_freq_factor,
                high_freq_factor=c.rope_high_freq_factor, original_max_position_embeddings=c.rope_original_max_len)
  # rope_theta + rope_scaling: what every transformers version reads (>= 5 converts them to rope_parameters).
  return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=c.vocab_size,
              hidden_size=c.embed_dim, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
              num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.mlp_dim,
              max_position_embeddings=c.max_len, hidden_act="silu", rms_norm_eps=c.norm_eps,
              tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_theta,
              rope_scaling=None if c.rope_scaling_type == "none" else rope, attention_bias=False, mlp_bias=False)


def _llama_tensors(c: ModelConfig) -> list[Tensor]:
  block = "model.layers.{layer}."
  tensors = [Tensor("model.embed_tokens.weight", ("token_embed/embedding",)),
             Tensor("model.norm.weight", ("final_norm/scale",)),
             Tensor(f"{block}input_layernorm.weight", ("layers/attention_norm/scale",)),
             Tensor(f"{block}post_attention_layernorm.weight", ("layers/mlp_norm/scale",))]
  for hf, jaxlm in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    tensors.append(Tensor(f"{block}self_attn.{hf}.weight", (f"layers/attention/{jaxlm}/kernel",), "linear"))
  tensors.append(Tensor(f"{block}self_attn.o_proj.weight", ("layers/attention/out/kernel",), "linear", inputs=2))
  for name in ("gate", "up", "down"):
    tensors.append(Tensor(f"{block}mlp.{name}_proj.weight", (f"layers/mlp/{name}/kernel",), "linear"))
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
  base_prefix: str  # the base model's prefix inside *ForCausalLM names; checkpoints of the bare base model lack it
  buffers: str = r"$^"  # regex of checkpoint entries that are buffers, not parameters (skipped)
  build_model: Callable[[ModelConfig], object] = Decoder


FAMILIES = {
    "gpt2": Family("gpt2", _gpt2_config, _gpt2_hf_config, _gpt2_tensors, "transformer.",
                   buffers=r"\.attn\.(masked_)?bias$"),
    "llama": Family("llama", _llama_config, _llama_hf_config, _llama_tensors, "model.",
                    buffers=r"\.rotary_emb\.inv_freq$"),
}
FAMILY_OF_POSITION = {"learned": "gpt2", "rotary": "llama"}  # which family exports a jaxlm decoder


def _check_exportable(c: ModelConfig, family: str, **required):
  for key, value in required.items():
    if getattr(c, key) != value:
      raise ConfigError(f"model.{key}={getattr(c, key)!r}: a Hugging Face {family} model needs {value!r}.")
  if c.lora_rank:
    raise ConfigError("model.lora_rank: merge or drop the LoRA adapters before exporting (Hugging Face "
                      f"{family} has no adapters).")


def model_config_from_hf(hf_config: dict, dtype: str | None = None) -> tuple[Family, ModelConfig]:
  """The family and `ModelConfig` of a Hugging Face config.json (a ConfigError names any key jaxlm cannot honour).
  `dtype` ('float32', 'bfloat16', ...) sets the parameter and compute dtype; None keeps jaxlm's float32."""
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ConfigError(f"config.json model_type={model_type!r}: jaxlm imports {sorted(FAMILIES)}.")
  family = FAMILIES[model_type]
  keys = _Keys(hf_config, model_type)
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
      raise CheckpointError(f"{path} is a PyTorch pickle and torch is not installed; convert it to safetensors, "
                            "or install torch.") from error
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
  if name not in names and name.startswith(family.base_prefix) and name[len(family.base_prefix):] in names:
    return name[len(family.base_prefix):]
  return name


def _check_tensor_names(family: Family, table: list[Tensor], num_layers: int, names: set, path: str):
  expected = {_hf_name(t.hf, layer, family, names) for t in table
              for layer in (range(num_layers) if "{layer}" in t.hf else [None])}
  missing = sorted(expected - names)
  unused = sorted(name for name in names - expected if not re.search(family.buffers, name))
  if missing or unused:
    raise CheckpointError(f"The weights in {path} do not fit its config.json as a {family.model_type} model: "
                          f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, not understood "
                          f"{unused[:8]}{'...' if len(unused) > 8 else ''}; nothing is imported.")


def load_params(path: str, family: Family, model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None):
  """The parameters of the Hugging Face model directory `path`, each placed straight into its sharding on `mesh`
  (default: the first device), read tensor by tensor."""
  abstract_tree = params_lib.abstract_params(family.build_model(model_config), mesh)
  abstract = params_lib.flatten(abstract_tree)
  weights = _open_weights(path)
  names = set(weights.names())
  table = family.tensors(model_config)
  _check_tensor_names(family, table, model_config.num_layers, names, path)
  where = {name: (tensor, position) for tensor in table for position, name in enumerate(tensor.jaxlm)}
  if set(where) != set(abstract):
    raise CheckpointError(f"jaxlm/interop/hf.py: the {family.model_type} table does not cover the model's "
                          f"parameters: {sorted(set(where) ^ set(abstract))}.")

  def place(name: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    tensor, position = where[name]
    stacked = "{layer}" in tensor.hf
    shapes = [abstract[other].shape[1 if stacked else 0:] for other in tensor.jaxlm]
    read = {}  # slice -> array: devices that hold the same slice (replicas) share one read

    def convert(layer):
      hf_name = _hf_name(tensor.hf, layer, family, names)
      try:
        return tensor.to_jaxlm(weights.get(hf_name), shapes)[position]
      except ValueError as error:
        raise CheckpointError(f"{path}: tensor {hf_name} does not fit jaxlm's {name} of shape {leaf.shape} "
                              f"({error}); its config.json does not describe its weights.") from error

    def callback(index: tuple) -> np.ndarray:
      key = repr(index)
      if key not in read:
        if stacked:
          layers = range(model_config.num_layers)[index[0]]
          read[key] = np.stack([convert(layer)[index[1:]] for layer in layers]).astype(leaf.dtype)
        else:
          read[key] = convert(None)[index].astype(leaf.dtype)
      return read[key]

    sharding = leaf.sharding if mesh is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(leaf.shape, sharding, callback)

  flat = {name: place(name, leaf) for name, leaf in abstract.items()}
  return jax.tree_util.tree_map_with_path(lambda p, _: flat[params_lib.path_name(p)], abstract_tree)


def load_tokenizer(path: str) -> Tokenizer | None:
  """The tokenizer of a Hugging Face model directory: its tokenizer.json, else a SentencePiece tokenizer.model;
  None if it has neither."""
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.exists(os.path.join(path, name)):
      return Tokenizer(os.path.join(path, name))
  return None


def load_pretrained(path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None):
  """(model, params, tokenizer, model_config) of the Hugging Face model directory `path`.

  `mesh`: parameters are laid out on it by the training rules (default: on the first device). `dtype`: the
  parameter and compute dtype ('bfloat16', ...); None is float32 (exact for float16/bfloat16 checkpoints).
  The tokenizer is None when the directory has none.
  """
  with open(os.path.join(path, "config.json")) as f:
    family, model_config = model_config_from_hf(json.load(f), dtype)
  params = load_params(path, family, model_config, mesh)
  return family.build_model(model_config), params, load_tokenizer(path), model_config


# ----------------------------------------------------------------------------------------------- writing

def save_pretrained(path: str, model_config: ModelConfig, params, tokenizer: Tokenizer | None = None) -> None:
  """Writes the Hugging Face layout of a jaxlm decoder to `path`: config.json, model.safetensors (float32, or the
  parameters' dtype) and, for a tokenizer.json tokenizer, tokenizer.json + tokenizer_config.json.
  `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it. Runs on process 0's view of `params`."""
  from safetensors.numpy import save_file  # safetensors comes with transformers; only export needs it here
  family = FAMILIES[FAMILY_OF_POSITION[model_config.position]]
  hf_config = family.to_hf_config(model_config)
  hf_config.update(dtype=str(np.dtype(model_config.weight_dtype)), bos_token_id=None, eos_token_id=None,
                   pad_token_id=None)
  if tokenizer is not None:
    hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  flat = params_lib.flatten(params)
  table = family.tensors(model_config)
  unused = sorted(set(flat) - {name for tensor in table for name in tensor.jaxlm})
  if unused:
    raise ConfigError(f"Parameters {unused} have no place in a Hugging Face {family.model_type} model; export the "
                      "decoder's parameters alone (a task's head or adapters are not part of it).")
  host = {name: np.asarray(jax.device_get(leaf)) for name, leaf in flat.items()}
  tensors = {}
  for tensor in table:
    for layer in range(model_config.num_layers) if "{layer}" in tensor.hf else [None]:
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
