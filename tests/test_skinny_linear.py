"""The few-row linear kernel (minivllm/kernels/skinny_linear.py) against the unfused PyTorch
composition it replaces: F.linear, after RMSNorm (with the residual add) or after SiLU-and-mul,
under flash-attn's rule against float64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minivllm.kernels.skinny_linear import MAX_ROWS, skinny_linear
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
