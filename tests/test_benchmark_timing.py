"""The benchmark clock measures device time: not the host's launch, not the wait for Python.

torch.cuda._sleep spins the GPU for a number of cycles while the host returns at once, so a host
clock would read microseconds where the device spent milliseconds."""

import time

import pytest
import torch

from benchmarks.timing import ColdRound, measure

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cold_round():
    return ColdRound(torch.device("cuda"))


@pytest.fixture(autouse=True)
def timing_enabled(benchmark):
    """pytest-benchmark times nothing under xdist (`-n`) or --benchmark-disable: say so rather
    than fail on the missing stats."""
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled in this run (xdist or --benchmark-disable); nothing is timed")


def test_event_clock_times_device_work_that_the_host_launches_instantly(benchmark, request, cold_round):
    cycles = int(2e-3 * cold_round.cycles_per_s)
    measure(benchmark, lambda: torch.cuda._sleep(cycles), torch.device("cuda"), request.config, cold_round)
    assert 1.8e-3 < benchmark.stats.stats.median < 2.3e-3
    assert benchmark.extra_info["host_launch_us"] < 200
    assert benchmark.stats.stats.rounds >= request.config.getoption("benchmark_min_rounds")


def test_launch_cover_keeps_host_time_out_of_the_figure(benchmark, request, cold_round):
    cycles = int(100e-6 * cold_round.cycles_per_s)

    def slow_launch():
        time.sleep(300e-6)  # host work ahead of the launch, as a wrapper's argument checks are
        torch.cuda._sleep(cycles)

    measure(benchmark, slow_launch, torch.device("cuda"), request.config, cold_round)
    # 100 us of device work; without the cover the window would also hold >= 300 us of waiting.
    assert 80e-6 < benchmark.stats.stats.median < 160e-6
    assert benchmark.extra_info["host_launch_us"] >= 300
