"""Hugging Face interop: tiny random GPT-2 and Llama models built by `transformers` (no download), saved, imported
into jaxlm (sharded on a 2x2x2 mesh), compared with `transformers` (logits with padding, greedy generation), and
exported back (exact round trips; a jaxlm-trained decoder loads in `transformers` with the same logits)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from conftest import REPO, cpu_env, run_cli
from jaxlm import configs, sharding
from jaxlm.errors import ConfigError
from jaxlm.experiment import Experiment
from jaxlm.inference.decode import CachedDecoder, DecodeSettings
from jaxlm.inference.generate import decode
from jaxlm.interop import hf
from jaxlm.models import params as params_lib
from jaxlm.models.transformer import Decoder

VOCAB = 320
TEXTS = ["def add(a, b):\n    return a + b\n", "Hello world, hello jaxlm.", "for i in range(10): print(i)"] * 20
LLAMA = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  rms_norm_eps=1e-5,
)
LLAMA3_ROPE = dict(
  rope_type="llama3",
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=16,
  rope_theta=10000.0,
)
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
VARIANTS = {
  "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)),
  "gpt2_untied": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, tie_word_embeddings=False)),
  "llama_gqa_tied": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      **LLAMA, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=500000.0)
    )
  ),
  "llama_gqa_untied_llama3": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
  ),
}


def save_hf_tokenizer(directory: str, gpt2: bool) -> None:
  """A small byte-level BPE trained here, saved by transformers as tokenizer.json + tokenizer_config.json
  (GPT-2: one <|endoftext|> token for bos and eos, no pad; Llama: <s> and </s>)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  specials = ["<|endoftext|>"] if gpt2 else ["<unk>", "<s>", "</s>"]
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(
    TEXTS,
    trainers.BpeTrainer(
      vocab_size=VOCAB - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  roles = dict(bos_token=specials[0], eos_token=specials[0]) if gpt2 else dict(bos_token="<s>", eos_token="</s>")
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles).save_pretrained(directory)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_model(request, tmp_path_factory):
  """(directory, transformers model) of one variant, random weights, saved with its tokenizer."""
  torch.manual_seed(0)
  model = VARIANTS[request.param]().eval()
  directory = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(directory)
  save_hf_tokenizer(directory, gpt2=request.param.startswith("gpt2"))
  return directory, model


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(dict(data=2, fsdp=2, tensor=2))


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


def test_logits_match_transformers_with_padding(hf_model, mesh):
  directory, reference = hf_model
  model, params, tokenizer, model_config = hf.load_pretrained(directory, mesh=mesh)
  assert model_config.tie_embeddings == reference.config.tie_word_embeddings
  assert tokenizer.vocab_size <= model_config.vocab_size
  assert params["token_embed"]["embedding"].sharding.mesh.shape == mesh.shape  # placed sharded, not on one device
  tokens = np.random.default_rng(1).integers(0, VOCAB, (3, 40))
  mask = np.ones_like(tokens)
  mask[1, 30:] = 0  # right padding: the padded rows' real tokens must not change
  mask[2, 13:] = 0
  expected = torch_logits(reference, tokens, mask)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segment_ids=mask))
  difference = np.abs(logits - expected)[mask == 1].max()
  print(f"{os.path.basename(directory)}: max |logits - transformers| = {difference:.2e}")
  assert difference < 1e-4
  if model_config.rope_scaling_type == "llama3":  # the scaling is on, and it matters (the test can fail)
    plain = Decoder(dataclasses.replace(model_config, rope_scaling_type="none"))
    unscaled = np.asarray(jax.jit(plain.apply)({"params": params}, tokens, segment_ids=mask))
    assert np.abs(unscaled - expected)[mask == 1].max() > 1e3 * difference


def test_greedy_generation_matches_transformers(hf_model):
  directory, reference = hf_model
  model, params, _, _ = hf.load_pretrained(directory)
  prompts = np.random.default_rng(2).integers(1, VOCAB, (2, 7))
  settings = DecodeSettings(strategy="greedy", max_new_tokens=12)
  eos = reference.generation_config.eos_token_id  # both stop a row at eos, then pad with 0
  output = decode(
    CachedDecoder(model), params, prompts, np.zeros(2, np.int32), jax.random.key(0), settings, eos_id=eos, pad_id=0
  )
  with torch.no_grad():
    expected = reference.generate(
      torch.tensor(prompts),
      attention_mask=torch.ones(2, 7, dtype=torch.long),
      max_new_tokens=12,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=0,
    )
  expected = np.pad(expected[:, 7:].numpy(), ((0, 0), (0, 12 - expected.shape[1] + 7)))
  np.testing.assert_array_equal(np.asarray(output.tokens), expected)


def test_import_then_export_reproduces_the_checkpoint(hf_model, tmp_path):
  directory, reference = hf_model
  model, params, tokenizer, model_config = hf.load_pretrained(directory)
  hf.save_pretrained(str(tmp_path), model_config, params, tokenizer)
  original = load_file(os.path.join(directory, "model.safetensors"))
  exported = load_file(tmp_path / "model.safetensors")
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  # export then import is the identity on params
  _, again, tokenizer_again, config_again = hf.load_pretrained(str(tmp_path))
  assert config_again == model_config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert (tokenizer_again.bos_id, tokenizer_again.eos_id, tokenizer_again.pad_id) == (
    tokenizer.bos_id,
    tokenizer.eos_id,
    tokenizer.pad_id,
  )
  # transformers reads the exported directory as the same model
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 20))
  np.testing.assert_array_equal(
    torch_logits(loaded, tokens, np.ones_like(tokens)), torch_logits(reference, tokens, np.ones_like(tokens))
  )


