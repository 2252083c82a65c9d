"""Device timing inside pytest-benchmark.

pytest-benchmark times a round as `timer()` after the call minus `timer()` before it. Its default
host clock is wrong for asynchronous launches: it measures how fast Python enqueues work. On a GPU
we hand it a clock whose readings are CUDA events, and whose difference is the elapsed device
time, so the JSON's stats are device seconds. Before every round a buffer larger than L2 is
rewritten and read back (outside the timed region, in the same stream), so each round reads its
inputs from HBM as a cold serving step would, without paying for the flush's own dirty lines;
then the device sleeps while the host enqueues the call, so launch latency stays out of the
figure (see ColdRound).
"""

import math
import statistics
import time
from collections.abc import Callable

import torch

MAX_ROUNDS = 1000
ESTIMATE_ROUNDS = 3
MAX_COVER_S = 1e-3


class _EventStamp:
    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: "_EventStamp") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) / 1e3


class CudaEventClock:
    """A pytest-benchmark timer: each reading records a CUDA event on the current stream; the
    difference of two readings is the device time between them, in seconds."""

    __name__ = "cuda_event_clock"  # pytest-benchmark stores the timer by name in the JSON

    def __call__(self) -> _EventStamp:
        return _EventStamp()


class ColdRound:
    """What the device runs, untimed, before every timed round, so the round starts cold: an L2
    flush (it rewrites a buffer of max(256 MiB, 4x L2) so no input survives in L2, and reads it
    back), then a launch cover (it sleeps `launch_cover_s` seconds so the GPU is still busy when
    the host has finished enqueuing the call). The events then bracket device work only, not the
    gap while Python launches it. The cover is capped at MAX_COVER_S: an implementation that needs
    longer to launch is host-bound and is timed as such.

    The read-back matters for kernels that read less than L2 holds: after a write-only flush, L2
    is full of dirty lines, and the timed kernel's first reads pay for writing them back to HBM
    (a third more time for decode at batch 1, 8k context, on an H100; benchmarks/NOTES.md)."""

    def __init__(self, device: torch.device):
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        self.buffer = torch.empty(max(256 << 20, 4 * l2), dtype=torch.int8, device=device)
        self.launch_cover_s = 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # first call loads the kernel
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        self.cycles_per_s = 10_000_000 / (start.elapsed_time(end) / 1e3)

    def __call__(self) -> None:
        self.buffer.fill_(1)
        self.buffer.view(torch.int64).sum()  # leaves L2 holding clean lines only
        if self.launch_cover_s:
            torch.cuda._sleep(int(self.launch_cover_s * self.cycles_per_s))


def _rounds(per_round: float, config) -> int:
    """pytest-benchmark's own knobs decide the count: enough rounds to fill
    --benchmark-max-time, never fewer than --benchmark-min-rounds."""
    max_time = float(config.getoption("benchmark_max_time"))
    min_rounds = int(config.getoption("benchmark_min_rounds"))
    return max(min_rounds, min(MAX_ROUNDS, math.ceil(max_time / max(per_round, 1e-7))))


def size_launch_cover(fn: Callable[[], object], cold_round: ColdRound) -> tuple[float, float]:
    """Run `fn` ESTIMATE_ROUNDS times after the cold round and size its launch cover from the
    host's enqueue time. Returns the medians (host enqueue seconds, device seconds)."""
    clock, host, dev = CudaEventClock(), [], []
    cold_round.launch_cover_s = 0.0
    for _ in range(ESTIMATE_ROUNDS):
        cold_round()
        start, t0 = clock(), time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        dev.append(clock() - start)
    cold_round.launch_cover_s = min(MAX_COVER_S, 2 * statistics.median(host) + 20e-6)
    return statistics.median(host), statistics.median(dev)


def median_s(fn: Callable[[], object], clock: Callable[[], object], rounds: int, before: Callable[[], object] | None = None) -> float:
    """The median over `rounds` calls of fn() of the difference of two `clock` readings around
    each (time.perf_counter, or a CudaEventClock for device time), before() running untimed
    ahead of each call when given."""
    times = []
    for _ in range(rounds):
        if before is not None:
            before()
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def median_device_s(fn: Callable[[], object], cold_round: ColdRound, rounds: int = 50) -> float:
    """The median device time of `fn` over `rounds` calls, each after the cold round (L2 flushed,
    launch covered), as the suites time it. For tools outside pytest-benchmark."""
    size_launch_cover(fn, cold_round)
    return median_s(fn, CudaEventClock(), rounds, before=cold_round)


def measure(benchmark, fn: Callable[[], object], device: torch.device, config, cold_round: ColdRound | None) -> None:
    """Time `fn()` into `benchmark`'s stats: device time between CUDA events after the ColdRound on
    a GPU, host time on the CPU, where every op is synchronous. The caller has already run `fn`
    once (its correctness check), so JIT compilation is out of the timed rounds; a few more
    untimed calls here warm caches, measure the host's launch time and size the round count.
    Records extra_info["host_launch_us"], the host time to enqueue one call."""
    if device.type == "cuda":
        if not hasattr(benchmark, "_timer"):
            raise RuntimeError("this pytest-benchmark has no BenchmarkFixture._timer; the CUDA event clock cannot be installed")
        host, dev = size_launch_cover(fn, cold_round)
        benchmark._timer = CudaEventClock()
        benchmark.pedantic(fn, setup=cold_round, rounds=_rounds(dev, config), warmup_rounds=1)
    else:
        start = time.perf_counter()
        fn()
        host = time.perf_counter() - start
        benchmark.pedantic(fn, rounds=_rounds(host, config), warmup_rounds=0)
    benchmark.extra_info["host_launch_us"] = 1e6 * host
