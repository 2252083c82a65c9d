"""Varlen flash attention for prefill, over contiguous K/V or a paged KV cache (prefix caching).

One program computes one BLOCK_M tile of queries of one head of one sequence, streaming the
sequence's keys in BLOCK_N tiles with an online softmax in base 2. Under `causal` the key loop is
split in two: tiles every query of the tile can see run without any mask, and only the tiles
that cross the diagonal (or the end of the sequence) pay for masking. Tiles wholly above the
diagonal are never visited.

On Hopper and later, Q, K and V tiles arrive by TMA (tensor descriptors) when head_dim is a power
of two, for a paged cache too when a page holds whole tiles; otherwise, and in the CPU
interpreter, through pointer loads. Where the tuning table says `gather`, a paged prefill first
copies its keys and values into packed rows (kv_gather.py) and runs the contiguous kernel. The tile comes from the device's tuning table
(minivllm/kernels/tuning_table.py, written by `python -m benchmarks.tune`); a device without one
autotunes among `tiles_for`'s candidates on first use. An entry that says `overlap` runs its tile
in flash_overlap.py's Gluon kernel instead, where that kernel takes the call (Hopper, contiguous
or copied-out keys).
"""

import math

import torch
import triton
import triton.language as tl

from minivllm.interpreter import interpreting
from minivllm.kernels.attention_tile import online_softmax_step, score_kv_tile
from minivllm.kernels.checks import (
    check_block_size,
    check_block_table,
    check_capacity,
    check_cu_seqlens,
    check_float_inputs,
    check_head_dim,
    check_heads,
    check_host_int,
    check_out,
    check_rank,
    check_same_shape,
    resolve_scale,
)
from minivllm.kernels.flash_overlap import overlap_ok, overlap_plan
from minivllm.kernels.kv_gather import gather_plan
from minivllm.kernels.launch import dot_precision, head_dim_block, tma_descriptor, tma_ok
from minivllm.kernels.tuning_table import bucket, lookup
from minivllm.values import check_bool


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, K, V, k_base, v_base, bt_row, lo, hi, offs_m, k_len, k_row0, kv_head, causal_shift, qk_scale,
    stride_kb, stride_kt, stride_vb, stride_vt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, TMA: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr, SOFTMAX: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_len
        if TMA:
            if PAGED:
                # A tile lies inside one page (PAGE % BLOCK_N == 0): one 4-D box of the cache.
                blk = tl.load(bt_row + start_n // PAGE)
                k = tl.reshape(K.load([blk, start_n % PAGE, kv_head, 0]), [BLOCK_N, BLOCK_D])
                v = tl.reshape(V.load([blk, start_n % PAGE, kv_head, 0]), [BLOCK_N, BLOCK_D])
            else:
                k = K.load([k_row0 + start_n, kv_head * HEAD_DIM])
                v = V.load([k_row0 + start_n, kv_head * HEAD_DIM])
            if MASKED:
                # Rows past k_len hold the next sequence, unwritten cache slots (anything, NaN
                # too) or TMA's zero fill: scores are masked below, and V rows zeroed so that
                # p = 0 times them stays 0.
                v = tl.where(n_ok[:, None], v, tl.zeros_like(v))
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            if PAGED:
                blk = tl.load(bt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
                k_rows = blk * stride_kb + (offs_n % PAGE) * stride_kt
                v_rows = blk * stride_vb + (offs_n % PAGE) * stride_vt
            else:
                k_rows = offs_n.to(tl.int64) * stride_kt
                v_rows = offs_n.to(tl.int64) * stride_vt
            if MASKED:
                kv_mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
            elif HEAD_DIM < BLOCK_D:
                kv_mask = (offs_d < HEAD_DIM)[None, :]
            else:
                kv_mask = None
            qk, v = score_kv_tile(q, k_base, v_base, k_rows, v_rows, offs_d, kv_mask, INTERPRETER, PRECISION)
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            qk = tl.where(visible, qk, float("-inf"))
        if SOFTMAX:
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, PRECISION)
        else:  # a measurement of the two matmuls alone (benchmarks.tune); never a right answer
            acc = tl.dot(qk.to(v.dtype), v, acc, input_precision=PRECISION)
            l_i = l_i + 1.0
    return acc, l_i, m_i


# A caller may size its block table to each batch's longest sequence, and seqlen_bucket only keys
# the autotuner: not specialised on, so a call whose width turns divisible by 16 compiles nothing.
@triton.jit(do_not_specialize=["stride_btb", "max_blocks", "seqlen_bucket"])
def _flash_fwd(
    Q, K, V, O, CU_Q, CU_K, BT, qk_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_btb, max_blocks, group, num_heads, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, TMA: tl.constexpr,
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr, SOFTMAX: tl.constexpr,
):
    # Grid (q tiles, heads, batch), q tiles fastest: the programs in flight at once are the tiles
    # of a few heads, whose K/V then stay in L2 (num_heads and seqlen_bucket only key the
    # autotuner). Each head's tiles run backwards, so under causal its longest tiles start first.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    kv_head = head // group
    overflow = False
    if PAGED:
        # A context longer than its block-table row would read another row's blocks: clamp the
        # reads and poison the output instead (the host cannot check without a sync).
        overflow = k_len > max_blocks * PAGE
        k_len = tl.minimum(k_len, max_blocks * PAGE)
        bt_row = BT + seq.to(tl.int64) * stride_btb
        if TMA:
            k_base, v_base = BT, BT  # unused: the descriptors address K and V
        else:
            k_base = K + kv_head * stride_kh
            v_base = V + kv_head * stride_vh
    elif TMA:
        bt_row, k_base, v_base = BT, BT, BT  # unused: the descriptors address K and V
    else:
        bt_row = BT
        k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    causal_shift = k_len - q_len if CAUSAL else 0
    offs_d = tl.arange(0, BLOCK_D)

    # One iteration when max_seqlen_q is right; striding keeps every row written if it is not.
    for start_m in range(tile * BLOCK_M, q_len, tl.num_programs(0) * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q_rows = (q_start + offs_m).to(tl.int64)
        if TMA:
            q = Q.load([q_start + start_m, head * HEAD_DIM])
        else:
            q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        if INTERPRETER:  # the interpreter's bf16 tl.dot multiplies raw bits
            q = q.to(tl.float32)
        if CAUSAL:
            # Bottom-right alignment: query i sees keys j <= i + causal_shift.
            first_row_sees = tl.minimum(tl.maximum(start_m + causal_shift + 1, 0), k_len)
            last_row = tl.minimum(start_m + BLOCK_M, q_len)
            hi = tl.minimum(tl.maximum(last_row + causal_shift, 0), k_len)
        else:
            first_row_sees = k_len
            hi = k_len
        mid = (first_row_sees // BLOCK_N) * BLOCK_N

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, K, V, k_base, v_base, bt_row, 0, mid, offs_m, k_len, k_start, kv_head,
            causal_shift, qk_scale, stride_kb, stride_kt, stride_vb, stride_vt,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, PAGED, PAGE, TMA, INTERPRETER, PRECISION, SOFTMAX,
        )
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, K, V, k_base, v_base, bt_row, mid, hi, offs_m, k_len, k_start, kv_head,
            causal_shift, qk_scale, stride_kb, stride_kt, stride_vb, stride_vt,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, PAGED, PAGE, TMA, INTERPRETER, PRECISION, SOFTMAX,
        )
        # A row that sees no key (q_len > k_len under causal) has l_i == 0 and outputs 0.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out = tl.where(overflow, float("nan"), out)
        o_ptrs = O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)


# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) for a device without a tuning table,
# autotuned on first use per (head_dim, causal, paged, TMA, dtype, num_heads, seqlen bucket); each
# fits shared memory with its K/V stages and keeps the accumulator in registers. The first is
# the choice where no autotuning happens. fp32 inputs (exact but slow, for references) get small
# tiles only. `python -m benchmarks.tune` times these and more per device and writes the winner.
# A Blackwell card (sm_100, B200/GB200) has no table until its tuning array runs, so it autotunes
# among these: `python -m benchmarks.compile_check` shows every one compiling there to tcgen05 MMAs
# with TMA loads and fitting its 227 KB per block (the first takes 230400 B; 230416 on sm_90), so they stand
# unchanged until measured there.
TUNE_TILES = {
    64: ((128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)),
    128: ((128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)),
    256: ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)),
}
TUNE_MIN_FLOPS = 1 << 34  # tens of microseconds of work: below it, the first candidate runs untuned
FP32_TILES = {64: ((64, 32, 4, 2),), 128: ((64, 32, 4, 2), (32, 32, 4, 1)), 256: ((32, 32, 4, 1),)}
INTERPRETER_TILE = (32, 16, 4, 1)


def tiles_for(block_d: int, dtype: torch.dtype) -> tuple[tuple[int, int, int, int], ...]:
    """The candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles for this padded head_dim and dtype."""
    return (FP32_TILES if dtype == torch.float32 else TUNE_TILES)[max(64, block_d)]


