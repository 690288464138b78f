"""Zero- and few-shot classification of `pystdlib_packages` by the pretrained quickstart language model, with
and without each correction of its label prior ("calibrate before use").

  python -m jaxlm.main --config=experiments/prompted_packages.py --workdir=runs/prompted --mode=calibrate \
      --config.init_from=runs/quickstart

The language model is `init_from`'s latest checkpoint (or `--step`); with `init_from=''` the workdir's own.
Each function's source (cut to `prompt.max_text_tokens` tokens) is put in each template and followed by each
package name as a label word; the model's log-probability of the word (summed over its tokens) is the class
score. Settings: 0 and 4 demonstrations (4-shot drawn from the train split with 3 seeds per template), each
scored raw and with contextual, domain-context and batch calibration and PMI (jaxlm/evaluation/prompting.py).
WORKDIR/calibration/report.json and report.md: accuracy, macro-F1, ECE, NLL per setting as the mean over
templates and draws with bootstrap intervals, and the spread across them.
Variant `tiny`: seconds on CPU, for tests (from a `quickstart.py:tiny` workdir).
"""

from jaxlm import configs


def get_config(arg: str | None = None):
  config = configs.base_config()
  config.task = "causal_lm"  # the language model itself; nothing trains
  config.init_from = "runs/quickstart"  # the pretrained run (its checkpoint and its tokenizer)
  config.model = configs.model_config_dict("small")  # must match the pretrained run
  config.data.name = "pystdlib_packages"
  config.data.seq_len = 96
  config.prompt.templates = ("{text}\n# package:", "{text}\n\nimport", "Function:\n{text}\nStandard library package:")
  config.prompt.shots = (0, 4)
  config.prompt.orders = 3  # demonstration draws per template of the 4-shot setting
  config.prompt.score = "sum"
  config.prompt.num_examples = 200  # test functions classified
  config.prompt.max_text_tokens = 48
  config.prompt.batch_size = 32
  config.calibration.num_resamples = 1000

  if arg == "tiny":
    config.init_from = ""  # tests point it at a quickstart.py:tiny workdir
    config.model = configs.model_config_dict("tiny")
    config.data.vocab_size = 512
    config.data.seq_len = 64
    config.prompt.templates = ("{text}\n# package:", "{text}\n\nimport")
    config.prompt.shots = (0, 1)
    config.prompt.orders = 2
    config.prompt.num_examples = 16
    config.prompt.max_text_tokens = 16
    config.prompt.domain_texts = 4
    config.prompt.batch_size = 8
    config.calibration.num_resamples = 20
  elif arg:
    raise ValueError(f"Unknown prompted_packages variant {arg!r}; use 'tiny' or nothing.")
  return config
