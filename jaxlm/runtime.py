"""Process setup that must happen before JAX uses a device: XLA flags for GPUs, the host allocator for CPU runs,
and multi-host initialisation.

`main.py` and `scripts/benchmark.py` call `set_recommended_xla_flags()` and `keep_freed_host_memory()` before
importing jax, then `initialize_distributed(...)`. Multi-host runs (TPU pods, SLURM or Open MPI GPU clusters, or
any set of processes given a coordinator address) are the same program in every process: each process feeds its
share of the batch, Orbax writes checkpoints collectively, and only process 0 logs metrics.
"""

import ctypes
import os
import platform
import sys

# XLA flags for NVIDIA GPUs, added to XLA_FLAGS unless already set there (values as MaxText and the
# JAX GPU performance guide recommend): overlap collectives with compute, and keep matmuls on cuBLAS.
RECOMMENDED_GPU_XLA_FLAGS = (
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  "--xla_gpu_enable_triton_gemm=false",
)

# Environment variables that mean "this process is one of several" for a cluster jax can detect itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _has_nvidia_gpu() -> bool:
  return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def _cpu_only() -> bool:
  """Whether jax will compute on the host CPU: JAX_PLATFORMS=cpu, or no NVIDIA GPU and no TPU (/dev/accel*)."""
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    return True
  return not _has_nvidia_gpu() and not os.path.exists("/dev/accel0")


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


def keep_freed_host_memory() -> bool:
  """On a CPU-only Linux host with glibc: malloc keeps freed memory for reuse (no mmap for large blocks, no trimming
  of the heap, one arena). Call before jax starts. Returns whether it applied.

  XLA:CPU allocates a step's temporary buffers anew at every execution, and glibc serves blocks over its mmap
  threshold (at most 32 MiB) with fresh mappings that it unmaps again on free: every train step page-faults its
  working set back in and the kernel zeroes it, a third of the quickstart step's CPU time (340 of 1030 ms per step
  in system time; 5 ms with this). One arena, because glibc's other arenas serve a block larger than 64 MiB (a
  step's temporaries are one such block) with a fresh mmap whatever is set here: with two arenas the quickstart
  step ran at 7.5k or 11.8k tokens/s depending on which arena XLA's executing thread had drawn (13M vs 5M page
  faults per run), with one at 8.9k-10.9k every run. The numbers computed are the same. The price: the process
  keeps its peak heap until it exits, which a training run reaches at every step anyway. Left alone where jax may
  use an accelerator, on other C libraries, and when GLIBC_TUNABLES or MALLOC_* variables set malloc options.
  """
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not _cpu_only():
    return False
  if "GLIBC_TUNABLES" in os.environ or any(name.startswith("MALLOC_") for name in os.environ):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(
    mallopt(parameter, value) == 1
    for parameter, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
  )


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
