"""Prefill over contiguous K/V on Hopper with each tile's softmax overlapped with the tensor cores.

The Triton kernel (flash_attention.py) runs QK^T, the softmax and P·V of a tile in order: Triton's
pipeliner waits on each QK^T before its softmax, so the exponentials (about 28% of a 4k tile's
time on the H100, benchmarks/NOTES.md) run while the tensor cores idle. This kernel, written in
Gluon (Triton's explicit-layout dialect), issues tile t's QK^T and tile t-1's P·V as asynchronous
warpgroup MMAs and computes tile t's softmax while the P·V runs: FA3's intra-warpgroup
pipelining. K and V arrive by TMA into rings of STAGES buffers, each stage refilled as soon as
the MMA reading it is done.

Hopper only (warpgroup MMAs are sm_90's): `overlap_ok` says whether a call can take it, and the
tuning table picks it per bucket ("overlap": true), so a card where it loses never runs it.
Same contract as flash_attn_varlen over contiguous keys: packed (total, heads, head_dim)
tensors, cu_seqlens, causal aligned bottom-right, a query that sees no key outputs 0.
"""

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from minivllm.interpreter import interpreting
from minivllm.kernels.launch import tma_ok

# Triton 3.9 renamed the TMA load; 3.6 (the GPU machines') has only the old name.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
HEAD_DIMS = (64, 128)  # 256 would hold a 128 x 256 fp32 accumulator beside the scores: spills


@gluon.jit
def _softmax_tile(s, m_i, l_i, start_n, offs_m, mid, k_len, causal_shift, qk_scale, CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    """Fold scores s (fp32 [M, N], keys start_n...) into the running row max and sum; returns
    (p, m, l, alpha). Tiles from `mid` on cross the end of the keys or the diagonal: masked."""
    if start_n + s.shape[1] > mid:
        offs_n = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(offs_n < k_len, 0)
        if CAUSAL:
            visible = visible & (gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m, 1) + causal_shift)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _load_kv(desc, bars, smem, c, row, col, STAGES: gl.constexpr, pred=True):
    """TMA-load one K or V tile (tile counter c) into its ring stage, arming the stage's barrier."""
    mbarrier.expect(bars.index(c % STAGES), desc.block_type.nbytes, pred=pred)
    tma_load(desc, [row, col], bars.index(c % STAGES), smem.index(c % STAGES), pred=pred)


