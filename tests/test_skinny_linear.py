"""The few-row linear kernel (minivllm/kernels/skinny_linear.py) against the unfused PyTorch
composition it replaces: F.linear, after RMSNorm (with the residual add) or after SiLU-and-mul,
under flash-attn's rule against float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minivllm.kernels.skinny_linear import MAX_ROWS, pdl_supported, skinny_linear
from minivllm.reference import rms_norm_ref, silu_and_mul_ref
from minivllm.reference.inputs import generator, randn
from minivllm.reference.tolerance import assert_within_tolerance
from tests.cases import DTYPES

EPS = 1e-6
MODES = ("plain", "norm", "add_norm", "gated")


def reference(mode: str, x, weight, residual, norm_weight):
    """y, or (y, x + residual), computed as the model computes it unfused, in the inputs' dtype."""
    if mode == "plain":
        return F.linear(x, weight)
    if mode == "gated":
        return F.linear(silu_and_mul_ref(x), weight)
    if mode == "norm":
        return F.linear(rms_norm_ref(x, norm_weight, EPS), weight)
    normed, summed = rms_norm_ref(x, norm_weight, EPS, residual)
    return F.linear(normed, weight), summed


@given(rows=st.integers(1, MAX_ROWS), k=st.sampled_from([16, 59, 96]), n=st.sampled_from([8, 37, 100]), mode=st.sampled_from(MODES),
       dtype=st.sampled_from(DTYPES), block_k=st.sampled_from([16, 32]), seed=st.integers(0, 2**31 - 1))
def test_skinny_linear_matches_the_unfused_layers(rows, k, n, mode, dtype, block_k, seed, device):
    """Odd widths off the tiles' edges, one row (the CUDA-core path) and more (the dot path), x a
    strided view of wider rows as the model's activations are, scales that differ by row."""
    gen = generator(seed, device)
    width = 2 * k if mode == "gated" else k
    x = (randn((rows, width + 5), dtype, device, gen) * 3)[:, :width]
    weight = randn((n, k), dtype, device, gen) / k**0.5
    residual = randn((rows, k), dtype, device, gen) if mode == "add_norm" else None
    norm_weight = (0.5 + torch.rand(k, generator=gen, device=device)).to(dtype) if mode in ("norm", "add_norm") else None
    out = skinny_linear(x, weight, residual=residual, norm_weight=norm_weight, eps=EPS, gated=mode == "gated", tile=(16, block_k, 4, 2))
    inputs = (x, weight, residual, norm_weight)
    ref64 = reference(mode, *(None if t is None else t.double() for t in inputs))
    ref = reference(mode, *inputs)
    if mode == "add_norm":
        (out, summed), (ref64, _), (ref, ref_summed) = out, ref64, ref
        assert torch.equal(summed, ref_summed)  # the residual stream is rounded as the unfused add rounds it
    assert out.dtype == dtype
    assert_within_tolerance(out, ref64, ref, f"skinny_linear {mode}")


