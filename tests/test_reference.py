"""Check the plain-PyTorch references against torch's scaled_dot_product_attention."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minivllm.reference import (
    attention_ref,
    paged_decode_gather,
    paged_decode_loop,
    store_kvcache_ref,
)
from minivllm.reference.inputs import PagedCache, cu_seqlens, generator, paged_cache, randn
from minivllm.reference.tolerance import ToleranceError

F64 = torch.float64
CPU = torch.device("cpu")

# (len_q, len_k) per sequence, packed in this order.
SEQLENS = {
    "self": [(1, 1), (7, 7), (16, 16), (17, 17)],
    "prefix": [(1, 18), (3, 33), (16, 17), (5, 5)],
    # More queries than keys: under the bottom-right causal mask the first rows see nothing.
    "q_exceeds_k": [(5, 2), (3, 0), (4, 4)],
}
HEADS = [(5, 1), (6, 3), (4, 4)]  # (num_heads, num_kv_heads)
CONTEXT_LENS = [1, 16, 17, 33, 0, 5, 32]


def bottom_right_causal(len_q, len_k):
    return torch.ones(len_q, len_k, dtype=torch.bool).tril(diagonal=len_k - len_q)


def sdpa(q, k, v, mask, scale):
    """q (Lq, H, D), k/v (Lk, Hkv, D), mask bool (Lq, Lk) or None -> (Lq, H, D).

    Rows that see no key are set to 0, the references' convention."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
    )[0].transpose(0, 1)
    if mask is not None:
        out = torch.where(mask.any(-1)[:, None, None], out, 0.0)
    return out


def make_varlen(gen, seqlens, heads, head_dim, dtype=F64):
    """Packed q (total_q, H, D), k, v (total_k, Hkv, D)."""
    num_heads, num_kv_heads = heads
    total_q = sum(lq for lq, _ in seqlens)
    total_k = sum(lk for _, lk in seqlens)
    q = randn((total_q, num_heads, head_dim), dtype, CPU, gen)
    k = randn((total_k, num_kv_heads, head_dim), dtype, CPU, gen)
    v = randn((total_k, num_kv_heads, head_dim), dtype, CPU, gen)
    return q, k, v


def expected_varlen(q, k, v, seqlens, causal, scale):
    outs, q0, k0 = [], 0, 0
    for lq, lk in seqlens:
        mask = (
            bottom_right_causal(lq, lk)
            if causal
            else torch.ones(lq, lk, dtype=torch.bool)
        )
        outs.append(
            sdpa(q[q0 : q0 + lq], k[k0 : k0 + lk], v[k0 : k0 + lk], mask, scale)
        )
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


def make_paged(gen, k, v, lengths, block_size) -> PagedCache:
    """Write packed k, v (sum(lengths), Hkv, D) into a random-filled, randperm-scattered paged cache
    (cases.paged_cache) through its block table."""
    cache = paged_cache(lengths, block_size, k.shape[1], k.shape[2], k.dtype, CPU, gen)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    blocks = cache.block_table[seq, pos // block_size].long()
    cache.k_cache[blocks, pos % block_size] = k
    cache.v_cache[blocks, pos % block_size] = v
    return cache


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [59, 80])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("case", list(SEQLENS))
def test_attention_contiguous(case, heads, head_dim, causal):
    gen = generator(0, CPU)
    seqlens = SEQLENS[case]
    q, k, v = make_varlen(gen, seqlens, heads, head_dim)
    out = attention_ref(
        q,
        k,
        v,
        cu_seqlens([lq for lq, _ in seqlens], CPU),
        cu_seqlens([lk for _, lk in seqlens], CPU),
        causal=causal,
        compute_dtype=F64,
    )
    assert out.dtype == F64 and out.shape == q.shape
    torch.testing.assert_close(
        out, expected_varlen(q, k, v, seqlens, causal, head_dim**-0.5)
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(5, 1), (6, 3)])
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("case", list(SEQLENS))
def test_attention_paged(case, block_size, heads, causal):
    gen = generator(1, CPU)
    seqlens, head_dim = SEQLENS[case], 59
    q, k, v = make_varlen(gen, seqlens, heads, head_dim)
    k_lens = [lk for _, lk in seqlens]
    paged = make_paged(gen, k, v, k_lens, block_size)
    out = attention_ref(
        q,
        paged.k_cache,
        paged.v_cache,
        cu_seqlens([lq for lq, _ in seqlens], CPU),
        cu_seqlens(k_lens, CPU),
        causal=causal,
        block_table=paged.block_table,
        compute_dtype=F64,
    )
    torch.testing.assert_close(
        out, expected_varlen(q, k, v, seqlens, causal, head_dim**-0.5)
    )


