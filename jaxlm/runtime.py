"""Process setup that must happen before JAX uses a device: XLA flags for GPUs and multi-host initialisation.

`main.py` and `scripts/benchmark.py` call `set_recommended_xla_flags()` before importing jax, then
`initialize_distributed(...)`. Multi-host runs (TPU pods, SLURM or Open MPI GPU clusters, or any set of
processes given a coordinator address) are the same program in every process: each process feeds its
share of the batch, Orbax writes checkpoints collectively, and only process 0 logs metrics.
"""

import os

# XLA flags for NVIDIA GPUs, added to XLA_FLAGS unless already set there (values as MaxText and the
# JAX GPU performance guide recommend): overlap collectives with compute, and keep matmuls on cuBLAS.
RECOMMENDED_GPU_XLA_FLAGS = (
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  "--xla_gpu_enable_triton_gemm=false",
)

# Environment variables that mean "this process is one of several" for a cluster jax can detect itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _has_nvidia_gpu() -> bool:
  return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def set_recommended_xla_flags() -> list[str]:
  """Appends RECOMMENDED_GPU_XLA_FLAGS to XLA_FLAGS on a machine with an NVIDIA GPU (before jax starts).

  A flag whose name is already in XLA_FLAGS is left as the user set it. Returns the flags added.
  """
  if not _has_nvidia_gpu() or os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = [flag for flag in RECOMMENDED_GPU_XLA_FLAGS if flag.split("=")[0] not in current]
  os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def _cluster_detected() -> bool:
  if any(int(os.environ.get(name, "1")) > 1 for name in _CLUSTER_SIZE_VARIABLES):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Calls `jax.distributed.initialize` when this is a multi-process run; returns whether it did.

  - Explicit: `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id`
    (e.g. several processes on one machine, or a cluster jax does not know).
  - Detected: SLURM (`SLURM_NTASKS` > 1), Open MPI (`OMPI_COMM_WORLD_SIZE` > 1) or a multi-host TPU
    slice; jax reads the coordinator and process ids from the environment.
  - Otherwise a single process: nothing to do.
  """
  import jax  # after set_recommended_xla_flags

  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError("--coordinator_address needs --num_processes (> 0) and --process_id (0 .. num_processes-1).")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if _cluster_detected():
    jax.distributed.initialize()
    return True
  return False
