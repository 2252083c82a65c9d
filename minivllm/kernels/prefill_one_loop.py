"""Prefill over contiguous keys as one key loop that Triton can warp-specialise.

flash_attention.py's kernel runs each query tile's keys in two loops (whole tiles unmasked, then
the masked ones) through TMA descriptors made on the host. Triton's automatic warp specialisation
(`tl.range(..., warp_specialize=True)`: a producer warp group issuing the TMA loads, consumer
groups running the MMAs and the softmax) does not take that kernel on Hopper: with 8 warps the
flag changes nothing, with 4 the pass fails (benchmarks/NOTES.md). This kernel has the form it
does take on sm_90 at 4 warps (and on sm_100): a single loop, every tile masked by the sequence's
key count (and under `causal` by the diagonal, up to the last key the tile's last row sees), and
descriptors made on the device (`tl.make_tensor_descriptor`), whose 128-byte
records live in a scratch buffer Triton asks its allocator for at launch.

It is a table knob (`ws` in a contiguous prefill entry) that the tuner times as a twin of a few
TMA candidates; without TMA (no Hopper, an odd head_dim, the interpreter) the main
kernel runs instead, and the interpreter's tests call this plan directly.
"""

import math

import torch
import triton
import triton.language as tl

from minivllm.kernels.attention_tile import online_softmax_step


@triton.jit
def _flash_fwd_one_loop(
    Q, K, V, O, CU_Q, CU_K, total_q, total_k, qk_scale, stride_qt, stride_kt, stride_vt, stride_ot, stride_oh, group,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WS: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grid (q tiles, heads, batch) as the main kernel's: one tile a program when max_seqlen_q is
    # right; striding keeps every row written if it is not.
    head, seq = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    q_desc = tl.make_tensor_descriptor(Q, [total_q, NUM_HEADS * HEAD_DIM], [stride_qt, 1], [BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, [total_k, NUM_KV_HEADS * HEAD_DIM], [stride_kt, 1], [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, [total_k, NUM_KV_HEADS * HEAD_DIM], [stride_vt, 1], [BLOCK_N, HEAD_DIM])
    kv_col = (head // group) * HEAD_DIM
    # Tiles backwards, as the main kernel's: under causal a head's longest tiles start first.
    for start_m in range((tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M, q_len, tl.num_programs(0) * BLOCK_M):
        q = q_desc.load([q_start + start_m, head * HEAD_DIM])
        if INTERPRETER:  # the interpreter's bf16 tl.dot multiplies raw bits
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        hi = k_len
        if CAUSAL:  # bottom-right aligned: query i sees keys j <= i + k_len - q_len
            hi = tl.minimum(tl.maximum(tl.minimum(start_m + BLOCK_M, q_len) + k_len - q_len, 0), k_len)
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < k_len
            k = k_desc.load([k_start + start_n, kv_col])
            # Rows past k_len are the next sequence's keys (or TMA's zero fill at the end):
            # their scores are masked, and their values zeroed so that p = 0 times them stays 0.
            v = tl.where(n_ok[:, None], v_desc.load([k_start + start_n, kv_col]), 0.0)
            if INTERPRETER:
                k, v = k.to(tl.float32), v.to(tl.float32)
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + k_len - q_len)
            qk = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, PRECISION)
        # A sequence with no key has l_i == 0 and outputs 0, as the main kernel's.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        rows = (q_start + offs_m).to(tl.int64)
        o_ptrs = O + rows[:, None] * stride_ot + head * stride_oh + tl.arange(0, HEAD_DIM)[None, :]
        # Stored through pointers: a TMA store would also write the rows past q_len, the next sequence's.
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < q_len)[:, None])


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's allocator for the device-made descriptors: bytes on the current CUDA device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def one_loop_plan(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal, tile, ws, interpreter, precision):
    """(kernel, grid, kwargs) of this kernel for already-checked arguments over contiguous keys
    (`causal` aligned bottom-right, as flash_attn_varlen's): q (total_q, num_heads, head_dim), k and v (total_k, num_kv_heads, head_dim),
    head_dim a power of two, heads contiguous; tile = (BLOCK_M, BLOCK_N, num_warps, num_stages);
    `ws` asks Triton to warp-specialise the key loop. On a GPU it installs Triton's allocator
    (triton.set_allocator) for the descriptors' scratch: torch memory on the current device."""
    if not interpreter:
        triton.set_allocator(_scratch)
    block_m, block_n, num_warps, num_stages = tile
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    kwargs = dict(
        Q=q, K=k, V=v, O=out, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, total_q=q.shape[0], total_k=k.shape[0],
        qk_scale=scale * math.log2(math.e), stride_qt=q.stride(0), stride_kt=k.stride(0), stride_vt=v.stride(0),
        stride_ot=out.stride(0), stride_oh=out.stride(1), group=num_heads // num_kv_heads,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=bool(causal), WS=bool(ws), INTERPRETER=interpreter, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    return _flash_fwd_one_loop, (max(1, triton.cdiv(max_seqlen_q, block_m)), num_heads, cu_seqlens_q.shape[0] - 1), kwargs