def test_attention_rows_without_keys_are_exactly_zero():
    gen = generator(2, CPU)
    seqlens = SEQLENS["q_exceeds_k"]
    q, k, v = make_varlen(gen, seqlens, (6, 3), 80)
    out = attention_ref(
        q,
        k,
        v,
        cu_seqlens([lq for lq, _ in seqlens], CPU),
        cu_seqlens([lk for _, lk in seqlens], CPU),
        compute_dtype=F64,
    )
    # (5, 2): first 3 rows see no key; (3, 0): all 3 rows see none.
    assert torch.equal(out[0:3], torch.zeros_like(out[0:3]))
    assert torch.equal(out[5:8], torch.zeros_like(out[5:8]))
    assert out[3:5].abs().sum() > 0 and out[8:].isfinite().all()


def test_attention_softmax_scale():
    gen = generator(3, CPU)
    seqlens = SEQLENS["prefix"]
    q, k, v = make_varlen(gen, seqlens, (5, 1), 59)
    out = attention_ref(
        q,
        k,
        v,
        cu_seqlens([lq for lq, _ in seqlens], CPU),
        cu_seqlens([lk for _, lk in seqlens], CPU),
        softmax_scale=0.37,
        compute_dtype=F64,
    )
    torch.testing.assert_close(out, expected_varlen(q, k, v, seqlens, True, 0.37))


def make_decode(gen, heads, head_dim, block_size, dtype=F64):
    """q (batch, H, D), packed contexts k, v (sum(CONTEXT_LENS), Hkv, D) and their paged caches."""
    num_heads, num_kv_heads = heads
    total = sum(CONTEXT_LENS)
    q = randn((len(CONTEXT_LENS), num_heads, head_dim), dtype, CPU, gen)
    k = randn((total, num_kv_heads, head_dim), dtype, CPU, gen)
    v = randn((total, num_kv_heads, head_dim), dtype, CPU, gen)
    paged = make_paged(gen, k, v, CONTEXT_LENS, block_size)
    return q, k, v, paged.k_cache, paged.v_cache, paged.block_table


def expected_decode(q, k, v, scale):
    outs = [
        sdpa(q[b : b + 1], k_seq, v_seq, None, scale)[0]
        if len(k_seq)
        else torch.zeros_like(q[b])
        for b, (k_seq, v_seq) in enumerate(
            zip(k.split(CONTEXT_LENS), v.split(CONTEXT_LENS), strict=True)
        )
    ]
    return torch.stack(outs)


@pytest.mark.parametrize("block_size", [1, 7, 16])
@pytest.mark.parametrize("head_dim", [59, 80])
@pytest.mark.parametrize("heads", HEADS)
def test_paged_decode(heads, head_dim, block_size):
    gen = generator(4, CPU)
    q, k, v, k_cache, v_cache, table = make_decode(gen, heads, head_dim, block_size)
    context_lens = torch.tensor(CONTEXT_LENS, dtype=torch.int32)
    expected = expected_decode(q, k, v, head_dim**-0.5)

    loop = paged_decode_loop(
        q, k_cache, v_cache, table, context_lens, compute_dtype=F64
    )
    gather = paged_decode_gather(
        q, k_cache, v_cache, table, context_lens, compute_dtype=F64
    )
    empty = CONTEXT_LENS.index(0)
    for out in (loop, gather):
        assert out.dtype == F64 and out.shape == q.shape
        torch.testing.assert_close(out, expected)
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    torch.testing.assert_close(loop, gather)


