"""Which shape grid the benchmark suites collect: the GPU's full grid or the CPU smoke shapes.

The grid follows the device, but MINIVLLM_BENCH_GRID=gpu|cpu overrides it. That lets a CPU-only
Slurm login node list the GPU grid (`pytest --collect-only`) for a sweep whose tasks then run, and
collect the same node ids, on GPU nodes.
"""

import os
import random

import torch

_CHOICE = os.environ.get("MINIVLLM_BENCH_GRID", "")
if _CHOICE not in ("", "gpu", "cpu"):
    raise ValueError(f"MINIVLLM_BENCH_GRID: expected 'gpu' or 'cpu' (or unset to follow the device), got {_CHOICE!r}")
GPU_GRID = _CHOICE == "gpu" if _CHOICE else torch.cuda.is_available()


def shared_prefix_lens(batch: int, shared_len: int, on_gpu: bool) -> list[int]:
    """Context lengths of `batch` sequences after a shared prefix of shared_len tokens, each with a
    seeded suffix of its own (the cascade suite's and the tuner's cascade buckets' shape): on a GPU
    uniform in [200, 2048], the shared_prefix engine workload's span (engine_workloads.py); on the
    CPU in [1, 40]."""
    rng = random.Random(batch + shared_len)
    low, high = (200, 2048) if on_gpu else (1, 40)
    return [shared_len + rng.randint(low, high) for _ in range(batch)]
