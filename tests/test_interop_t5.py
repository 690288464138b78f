"""An imported Hugging Face T5 as a starting point: a tiny T5 v1.0 (tied, scaled, ReLU) and v1.1 (untied, gated
GELU) with a T5-style Unigram tokenizer (no bos, `text </s>`, sentinels), built and taught to copy its input by
`transformers` (no download), then imported. jaxlm frames its rows as T5 was trained (`model.encoder_eos`,
`model.decoder_start_id`): the seq2seq loss of a row equals `transformers`' loss of the same pair, greedy
`Experiment.generate` equals `transformers`' greedy `generate` token for token, and `--config.init_from=hf:DIR`
fine-tunes it through the CLI."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import experiment_config, run_cli, tiny_model_config
from jaxlm.data import pipeline
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.experiment import Experiment
from jaxlm.interop import hf, random_checkpoints

PROMPTS = [
  "def load(fp, *, cls=None):",
  "import os",
  "return the sum of a and b",
  "class Message(object): a message with headers and a payload",
]


def teach_to_copy(directory: str, steps: int = 80) -> None:
  """Trains the T5 in `directory` to copy its input (Adam) and saves it back. A random T5 v1.0 decodes pad forever
  (its tied head reads back the decoder's input token); a trained one gives greedy outputs that follow the prompt
  and end with eos."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  model = transformers.T5ForConditionalGeneration.from_pretrained(directory)
  # transformers >= 5 reads every T5 config as tied; v1.1's lm_head loads untied, and saves so with this
  model.config.tie_word_embeddings = model.lm_head.weight is model.shared.weight
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
  lines = [line.strip() for line in random_checkpoints.stdlib_lines(512)]
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny matmuls: a second thread on a busy 2-core machine makes each step 100x slower
  try:
    for step in range(steps):
      batch = tokenizer(
        lines[step * 16 % 512 :][:16], max_length=16, truncation=True, padding=True, return_tensors="pt"
      )
      labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
      model(**batch, labels=labels).loss.backward()
      optimizer.step()
      optimizer.zero_grad()
  finally:
    torch.set_num_threads(threads)
  model.save_pretrained(directory)


VERSIONS = ("1.0", "1.1")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  """version -> a directory with that T5, taught to copy (built on first use)."""
  built = {}

  def get(version: str) -> str:
    if version not in built:
      directory = str(tmp_path_factory.mktemp(f"t5_v{version}"))
      built[version] = random_checkpoints.save_random_t5(directory, version=version)
      teach_to_copy(built[version])
    return built[version]

  return get


def imported_experiment(t5_dir: str) -> Experiment:
  """`sft_docstrings.py:tiny,t5` starting from the T5 in `t5_dir` (`init_from=hf:DIR`)."""
  config = experiment_config("sft_docstrings", "tiny,t5")
  config.init_from = f"hf:{t5_dir}"
  return Experiment.from_config(config)


@pytest.mark.parametrize("version", VERSIONS)
def test_tokenizer_and_rows_frame_text_as_t5(t5_dir, version):
  """No bos, `text </s>` in the encoder, the decoder started with pad: the seq2seq row of a prompt/target pair is
  what `transformers` trains T5 on, and jaxlm's loss on it is `transformers`' loss."""
  t5_dir = t5_dir(version)
  experiment = imported_experiment(t5_dir)
  tokenizer, reference = experiment.tokenizer, transformers.AutoTokenizer.from_pretrained(t5_dir)
  assert (tokenizer.bos_id, tokenizer.bos_prefix, tokenizer.eos_id, tokenizer.pad_id) == (None, [], 1, 0)
  assert tokenizer.piece_id("<extra_id_0>") == reference.convert_tokens_to_ids("<extra_id_0>") == 499
  assert (experiment.model_config.decoder_start_id, experiment.model_config.encoder_eos) == (0, True)
  prompt, target = "def load(fp, *, cls=None):", "Deserialize fp to a Python object."
  record = {"prompt": prompt, "target": target}
  row = experiment.task.encode(tokenizer, record, 0)
  separator = experiment.config.data.separator
  source, labels = reference(prompt + separator)["input_ids"], reference(target)["input_ids"]
  assert row["encoder_tokens"][row["encoder_segment_ids"] == 1].tolist() == source
  assert row["tokens"][row["segment_ids"] == 1].tolist() == [0, *labels]
  assert row["loss_mask"][row["segment_ids"] == 1].tolist() == [0] + [1] * len(labels)

  batch = jax.tree.map(lambda value: value[None], row)
  params = experiment.init_params()
  _, sums = experiment.task.loss_and_metrics(experiment.model, params, batch, train=False)
  model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
  with torch.no_grad():
    loss = model(input_ids=torch.tensor([source]), labels=torch.tensor([labels])).loss
  np.testing.assert_allclose(float(sums["loss_sum"] / sums["weight"]), float(loss), rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_generate_equals_transformers(t5_dir, version):
  """`Experiment.generate` of the imported T5 (its tokenizer, its framing) gives `transformers`' greedy tokens."""
  t5_dir = t5_dir(version)
  experiment = imported_experiment(t5_dir)
  params = experiment.init_params()
  tokenizer, reference = experiment.tokenizer, transformers.AutoTokenizer.from_pretrained(t5_dir)
  model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
  max_new_tokens = 20
  ours = experiment.generate(params, PROMPTS, max_new_tokens=max_new_tokens)
  batch = reference(PROMPTS, padding=True, return_tensors="pt")
  with torch.no_grad():
    theirs = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens).tolist()
  for prompt, generation, expected in zip(PROMPTS, ours, theirs):
    assert expected[0] == 0  # transformers started the decoder with decoder_start_token_id
    expected = expected[1:]
    if tokenizer.eos_id in expected:
      expected = expected[: expected.index(tokenizer.eos_id) + 1]
    assert generation.tokens == expected, prompt
    assert generation.text == reference.decode(expected, skip_special_tokens=True)
  # the model copies: the outputs follow the prompts, and eos ends some before max_new_tokens
  assert len({tuple(generation.tokens) for generation in ours}) == len(PROMPTS)
  assert any(generation.tokens[-1] == tokenizer.eos_id for generation in ours)

  # and the logits of the whole greedy continuations agree
  decoder = [[0, *generation.tokens] for generation in ours]
  width = max(len(tokens) for tokens in decoder)
  decoder_mask = np.asarray([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in decoder])
  decoder = np.asarray([tokens + [0] * (width - len(tokens)) for tokens in decoder])
  logits = experiment.model.apply(
    {"params": params},
    decoder,
    segment_ids=decoder_mask,
    encoder_tokens=batch["input_ids"].numpy(),
    encoder_segment_ids=batch["attention_mask"].numpy(),
  )
  with torch.no_grad():
    expected = model(**batch, decoder_input_ids=torch.tensor(decoder)).logits.numpy()
  difference = np.abs(np.asarray(logits) - expected)[decoder_mask == 1].max()
  print(f"max |logit difference| over the greedy continuations: {difference:.2e}")
  assert difference < 1e-4


def test_jaxlm_encoder_decoders_keep_their_framing(tokenizer):
  """The defaults (decoder_start_id -1, encoder_eos False) frame rows as before: `[bos] prompt separator` to the
  encoder, `[bos] target [eos]` to the decoder. A decoder started with bos needs a tokenizer that has one."""
  row = pipeline.encoder_decoder_example(
    tokenizer,
    "x = 1",
    "y",
    16,
    "right",
    ":",
    decoder_start_id=pipeline.decoder_start_id(tokenizer, -1),
    encoder_eos=False,
  )
  encoder = [tokenizer.bos_id, *tokenizer.encode("x = 1"), *tokenizer.encode(":")]
  assert row["encoder_tokens"][row["encoder_segment_ids"] == 1].tolist() == encoder
  assert row["tokens"][row["segment_ids"] == 1].tolist() == [tokenizer.bos_id, *tokenizer.encode("y"), tokenizer.eos_id]
  assert pipeline.frame_prompt(tokenizer, [7], True) == [tokenizer.bos_id, 7, tokenizer.eos_id]


def test_framing_errors_name_the_key(t5_dir):
  with pytest.raises(ConfigError, match="model.decoder_start_id"):
    pipeline.decoder_start_id(hf.load_tokenizer(t5_dir("1.0")), -1)
  with pytest.raises(ConfigError, match="model.encoder_eos"):
    tiny_model_config(encoder_eos=True)  # the decoder family


@pytest.mark.e2e
def test_finetune_imported_t5_through_the_cli(t5_dir, data_dir, tmp_path):
  """`--config.init_from=hf:DIR`: seq2seq fine-tuning of the imported T5 runs, evaluates and generates; the workdir
  keeps its architecture, its framing and a copy of its tokenizer (no bos)."""
  t5_dir = t5_dir("1.0")
  run_cli(
    "--config=experiments/sft_docstrings.py:tiny,t5",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    f"--config.init_from=hf:{t5_dir}",
  )
  report = json.load(open(tmp_path / "eval" / "report.json"))
  assert report["split"] == "test" and report["metrics"]["loss"] > 0
  assert len(report["generation"]["examples"]) == 2
  with open(tmp_path / "config.json") as f:
    model = json.load(f)["model"]
  assert (model["family"], model["mlp"], model["decoder_start_id"], model["encoder_eos"]) == (
    "encoder_decoder",
    "relu",
    0,
    True,
  )
  saved = Tokenizer(str(tmp_path / "tokenizer.model"))
  assert (saved.bos_id, saved.encode("import os")) == (None, hf.load_tokenizer(t5_dir).encode("import os"))
