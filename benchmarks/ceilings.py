"""The device ceilings every figure is a percentage of, measured once per run.

copy_gbps: a large device-to-device copy, counting bytes read plus bytes written.
read_gbps: the best rate at which a buffer of read_bytes is read and nothing written back, over
    read_method's candidates: torch's own reductions (sum, amax) and, on a GPU, a streaming
    Triton kernel at a few tile shapes. A read-only kernel beats a copy's rate (dense SDPA decode
    read 112% of copy_gbps on an H200), so this is the ceiling of kernels that only read.
matmul_tflops: a bf16 8192^3 matmul on a GPU.
On the CPU they are measured at sizes that finish in a second (256 MiB, float32 1024^3) and with
torch alone; they describe the host, not the interpreted kernels.
"""

import functools
import subprocess
import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from benchmarks.timing import CudaEventClock, median_s
from minivllm.dtypes import dtype_name
from minivllm.interpreter import interpreting

# (BLOCK, STEPS, num_warps) of the streaming read kernel. On an H200 each read 1 GiB within 0.5%
# of the best of 60 shapes tried (4.55 TB/s); three, so that another card finds its own best.
READ_TILES = ((1024, 8, 8), (4096, 4, 16), (8192, 1, 16))


@triton.jit
def read_kernel(x_ptr, partial_ptr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Sums this program's STEPS * BLOCK contiguous floats into partial_ptr[program]: one float
    written per 8K or more read, so the traffic is the reads."""
    start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        acc += tl.load(x_ptr + start + step * BLOCK + offsets)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    """The median of `reps` timings of one fn() call. On a GPU each timed call is queued behind an
    untimed one, still running when the start event is recorded, so the host's launch time
    (tens of µs for a Triton kernel, 7% of a 1 GiB read on an H200) stays out of the window."""
    on_gpu = device.type == "cuda"
    fn()  # warm-up: cuBLAS handle, allocator, Triton's compile
    return median_s(fn, CudaEventClock() if on_gpu else time.perf_counter, reps, before=fn if on_gpu else None)


def random_buffer(device: torch.device, nbytes: int, seed: int) -> torch.Tensor:
    """`nbytes` of seeded random float32 on `device`."""
    return torch.randn(nbytes // 4, device=device, generator=torch.Generator(device=device).manual_seed(seed))


def _copy_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    src = random_buffer(device, nbytes, 0)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), device, reps) / 1e9


def read_methods(src: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Calls that read all of float32 `src` and write next to nothing, by name: torch.sum and
    torch.amax, and on a GPU the streaming kernel at each of READ_TILES (never in the
    interpreter, where it would take minutes)."""
    methods = {"torch.sum": src.sum, "torch.amax": src.amax}
    if src.device.type != "cuda" or interpreting():
        return methods
    for block, steps, warps in READ_TILES:
        programs, rest = divmod(src.numel(), block * steps)
        assert rest == 0, f"{src.numel()} floats do not split into programs of {block * steps}"
        partial = torch.empty(programs, device=src.device)
        launch = functools.partial(read_kernel[(programs,)], src, partial, BLOCK=block, STEPS=steps, num_warps=warps)
        methods[f"triton {block}x{steps} w{warps}"] = launch
    return methods


def fastest_read(device: torch.device, nbytes: int, reps: int) -> tuple[float, str]:
    """The best of read_methods' rates over a buffer of `nbytes`, each a median over `reps`, and
    the name of the method that gave it."""
    src = random_buffer(device, nbytes, 2)
    rates = {name: nbytes / _median_seconds(fn, device, reps) / 1e9 for name, fn in read_methods(src).items()}
    best = max(rates, key=rates.get)
    return rates[best], best


def _matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, reps) / 1e12


@functools.cache
def ceilings(device: torch.device) -> dict:
    """{"copy_gbps", "read_gbps", "matmul_tflops", "copy_bytes", "read_bytes", "read_method",
    "matmul_shape"} for `device`."""
    on_gpu = device.type == "cuda"
    nbytes = (1 << 30) if on_gpu else (256 << 20)
    # Reads of 4 GiB: over 1 GiB a call's fixed start and drain cost enough that dense SDPA decode,
    # reading 17 GB in one call, measured 100.2-100.4% of that probe on an H100 (NOTES.md).
    read_bytes = 4 * nbytes if on_gpu else nbytes
    n, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    reps = 20 if on_gpu else 5
    read_gbps, read_method = fastest_read(device, read_bytes, reps)
    return {
        "copy_gbps": _copy_gbps(device, nbytes, reps),
        "read_gbps": read_gbps,
        "matmul_tflops": _matmul_tflops(device, n, dtype, reps),
        "copy_bytes": nbytes,
        "read_bytes": read_bytes,
        "read_method": read_method,
        "matmul_shape": f"{n}^3 {dtype_name(dtype)}",
    }


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def software_facts(device: torch.device, interpreter: bool) -> dict:
    """The card and the software a figure was measured with: GPU, SM count, driver, CUDA, torch,
    Triton, and whether Triton interpreted the kernels."""
    on_gpu = device.type == "cuda"
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if on_gpu else "none (CPU)",
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else None,
        "driver": driver_version() if on_gpu else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "interpreter": interpreter,
    }


def machine_facts(device: torch.device, interpreter: bool) -> dict:
    """What machine_info records beside pytest-benchmark's own fields: the card, the software,
    the timer and the ceilings, so a JSON file says where its numbers came from."""
    timer = "cuda_events" if device.type == "cuda" else "host_clock"
    return {**software_facts(device, interpreter), "timer": timer, **ceilings(device)}
