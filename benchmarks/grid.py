"""Which shape grid the benchmark suites collect: the GPU's full grid or the CPU smoke shapes.

The grid follows the device, but MINIVLLM_BENCH_GRID=gpu|cpu overrides it. That lets a CPU-only
Slurm login node list the GPU grid (`pytest --collect-only`) for a sweep whose tasks then run, and
collect the same node ids, on GPU nodes.
"""

import os

import torch

_CHOICE = os.environ.get("MINIVLLM_BENCH_GRID", "")
if _CHOICE not in ("", "gpu", "cpu"):
    raise ValueError(f"MINIVLLM_BENCH_GRID: expected 'gpu' or 'cpu' (or unset to follow the device), got {_CHOICE!r}")
GPU_GRID = _CHOICE == "gpu" if _CHOICE else torch.cuda.is_available()

# Each sequence's own tokens after a shared prefix (the cascade suite and the tuner's cascade
# buckets): the shared_prefix engine workload's span on a GPU (benchmarks/engine_workloads.py).
SUFFIX_SPAN = {True: (200, 2048), False: (1, 40)}  # keyed by "on a GPU"
