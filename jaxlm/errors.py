"""Errors shared by every layer of jaxlm, and the one helper that raises them. Imports nothing of jaxlm.

An expected failure (a bad config value, a checkpoint that does not fit the model) is one of these
exceptions, with a message that names the cause and the fix.
"""


class ConfigError(ValueError):
  """An invalid configuration: the message names the key and the fix."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked: missing, or not fitting the model it is restored into."""


def check(ok: bool, key: str, message: str) -> None:
  """Raises `ConfigError("key: message")` unless `ok`: how each config section validates its keys."""
  if not ok:
    raise ConfigError(f"{key}: {message}")


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradients or the parameters became NaN or Inf."""


class WorkdirError(RuntimeError):
  """A workdir a run cannot use: not a directory, or in use by another run."""