def test_the_residual_sum_is_written_once_whatever_the_grid(device):
    """Program 0 writes x + residual; with many programs the sum is still whole, and every column
    of a given `out` is written (N off a tile edge)."""
    gen = generator(3, device)
    x, residual = randn((3, 40), torch.float32, device, gen), randn((3, 40), torch.float32, device, gen)
    weight, norm_weight = randn((70, 40), torch.float32, device, gen), torch.ones(40, device=device)
    out = torch.full((3, 70), float("nan"), device=device)
    y, summed = skinny_linear(x, weight, residual=residual, norm_weight=norm_weight, tile=(16, 16, 4, 1), out=out)
    assert y is out and torch.equal(summed, x + residual) and y.isfinite().all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: skinny_linear(torch.ones(0, 8, device=d), torch.ones(4, 8, device=d)), "1 to 16 rows"),
        (lambda d: skinny_linear(torch.ones(17, 8, device=d), torch.ones(4, 8, device=d)), "1 to 16 rows"),
        (lambda d: skinny_linear(torch.ones(2, 7, device=d), torch.ones(4, 8, device=d)), "K = 8 columns"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d), gated=True), "2 x weight's K = 16"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d), residual=torch.ones(2, 8, device=d)), "needs norm_weight"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d), norm_weight=torch.ones(7, device=d)), "norm_weight must be"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d), norm_weight=torch.ones(8, device=d), eps=0.0), "eps"),
        (lambda d: skinny_linear(torch.ones(2, 16, device=d), torch.ones(4, 8, device=d), norm_weight=torch.ones(8, device=d), gated=True), "cannot be combined"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d, dtype=torch.float16)), "dtype"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(8, 4, device=d).t()), "contiguous"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d), out=torch.ones(2, 5, device=d)), "out must be"),
        (lambda d: skinny_linear(torch.ones(2, 8, device=d), torch.ones(4, 8, device=d), tile=(8, 16, 4, 1)), "at least 16"),
    ],
)
def test_bad_inputs_name_the_argument(call, match, device):
    with pytest.raises(ValueError, match=match):
        call(device)


def test_pdl_is_refused_where_the_device_cannot_launch_that_way(device):
    """Programmatic dependent launch needs Hopper's instructions, compiled: elsewhere pdl=True is
    a ValueError naming it, not a launch that ignores it."""
    if pdl_supported(device):
        pytest.skip("this device launches with PDL")
    x, weight = torch.ones(1, 32, device=device), torch.ones(8, 32, device=device)
    with pytest.raises(ValueError, match="pdl needs a CUDA device of compute capability 9.0"):
        skinny_linear(x, weight, pdl=True)


def _projection_chain(layers, x0, tile, pdl):
    """A decode step's projections, layer after layer, each reading the one before."""
    h, res = x0, torch.zeros_like(x0)
    for lw in layers:
        a, res = skinny_linear(h, lw["qkv"], residual=res, norm_weight=lw["n1"], eps=EPS, tile=tile, pdl=pdl)
        h = skinny_linear(a, lw["o"], tile=tile, pdl=pdl)
        g, res = skinny_linear(h, lw["up"], residual=res, norm_weight=lw["n2"], eps=EPS, tile=tile, pdl=pdl)
        h = skinny_linear(g, lw["down"], gated=True, tile=tile, pdl=pdl)
    return h, res


@pytest.mark.parametrize("rows", [1, 5])
def test_a_chain_of_pdl_launches_in_a_cuda_graph_gives_the_plain_launches_results(rows, device):
    """Each launch reads what the one before wrote, as a decode step's projections do: launched
    early, each must still wait for its input. A graph of PDL launches (a chain of norm with the
    residual, plain and gated forms) gives bit for bit what plain launches give; a kernel that
    read before its wait would read the buffer's previous contents."""
    if not pdl_supported(device):
        pytest.skip("PDL needs a CUDA device of compute capability 9.0 or later")
    gen = generator(11, device)
    dtype, hidden, inter = torch.bfloat16, 256, 384
    layers = [dict(qkv=randn((hidden, hidden), dtype, device, gen) / hidden**0.5, up=randn((2 * inter, hidden), dtype, device, gen) / hidden**0.5,
                   down=randn((hidden, inter), dtype, device, gen) / inter**0.5, o=randn((hidden, hidden), dtype, device, gen) / hidden**0.5,
                   n1=0.5 + torch.rand(hidden, generator=gen, device=device).to(dtype), n2=0.5 + torch.rand(hidden, generator=gen, device=device).to(dtype))
              for _ in range(6)]
    x0, tile = randn((rows, hidden), dtype, device, gen), (8 if rows == 1 else 16, 64, 4, 3)
    want = _projection_chain(layers, x0, tile, pdl=False)
    _projection_chain(layers, x0, tile, pdl=True)  # compiles outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _projection_chain(layers, x0, tile, pdl=True)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize(device)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
