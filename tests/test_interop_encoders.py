"""Hugging Face interop of the encoder families: tiny random BERT (token types, pooler, MLM and next-sentence
heads), RoBERTa (positions offset by padding_idx + 1), MiniLM (a bare `BertModel`: no prefix, no MLM head) and T5
(v1.0: tied, scaled, ReLU, more decoder than encoder layers; v1.1: untied, gated GELU) built by `transformers` (no
download), saved, imported into jaxlm (sharded on a 2x2x2 mesh), compared with `transformers` on padded random
inputs, and exported back (exact round trips; `transformers` reads the export as the same model)."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from conftest import REPO, run_cli
from jaxlm import sharding
from jaxlm.errors import ConfigError
from jaxlm.experiment import Experiment
from jaxlm.interop import hf, random_checkpoints
from jaxlm.models import params as params_lib

VOCAB = 320
BERT = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=96,
  max_position_embeddings=64,
)
T5 = dict(
  vocab_size=VOCAB,
  d_model=64,
  d_kv=16,
  d_ff=96,
  num_layers=2,
  num_heads=4,
  relative_attention_num_buckets=16,
  relative_attention_max_distance=20,
)


VARIANTS = {
  "bert": lambda: transformers.BertForPreTraining(transformers.BertConfig(**BERT, type_vocab_size=2)),
  "roberta": lambda: transformers.RobertaForMaskedLM(
    transformers.RobertaConfig(
      **{**BERT, "max_position_embeddings": 66}, type_vocab_size=1, pad_token_id=1, hidden_act="gelu_new"
    )
  ),
  "minilm": lambda: transformers.BertModel(
    transformers.BertConfig(
      vocab_size=VOCAB,
      hidden_size=48,
      num_hidden_layers=3,
      num_attention_heads=12,
      intermediate_size=96,
      max_position_embeddings=64,
    )
  ),
  "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**T5, num_decoder_layers=3)),
  "t5_v11": lambda: random_checkpoints.t5_model("1.1", **T5),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_model(request, tmp_path_factory):
  """(variant, directory, transformers model) with random weights."""
  torch.manual_seed(0)
  model = VARIANTS[request.param]().eval()
  directory = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(directory)
  return request.param, directory, model


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(dict(data=2, fsdp=2, tensor=2))


def padded_inputs(seed: int, length: int, low: int = 0, pad: int = 0):
  """tokens [3, length] in [low, VOCAB) (pad where the mask is 0), mask [3, length] (rows 1, 2 right-padded)."""
  rng = np.random.default_rng(seed)
  mask = np.ones((3, length), np.int64)
  mask[1, length - 7 :] = 0
  mask[2, 9:] = 0
  return np.where(mask == 1, rng.integers(low, VOCAB, (3, length)), pad), mask


def outputs(variant: str, model, params, reference) -> dict:
  """{name: (jaxlm output, transformers output, mask of the rows/positions to compare)} on padded random inputs."""
  apply = jax.jit(model.apply, static_argnames=("return_hidden", "return_pooled"))
  variables = {"params": params}
  if variant.startswith("t5"):
    encoder_tokens, encoder_mask = padded_inputs(1, 24)
    tokens, mask = padded_inputs(2, 17)
    ours = apply(variables, tokens, segment_ids=mask, encoder_tokens=encoder_tokens, encoder_segment_ids=encoder_mask)
    with torch.no_grad():
      theirs = reference(
        input_ids=torch.tensor(encoder_tokens),
        attention_mask=torch.tensor(encoder_mask),
        decoder_input_ids=torch.tensor(tokens),
        decoder_attention_mask=torch.tensor(mask),
      ).logits
    return {"logits": (ours, theirs, mask)}
  pad = reference.config.pad_token_id or 0
  tokens, mask = padded_inputs(3, 29, low=pad + 1, pad=pad)  # RoBERTa numbers positions past its pad tokens
  types = np.where(np.arange(29) < 11, 0, 1) * mask if reference.config.type_vocab_size > 1 else np.zeros_like(mask)
  base = getattr(reference, "bert", getattr(reference, "roberta", reference))
  with torch.no_grad():
    inputs = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    base_output = base(**inputs)
    result = {
      "hidden": (
        apply(variables, tokens, segment_ids=mask, token_types=types, return_hidden=True),
        base_output.last_hidden_state,
        mask,
      )
    }
    if base.pooler is not None:
      result["pooled"] = (
        apply(variables, tokens, segment_ids=mask, token_types=types, return_pooled=True),
        base_output.pooler_output,
        np.ones(3),
      )
    if base is not reference:
      logits = reference(**inputs)
      logits = logits.prediction_logits if variant == "bert" else logits.logits
      result["mlm_logits"] = (apply(variables, tokens, segment_ids=mask, token_types=types), logits, mask)
  return result


def max_differences(variant, model, params, reference) -> dict:
  return {
    name: float(np.abs(np.asarray(ours) - theirs.numpy())[where == 1].max())
    for name, (ours, theirs, where) in outputs(variant, model, params, reference).items()
  }


def test_outputs_match_transformers_with_padding(hf_model, mesh):
  variant, directory, reference = hf_model
  model, params, _, model_config = hf.load_pretrained(directory, mesh=mesh)
  assert params["token_embed"]["embedding"].sharding.mesh.shape == mesh.shape  # placed sharded
  differences = max_differences(variant, model, params, reference)
  print(f"{variant}: max |jaxlm - transformers| = {differences}")
  expected = {
    "bert": {"hidden", "pooled", "mlm_logits"},
    "roberta": {"hidden", "mlm_logits"},
    "minilm": {"hidden", "pooled"},
    "t5": {"logits"},
    "t5_v11": {"logits"},
  }[variant]
  assert set(differences) == expected
  assert max(differences.values()) < 1e-4
  if variant == "roberta":
    assert model_config.position_offset == 2 and model_config.max_len == 64
  if variant.startswith("t5"):
    assert (model_config.tie_embeddings, model_config.mlp) == ((True, "relu") if variant == "t5" else (False, "geglu"))


def test_import_then_export_reproduces_the_checkpoint(hf_model, tmp_path):
  variant, directory, reference = hf_model
  model, params, _, model_config = hf.load_pretrained(directory)
  hf.save_pretrained(str(tmp_path), model_config, params)
  original = load_file(os.path.join(directory, "model.safetensors"))
  exported = load_file(tmp_path / "model.safetensors")
  if variant == "minilm":  # a bare BertModel leaves in the BertForMaskedLM layout, with the (fresh) MLM head
    original = {f"bert.{name}": value for name, value in original.items()}
    assert sorted(set(exported) - set(original)) == sorted(
      f"cls.predictions.{name}"
      for name in (
        "bias",
        "transform.LayerNorm.bias",
        "transform.LayerNorm.weight",
        "transform.dense.bias",
        "transform.dense.weight",
      )
    )
  left_out = {
    "bert": ["cls.seq_relationship.bias", "cls.seq_relationship.weight"],  # no next-sentence head in jaxlm
    "t5_v11": ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight"],
  }.get(variant, [])
  assert sorted(set(original) - set(exported)) == left_out
  for name in left_out:  # copies of the shared embedding (checked equal on import)
    if name.endswith("embed_tokens.weight"):
      np.testing.assert_array_equal(original[name], exported["shared.weight"])
  for name in set(original) & set(exported):
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  # export then import is the identity on params and config
  _, again, _, config_again = hf.load_pretrained(str(tmp_path))
  assert config_again == model_config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  # transformers reads the export as the same model
  loaded = type(reference).from_pretrained(str(tmp_path)).eval()
  for name, difference in max_differences(variant, model, params, loaded).items():
    assert difference < 1e-4, (name, difference)


@pytest.mark.parametrize(
  "family, change, key",
  [
    ("bert", dict(position_embedding_type="relative_key"), "position_embedding_type"),
    ("bert", dict(hidden_act="silu"), "hidden_act"),
    ("bert", dict(is_decoder=True), "is_decoder"),
    ("t5", dict(feed_forward_proj="gated-silu"), "feed_forward_proj"),
    ("t5", dict(some_new_switch=1), "some_new_switch"),
  ],
)
def test_unsupported_config_is_a_clear_error(family, change, key):
  config = (transformers.BertConfig(**BERT) if family == "bert" else transformers.T5Config(**T5)).to_dict()
  with pytest.raises(ConfigError, match=key):
    hf.model_config_from_hf({**config, **change})


# ------------------------------------------------------------------------------- fine-tuning an imported BERT


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A tiny random BertForPreTraining (pooler, MLM head) with its WordPiece tokenizer, as a Hugging Face directory."""
  return random_checkpoints.save_random_bert(str(tmp_path_factory.mktemp("tiny_bert")), vocab_size=512)


