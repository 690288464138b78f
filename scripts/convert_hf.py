"""Hugging Face model directory <-> jaxlm workdir.

  python scripts/convert_hf.py --hf_dir=PATH --workdir=OUT           # import
  python -m jaxlm.main --workdir=OUT --mode=generate --prompt="def "  # then: generate, plan, or start a run from it
  python -m jaxlm.main --config=experiments/workdir.py:OUT --workdir=RUN --config.init_from=OUT ...

  python scripts/convert_hf.py --workdir=RUN --export_hf_dir=PATH    # export a run's latest parameters

Import writes a workdir: config.json (`jaxlm.configs.base_config()` with the model section of the checkpoint's
config.json and data sizes that fit it), the parameters as checkpoint 0 (`checkpoints/0/state`, parameters only:
`init_from`, `load_params` and the modes other than train read it) and the tokenizer as `tokenizer.model` (a
tokenizer.json carries its special tokens inside). Export writes config.json, model.safetensors and the tokenizer
in the layout `transformers` loads (`AutoModelForCausalLM`, `AutoModelForMaskedLM`, `AutoModelForSeq2SeqLM`;
`jaxlm.interop.hf`).
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to import (config.json + weights).")
_WORKDIR = flags.DEFINE_string("workdir", None, "jaxlm workdir: written by an import, read by an export.")
_EXPORT_HF_DIR = flags.DEFINE_string("export_hf_dir", None, "Export --workdir's parameters to this directory.")
_STEP = flags.DEFINE_string("step", "latest", "Export: the checkpoint ('latest', 'best' or a step number).")
_DTYPE = flags.DEFINE_string("dtype", "", "Import: parameter and compute dtype ('bfloat16', ...); '' = float32.")
flags.mark_flags_as_required(["workdir"])
TASK_OF_FAMILY = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder_decoder": "span_corruption"}


def import_hf(hf_dir: str, workdir: str, dtype: str | None = None) -> None:
  import jax
  from jaxlm import configs, experiment, sharding
  from jaxlm.interop import hf
  from jaxlm.training import checkpoint

  config = configs.base_config()
  _, params, tokenizer, model_config = hf.load_pretrained(hf_dir, mesh=sharding.create_mesh(config.mesh), dtype=dtype)
  if tokenizer is None:
    raise app.UsageError(f"{hf_dir} has no tokenizer.json or tokenizer.model; a workdir needs its tokenizer.")
  config.task = TASK_OF_FAMILY[model_config.family]  # the objective the family was pretrained with
  config.model.update(dataclasses.asdict(model_config))
  config.data.seq_len = min(config.data.seq_len, model_config.max_len)
  config.data.vocab_size = tokenizer.vocab_size
  experiment.validate(config)
  os.makedirs(workdir, exist_ok=True)
  state_dir = checkpoint.save_params(workdir, params)
  if jax.process_index() == 0:
    tokenizer.save(os.path.join(workdir, experiment.TOKENIZER_FILE))
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  logging.info("Imported %s into %s (%s)", hf_dir, workdir, state_dir)


def export_hf(workdir: str, hf_dir: str, step: str) -> None:
  from jaxlm.experiment import Experiment
  from jaxlm.interop import hf

  run = Experiment.from_workdir(workdir)
  params = run.load_params(int(step) if step.isdigit() else step)
  hf.save_pretrained(hf_dir, run.model_config, params, run.tokenizer)
  logging.info("Exported %s (step %s) to %s", workdir, step, hf_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if bool(_HF_DIR.value) == bool(_EXPORT_HF_DIR.value):
    raise app.UsageError("Pass exactly one of --hf_dir (import into --workdir) and --export_hf_dir (export it).")
  if _HF_DIR.value:
    import_hf(_HF_DIR.value, _WORKDIR.value, _DTYPE.value or None)
  else:
    export_hf(_WORKDIR.value, _EXPORT_HF_DIR.value, _STEP.value)


if __name__ == "__main__":
  app.run(main)
