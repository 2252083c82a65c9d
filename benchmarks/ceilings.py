"""The two device ceilings every figure is a percentage of, measured once per run.

copy_gbps: a large device-to-device copy, counting bytes read plus bytes written.
matmul_tflops: a bf16 8192^3 matmul on a GPU. On the CPU both are measured at sizes that finish in
a second (float32 1024^3); they describe the host, not the interpreted kernels.
"""

import functools
import statistics
import subprocess
import time

import torch
import triton

from benchmarks.figures import dtype_name
from benchmarks.timing import CudaEventClock


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    clock = CudaEventClock() if device.type == "cuda" else time.perf_counter
    fn()  # warm-up: cuBLAS handle, allocator
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def _copy_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    src = torch.randn(nbytes // 4, device=device, generator=torch.Generator(device=device).manual_seed(0))
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, reps) / 1e9


def _matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, reps) / 1e12


@functools.cache
def ceilings(device: torch.device) -> dict:
    """{"copy_gbps", "matmul_tflops", "copy_bytes", "matmul_shape"} for `device`."""
    on_gpu = device.type == "cuda"
    nbytes = (1 << 30) if on_gpu else (256 << 20)
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    reps = 20 if on_gpu else 5
    return {
        "copy_gbps": _copy_gbps(device, nbytes, reps),
        "matmul_tflops": _matmul_tflops(device, n, dtype, reps),
        "copy_bytes": nbytes,
        "matmul_shape": f"{n}^3 {dtype_name(dtype)}",
    }


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_facts(device: torch.device, interpreter: bool) -> dict:
    """What machine_info records beside pytest-benchmark's own fields: the card, the software
    and the ceilings, so a JSON file says where its numbers came from."""
    on_gpu = device.type == "cuda"
    facts = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if on_gpu else "none (CPU)",
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else None,
        "driver": _driver_version() if on_gpu else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": interpreter,
        "timer": "cuda_events" if on_gpu else "host_clock",
    }
    facts.update(ceilings(device))
    return facts
