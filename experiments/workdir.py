"""A finished run's own config, to override some keys in a mode other than train.

  python -m jaxlm.main --config=experiments/workdir.py:runs/quickstart --workdir=runs/quickstart \
    --mode=generate --prompt="def " --config.decode.strategy=sample --config.decode.top_p=0.9

The argument is the workdir whose config.json is read (without --config, modes other than train read it
unchanged).
"""

from jaxlm import configs


def get_config(workdir=None):
  if not workdir:
    raise ValueError("Name the workdir: --config=experiments/workdir.py:WORKDIR.")
  config = configs.from_workdir(workdir)
  config.unlock()  # config_flags locks it again after loading
  return config
