"""The per-tile steps that the flash and decode kernels share: fetch a K/V tile, score it, fold it in."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, PRECISION: tl.constexpr):
    """Fold one tile into the running (output, row sum, row max).

    qk: fp32 [M, N] raw scores q·k (masked entries -inf); qk_scale > 0 takes them into base 2,
    fused into the exponent's one multiply-add. v: [N, D]. acc: fp32 [M, D] un-normalised output,
    which the P·V product accumulates into in place; l_i, m_i: fp32 [M]. m_i starts finite
    (-1e30) so a row with every entry masked keeps alpha = 1 and p = 0 instead of NaN.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def score_kv_tile(q, k_base, v_base, k_rows, v_rows, offs_d, kv_mask,
                  INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    """Load one K/V tile through pointers and score q against it.

    q: [M, BLOCK_D]; k_rows, v_rows: [N] element offsets of each token's row; kv_mask: [N, BLOCK_D]
    or None. Returns (raw scores fp32 [M, N], v [N, BLOCK_D]). Under the interpreter, whose
    bf16 tl.dot multiplies raw bits, INTERPRETER moves the operands to fp32.
    """
    k_ptrs = k_base + k_rows[:, None] + offs_d[None, :]
    v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
    if kv_mask is None:  # a full tile: unmasked loads vectorise
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if INTERPRETER:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION), v


@triton.jit
def gather_kv_tile(k_head, v_head, bt_row, offs_n, hi, offs_d, d_ok, stride_kb, stride_kt, stride_vb, stride_vt,
                   PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETER: tl.constexpr):
    """Load the K and V rows of tokens offs_n [N] of one kv head (k_head, v_head: the caches
    offset to that head) through one block-table row, one block id per token, so a tile may span
    scattered pages. Rows past hi re-read token hi - 1, which is real data: the caller masks their
    scores, and p = 0 times finite V is 0, so the loads need no token mask and vectorise and
    pipeline like a contiguous tile. Returns (k, v), each [N, BLOCK_D] (fp32 under the interpreter,
    whose bf16 tl.dot multiplies raw bits)."""
    tok = tl.minimum(offs_n, hi - 1)
    blk = tl.load(bt_row + tok // PAGE).to(tl.int64)
    k_rows = blk * stride_kb + (tok % PAGE) * stride_kt
    v_rows = blk * stride_vb + (tok % PAGE) * stride_vt
    if HEAD_DIM < BLOCK_D:
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :])
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :])
    if INTERPRETER:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v
