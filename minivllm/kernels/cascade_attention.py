"""Cascade attention for decode: rows that share a cached prefix read its K/V once per tile of rows.

When many running sequences begin with the same cached blocks (one system prompt, prefix
caching), plain paged decode reads those blocks once per sequence. Here the shared prefix is
attended by its own kernel, one program per (tile of rows, kv head, split), whose query tile is
every query head of BLOCK_R sequences at once, so each prefix K/V tile is read once per
BLOCK_R sequences. The paged decode kernel then covers each row's own suffix, and the split
merge folds the two partial softmaxes (each a partial output and its log-sum-exp) into one. The
shared length is a device tensor, so a CUDA graph captured once replays for any prefix.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.attention_tile import gather_kv_tile, online_softmax_step
from minivllm.kernels.checks import check_host_int, check_int_vector, check_out, resolve_scale
from minivllm.kernels.launch import dot_precision, head_dim_block
from minivllm.kernels.paged_attention import check_decode_args, decode_config, launch_decode, split_policy
from minivllm.kernels.tuning_table import bucket, lookup


@triton.jit(do_not_specialize=["batch", "tokens_per_split", "part_stride", "first_slot"])
def _shared_prefix(
    Q, K, V, O_PART, LSE_PART, BT, CTX, SHARED, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    batch, num_heads, group, tokens_per_split, part_stride, first_slot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    shared = tl.load(SHARED)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, shared)

    # Query row m is head kv_head * group + m % BLOCK_G of sequence tile * BLOCK_R + m // BLOCK_G.
    offs_m = tl.arange(0, BLOCK_R * BLOCK_G)
    seq = tile * BLOCK_R + offs_m // BLOCK_G
    head = kv_head * group + offs_m % BLOCK_G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = (seq < batch) & (offs_m % BLOCK_G < group)
    ctx = tl.load(CTX + seq, mask=row_ok, other=0)
    # A row whose context is shorter than the prefix attends to its own blocks only (decode side).
    uses = row_ok & (ctx >= shared)
    q = tl.load(Q + seq.to(tl.int64)[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=uses[:, None] & d_ok[None, :], other=0.0)
    if INTERPRETER:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_R * BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R * BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # The prefix's blocks are row 0's: every row using it holds the same ids there.
        k, v = gather_kv_tile(K + kv_head * stride_kh, V + kv_head * stride_vh, BT, offs_n, hi, offs_d, d_ok,
                              stride_kb, stride_kt, stride_vb, stride_vt, PAGE, HEAD_DIM, BLOCK_D, INTERPRETER)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        qk = tl.where((offs_n < hi)[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(uses & (l_i > 0.0), m_i + tl.math.log2(l_safe), float("-inf"))
    row = (seq * num_heads + head).to(tl.int64) * part_stride + first_slot + split
    tl.store(LSE_PART + row, lse, mask=row_ok)
    tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], acc / l_safe[:, None], mask=row_ok[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class CascadeConfig:
    """How the shared prefix's kernel runs: query rows per program (block_m, every query head of
    block_m / group sequences), K/V tile tokens, warps, stages and programs per SM for its split
    policy; and when the engine takes the cascade at all: at least min_rows rows sharing at least
    min_shared tokens. `source` as DecodeConfig's."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    min_rows: int
    min_shared: int
    source: str = "heuristic"

    def as_dict(self) -> dict:
        return dict(block_m=self.block_m, block_n=self.block_n, num_warps=self.num_warps, num_stages=self.num_stages,
                    programs_per_sm=self.programs_per_sm, min_rows=self.min_rows, min_shared=self.min_shared)


