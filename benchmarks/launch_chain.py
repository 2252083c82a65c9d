"""A projection's time inside a chain of its own launches, as a decode step runs them: one CUDA
graph of launches back to back, each on a weight of its own. What a programmatic dependent
launch (PDL) saves shows only there, where a launch can start under the one before it; the
tuner's single timed calls, each after an L2 flush, cannot see it.

The weights rotate: together they are at least twice the L2, so every launch reads its weight
from memory, as each layer of a step does."""

import math
import statistics
from functools import partial

import torch

from minivllm.kernels.skinny_linear import skinny_linear

MIN_LAUNCHES, MAX_LAUNCHES = 8, 128
REPLAYS = 100
PDL_GAIN = 0.98  # PDL is kept where the chain runs at most this fraction of its plain time


def chain_launches(weight_bytes: int, device: torch.device) -> int:
    """Launches in a chain: enough distinct weights to fill twice the L2, within [8, 128]."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return min(MAX_LAUNCHES, max(MIN_LAUNCHES, math.ceil(2 * l2 / weight_bytes)))


def graph_us_a_launch(launches: list) -> float:
    """Median µs a launch over REPLAYS replays of one CUDA graph calling `launches` in order."""
    for launch in launches:  # compiles and allocates outside the capture
        launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1e3 * statistics.median(times) / len(launches)


def pdl_chain_us(x: torch.Tensor, weight: torch.Tensor, tile: tuple, fused: dict) -> tuple[float, float]:
    """(plain, pdl): µs a launch of skinny_linear(x, weight copy, tile=tile, **fused) in a chain,
    launched plainly and with PDL. x (rows, K or 2K) and weight (N, K) on a CUDA device that
    supports PDL (skinny_linear.pdl_supported); fused holds the form's other arguments."""
    copies = [weight.clone() for _ in range(chain_launches(weight.numel() * weight.element_size(), weight.device))]
    outs = [torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) for _ in copies]
    timed = {}
    for pdl in (False, True):
        timed[pdl] = graph_us_a_launch([partial(skinny_linear, x, w, tile=tile, out=o, pdl=pdl, **fused) for w, o in zip(copies, outs, strict=True)])
    return timed[False], timed[True]
