"""Paged attention for decode: one query token per sequence against its paged KV cache.

One program handles one (sequence, kv head, split): the whole GQA group of query heads that
share the kv head is one tile of rows (padded to 16 for tl.dot), so each K/V tile is read once
per group. Long contexts are split across programs (flash-decoding); each split writes a partial
output and its log-sum-exp, and a second small kernel merges them. Block ids are loaded once per
page in a tile. On Hopper each K/V tile lies inside one page and arrives as one TMA box; elsewhere
(and for pages under 16 tokens) tiles are gathered through pointers. The split size and the
block-table width are runtime values, so new batch shapes and context lengths reuse the compiled
kernel.
"""

import math

import torch
import triton
import triton.language as tl

from kernels.attention_tile import online_softmax_step, score_kv_tile
from kernels.checks import (
    check_block_size,
    check_block_table,
    check_capacity,
    check_float_inputs,
    check_head_dim,
    check_heads,
    check_host_int,
    check_int_vector,
    check_out,
    check_rank,
    check_same_shape,
    resolve_scale,
)
from kernels.launch import dot_precision, head_dim_block, interpreting, parallel_slots, tma_descriptor, tma_ok


@triton.jit(do_not_specialize=["max_blocks", "tokens_per_split"])
def _paged_decode(
    Q, K, V, O, O_PART, LSE_PART, BT, CTX, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_btb, max_blocks, tokens_per_split, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    PAGE_IN_TILE: tl.constexpr = PAGE if PAGE < BLOCK_N else BLOCK_N
    PAGES_IN_TILE: tl.constexpr = BLOCK_N // PAGE_IN_TILE

    ctx = tl.load(CTX + seq)
    # A context longer than its block-table row would read the next row: clamp and poison.
    overflow = ctx > max_blocks * PAGE
    ctx = tl.minimum(ctx, max_blocks * PAGE)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_g < group)[:, None] & d_ok[None, :]
    q = tl.load(Q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    bt_row = BT + seq.to(tl.int64) * stride_btb

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        n_ok = start_n + tl.arange(0, BLOCK_N) < hi
        if TMA:
            # The tile lies inside one page (PAGE % BLOCK_N == 0): one 4-D box of each cache.
            # Slots past the context may hold anything, NaN too: V rows there are zeroed.
            blk = tl.load(bt_row + start_n // PAGE)
            k = tl.reshape(K.load([blk, start_n % PAGE, kv_head, 0]), [BLOCK_N, BLOCK_D])
            v = tl.reshape(V.load([blk, start_n % PAGE, kv_head, 0]), [BLOCK_N, BLOCK_D])
            v = tl.where(n_ok[:, None], v, tl.zeros_like(v))
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            # start_n is a multiple of BLOCK_N, so a tile spans whole pages or lies inside one.
            page_ids = start_n // PAGE + tl.arange(0, PAGES_IN_TILE)
            blk = tl.load(bt_row + page_ids, mask=page_ids * PAGE < hi, other=0).to(tl.int64)
            in_page = start_n % PAGE + tl.arange(0, PAGE_IN_TILE)
            k_rows = tl.reshape(blk[:, None] * stride_kb + in_page[None, :] * stride_kt, [BLOCK_N])
            v_rows = tl.reshape(blk[:, None] * stride_vb + in_page[None, :] * stride_vt, [BLOCK_N])
            kv_mask = n_ok[:, None] & d_ok[None, :]
            qk, v = score_kv_tile(q, K + kv_head * stride_kh, V + kv_head * stride_vh, k_rows, v_rows, offs_d, kv_mask, UPCAST, PRECISION)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(overflow, float("nan"), acc / l_safe[:, None])
    if SPLIT:
        # Partials are fp32 (batch, num_heads, num_splits, BLOCK_D); an empty split has lse -inf.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        row = (seq * tl.num_programs(1) * group + heads).to(tl.int64) * num_splits + split
        tl.store(LSE_PART + row, lse, mask=offs_g < group)
        tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=q_mask)
    else:
        o_ptrs = O + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _merge_splits(
    O, O_PART, LSE_PART, stride_ob, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + row + offs_s, mask=s_ok, other=float("-inf"))
    lse_max = tl.maximum(tl.max(lse, 0), -1.0e30)
    w = tl.math.exp2(lse - lse_max)
    d_ok = offs_d < HEAD_DIM
    part = tl.load(O_PART + (row + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    w_sum = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(O + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


PROGRAMS_PER_SM = 4  # the default tiles below need 23-46 KiB of shared memory at head_dim 128 (Triton 3.6, sm_90): four fit an SM
# The merge holds every split's partial in one [splits, head_dim] register tile. On an H100,
# decode with 512 splits ran at 0.32-0.38x SDPA and with 128 at SDPA's speed (benchmarks/NOTES.md).
MAX_SPLITS = 128


def _tile_config(block_d: int, dtype: torch.dtype, page: int, tma: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for one K/V tile of a decode step.

    A TMA tile lies inside one page. Each tile's block id is itself a load that Triton's
    pipeliner stages ahead of the tile, so num_stages s buffers only (s - 2) // 2 tiles of K and
    V (Triton 3.6, sm_90): eight stages keep three 16-token tiles in flight per program, six
    stages two 32-token tiles (benchmarks/NOTES.md, issue 7, has the measurements)."""
    if interpreting():
        return 16, 4, 1
    if tma:
        return (16, 4, 8) if page == 16 else (32, 4, 6)
    if dtype == torch.float32 or block_d > 128:
        return 32, 4, 2
    # Small pages put one block-table entry in every few rows; a short tile keeps that gather cheap.
    return (16, 4, 6) if page < 16 else (64, 4, 3)


def _split_policy(batch: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, tokens_per_split) from host-side shapes only, so it needs no device sync and
    the same choice holds inside a CUDA graph. Splits are added while the whole grid still fits
    in one wave of resident programs (a partial second wave would leave SMs idle at its end),
    never finer than one tile nor more than MAX_SPLITS."""
    tiles = max(1, triton.cdiv(max_context, block_n))
    num_splits = min(tiles, MAX_SPLITS, max(1, parallel_slots(device, PROGRAMS_PER_SM) // (batch * num_kv_heads)))
    tokens_per_split = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(max(max_context, 1), tokens_per_split), tokens_per_split


def launch_decode(q, k_cache, v_cache, block_table, context_lens, out, max_context, scale, num_splits=None, tile=None, tma=None) -> None:
    """Launch the decode kernel (and the split merge) for already-checked arguments, writing out.

    tile = (BLOCK_N, num_warps, num_stages) overrides the default tile and num_splits fixes the
    split count. K/V tiles load as TMA boxes (Hopper or later, fp16/bf16, head_dim a power of two
    up to 128, pages of at least 16 tokens) unless tma=False; tma=True asks for them wherever the
    tile fits inside one page. benchmarks/tune_decode.py times these variants."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    block_d = head_dim_block(head_dim)
    tma_able = not interpreting() and page >= 16 and all(tma_ok(t, head_dim, block_d) for t in (k_cache, v_cache))
    tma = tma_able and (block_d <= 128 if tma is None else tma)
    block_n, num_warps, num_stages = tile or _tile_config(block_d, q.dtype, page, tma)
    # A TMA box must lie inside one page; the pointer path gathers tiles across pages.
    tma = tma and page % block_n == 0
    if num_splits is None:
        splits, tokens_per_split = _split_policy(batch, num_kv_heads, max_context, block_n, q.device)
    else:
        tokens_per_split = triton.cdiv(triton.cdiv(max(max_context, 1), num_splits), block_n) * block_n
        splits = num_splits
    group = num_heads // num_kv_heads
    if splits > 1:
        o_part = torch.empty(batch, num_heads, splits, block_d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(batch, num_heads, splits, device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out
    k_arg, v_arg = k_cache, v_cache
    if tma:
        k_arg, v_arg = tma_descriptor(k_cache), tma_descriptor(v_cache)
        k_arg.block_shape = [1, block_n, 1, block_d]
        v_arg.block_shape = [1, block_n, 1, block_d]
    _paged_decode[(batch, num_kv_heads, splits)](
        q, k_arg, v_arg, out, o_part, lse_part, block_table, context_lens, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), block_table.stride(0), block_table.shape[1], tokens_per_split, group,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        PAGE=page, SPLIT=splits > 1, TMA=tma, UPCAST=interpreting(), PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits[(batch, num_heads)](
            out, o_part, lse_part, out.stride(0), out.stride(1), splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
        )


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention over a paged KV cache.

    q: (batch, num_heads, head_dim), fp16/bf16/fp32, the new token of each sequence.
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), same dtype as q;
        block_size a power of two in [1, 256].
    block_table: int32 (batch, max_blocks_per_seq), scattered block ids, padded with -1.
    context_lens: int32 (batch,), tokens in each sequence's cache (the new token's K/V included).
    max_context_len: optional host int bounding context_lens; it sizes the splits (default: the
        block table's capacity) and is checked against that capacity.
    num_splits: optional fixed split count in [1, 128] (default: chosen to fill the device).
    On Hopper, K/V tiles of pages of 16 tokens or more load through TMA (see launch_decode).
    The host never reads device memory; on a GPU, a context longer than its block-table row
    yields NaN for that sequence rather than reading another row. Returns (batch, num_heads,
    head_dim) in q's dtype, written into `out` when given; accumulation is fp32.
    """
    check_rank("q", q, 3, "(batch, num_heads, head_dim)")
    layout = "(num_blocks, block_size, num_kv_heads, head_dim)"
    check_rank("k_cache", k_cache, 4, layout)
    check_rank("v_cache", v_cache, 4, layout)
    check_same_shape("k_cache", k_cache, "v_cache", v_cache)
    check_float_inputs(q=q, k_cache=k_cache, v_cache=v_cache)
    head_dim = check_head_dim({"q": q.shape[-1], "k_cache": k_cache.shape[-1], "v_cache": v_cache.shape[-1]})
    batch, num_heads = q.shape[0], q.shape[1]
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    check_heads(num_heads, num_kv_heads)
    check_block_size(page)
    check_block_table(block_table, batch, q.device)
    check_int_vector("context_lens", context_lens, batch, q.device)
    if max_context_len is not None:
        check_host_int("max_context_len", max_context_len)
    check_capacity("context_lens", max_context_len, context_lens, block_table, page, k_cache.shape[0])
    if num_splits is not None and not 1 <= check_host_int("num_splits", num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    scale = resolve_scale(softmax_scale, head_dim)

    out = check_out(out, q)
    if batch == 0:
        return out
    max_context = block_table.shape[1] * page if max_context_len is None else max_context_len
    launch_decode(q, k_cache, v_cache, block_table, context_lens, out, max_context, scale, num_splits)
    return out