def _set_block_shapes(nargs: dict) -> None:
    """Give the TMA descriptors the tile shape of the config about to run: 2-D boxes of packed
    tokens, or for a paged cache a 4-D box of one page of one kv head."""
    if nargs["TMA"]:
        nargs["Q"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_D"]]
        kv_box = [1, nargs["BLOCK_N"], 1, nargs["BLOCK_D"]] if nargs["PAGED"] else [nargs["BLOCK_N"], nargs["BLOCK_D"]]
        nargs["K"].block_shape = kv_box
        nargs["V"].block_shape = list(kv_box)


def _config(tile: tuple[int, int, int, int]) -> triton.Config:
    block_m, block_n, num_warps, num_stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages, pre_hook=_set_block_shapes)


def tile_of(config: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of an autotuner config: the form tiles_for lists."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def prune_tiles(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's prune hook: of every config, those tiles_for offers for this launch's head dim and dtype."""
    # The autotuner's named_args hold only positional arguments; launches pass keywords.
    out = kwargs["O"] if "O" in kwargs else named_args["O"]
    wanted = set(tiles_for(kwargs["BLOCK_D"], out.dtype))
    return [c for c in configs if tile_of(c) in wanted]


_ALL_TILES = sorted({t for tiles in (*TUNE_TILES.values(), *FP32_TILES.values()) for t in tiles})
flash_fwd_tuned = triton.autotune(
    [_config(t) for t in _ALL_TILES],
    key=["HEAD_DIM", "CAUSAL", "PAGED", "TMA", "num_heads", "seqlen_bucket"],
    prune_configs_by={"early_config_prune": prune_tiles},
)(_flash_fwd)


def prefill_config(q: torch.Tensor, k: torch.Tensor, max_seqlen_k: int, causal: bool, paged: bool) -> tuple[dict | None, str]:
    """(config, source) of a flash_attn_varlen call: the device's tuning-table entry for (dtype,
    head_dim, page or 0 for contiguous keys, key-length bucket, causal, GQA group), as
    {"tile": [BLOCK_M, BLOCK_N, num_warps, num_stages], "tma": bool}; for a paged entry that
    copies the keys out first, "gather": true; for one that runs flash_overlap's kernel,
    "overlap": true; or (None, 'heuristic')."""
    page = k.shape[1] if paged else 0
    group = q.shape[1] // k.shape[-2]
    return lookup("prefill", q.device, q.dtype, q.shape[-1], page, (bucket(max_seqlen_k), bool(causal), bucket(group)))


def prefill_plan(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, block_table, tile=None, tma=None, softmax=True,
                 overlap=None):
    """(kernel, grid, kwargs) for already-checked flash_attn_varlen arguments: with `tile` =
    (BLOCK_M, BLOCK_N, num_warps, num_stages) that tile alone (a tuner's candidate), else the
    device's tuning-table tile, else the autotuned kernel. TMA is used where it applies unless
    `tma` (or the table) says False; softmax=False leaves the softmax out (a wrong answer: it
    measures the two matmuls alone). `overlap` (or the table's "overlap") runs the tile in
    flash_overlap's Gluon kernel where overlap_ok accepts the call, else in this one."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[-2], q.shape[-1]
    batch, paged = cu_seqlens_q.shape[0] - 1, block_table is not None
    page = k.shape[1] if paged else 1
    block_d = head_dim_block(head_dim)
    if tile is None:
        found, _ = prefill_config(q, k, max_seqlen_k, causal, paged)
        if found is not None:
            tile, tma = tuple(found["tile"]), found["tma"] if tma is None else tma
            overlap = found.get("overlap", False) if overlap is None else overlap
    if overlap and tile is not None and softmax and overlap_ok(q, k, v, out, paged):
        return overlap_plan(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal, tile)
    table = block_table if paged else cu_seqlens_k  # any int32 tensor stands in when unpaged
    # A paged TMA tile must lie inside one page.
    widest_n = tile[1] if tile else max(t[1] for t in tiles_for(block_d, q.dtype))
    tma = tma is not False and not interpreting() and (not paged or page >= widest_n) and all(tma_ok(t, head_dim, block_d) for t in (q, k, v))
    kwargs = dict(
        Q=tma_descriptor(q) if tma else q, K=tma_descriptor(k) if tma else k, V=tma_descriptor(v) if tma else v,
        O=out, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, BT=table, qk_scale=scale * math.log2(math.e),
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k.stride(0) if paged else 0, stride_kt=k.stride(-3), stride_kh=k.stride(-2),
        stride_vb=v.stride(0) if paged else 0, stride_vt=v.stride(-3), stride_vh=v.stride(-2),
        stride_ot=out.stride(0), stride_oh=out.stride(1), stride_btb=table.stride(0), max_blocks=block_table.shape[1] if paged else 0,
        group=num_heads // num_kv_heads, num_heads=num_heads, seqlen_bucket=bucket(max(max_seqlen_q, max_seqlen_k, 1)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=bool(causal), PAGED=paged, PAGE=page, TMA=tma,
        INTERPRETER=interpreting(), PRECISION=dot_precision(q.dtype), SOFTMAX=softmax,
    )

    def grid(config):
        return (max(1, triton.cdiv(max_seqlen_q, config["BLOCK_M"])), num_heads, batch)

    if tile is None and interpreting():
        tile = INTERPRETER_TILE
    elif tile is None and (head_dim != block_d or q.dtype == torch.float32 or 4 * q.shape[0] * max_seqlen_k * num_heads * head_dim < TUNE_MIN_FLOPS):
        # Autotuning compiles every candidate once per head_dim and times each per key: spent
        # on the power-of-two head dims of real models at sizes where a tile choice pays, not on
        # odd ones, exact-fp32 reference runs or launches of a few microseconds.
        tile = tiles_for(block_d, q.dtype)[0]
    if tile is None:
        return flash_fwd_tuned, grid, kwargs
    block_m, block_n, num_warps, num_stages = tile
    kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    _set_block_shapes(kwargs)
    return _flash_fwd, grid({"BLOCK_M": block_m}), kwargs


def prefill_launches(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, block_table, tile=None, tma=None,
                     gather=None, softmax=True, overlap=None) -> list[tuple]:
    """The [(kernel, grid, kwargs)] of a flash_attn_varlen call, run in order: prefill_plan's one
    launch, or over a paged cache with `gather` (a tuner's candidate, else the table's entry) the
    copy of the keys into packed rows (kv_gather.py) and then the contiguous kernel with the same
    tile. Arguments as prefill_plan's. The table's `gather` applies only where a sequence has more
    queries than one tile holds: a key copied out is then read by several query tiles, while a
    prefill of a few new tokens over a long prefix (a chat turn) would pay the copy for one read."""
    paged = block_table is not None
    if paged and tile is None and gather is None:
        found, _ = prefill_config(q, k, max_seqlen_k, causal, paged)
        if found is not None:  # prefill_plan takes the entry's tile as given, without a second lookup
            tile, tma = tuple(found["tile"]), found["tma"] if tma is None else tma
            gather = bool(found.get("gather")) and max_seqlen_q > tile[0]
            overlap = found.get("overlap", False) if overlap is None else overlap
    if not (paged and gather):
        return [prefill_plan(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, block_table, tile, tma, softmax, overlap)]
    kernel, grid, kwargs, k, v = gather_plan(k, v, block_table, cu_seqlens_k, max_seqlen_k, head_dim_block(q.shape[-1]))
    plan = prefill_plan(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, None, tile, tma, softmax, overlap)
    return [(kernel, grid, kwargs), plan]


def run_launches(launches: list[tuple]) -> None:
    """Launch each (kernel, grid, kwargs) in order, on the current stream."""
    for kernel, grid, kwargs in launches:
        kernel[grid](**kwargs)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = True,
    block_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (flash-attn's varlen convention).

    q: (total_q, num_heads, head_dim), fp16/bf16/fp32, last dim contiguous.
    k, v: (total_k, num_kv_heads, head_dim) packed like q; or, when `block_table` is given, paged
        caches (num_blocks, block_size, num_kv_heads, head_dim) already holding every key.
    cu_seqlens_q, cu_seqlens_k: int32 (batch+1,) prefix sums of query / key counts per sequence;
        with a block table, keys count the cached prefix plus the new tokens.
    max_seqlen_q, max_seqlen_k: host ints, the longest query / key length (the caller passes
        them so the wrapper never syncs with the device). max_seqlen_q sizes the grid: one too
        small still gives the right answer, only slower.
    block_table: int32 (batch, max_blocks_per_seq), scattered block ids, padded with -1.
    causal: mask aligned bottom-right, so query i sees keys j <= i + Lk - Lq; a query that sees
        no key outputs 0.
    num_heads must be a multiple of num_kv_heads (GQA/MQA). Softmax scale defaults to
    head_dim**-0.5. Returns (total_q, num_heads, head_dim) in q's dtype, written into `out` when
    given (same shape and dtype as q); accumulation is fp32.
    """
    check_rank("q", q, 3, "(total_q, num_heads, head_dim)")
    paged = block_table is not None
    kv_layout = "(num_blocks, block_size, num_kv_heads, head_dim)" if paged else "(total_k, num_kv_heads, head_dim)"
    check_rank("k", k, 4 if paged else 3, kv_layout)
    check_rank("v", v, 4 if paged else 3, kv_layout)
    check_same_shape("k", k, "v", v)
    check_float_inputs(q=q, k=k, v=v)
    head_dim = check_head_dim({"q": q.shape[-1], "k": k.shape[-1], "v": v.shape[-1]})
    num_heads, num_kv_heads = q.shape[1], k.shape[-2]
    check_heads(num_heads, num_kv_heads)
    causal = check_bool("causal", causal)
    max_seqlen_q, max_seqlen_k = check_host_int("max_seqlen_q", max_seqlen_q), check_host_int("max_seqlen_k", max_seqlen_k)
    cu_seqlens_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
    batch = cu_seqlens_q.shape[0] - 1
    if paged:
        # With a paged cache the key total is not k.shape[0]; only the shape is checked here.
        cu_seqlens_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, None)
    else:
        cu_seqlens_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0])
    if cu_seqlens_k.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_k has shape {tuple(cu_seqlens_k.shape)} but cu_seqlens_q implies ({batch + 1},)")
    page = 1
    if paged:
        page = k.shape[1]
        check_block_size(page)
        block_table = check_block_table(block_table, batch, q.device)
        k_lens = cu_seqlens_k.diff() if cu_seqlens_k.device.type == "cpu" else None
        check_capacity("max_seqlen_k", max_seqlen_k, k_lens, block_table, page, k.shape[0])
    scale = resolve_scale(softmax_scale, head_dim)

    out = check_out(out, q)
    if q.shape[0] == 0 or batch == 0:
        return out
    run_launches(prefill_launches(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, block_table))
    return out