def test_hf_tokenizer_behind_jaxlm_interface(tmp_path):
  save_hf_tokenizer(str(tmp_path), gpt2=True)
  reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  tokenizer = hf.load_tokenizer(str(tmp_path))
  text = "def add(a, b):\n    return a + b  # ünïcode"
  assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
  assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]) == text
  assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.pad_id == reference.eos_token_id  # GPT-2: pad = eos
  tokenizer.save(str(tmp_path / "copy.model"))  # a workdir's copy carries its special tokens inside
  os.remove(tmp_path / "tokenizer_config.json")
  from jaxlm.data.tokenizer import Tokenizer

  copy = Tokenizer(str(tmp_path / "copy.model"))
  assert (copy.kind, copy.vocab_size, copy.eos_id, copy.encode(text)) == (
    "tokenizers",
    tokenizer.vocab_size,
    tokenizer.eos_id,
    tokenizer.encode(text),
  )


@pytest.mark.parametrize(
  "change, key",
  [
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "rope_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(sliding_window=128), "sliding_window"),
    (dict(model_type="mistral"), "model_type"),
  ],
)
def test_unsupported_config_is_a_clear_error(change, key):
  config = {**transformers.LlamaConfig(**LLAMA).to_dict(), **change}
  with pytest.raises(ConfigError, match=key):
    hf.model_config_from_hf(config)


def test_gpt2_exact_gelu_is_refused():
  with pytest.raises(ConfigError, match="activation_function='gelu'"):
    hf.model_config_from_hf({**transformers.GPT2Config(**GPT2).to_dict(), "activation_function": "gelu"})


def test_exported_jaxlm_trained_decoder_loads_in_transformers(tiny_workdir, tmp_path):
  experiment = Experiment.from_workdir(tiny_workdir)
  params = experiment.load_params()
  hf.save_pretrained(str(tmp_path), experiment.model_config, params, experiment.tokenizer)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = np.random.default_rng(4).integers(0, experiment.model_config.vocab_size, (2, 24))
  logits = np.asarray(jax.jit(experiment.model.apply)({"params": params}, tokens))
  difference = np.abs(logits - torch_logits(loaded, tokens, np.ones_like(tokens))).max()
  print(f"jaxlm-trained tiny decoder -> transformers: max |logits difference| = {difference:.2e}")
  assert difference < 1e-4


@pytest.mark.e2e
def test_convert_cli_workdir_generates_plans_and_initialises(tmp_path):
  """convert_hf.py turns a Hugging Face directory into a workdir that --mode=generate and --mode=plan serve and
  init_from starts from; --export_hf_dir turns it back."""
  torch.manual_seed(0)
  hf_dir, workdir, export = (str(tmp_path / name) for name in ("hf", "workdir", "export"))
  reference = VARIANTS["llama_gqa_untied_llama3"]().eval()
  reference.save_pretrained(hf_dir)
  save_hf_tokenizer(hf_dir, gpt2=False)
  env = cpu_env(2)
  convert = [sys.executable, os.path.join(REPO, "scripts", "convert_hf.py")]
  subprocess.run(
    [*convert, f"--hf_dir={hf_dir}", f"--workdir={workdir}"],
    check=True,
    cwd=REPO,
    env=env,
    capture_output=True,
    timeout=300,
  )

  text = run_cli(
    f"--workdir={workdir}",
    "--mode=generate",
    "--prompt=def add",
    f"--config=experiments/workdir.py:{workdir}",
    "--config.decode.max_new_tokens=6",
  )
  _, params, tokenizer, model_config = hf.load_pretrained(hf_dir)
  ids = [tokenizer.bos_id, *tokenizer.encode("def add")]
  with torch.no_grad():
    expected = reference.generate(
      torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=tokenizer.eos_id
    )[0, len(ids) :].tolist()
  assert text.stdout.strip() == tokenizer.decode(expected).strip()
  plan = run_cli(f"--workdir={workdir}", "--mode=plan")
  assert "layers/attention/query/kernel" in plan.stdout

  config = configs.from_workdir(workdir)
  config.unlock()
  config.init_from = workdir
  started = Experiment.from_config(config, str(tmp_path / "finetune")).init_params()
  jax.tree.map(np.testing.assert_array_equal, started, params)

  subprocess.run(
    [*convert, f"--workdir={workdir}", f"--export_hf_dir={export}"],
    check=True,
    cwd=REPO,
    env=env,
    capture_output=True,
    timeout=300,
  )
  original, exported = (
    load_file(os.path.join(hf_dir, "model.safetensors")),
    load_file(os.path.join(export, "model.safetensors")),
  )
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  with open(os.path.join(export, "config.json")) as f:
    assert json.load(f)["rope_scaling"]["rope_type"] == "llama3"
  assert params_lib.count(params) == sum(x.size for x in original.values())
