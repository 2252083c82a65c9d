"""naive_attention inside its one-tile limit, and its refusal past it."""

import pytest
import torch
from hypothesis import assume, given

from minivllm.kernels import naive_attention
from minivllm.kernels.launch import head_dim_block
from minivllm.kernels.naive_attention import NAIVE_MAX_SEQLEN
from minivllm.reference import attention_ref
from minivllm.reference.inputs import as_layout, cu_seqlens, generator, randn
from minivllm.reference.tolerance import assert_matches_reference
from tests.cases import attn_cases


def run_naive(lens, num_heads, num_kv_heads, head_dim, dtype, causal, seed, device, max_seqlen=None, layout="contiguous"):
    gen = generator(seed, device)
    q = randn((sum(lens), num_heads, head_dim), dtype, device, gen)
    k = randn((sum(lens), num_kv_heads, head_dim), dtype, device, gen)
    v = randn((sum(lens), num_kv_heads, head_dim), dtype, device, gen)
    q, k, v, cu = (as_layout(t, layout) for t in (q, k, v, cu_seqlens(lens, device)))
    out = torch.full_like(q, float("nan"))
    naive_attention(q, k, v, cu, max_seqlen or max(lens), causal=causal, out=out)
    assert_matches_reference(out, attention_ref, q, k, v, cu, cu, causal=causal, what=f"lens={lens}")


@given(case=attn_cases(paged=False))
def test_naive_matches_reference(case, device):
    limit = NAIVE_MAX_SEQLEN[head_dim_block(case.head_dim)]
    assume(max(case.q_lens) <= limit)
    run_naive(case.q_lens, case.num_heads, case.num_kv_heads, case.head_dim, case.dtype, case.causal, case.seed, device, layout=case.layout)


@pytest.mark.parametrize("head_dim", [16, 59, 128, 256])
def test_naive_at_its_limit(head_dim, device):
    limit = NAIVE_MAX_SEQLEN[head_dim_block(head_dim)]
    run_naive([limit, 3], 2, 1, head_dim, torch.float16, True, 1, device)


@pytest.mark.parametrize("head_dim", [16, 59, 128, 256])
def test_naive_past_its_limit_raises(head_dim, device):
    limit = NAIVE_MAX_SEQLEN[head_dim_block(head_dim)]
    with pytest.raises(ValueError, match="max_seqlen"):
        run_naive([limit + 1], 2, 1, head_dim, torch.float16, True, 1, device)


def test_sequence_longer_than_max_seqlen_is_nan(device):
    """A caller who under-states max_seqlen gets NaN for that sequence, not a truncated answer."""
    gen = generator(0, device)
    q, k, v = (randn((40, 1, 32), torch.float32, device, gen) for _ in range(3))
    for max_seqlen in (0, 16):
        out = naive_attention(q, k, v, cu_seqlens([40], device), max_seqlen, out=torch.zeros_like(q))
        assert out.isnan().all()
