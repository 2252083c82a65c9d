"""Copy each sequence's keys and values out of a paged cache into packed (varlen) rows, so that
prefill over pages smaller than a K/V tile can run the contiguous kernel's TMA path instead of
gathering every tile through pointers. The copy reads and writes the keys once each; the
attention then reads them once per query tile of every head, which is where the copy pays
(a prefill of hundreds of new tokens or more). The device's tuning table decides where it runs
(the prefill config's `gather`).
"""

import torch
import triton
import triton.language as tl


# A caller may size its block table to each batch's longest sequence: not specialised on (see _flash_fwd).
@triton.jit(do_not_specialize=["stride_btb", "max_blocks"])
def _gather_pages(
    K_CACHE, V_CACHE, K_OUT, V_OUT, BT, CU_K,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_btb, max_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr,
):
    # Grid (token tiles, kv heads, batch): each program copies BLOCK_T tokens of one kv head.
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    # A context longer than its block-table row would read another row's blocks: clamp the reads
    # and poison the values, so that attention over them is NaN, as the paged kernel's is.
    overflow = k_len > max_blocks * PAGE
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < tl.minimum(k_len, max_blocks * PAGE)
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    blk = tl.load(BT + seq.to(tl.int64) * stride_btb + offs_t // PAGE, mask=t_ok, other=0).to(tl.int64)
    k = tl.load(K_CACHE + (blk * stride_kb + (offs_t % PAGE) * stride_kt + head * stride_kh)[:, None] + offs_d[None, :], mask=mask)
    v = tl.load(V_CACHE + (blk * stride_vb + (offs_t % PAGE) * stride_vt + head * stride_vh)[:, None] + offs_d[None, :], mask=mask)
    v = tl.where(overflow, float("nan"), v)
    num_kv_heads = tl.num_programs(1)
    rows = ((k_start + offs_t).to(tl.int64) * num_kv_heads + head) * HEAD_DIM
    tl.store(K_OUT + rows[:, None] + offs_d[None, :], k, mask=mask)
    tl.store(V_OUT + rows[:, None] + offs_d[None, :], v.to(V_OUT.dtype.element_ty), mask=mask)


# Tokens per program: 64 rows of one head (16 KB of bf16 at head_dim 128) keep a copy's loads
# in flight without a tile choice to tune; the copy is a small share of the prefill it serves.
GATHER_TOKENS = 64


def gather_plan(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int,
                block_d: int) -> tuple:
    """(kernel, grid, kwargs, k, v) for already-checked paged prefill arguments: k and v are new
    packed (batch * max_seqlen_k, num_kv_heads, head_dim) buffers in the caches' dtype whose rows
    cu_seqlens_k[i] to cu_seqlens_k[i + 1] the launch fills with sequence i's keys and values
    (the host knows only max_seqlen_k, so the buffers are sized for every sequence at that length)."""
    batch = cu_seqlens_k.shape[0] - 1
    _, page, num_kv_heads, head_dim = k_cache.shape
    k = torch.empty(batch * max_seqlen_k, num_kv_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    kwargs = dict(
        K_CACHE=k_cache, V_CACHE=v_cache, K_OUT=k, V_OUT=v, BT=block_table, CU_K=cu_seqlens_k,
        stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_btb=block_table.stride(0), max_blocks=block_table.shape[1],
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=GATHER_TOKENS, PAGE=page,
    )
    return _gather_pages, (max(1, triton.cdiv(max_seqlen_k, GATHER_TOKENS)), num_kv_heads, batch), kwargs, k, v
