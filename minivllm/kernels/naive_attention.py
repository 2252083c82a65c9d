"""Naive one-tile attention: every key of a sequence sits in one tile.

One program takes BLOCK_M queries of one head of one sequence, loads all of the sequence's keys
and values at once, and materialises the whole score row, so it needs no online softmax. It is
the simple baseline the flash kernel is measured against, and it only works while a sequence's
K and V tiles fit on chip: NAIVE_MAX_SEQLEN gives that limit.
"""

import math

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.checks import (
    check_cu_seqlens,
    check_float_inputs,
    check_head_dim,
    check_heads,
    check_host_int,
    check_out,
    check_rank,
    resolve_scale,
)
from minivllm.kernels.launch import dot_precision, head_dim_block
from minivllm.values import check_bool

# Longest sequence per padded head_dim (head_dim rounded up to a power of two, at least 16):
# the K and V tiles hold 16384 elements each, 128 KiB together in fp32, which fits the shared
# memory of every datacenter GPU since the A100 (164 KiB and up).
NAIVE_MAX_SEQLEN = {16: 1024, 32: 512, 64: 256, 128: 128, 256: 64}
_BLOCK_M = 16


@triton.jit
def _naive_attn(
    Q, K, V, O, CU, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    CAUSAL: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(CU + seq)
    seq_len = tl.load(CU + seq + 1) - start
    if pid_m * BLOCK_M >= seq_len:
        return
    kv_head = head // group
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    kv_mask = (offs_l < seq_len)[:, None] & d_ok
    rows_l = (start + offs_l).to(tl.int64)
    k = tl.load(K + rows_l[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows_l[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    # The interpreter's bf16 tl.dot multiplies raw bits; fp32 operands give the true products.
    if INTERPRETER:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Striding over query tiles covers every row even if the caller under-states max_seqlen;
    # such a sequence does not fit the tile and is poisoned with NaN below.
    for start_m in range(pid_m * BLOCK_M, seq_len, tl.num_programs(0) * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m < seq_len)[:, None] & d_ok
        rows_m = (start + offs_m).to(tl.int64)
        q = tl.load(Q + rows_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        if INTERPRETER:
            q = q.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (offs_l < seq_len)[None, :]
        if CAUSAL:
            visible = visible & (offs_l[None, :] <= offs_m[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        p = tl.math.exp2(scores - tl.max(scores, 1)[:, None])
        out = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / tl.sum(p, 1)[:, None]
        out = tl.where(seq_len > BLOCK_L, float("nan"), out)
        tl.store(O + rows_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention over packed sequences with one tile per sequence.

    q: (total, num_heads, head_dim); k, v: (total, num_kv_heads, head_dim); fp16/bf16/fp32.
    cu_seqlens: int32 (batch+1,) prefix sums shared by queries and keys; max_seqlen: host int
    bounding every length, at most NAIVE_MAX_SEQLEN[padded head_dim] (else ValueError).
    Returns (total, num_heads, head_dim) in q's dtype, written into `out` when given.
    """
    check_rank("q", q, 3, "(total, num_heads, head_dim)")
    check_rank("k", k, 3, "(total, num_kv_heads, head_dim)")
    check_rank("v", v, 3, "(total, num_kv_heads, head_dim)")
    if k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must both be (total={q.shape[0]}, num_kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}")
    check_float_inputs(q=q, k=k, v=v)
    head_dim = check_head_dim({"q": q.shape[-1], "k": k.shape[-1], "v": v.shape[-1]})
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    check_heads(num_heads, num_kv_heads)
    causal = check_bool("causal", causal)
    cu_seqlens = check_cu_seqlens("cu_seqlens", cu_seqlens, q.device, q.shape[0])
    batch = cu_seqlens.shape[0] - 1
    check_host_int("max_seqlen", max_seqlen)
    block_d = head_dim_block(head_dim)
    limit = NAIVE_MAX_SEQLEN[block_d]
    if max_seqlen > limit:
        raise ValueError(
            f"max_seqlen ({max_seqlen}) exceeds naive_attention's one-tile limit of {limit} for "
            f"head_dim {head_dim}; use flash_attn_varlen"
        )
    scale = resolve_scale(softmax_scale, head_dim)
    out = check_out(out, q)
    if batch == 0 or q.shape[0] == 0:
        return out
    grid = (max(1, triton.cdiv(max_seqlen, _BLOCK_M)), num_heads, batch)
    _naive_attn[grid](
        Q=q, K=k, V=v, O=out, CU=cu_seqlens, qk_scale=scale * math.log2(math.e),
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        group=num_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_BLOCK_M, BLOCK_L=max(16, triton.next_power_of_2(max_seqlen)),
        CAUSAL=causal, INTERPRETER=interpreting(), PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=1,
    )
    return out