def finetune_config(variant: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    "finetune_packages", os.path.join(REPO, "experiments", "finetune_packages.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_bert_tokenizer_maps_cls_and_sep_to_bos_and_eos(bert_dir):
  tokenizer = hf.load_tokenizer(bert_dir)
  reference = transformers.AutoTokenizer.from_pretrained(bert_dir)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
    reference.cls_token_id,
    reference.sep_token_id,
    reference.pad_token_id,
  )
  assert tokenizer.piece_id("[MASK]") == reference.mask_token_id
  assert reference.mask_token_id not in tokenizer.ordinary_ids() and len(tokenizer.ordinary_ids()) == 507
  text = "def load(fp, *, cls=None):\n    return loads(fp.read())"
  # what jaxlm's tasks build ([bos] text [eos]) is what BERT's tokenizer builds
  assert [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] == reference(text)["input_ids"]


def test_init_from_hf_imports_model_section_params_and_tokenizer(bert_dir, tmp_path):
  config = finetune_config("tiny,encoder")
  config.init_from = f"hf:{bert_dir}"
  config.model.dropout_rate = 0.1  # a run field: stays the run's
  experiment = Experiment.from_config(config, str(tmp_path))
  _, imported, _, model_config = hf.load_pretrained(bert_dir)
  assert experiment.model_config == dataclasses.replace(model_config, dropout_rate=0.1)
  assert experiment.tokenizer_path() == os.path.join(bert_dir, "tokenizer.json")
  params = params_lib.flatten(experiment.init_params())
  imported = params_lib.flatten(imported)
  assert set(params) - {f"backbone/{name}" for name in imported} == {"head/kernel", "head/bias"}
  for name, value in imported.items():
    np.testing.assert_array_equal(params[f"backbone/{name}"], value, err_msg=name)


@pytest.mark.e2e
def test_finetune_imported_bert_through_the_cli(bert_dir, data_dir, tmp_path):
  """`--config.init_from=hf:DIR`: the tiny BERT fine-tuned with a classification head on its pooler; the workdir
  keeps the checkpoint's architecture and a copy of its tokenizer, and evaluates."""
  run_cli(
    "--config=experiments/finetune_packages.py:tiny,encoder",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    f"--config.init_from=hf:{bert_dir}",
    "--config.classification.pooling=pooler",
  )
  report = json.load(open(tmp_path / "eval" / "report.json"))
  assert report["split"] == "test" and 0 <= report["metrics"]["accuracy"] <= 1
  with open(tmp_path / "config.json") as f:
    model = json.load(f)["model"]
  assert (model["family"], model["norm_position"], model["mlp"], model["pooler"]) == (
    "encoder",
    "post",
    "gelu_exact",
    True,
  )
  copy = hf.load_tokenizer(bert_dir)
  from jaxlm.data.tokenizer import Tokenizer

  saved = Tokenizer(str(tmp_path / "tokenizer.model"))
  assert (saved.bos_id, saved.eos_id, saved.encode("import os")) == (copy.bos_id, copy.eos_id, copy.encode("import os"))