def cascade_config(device: torch.device, dtype: torch.dtype, head_dim: int, page: int, rows: int, num_heads: int, num_kv_heads: int,
                   max_shared: int) -> CascadeConfig:
    """The config for `rows` rows of `num_heads` query heads over `num_kv_heads` kv heads sharing at
    most max_shared tokens of pages of `page` tokens: the device's tuning table entry (kernel
    "cascade", bucket (rows x kv_heads, max shared tokens, GQA group)), else the heuristic: a
    64-row query tile, 64-token K/V tiles, and the cascade taken from 16 rows sharing 256 tokens.
    On an H100, 16 rows sharing 2,048
    tokens ran 1.21x (256-token pages) and 1.53x (16-token pages) plain decode's speed once each
    row's suffix was split evenly, 64 rows 1.5-1.75x; fewer rows were not measured, and there the
    L2 serves most repeated prefix reads anyway (benchmarks/NOTES.md)."""
    found, source = lookup("cascade", device, dtype, head_dim, page, (bucket(rows * num_kv_heads), bucket(max_shared), bucket(num_heads // num_kv_heads)))
    if found is not None:
        return CascadeConfig(source=source, **found)
    if interpreting():
        return CascadeConfig(16, 16, 4, 1, 2, 2, 1)
    return CascadeConfig(64, 32 if dtype == torch.float32 or head_dim_block(head_dim) > 128 else 64, 4, 2, 2, 16, 256)


class _PrefixLaunch:
    """launch_decode's prefix_parts hook: the shared prefix's kernel, writing its splits' partials
    into the decode's partial buffers after the decode's own splits."""

    def __init__(self, q, k_cache, v_cache, block_table, context_lens, shared, max_shared, scale, config: CascadeConfig):
        self.args = q, k_cache, v_cache, block_table, context_lens, shared, scale, config
        batch, num_kv_heads = q.shape[0], k_cache.shape[2]
        self.block_g = triton.next_power_of_2(q.shape[1] // num_kv_heads)
        self.block_r = max(1, config.block_m // self.block_g)
        self.tiles = triton.cdiv(batch, self.block_r)
        # Decode's policy, with a tile of rows in the place of a sequence.
        self.splits, self.tokens_per_split = split_policy(self.tiles, num_kv_heads, max_shared, config.block_n, config.programs_per_sm, q.device)

    def __call__(self, o_part, lse_part, first_slot):
        q, k_cache, v_cache, block_table, context_lens, shared, scale, config = self.args
        batch, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        _shared_prefix[(self.tiles, num_kv_heads, self.splits)](
            Q=q, K=k_cache, V=v_cache, O_PART=o_part, LSE_PART=lse_part, BT=block_table, CTX=context_lens, SHARED=shared,
            qk_scale=scale * math.log2(math.e),
            stride_qb=q.stride(0), stride_qh=q.stride(1),
            stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
            stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
            batch=batch, num_heads=num_heads, group=num_heads // num_kv_heads, tokens_per_split=self.tokens_per_split,
            part_stride=lse_part.shape[-1], first_slot=first_slot,
            HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), BLOCK_R=self.block_r, BLOCK_G=self.block_g,
            BLOCK_N=config.block_n, PAGE=k_cache.shape[1], INTERPRETER=interpreting(), PRECISION=dot_precision(q.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )


def _check_shared(shared_len, max_shared_len, block_table, context_lens, page, max_context) -> int:
    """max_shared_len checked (a host int, at most max_context); on the CPU, where it can be read
    without a sync, shared_len too: a multiple of the block size, at most max_shared_len, and
    every row whose context holds it has row 0's blocks there. Returns max_shared_len."""
    max_shared = max_context if max_shared_len is None else check_host_int("max_shared_len", max_shared_len)
    if not 0 <= max_shared <= max_context:
        raise ValueError(f"max_shared_len must be in [0, max_context_len = {max_context}], got {max_shared}")
    if shared_len.device.type != "cpu":
        return max_shared
    n = int(shared_len[0])
    if n < 0 or n % page or n > max_shared:
        raise ValueError(f"shared_len must be a multiple of the block size ({page}) in [0, max_shared_len = {max_shared}], got {n}")
    users = context_lens >= n
    if n and users.any():
        if not bool(users[0]):
            raise ValueError(f"shared_len: row 0 holds the shared prefix's blocks, so its context must hold all {n} tokens")
        if not bool((block_table[users, : n // page] == block_table[0, : n // page]).all()):
            raise ValueError(f"shared_len: every row whose context holds {n} tokens must have row 0's first {n // page} blocks")
    return max_shared


def cascade_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    shared_len: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    max_context_len: int | None = None,
    max_shared_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention_decode for a batch whose rows share a prefix of cached blocks.

    q, k_cache, v_cache, block_table, context_lens, softmax_scale, max_context_len, out: as
        paged_attention_decode's (q (batch, num_heads, head_dim); caches (num_blocks, block_size,
        num_kv_heads, head_dim); block_table int32 (batch, max_blocks_per_seq), -1 padded;
        context_lens int32 (batch,)).
    shared_len: int32 (1,) on q's device, a multiple of block_size: the prefix's tokens. Row 0's
        first shared_len / block_size blocks hold it, and every row whose context is at least
        shared_len holds the same block ids there (checked on the CPU; on a GPU the caller's
        promise, as the engine's prefix cache keeps it). A row with a shorter context attends to
        its own blocks alone; shared_len 0 is plain decode.
    max_shared_len: optional host int bounding shared_len, which sizes the prefix's splits
        (default: max_context_len's default).
    Returns (batch, num_heads, head_dim) in q's dtype, equal to paged_attention_decode's up to
    rounding; fp32 accumulation. The host never reads device memory.
    """
    block_table, context_lens, head_dim = check_decode_args(q, k_cache, v_cache, block_table, context_lens, max_context_len)
    shared_len = check_int_vector("shared_len", shared_len, 1, q.device)
    page = k_cache.shape[1]
    max_context = block_table.shape[1] * page if max_context_len is None else max_context_len
    max_shared = _check_shared(shared_len, max_shared_len, block_table, context_lens, page, max_context)
    scale = resolve_scale(softmax_scale, head_dim)
    out = check_out(out, q)
    if q.shape[0] == 0:
        return out
    config = cascade_config(q.device, q.dtype, head_dim, page, q.shape[0], q.shape[1], k_cache.shape[2], max_shared)
    launch_cascade(q, k_cache, v_cache, block_table, context_lens, shared_len, out, max_context, max_shared, scale, config)
    return out


def launch_cascade(q, k_cache, v_cache, block_table, context_lens, shared_len, out, max_context, max_shared, scale, config: CascadeConfig) -> None:
    """Launch the cascade for already-checked arguments with `config` (cascade_config's, or a
    tuner's candidate) for the shared prefix and the device's decode config for the suffixes,
    writing out."""
    prefix = _PrefixLaunch(q, k_cache, v_cache, block_table, context_lens, shared_len, max_shared, scale, config)
    decode = decode_config(q, k_cache, v_cache, max_context)
    launch_decode(q, k_cache, v_cache, block_table, context_lens, out, max_context, scale, decode, shared=shared_len, prefix_parts=prefix)
