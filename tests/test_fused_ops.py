"""The model's fused elementwise kernels and the sampling kernel against their PyTorch references.

Norms, SiLU-and-mul and q/k norm + rotary follow flash-attn's rule against a float64 run of the
reference; sampling is checked for its distribution, its greedy rows and its determinism.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minivllm.kernels import qk_norm_rope, rms_norm, sample_tokens, silu_and_mul
from minivllm.reference import qk_norm_rope_ref, rms_norm_ref, rope_cos_sin, silu_and_mul_ref, store_kvcache_ref
from minivllm.reference.inputs import generator, randn
from minivllm.reference.tolerance import assert_within_tolerance
from tests.cases import DTYPES

EPS = 1e-6
ROWS = st.integers(1, 37)


def check(kernel_out, ref_fn, inputs, what):
    """kernel_out against ref_fn on the inputs in float64 and in their own dtype."""
    fp64 = ref_fn(*[t.double() for t in inputs])
    same = ref_fn(*inputs)
    for i, (out, ref64, ref) in enumerate(zip(*(x if isinstance(x, tuple) else (x,) for x in (kernel_out, fp64, same)), strict=True)):
        assert out.dtype == inputs[0].dtype
        assert_within_tolerance(out, ref64, ref, f"{what} output {i}")


@given(rows=ROWS, dim=st.sampled_from([16, 59, 128, 1000, 1024]), dtype=st.sampled_from(DTYPES),
       residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rms_norm(rows, dim, dtype, residual, seed, device):
    gen = generator(seed, device)
    # Rows of different scales, as hidden states are; a strided view, as the model passes.
    x = (randn((rows, dim + 3), dtype, device, gen) * 4)[:, :dim]
    weight = randn((dim,), dtype, device, gen)
    if residual:
        res = randn((rows, dim), dtype, device, gen)
        check(rms_norm(x, weight, EPS, res), lambda a, w, r: rms_norm_ref(a, w, EPS, r), (x, weight, res), "add + rms_norm")
    else:
        check(rms_norm(x, weight, EPS), lambda a, w: rms_norm_ref(a, w, EPS), (x, weight), "rms_norm")


@given(rows=ROWS, width=st.sampled_from([1, 17, 1000, 1536]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_silu_and_mul(rows, width, dtype, seed, device):
    x = randn((rows, 2 * width), dtype, device, generator(seed, device)) * 3
    check(silu_and_mul(x), silu_and_mul_ref, (x,), "silu_and_mul")


@given(tokens=ROWS, heads=st.sampled_from([(1, 1), (8, 2), (6, 3), (16, 8), (5, 1)]), head_dim=st.sampled_from([16, 34, 64, 128]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_qk_norm_rope(tokens, heads, head_dim, dtype, seed, device):
    gen = generator(seed, device)
    h, hkv = heads
    # q and k as views into a fused qkv projection, as the model produces them.
    qkv = randn((tokens, (h + 2 * hkv) * head_dim), dtype, device, gen) * 3
    q = qkv[:, : h * head_dim].view(tokens, h, head_dim)
    k = qkv[:, h * head_dim : (h + hkv) * head_dim].view(tokens, hkv, head_dim)
    qw, kw = randn((head_dim,), dtype, device, gen), randn((head_dim,), dtype, device, gen)
    positions = torch.randint(0, 40000, (tokens,), device=device, generator=gen)
    cos, sin = rope_cos_sin(positions, head_dim, 1e6, torch.float64)
    inputs = (q, k, qw, kw, cos.to(dtype), sin.to(dtype))
    check(qk_norm_rope(*inputs, EPS), lambda *a: qk_norm_rope_ref(*a, EPS), inputs, "qk_norm_rope")


@given(tokens=ROWS, heads=st.sampled_from([(8, 2), (6, 3), (5, 1)]), head_dim=st.sampled_from([16, 34, 128]),
       block_size=st.sampled_from([1, 16]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_qk_norm_rope_stores_the_rotated_keys_and_the_values(tokens, heads, head_dim, block_size, dtype, seed, device):
    """With a cache, the same pass writes each token's rotated k and its v into its slot: slots
    scattered over the cache, some tokens -1 (padding) and written nowhere; every other slot
    keeps its NaN. The cache holds exactly the unfused path's bytes: the returned k, and v."""
    gen = generator(seed, device)
    h, hkv = heads
    qkv = randn((tokens, (h + 2 * hkv) * head_dim), dtype, device, gen) * 3
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([h * head_dim, hkv * head_dim, hkv * head_dim], dim=-1))
    qw, kw = randn((head_dim,), dtype, device, gen), randn((head_dim,), dtype, device, gen)
    cos, sin = (t.to(dtype) for t in rope_cos_sin(torch.randint(0, 40000, (tokens,), device=device, generator=gen), head_dim, 1e6, torch.float64))
    num_blocks = -(-2 * tokens // block_size)
    slots = torch.randperm(num_blocks * block_size, device=device, generator=gen)[:tokens]
    slots[torch.rand(tokens, device=device, generator=gen) < 0.2] = -1
    k_cache = torch.full((num_blocks, block_size, hkv, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    q_out, k_out = qk_norm_rope(q, k, qw, kw, cos, sin, EPS, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots.int())
    q_plain, k_plain = qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert torch.equal(q_out, q_plain) and torch.equal(k_out, k_plain)
    want_k, want_v = torch.full_like(k_cache, float("nan")), torch.full_like(v_cache, float("nan"))
    store_kvcache_ref(k_plain, v, want_k, want_v, slots)
    assert torch.equal(k_cache.isnan(), want_k.isnan()) and torch.equal(v_cache.isnan(), want_v.isnan())
    assert torch.equal(k_cache.nan_to_num(), want_k.nan_to_num()) and torch.equal(v_cache.nan_to_num(), want_v.nan_to_num())


def test_qk_norm_rope_takes_the_cache_arguments_together(device):
    q = torch.randn(3, 2, 16, device=device)
    k = torch.randn(3, 1, 16, device=device)
    w, cos = torch.ones(16, device=device), torch.ones(3, 16, device=device)
    with pytest.raises(ValueError, match="go together"):
        qk_norm_rope(q, k, w, w, cos, cos, EPS, v=k)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache = torch.zeros(2, 4, 1, 16, device=device)
        qk_norm_rope(q, k, w, w, cos, cos, EPS, v=k, k_cache=cache, v_cache=cache, slot_mapping=torch.zeros(2, dtype=torch.int32, device=device))


def frequencies(draws: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(draws.cpu(), minlength=vocab).double() / draws.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_distribution(dtype, device):
    """1000 draws of one row at temperature 0.7 land within 4.5 standard deviations of the
    softmax, token by token."""
    draws = 1000
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 1.5], device=device).to(dtype)
    probs = (logits.double() / 0.7).softmax(-1).cpu()
    out = sample_tokens(logits.repeat(draws, 1), torch.full((draws,), 0.7, device=device), seed=11)
    assert out.dtype == torch.long
    assert (frequencies(out, 6) - probs).abs().max() <= 4.5 * (probs * (1 - probs) / draws).sqrt().max()


def test_sampling_greedy_rows_seeds_and_long_rows(device):
    """Temperature 0 is argmax wherever the maximum lies in a long row (split over programs);
    one seed repeats its draws and another changes them; a peaked row samples its peak."""
    gen = generator(5, device)
    vocab = 151_936 if device.type == "cuda" else 5000
    logits = randn((6, vocab), torch.float32, device, gen)
    spots = torch.tensor([0, vocab - 1, 4097, 2048, 2047, vocab // 2], device=device)
    logits[torch.arange(6, device=device), spots] = 50.0
    zeros = torch.zeros(6, device=device)
    assert sample_tokens(logits, zeros, seed=0).tolist() == spots.tolist()
    assert sample_tokens(logits, torch.full((6,), 0.5, device=device), seed=3).tolist() == spots.tolist()
    flat = randn((8, vocab), torch.float32, device, gen) * 0.1
    temps = torch.ones(8, device=device)
    first, again, other = (sample_tokens(flat, temps, seed=s) for s in (7, 7, 8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert ((first >= 0) & (first < vocab)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_under_a_cut(dtype, device):
    """Each row draws only among the tokens whose logit reaches its cut, with the softmax of those
    alone (each frequency within 4.5 standard deviations); a cut of -inf keeps every token, and a
    greedy row keeps its argmax under any cut that keeps it. Four of the kept tokens are adjacent
    columns 4i..4i+3, which share one Philox call: should two of them get the same uniform, the
    lower logit of the two would never be drawn."""
    draws, vocab = 1000, 2048 + 37
    gen = generator(6, device)
    logits = (randn((1, vocab), torch.float32, device, gen) - 8.0).to(dtype)
    spots = torch.tensor([5, 600, 601, 602, 603, vocab - 1], device=device)
    logits[0, spots] = torch.tensor([2.0, 1.0, 0.5, 1.2, 0.8, 1.5], device=device, dtype=dtype)
    # Cut at 0.7: every spot but 601 stays.
    out = sample_tokens(logits.repeat(draws, 1), torch.full((draws,), 0.7, device=device), seed=13, cuts=torch.full((draws,), 0.7, device=device))
    kept = spots[[0, 1, 3, 4, 5]]
    probs = torch.zeros(vocab, dtype=torch.float64)
    probs[kept.cpu()] = (logits[0, kept].double() / 0.7).softmax(-1).cpu()
    assert set(out.tolist()) <= set(kept.tolist())
    assert (frequencies(out, vocab) - probs).abs().max() <= 4.5 * (probs * (1 - probs) / draws).sqrt().max()
    uncut = sample_tokens(logits.repeat(200, 1), torch.ones(200, device=device), seed=14, cuts=torch.full((200,), float("-inf"), device=device))
    assert not set(uncut.tolist()) <= set(spots.tolist())  # the 2,000 tokens near -8 hold about 6% of the mass
    greedy = sample_tokens(logits.repeat(2, 1), torch.zeros(2, device=device), seed=15, cuts=torch.tensor([2.0, -1.0], device=device))
    assert greedy.tolist() == [5, 5]


def test_sampling_reads_strided_temperatures_and_cuts_by_row(device):
    """Views of every other element are copied, not read as if contiguous: greedy row 0 and row 1
    cut to its token 2 give those tokens, as contiguous tensors do."""
    logits = torch.tensor([[0.5, 5.0, 1.0, 2.0], [0.5, 1.0, 3.0, -1.0]], device=device)
    temps = torch.tensor([0.0, 9.0, 1.0, 9.0], device=device)[::2]
    cuts = torch.tensor([-1.0, 7.0, 2.5, 7.0], device=device)[::2]
    assert not temps.is_contiguous() and not cuts.is_contiguous()
    assert sample_tokens(logits, temps, 3, cuts=cuts).tolist() == [1, 2]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d: rms_norm(torch.ones(2, 8, device=d), torch.ones(7, device=d), EPS), "weight must be"),
        (lambda d: rms_norm(torch.ones(2, 8, device=d), torch.ones(8, device=d), EPS, torch.ones(3, 8, device=d)), "same shape"),
        (lambda d: rms_norm(torch.ones(2, 8, device=d), torch.ones(8, device=d, dtype=torch.float16), EPS), "dtype"),
        (lambda d: rms_norm(torch.ones(2, 8, device=d), torch.ones(8, device=d), 0.0), "eps"),
        (lambda d: silu_and_mul(torch.ones(2, 7, device=d)), "even number"),
        (lambda d: qk_norm_rope(torch.ones(2, 4, 6, device=d), torch.ones(2, 2, 6, device=d), torch.ones(6, device=d),
                                torch.ones(6, device=d), torch.ones(3, 6, device=d), torch.ones(3, 6, device=d), EPS), "cos must have shape"),
        (lambda d: qk_norm_rope(torch.ones(2, 4, 5, device=d), torch.ones(2, 2, 5, device=d), torch.ones(5, device=d),
                                torch.ones(5, device=d), torch.ones(2, 5, device=d), torch.ones(2, 5, device=d), EPS), "even"),
        (lambda d: sample_tokens(torch.ones(2, 8, device=d), torch.ones(3, device=d), 0), "temperatures must be"),
        (lambda d: sample_tokens(torch.ones(2, 8, device=d), torch.ones(2, device=d), -1), "seed"),
        (lambda d: sample_tokens(torch.ones(2, 8, device=d).t(), torch.ones(8, device=d), 0), "contiguous"),
        (lambda d: sample_tokens(torch.ones(2, 8, device=d), torch.ones(2, device=d), 0, torch.ones(2, device=d, dtype=torch.float64)), "cuts must be"),
        (lambda d: sample_tokens(torch.ones(2, 8, device=d), torch.ones(2, device=d), 0, torch.ones(3, device=d)), "cuts must be"),
    ],
)
def test_bad_inputs_raise(call, match, device):
    with pytest.raises(ValueError, match=match):
        call(device)
