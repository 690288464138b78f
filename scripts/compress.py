"""Compresses a trained run into a new workdir: one-shot pruning and / or post-training weight quantization.

    python scripts/compress.py --workdir=runs/quickstart --out=runs/quickstart_int4 --quantize=int4-g16
    python scripts/compress.py --workdir=runs/quickstart --out=runs/quickstart_24 --prune=2:4
    python scripts/compress.py --workdir=runs/quickstart --out=runs/quickstart_heads --prune=heads:0.25
    python scripts/compress.py --workdir=runs/quickstart --out=runs/quickstart_p50 --prune=0.5 --quantize=int8

What the new workdir holds: `jaxlm.compress` (the library function this script calls).
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run to compress.", required=True)
_OUT = flags.DEFINE_string("out", None, "The new workdir (must not exist).", required=True)
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint of --workdir: latest, best or a number.")
_PRUNE = flags.DEFINE_string(
  "prune", "", "Magnitude sparsity (e.g. 0.5), N:M structure (e.g. 2:4) or heads:FRACTION (e.g. heads:0.25); '' = none."
)
_SCOPE = flags.DEFINE_enum("prune_scope", "layer", ["layer", "global"], "Weights or heads ranked per layer or global.")
_HEAD_BATCHES = flags.DEFINE_integer("head_batches", 8, "--prune=heads:F: validation batches scoring the heads.")
_TARGETS = flags.DEFINE_string("prune_targets", r"kernel$", "Regex of the parameter paths pruned.")
_REPORT = flags.DEFINE_bool("report", True, "Write OUT/compression_report.{json,md} against --workdir.")
_QUANTIZE = flags.DEFINE_string("quantize", "", "Quantization scheme (int8, int4, int4-g64, int8-asym, ...).")


def main(argv):
  del argv
  from jaxlm.compress import compress

  step = int(_STEP.value) if _STEP.value.isdigit() else _STEP.value
  record = compress(
    _WORKDIR.value,
    _OUT.value,
    step,
    _PRUNE.value,
    _SCOPE.value,
    _TARGETS.value,
    _QUANTIZE.value,
    _HEAD_BATCHES.value,
    _REPORT.value,
  )
  record.pop("sparsity", None)
  print(json.dumps(record, indent=2), flush=True)


if __name__ == "__main__":
  app.run(main)