@pytest.mark.parametrize("decode", [paged_decode_loop, paged_decode_gather])
def test_paged_decode_softmax_scale(decode):
    gen = generator(5, CPU)
    q, k, v, k_cache, v_cache, table = make_decode(gen, (6, 3), 59, 16)
    context_lens = torch.tensor(CONTEXT_LENS, dtype=torch.int32)
    out = decode(
        q, k_cache, v_cache, table, context_lens, softmax_scale=0.37, compute_dtype=F64
    )
    torch.testing.assert_close(out, expected_decode(q, k, v, 0.37))


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_store_kvcache(block_size, contiguous):
    gen = generator(6, CPU)
    num_blocks, num_kv_heads, head_dim, num_tokens = 13, 3, 59, 11
    num_slots = num_blocks * block_size
    # Non-contiguous caches are views into wider buffers; writes must still land in them.
    width = head_dim if contiguous else head_dim + 5
    k_cache = randn((num_blocks, block_size, num_kv_heads, width), F64, CPU, gen)[..., :head_dim]
    v_cache = randn((num_blocks, block_size, num_kv_heads, width), F64, CPU, gen)[..., :head_dim]
    key = randn((num_tokens, num_kv_heads, head_dim), F64, CPU, gen)
    value = randn((num_tokens, num_kv_heads, head_dim), F64, CPU, gen)
    # The last slot is never a target, so a -1 mistaken for a Python index would show there.
    slots = torch.randperm(num_slots - 1, generator=gen)[:num_tokens]
    slot_mapping = torch.where(torch.arange(len(slots)) % 3 == 1, -1, slots)

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot != -1:
            expected_k[slot // block_size, slot % block_size] = key[t]
            expected_v[slot // block_size, slot % block_size] = value[t]
    assert (slot_mapping == -1).any() and (slot_mapping >= 0).any()

    assert store_kvcache_ref(key, value, k_cache, v_cache, slot_mapping) is None
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_bf16_same_dtype_reference():
    gen = generator(7, CPU)
    seqlens = SEQLENS["prefix"]
    q, k, v = make_varlen(gen, seqlens, (6, 3), 80, dtype=torch.bfloat16)
    cu_q = cu_seqlens([lq for lq, _ in seqlens], CPU)
    cu_k = cu_seqlens([lk for _, lk in seqlens], CPU)
    same = attention_ref(q, k, v, cu_q, cu_k)
    exact = attention_ref(q, k, v, cu_q, cu_k, compute_dtype=F64)
    assert same.dtype == torch.bfloat16 and exact.dtype == F64
    torch.testing.assert_close(
        exact,
        expected_varlen(q.double(), k.double(), v.double(), seqlens, True, 80**-0.5),
    )
    torch.testing.assert_close(same.double(), exact, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("decode", [paged_decode_loop, paged_decode_gather])
def test_bf16_same_dtype_decode(decode):
    gen = generator(8, CPU)
    q, _, _, k_cache, v_cache, table = make_decode(
        gen, (5, 1), 80, 16, dtype=torch.bfloat16
    )
    context_lens = torch.tensor(CONTEXT_LENS, dtype=torch.int32)
    same = decode(q, k_cache, v_cache, table, context_lens)
    exact = decode(q, k_cache, v_cache, table, context_lens, compute_dtype=F64)
    assert same.dtype == torch.bfloat16 and exact.dtype == F64
    torch.testing.assert_close(same.double(), exact, atol=3e-2, rtol=3e-2)


# Run under `python -O`, which strips every `assert`: the gate must still refuse a wrong output.
WRONG_OUTPUT_UNDER_O = """
import torch
from minivllm.reference import paged_decode_gather
from minivllm.reference.decode_check import check_decode
from minivllm.reference.inputs import generator, paged_cache, randn
from minivllm.reference.tolerance import ToleranceError, assert_within_tolerance

assert False, "python -O strips asserts; this one ran"
gen = generator(4, torch.device("cpu"))
q = randn((3, 4, 16), torch.bfloat16, "cpu", gen)
cache = paged_cache([20] * 3, 16, 2, 16, torch.bfloat16, "cpu", gen)
lens = torch.full((3,), 20, dtype=torch.int32)
wrong = paged_decode_gather(q, cache.k_cache, cache.v_cache, cache.block_table, lens) + 1
for check in (lambda: check_decode(wrong, q, cache, lens, "wrong"), lambda: assert_within_tolerance(torch.ones(2), torch.zeros(2), torch.zeros(2), "wrong")):
    try:
        check()
    except ToleranceError as e:
        print("refused:", e)
    else:
        print("passed a wrong output")
"""


def test_the_tolerance_gate_holds_under_python_O():
    """The tuner times only candidates that pass the gate; under -O a bare assert would let a
    wrong one through. ToleranceError is raised explicitly, and is an AssertionError for pytest."""
    assert issubclass(ToleranceError, AssertionError)
    proc = subprocess.run([sys.executable, "-O", "-c", WRONG_OUTPUT_UNDER_O], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: wrong: max error") for line in lines), proc.stdout
