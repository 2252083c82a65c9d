"""Paged attention for decode: one query token per sequence against its paged KV cache.

One program handles one (sequence, kv head, split): the whole GQA group of query heads that
share the kv head is one tile of rows (padded to 16 for tl.dot), so each K/V tile is read once
per group. Long contexts are split across programs (flash-decoding); each split writes a partial
output and its log-sum-exp, and a second small kernel merges them.

Two ways to fetch a K/V tile, chosen per device by its tuning table (minivllm/kernels/tuning_table.py):
- `tma`: the tile lies inside one page and arrives as one TMA box (Hopper or later);
- `gather`: pointer loads with one block id per token, so a tile may span many pages; the
  loads are unmasked (tokens past the split re-read its last one, then their scores are
  masked), which lets Triton vectorise and pipeline them like a contiguous load.
Each row splits its own context evenly over the grid's splits (whole tiles each), so a row
shorter than the longest one the host sized the grid for runs shorter programs rather than
leaving the tail splits idle while its first ones do all of it; the engine sizes its grids for
max_model_len, so its rows are all shorter. The block-table width is a runtime value, so new
batch shapes and context lengths reuse the compiled kernel.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.attention_tile import gather_kv_tile, online_softmax_step
from minivllm.kernels.checks import (
    check_block_size,
    check_block_table,
    check_capacity,
    check_context_lens,
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
from minivllm.kernels.launch import dot_precision, head_dim_block, parallel_slots, tma_descriptor, tma_ok
from minivllm.kernels.tuning_table import bucket, lookup


@triton.jit(do_not_specialize=["max_blocks", "part_stride"])
def _paged_decode(
    Q, K, V, O, O_PART, LSE_PART, BT, CTX, SHARED, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_btb, max_blocks, part_stride, group,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr, CASCADE: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(CTX + seq)
    # A context longer than its block-table row would read the next row: clamp and poison.
    overflow = ctx > max_blocks * PAGE
    ctx = tl.minimum(ctx, max_blocks * PAGE)
    start = 0
    if CASCADE:
        # The shared prefix's tokens are the cascade's other kernel's (cascade_attention.py).
        shared = tl.load(SHARED)
        start = tl.where(ctx >= shared, shared, 0)
    # The row's own tokens, split evenly in whole tiles (a TMA box then stays inside one page).
    tokens_per_split = tl.cdiv(tl.cdiv(ctx - start, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = start + split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_g < group)[:, None] & d_ok[None, :]
    q = tl.load(Q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    if INTERPRETER:  # the interpreter's bf16 tl.dot multiplies raw bits
        q = q.to(tl.float32)
    bt_row = BT + seq.to(tl.int64) * stride_btb

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if TMA:
            # The tile lies inside one page (PAGE % BLOCK_N == 0): one 4-D box of each cache.
            blk = tl.load(bt_row + start_n // PAGE)
            k = tl.reshape(K.load([blk, start_n % PAGE, kv_head, 0]), [BLOCK_N, BLOCK_D])
            v = tl.reshape(V.load([blk, start_n % PAGE, kv_head, 0]), [BLOCK_N, BLOCK_D])
            # Slots past the context may hold anything, NaN too: V rows there are zeroed so
            # that p = 0 times them stays 0.
            v = tl.where(n_ok[:, None], v, tl.zeros_like(v))
        else:
            k, v = gather_kv_tile(K + kv_head * stride_kh, V + kv_head * stride_vh, bt_row, offs_n, hi, offs_d, d_ok,
                                  stride_kb, stride_kt, stride_vb, stride_vt, PAGE, HEAD_DIM, BLOCK_D, INTERPRETER)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = tl.where(overflow, float("nan"), acc / l_safe[:, None])
    if SPLIT:
        # Partials are fp32 (batch, num_heads, part_stride, BLOCK_D), this kernel's splits first;
        # an empty split has lse -inf.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        row = (seq * tl.num_programs(1) * group + heads).to(tl.int64) * part_stride + split
        tl.store(LSE_PART + row, lse, mask=offs_g < group)
        tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=q_mask)
    else:
        o_ptrs = O + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["num_splits"])  # the split count follows the batch outside a CUDA graph
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


# The merge holds every split's partial in one [splits, head_dim] register tile; past a few
# hundred splits that tile no longer fits in registers (benchmarks/NOTES.md measures it).
MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodeConfig:
    """How one decode launch runs: the fetch scheme ('tma' or 'gather'), the K/V tile (tokens,
    warps, pipeline stages), the programs the split policy packs onto each SM, and which source
    chose it ('table', 'other group', 'family' or 'heuristic'; a tuner's candidate keeps the default)."""

    fetch: str
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    source: str = "heuristic"

    def as_dict(self) -> dict:
        return dict(fetch=self.fetch, block_n=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages, programs_per_sm=self.programs_per_sm)


def tma_able(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> bool:
    """TMA boxes of whole 16-token page tiles or larger, whole heads, up to head_dim 128."""
    block_d = head_dim_block(head_dim)
    return not interpreting() and k_cache.shape[1] >= 16 and block_d <= 128 and all(tma_ok(t, head_dim, block_d) for t in (k_cache, v_cache))


def _heuristic(block_d: int, dtype: torch.dtype) -> DecodeConfig:
    """The untuned choice: gathered tiles, whose unmasked pointer loads every GPU since Ampere
    pipelines through cp.async (3 stages buffer one tile ahead), spanning pages so that each
    step moves tens of KB; fp32 or wide heads halve the tile to keep registers. TMA is left to
    tables that measured it winning. The same holds on Blackwell (sm_100) until its table is
    tuned: the compile check shows this tile compiling there as on Hopper, with warp-level mma
    (the q tile is one GQA group, at most 16 rows, below the 64 rows tcgen05 takes), and decode
    is bound by reading the cache, not by the MMA."""
    if interpreting():
        return DecodeConfig("gather", 16, 4, 1, 2)
    return DecodeConfig("gather", 32 if dtype == torch.float32 or block_d > 128 else 64, 4, 3, 4)


def decode_config(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, max_context: int) -> DecodeConfig:
    """The config a paged_attention_decode call with these tensors launches with: the device's
    tuning table for (dtype, head_dim, page, batch x kv_heads, context, GQA group), else the heuristic.
    A table's TMA choice falls back to gathering where TMA cannot address these caches."""
    head_dim, page = q.shape[-1], k_cache.shape[1]
    rows, group = q.shape[0] * k_cache.shape[2], q.shape[1] // k_cache.shape[2]
    found, source = lookup("decode", q.device, q.dtype, head_dim, page, (bucket(rows), bucket(max_context), bucket(group)))
    if found is None:
        return _heuristic(head_dim_block(head_dim), q.dtype)
    config = DecodeConfig(source=source, **found)
    if config.fetch == "tma" and not (tma_able(k_cache, v_cache, head_dim) and page % config.block_n == 0):
        return DecodeConfig("gather", config.block_n, config.num_warps, config.num_stages, config.programs_per_sm, source)
    return config


def split_policy(batch: int, num_kv_heads: int, max_context: int, block_n: int, programs_per_sm: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, tokens_per_split) from host-side shapes only, so it needs no device sync and
    the same choice holds inside a CUDA graph. Splits are added while the whole grid still fits
    in one wave of `programs_per_sm` programs per SM (a partial second wave would leave SMs idle
    at its end), never finer than one tile nor more than MAX_SPLITS."""
    tiles = max(1, triton.cdiv(max_context, block_n))
    num_splits = min(tiles, MAX_SPLITS, max(1, parallel_slots(device, programs_per_sm) // (batch * num_kv_heads)))
    tokens_per_split = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(max(max_context, 1), tokens_per_split), tokens_per_split


def launch_decode(q, k_cache, v_cache, block_table, context_lens, out, max_context, scale, config: DecodeConfig, num_splits=None,
                  shared=None, prefix_parts=None) -> None:
    """Launch the decode kernel (and the split merge) for already-checked arguments with
    `config` (decode_config's, or a tuner's candidate), writing out; num_splits fixes the split
    count instead of the policy's. For cascade attention (cascade_attention.py), `shared` (int32
    (1,)) makes rows whose context holds it skip that many leading tokens, and
    prefix_parts(o_part, lse_part, first_slot) launches the shared prefix's kernel, which
    `prefix_parts.splits` partial slots per row after this kernel's hold; the merge then folds both."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    block_d, block_n = head_dim_block(head_dim), config.block_n
    tma = config.fetch == "tma"
    splits = num_splits or split_policy(batch, num_kv_heads, max_context, block_n, config.programs_per_sm, q.device)[0]
    slots = splits + (prefix_parts.splits if prefix_parts is not None else 0)
    group = num_heads // num_kv_heads
    if slots > 1:
        o_part = torch.empty(batch, num_heads, slots, block_d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(batch, num_heads, slots, device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out
    k_arg, v_arg = k_cache, v_cache
    if tma:
        k_arg, v_arg = tma_descriptor(k_cache), tma_descriptor(v_cache)
        k_arg.block_shape = [1, block_n, 1, block_d]
        v_arg.block_shape = [1, block_n, 1, block_d]
    _paged_decode[(batch, num_kv_heads, splits)](
        Q=q, K=k_arg, V=v_arg, O=out, O_PART=o_part, LSE_PART=lse_part, BT=block_table, CTX=context_lens, SHARED=shared,
        qk_scale=scale * math.log2(math.e),
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_btb=block_table.stride(0),
        max_blocks=block_table.shape[1], part_stride=slots, group=group,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        PAGE=page, SPLIT=slots > 1, TMA=tma, CASCADE=shared is not None, INTERPRETER=interpreting(), PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if prefix_parts is not None:
        prefix_parts(o_part, lse_part, splits)
    if slots > 1:
        _merge_splits[(batch, num_heads)](
            O=out, O_PART=o_part, LSE_PART=lse_part, stride_ob=out.stride(0), stride_oh=out.stride(1), num_splits=slots,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(slots),
        )


def check_decode_args(q, k_cache, v_cache, block_table, context_lens, max_context_len):
    """paged_attention_decode's argument checks (ValueError naming the argument); returns the
    block table and context lengths as the kernel takes them, and the head size."""
    check_rank("q", q, 3, "(batch, num_heads, head_dim)")
    layout = "(num_blocks, block_size, num_kv_heads, head_dim)"
    check_rank("k_cache", k_cache, 4, layout)
    check_rank("v_cache", v_cache, 4, layout)
    check_same_shape("k_cache", k_cache, "v_cache", v_cache)
    check_float_inputs(q=q, k_cache=k_cache, v_cache=v_cache)
    head_dim = check_head_dim({"q": q.shape[-1], "k_cache": k_cache.shape[-1], "v_cache": v_cache.shape[-1]})
    check_heads(q.shape[1], k_cache.shape[2])
    page = k_cache.shape[1]
    check_block_size(page)
    block_table = check_block_table(block_table, q.shape[0], q.device)
    context_lens = check_int_vector("context_lens", context_lens, q.shape[0], q.device)
    if max_context_len is not None:
        check_host_int("max_context_len", max_context_len)
    check_capacity("context_lens", max_context_len, context_lens, block_table, page, k_cache.shape[0])
    check_context_lens(context_lens, max_context_len)
    return block_table, context_lens, head_dim


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
    The tile, fetch scheme and split policy come from the device's tuning table (decode_config).
    The host never reads device memory; on a GPU, a context longer than its block-table row
    yields NaN for that sequence rather than reading another row. Returns (batch, num_heads,
    head_dim) in q's dtype, written into `out` when given; accumulation is fp32.
    """
    block_table, context_lens, head_dim = check_decode_args(q, k_cache, v_cache, block_table, context_lens, max_context_len)
    if num_splits is not None and not 1 <= check_host_int("num_splits", num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    scale = resolve_scale(softmax_scale, head_dim)

    out = check_out(out, q)
    if q.shape[0] == 0:
        return out
    max_context = block_table.shape[1] * k_cache.shape[1] if max_context_len is None else max_context_len
    launch_decode(q, k_cache, v_cache, block_table, context_lens, out, max_context, scale, decode_config(q, k_cache, v_cache, max_context), num_splits)
    return out