@gluon.jit
def _flash_fwd_overlap(q_desc, k_desc, v_desc, O, CU_Q, CU_K, qk_scale, stride_ot, stride_oh, group,
                       HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    # Grid (q tiles, heads, batch) as flash_attention's, tiles backwards (longest first under causal).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_desc.dtype
    tile = gl.num_programs(0) - 1 - gl.program_id(0)
    head = gl.program_id(1)
    seq = gl.program_id(2)
    q_start = gl.load(CU_Q + seq)
    q_len = gl.load(CU_Q + seq + 1) - q_start
    k_start = gl.load(CU_K + seq)
    k_len = gl.load(CU_K + seq + 1) - k_start
    kv_col = (head // group) * HEAD_DIM
    causal_shift = k_len - q_len if CAUSAL else 0

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)

    offs_mo = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    base = 0  # K/V tiles loaded so far: tile counter c uses stage c % STAGES at phase (c // STAGES) & 1
    q_phase = 0
    # One iteration when max_seqlen_q is right; striding keeps every row written if it is not.
    for start_m in range(tile * BLOCK_M, q_len, gl.num_programs(0) * BLOCK_M):
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        if CAUSAL:
            first_row_sees = gl.minimum(gl.maximum(start_m + causal_shift + 1, 0), k_len)
            hi = gl.minimum(gl.maximum(gl.minimum(start_m + BLOCK_M, q_len) + causal_shift, 0), k_len)
        else:
            first_row_sees = k_len
            hi = k_len
        mid = (first_row_sees // BLOCK_N) * BLOCK_N
        n = gl.maximum(gl.cdiv(hi, BLOCK_N), 1)  # a tile that sees no key runs one masked tile: zeros

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma_load(q_desc, [q_start + start_m, head * HEAD_DIM], q_bar, q_smem)
        for i in gl.static_range(STAGES):
            _load_kv(k_desc, k_bar, k_smem, base + i, k_start + i * BLOCK_N, kv_col, STAGES, pred=i < n)
            _load_kv(v_desc, v_bar, v_smem, base + i, k_start + i * BLOCK_N, kv_col, STAGES, pred=i < n)
        mbarrier.wait(q_bar, q_phase)
        q_phase ^= 1

        mbarrier.wait(k_bar.index(base % STAGES), (base // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(base % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))  # finite: a fully masked row keeps alpha 1
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, 0, offs_m, mid, k_len, causal_shift, qk_scale, CAUSAL, s_layout)
        _load_kv(k_desc, k_bar, k_smem, base + STAGES, k_start + STAGES * BLOCK_N, kv_col, STAGES, pred=STAGES < n)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        for t in range(1, n):
            c = base + t
            mbarrier.wait(k_bar.index(c % STAGES), (c // STAGES) & 1)
            s = warpgroup_mma(q_smem, k_smem.index(c % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_bar.index((c - 1) % STAGES), ((c - 1) // STAGES) & 1)
            # P is read from registers by the tensor cores: it stays alive through both waits.
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p_op, v_smem.index((c - 1) % STAGES), acc, is_async=True)
            s, p_op = warpgroup_mma_wait(1, deps=[s, p_op])  # MMAs retire in order: the scores are done
            _load_kv(k_desc, k_bar, k_smem, c + STAGES, k_start + (t + STAGES) * BLOCK_N, kv_col, STAGES, pred=t + STAGES < n)
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, t * BLOCK_N, offs_m, mid, k_len, causal_shift, qk_scale, CAUSAL, s_layout)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            _load_kv(v_desc, v_bar, v_smem, c - 1 + STAGES, k_start + (t - 1 + STAGES) * BLOCK_N, kv_col, STAGES, pred=t - 1 + STAGES < n)
        c = base + n - 1
        mbarrier.wait(v_bar.index(c % STAGES), (c // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(c % STAGES), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
        base += n

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc / gl.expand_dims(gl.where(l_o == 0.0, 1.0, l_o), 1)
        rows = start_m + offs_mo
        # Rows past q_len belong to the next sequence: a masked store, not a TMA box.
        ptrs = O + gl.expand_dims((q_start + rows).to(gl.int64) * stride_ot + head * stride_oh, 1) + gl.expand_dims(offs_d, 0)
        gl.store(ptrs, out.to(dtype), mask=gl.expand_dims(rows < q_len, 1))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))


def overlap_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, paged: bool) -> bool:
    """Whether a flash_attn_varlen call can run this kernel: compiled (not the interpreter), a
    Hopper card (sm_90), contiguous keys, fp16/bf16, head_dim 64 or 128, and every tensor TMA-
    and store-aligned as launch.tma_ok says."""
    head_dim = q.shape[-1]
    return (
        not paged
        and not interpreting()
        and q.dtype in GL_DTYPES
        and head_dim in HEAD_DIMS
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and all(tma_ok(t, head_dim, head_dim) for t in (q, k, v))
        and out.stride(-1) == 1
    )


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """Packed (tokens, heads, head_dim) as 2-D (tokens, heads*head_dim) in boxes of one head's `rows` tokens."""
    d = t.shape[2]
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], GL_DTYPES[t.dtype])
    return TensorDescriptor(t, [t.shape[0], t.shape[1] * d], [t.stride(0), 1], [rows, d], layout)


def overlap_plan(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal, tile) -> tuple:
    """(kernel, grid, kwargs) of this kernel for already-checked flash_attn_varlen arguments
    that overlap_ok accepts; tile = (BLOCK_M, BLOCK_N, num_warps, STAGES), as the table's prefill tile."""
    block_m, block_n, num_warps, stages = tile
    grid = (max(1, triton.cdiv(max_seqlen_q, block_m)), q.shape[1], cu_seqlens_q.shape[0] - 1)
    kwargs = dict(
        q_desc=_descriptor(q, block_m), k_desc=_descriptor(k, block_n), v_desc=_descriptor(v, block_n), O=out,
        CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, qk_scale=scale * math.log2(math.e), stride_ot=out.stride(0), stride_oh=out.stride(1),
        group=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        num_warps=num_warps,
    )
    return _flash_fwd_overlap, grid, kwargs
