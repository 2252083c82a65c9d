"""Tune the Triton kernels for this device and write its tuning table.

    python -m benchmarks.tune [--kernel decode|prefill|cascade|linear|norm_linear|gated_linear] [--bucket TEXT] [--preset MODEL]
                              [--dtype bf16|fp16] [--missing] [--part I/N]
                              [--out DIR] [--budget-s 540] [--no-peers] [--matmuls-alone] [--json ROWS.json]

For each bucket of the table's key (minivllm/kernels/tuning_table.py) it builds one representative shape,
checks every candidate config's output against the float64 reference (the suites' checks), times
the ones that pass the way the suites time (benchmarks/timing.py: CUDA events, L2 rewritten and
the launch covered before each call, median), and writes the fastest into
`<out>/<device slug>.json` with its margin over the runner-up, keeping the table's other entries.
The table records where it came from: GPU, driver, torch, Triton, date and commit. The run stops
starting buckets once --budget-s has passed and says which it left out. Without a GPU it runs
under the interpreter with tiny shapes and a two-candidate set, so CI exercises it end to end.
SDPA's time for the same shape is printed beside each winner unless --no-peers. --matmuls-alone
also times each prefill winner with its softmax left out (a wrong answer, never a candidate):
what the tile's two matmuls cost, so the rest of the gap to cuDNN is the softmax.
A cascade bucket also times plain decode on its shape, whatever --no-peers says: its entry takes
the cascade there only where the winner beats plain decode (min_rows and min_shared 1, else never).
A decode bucket also times each candidate on a ragged batch of the same key, as the engine's
steps are (contexts spread from the bucket's down to a quarter of it, rows longest first, the grid
sized for the longest): its entry is the fastest there among the candidates within RAGGED_SLACK of
the fastest on the uniform batch, so the decode suite's uniform cells give up at most that.
"""

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minivllm.interpreter import interpret_without_gpu, interpreting

# Run as a tool: choose the kernels' mode before they are imported. A dry run compiles for a
# target and launches nothing, so it keeps them compiled, GPU or not.
if __name__ == "__main__" and "--dry-run" not in sys.argv[1:]:
    interpret_without_gpu()


from benchmarks.ceilings import software_facts
from benchmarks.grid import shared_prefix_lens
from benchmarks.output_paths import output_dir, output_file
from benchmarks.presets import PRESETS
from benchmarks.repo import commit
from benchmarks.timing import ColdRound, median_device_s, median_s
from minivllm.atomic_write import write_atomic
from minivllm.dtypes import SHORT_DTYPES, dtype_name
from minivllm.kernels import compile_check as cc
from minivllm.kernels import rms_norm, silu_and_mul
from minivllm.kernels.cascade_attention import CascadeConfig, launch_cascade
from minivllm.kernels.flash_attention import prefill_launches, prefill_plan, run_launches
from minivllm.kernels.flash_overlap import _flash_fwd_overlap
from minivllm.kernels.paged_attention import DecodeConfig, decode_config, launch_decode, tma_able
from minivllm.kernels.skinny_linear import FORMS, skinny_linear
from minivllm.kernels.tuning_table import bucket, clear_cache, config_dir, device_slug, entry_id, read_table, write_table
from minivllm.reference import rms_norm_ref, silu_and_mul_ref
from minivllm.reference.decode_check import check_decode
from minivllm.reference.inputs import cu_seqlens, generator, paged_cache, randn, share_prefix
from minivllm.reference.paging import paged_gather
from minivllm.reference.prefill_check import check_prefill
from minivllm.reference.tolerance import ToleranceError, assert_within_tolerance

TUNED_DTYPES = ("bf16", "fp16")  # of SHORT_DTYPES: what serving runs in
KERNELS = ("decode", "prefill", "cascade", *FORMS)
CACHE_LIMIT = 9 << 30  # bytes of K+V a decode representative may hold
ROUNDS = 20
NEVER = 2**31 - 1  # a cascade entry's min_rows where plain decode won: no batch takes the cascade
# The uniform-batch time a decode winner may give up for a faster ragged batch: the engine's
# steps are ragged, and more splits that even them out cost uniform batches 1-2% (NOTES.md,
# fourteenth session), less than the 11-29% they won on ragged ones.
RAGGED_SLACK = 0.02
# The projections tuned: the default engine models' at decode's small batches (a lookup takes the
# nearest (rows, N, K) bucket, so other models' shapes find these).
LINEAR_MODELS = ("qwen3-0.6b", "qwen3-8b")
# The attention kernels' default heads: Qwen3-8B's 32 / 8 (group 4), the suites' headline shape.
# --preset tunes others' groups too (the suites' defaults add the 0.6B's 2 and the 235B's 16).
ATTENTION_MODELS = ("qwen3-8b",)
LINEAR_ROWS = (1, 2, 4, 8, 16)  # the decode graphs' batch sizes up to skinny_linear's MAX_ROWS
# Each projection of a Qwen3 layer and the form the engine runs it in (minivllm/engine/linear.py).
ROLE_FORMS = {"qkv": "norm_linear", "o": "linear", "gate_up": "norm_linear", "down": "gated_linear"}
NORM_EPS = 1e-6


class Variants(NamedTuple):
    """What tune_bucket times for one bucket: candidates {name: (config, fn)}, each writing `out`;
    check(what), which holds `out` to the float64 reference; the peer's fn or None;
    matmuls_alone(tile) or None (prefill: the tile with its softmax left out); and ragged or None
    (decode: the same candidates on a ragged batch, as ({name: fn}, its output, its check))."""

    candidates: dict
    out: torch.Tensor
    check: Callable
    peer: Callable | None = None
    matmuls_alone: Callable | None = None
    ragged: tuple[dict, torch.Tensor, Callable] | None = None


@dataclass
class Bucket:
    """One table key and the representative shape it is tuned on."""

    kernel: str
    dtype: str
    head_dim: int
    page: int
    key: tuple
    shape: dict = field(default_factory=dict)

    @property
    def entry_key(self) -> dict:
        """The table entry's key fields for this bucket (its config and timings go beside them)."""
        return dict(kernel=self.kernel, dtype=dtype_name(SHORT_DTYPES[self.dtype]), head_dim=self.head_dim, page=self.page, bucket=list(self.key))

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.dtype} d{self.head_dim} page{self.page} " + " ".join(f"{k}={v}" for k, v in self.shape.items())


def buckets(on_gpu: bool, dtypes: list[str], presets: tuple[str, ...] = ATTENTION_MODELS) -> list[Bucket]:
    """Decode, prefill and cascade at the heads of each of `presets` (their GQA group is the key's
    last axis). Decode: batch 1..256 and context 512..32k, pages of 16 and 256 (512 as the decode
    suite has, and 4k: lookups take the nearest tuned bucket, so the cascade suite's ragged rows up
    to 4k ran on the 2k entry's tile, 10-14% slower than the baseline run that had the heuristic's
    there; benchmarks/NOTES.md). Prefill: 16k tokens at seqlen 512..16k, causal or not, and the
    prefix suite's 4 x (2k cached + 2k new) over pages of 16 and 256. Cascade: batch 16..256
    sharing a 2k prefix (the cascade suite's shape), pages of 16 and 256. The projections: the
    qkv, o, gate_up and down projections of LINEAR_MODELS at LINEAR_ROWS rows, each in the form the
    engine runs it (ROLE_FORMS), keyed (rows, N, K). Presets of one (heads, kv heads, head_dim)
    give their buckets once."""
    out = []
    if not on_gpu:
        for name in dtypes:
            out.append(Bucket("decode", name, 16, 16, (bucket(2 * 2), bucket(40), 2), dict(batch=2, context=40, heads=4, kv=2)))
            out.append(Bucket("prefill", name, 16, 0, (bucket(40), True, 2), dict(batch=2, seqlen=40, new=40, heads=4, kv=2, causal=True)))
            out.append(Bucket("cascade", name, 16, 16, (bucket(3 * 2), bucket(32), 2), dict(batch=3, shared=32, heads=4, kv=2)))
            out += [Bucket(form, name, 0, 0, (bucket(2), 40, 48), dict(rows=2, n=40, k=48)) for form in FORMS]
        return out
    for heads, kv, d in dict.fromkeys((PRESETS[m].num_heads, PRESETS[m].num_kv_heads, PRESETS[m].head_dim) for m in presets):
        g = bucket(heads // kv)
        for name in dtypes:
            for page in (16, 256):
                for batch in (1, 4, 16, 64, 256):
                    for ctx in (512, 2048, 4096, 8192, 32768):
                        if 2 * batch * ctx * kv * d * 2 <= CACHE_LIMIT:
                            out.append(Bucket("decode", name, d, page, (bucket(batch * kv), bucket(ctx), g), dict(batch=batch, context=ctx, heads=heads, kv=kv)))
        for name in dtypes:
            for causal in (False, True):
                for n in (512, 1024, 2048, 4096, 8192, 16384):
                    out.append(Bucket("prefill", name, d, 0, (bucket(n), causal, g), dict(batch=16384 // n, seqlen=n, new=n, heads=heads, kv=kv, causal=causal)))
                for page in (16, 256):
                    out.append(Bucket("prefill", name, d, page, (bucket(4096), causal, g), dict(batch=4, seqlen=4096, new=2048, heads=heads, kv=kv, causal=causal)))
        for name in dtypes:
            for page in (16, 256):
                for batch in (16, 64, 256):
                    out.append(Bucket("cascade", name, d, page, (bucket(batch * kv), bucket(2048), g), dict(batch=batch, shared=2048, heads=heads, kv=kv)))
    for name in dtypes:
        shapes = dict.fromkeys((ROLE_FORMS[role], *shape) for model in LINEAR_MODELS for role, shape in linear_shapes(PRESETS[model]).items())
        for form, n, k in shapes:
            for rows in LINEAR_ROWS:
                out.append(Bucket(form, name, 0, 0, (bucket(rows), n, k), dict(rows=rows, n=n, k=k)))
    # The shapes that stand for many first, so that a run cut short by its budget still covers
    # every key coarsely (lookups take the nearest tuned bucket); stable within each pass.
    return sorted(out, key=lambda b: 0 if b.shape.get("batch") in (16, 64) and b.shape.get("context") in (2048, 8192) or b.shape.get("seqlen") in (1024, 4096) else 1)


def decode_candidates(page: int, tma: bool, on_gpu: bool) -> list[DecodeConfig]:
    """TMA boxes (one page-tile each) and gathered tiles spanning pages, each at several
    programs per SM; programs per SM changes only the split count, so costs no compile. One
    program per SM splits no row once batch x kv heads fills the SMs, which saves the merge's
    second launch where contexts are short (vLLM and FlashInfer split only below that). Triton
    3.6's pipeliner stages each tile's block ids too: a gathered tile is double-buffered from 5
    stages, a TMA tile from 6."""
    if not on_gpu:
        return [DecodeConfig("gather", 16, 4, 1, 2), DecodeConfig("gather", 32, 4, 1, 4)]
    tiles = [("gather", 32, 4, 3), ("gather", 32, 4, 5), ("gather", 64, 4, 3), ("gather", 64, 4, 5), ("gather", 128, 4, 3), ("gather", 128, 8, 3)]
    if tma:
        tiles += [("tma", 16, 4, 6), ("tma", 16, 4, 8)] + ([("tma", 32, 4, 6), ("tma", 64, 4, 6)] if page >= 64 else [])
    return [DecodeConfig(*t, pps) for t in tiles for pps in (1, 2, 4, 8)]


def cascade_candidates(on_gpu: bool) -> list[CascadeConfig]:
    """The shared prefix's kernel: query tiles of 32 to 128 rows, K/V tiles of 32 or 64 tokens,
    each at several programs per SM (only the split count changes, so no compile). min_rows and
    min_shared are the bucket's verdict, set once the winner is compared with plain decode."""
    if not on_gpu:
        return [CascadeConfig(16, 16, 4, 1, 2, 1, 1), CascadeConfig(32, 16, 4, 1, 2, 1, 1)]
    tiles = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (32, 64, 4, 2), (64, 32, 4, 3)]
    return [CascadeConfig(*t, pps, 1, 1) for t in tiles for pps in (1, 2, 4)]


def linear_shapes(p) -> dict[str, tuple[int, int]]:
    """A dense preset's projections as (N, K), nn.Linear's weight shapes with qkv and gate_up fused."""
    q, kv = p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim
    return {"qkv": (q + 2 * kv, p.hidden), "o": (p.hidden, q), "gate_up": (2 * p.ffn, p.hidden), "down": (p.hidden, p.ffn)}


def linear_candidates(rows: int, on_gpu: bool) -> list[tuple | None]:
    """None for the unfused steps (the norm or SiLU-and-mul kernel, then cuBLAS), and
    skinny_linear tiles (BLOCK_N, BLOCK_K, num_warps, num_stages). Several rows: column strips of
    16 to 64 with K steps of 256, and a 16-wide strip with steps of 512. One row: strips of 8 to 64
    with K steps of 256 to 1024, up to 16k products a step (one row holds a step's products in
    fp32 registers, 128 a thread at 4 warps); the H100 chose the widest step offered, 512, at every
    one-row bucket, so the grid goes past it (benchmarks/NOTES.md)."""
    if not on_gpu:
        return [None, (16, 16, 4, 1), (16, 32, 4, 2)]
    if rows == 1:
        return [None] + [(bn, bk, 4, 3) for bn in (8, 16, 32, 64) for bk in (256, 512, 1024) if bn * bk <= 16384]
    return [None] + [(bn, 256, 4, 3) for bn in (16, 32, 64)] + [(16, 512, 4, 3)]


def linear_name(tile: tuple | None) -> str:
    return "unfused cublas" if tile is None else "skinny n{} k{} w{} s{}".format(*tile)


def linear_config(tile: tuple | None) -> dict:
    """A projection entry's config: the tile skinny_linear takes, or cuBLAS (after the unfused
    step) where that won."""
    return {"cublas": True} if tile is None else {"tile": list(tile)}


def cascade_name(c: CascadeConfig) -> str:
    return f"m{c.block_m} n{c.block_n} w{c.num_warps} s{c.num_stages} pps{c.programs_per_sm}"


def fits_page(c: DecodeConfig, page: int) -> bool:
    """A TMA tile lies inside one page; a gathered one may span pages."""
    return c.fetch == "gather" or page % c.block_n == 0


def decode_name(c: DecodeConfig) -> str:
    return f"{c.fetch} n{c.block_n} w{c.num_warps} s{c.num_stages} pps{c.programs_per_sm}"


def prefill_name(tile: tuple, tma: bool, gather: bool = False, overlap: bool = False) -> str:
    return f"tile {tuple(tile)} tma={tma}" + (" overlap" if overlap else "") + (" gather" if gather else "")


def prefill_table_config(tile: tuple, tma: bool, gather: bool, overlap: bool = False) -> dict:
    """A prefill candidate as a table entry's config: `gather` only where it copies the keys out,
    `overlap` only where flash_overlap's kernel runs the tile."""
    return dict(tile=list(tile), tma=tma) | (dict(overlap=True) if overlap else {}) | (dict(gather=True) if gather else {})


def prefill_candidates(on_gpu: bool) -> list[tuple[tuple, bool]]:
    """(tile, tma) pairs: (BLOCK_M, BLOCK_N, num_warps, num_stages), TMA where it applies. Over a
    paged cache each pair is also timed copying the keys out first (`gather`)."""
    if not on_gpu:
        return [((32, 16, 4, 1), False), ((16, 16, 4, 1), False)]
    tiles = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]
    return [(t, True) for t in tiles] + [((128, 64, 8, 3), False)]


def overlap_tiles(on_gpu: bool) -> list[tuple]:
    """Tiles (BLOCK_M, BLOCK_N, num_warps, K/V stages) for flash_overlap's kernel, timed where it
    applies (a Hopper card, contiguous or gathered keys): a 128-row tile over two warpgroups or a
    64-row one over one; 128-key tiles hold 64 more fp32 registers a thread of scores."""
    return [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)] if on_gpu else []


def _timer(device: torch.device, cold_round: ColdRound | None):
    if device.type == "cuda":
        return lambda fn: 1e3 * median_device_s(fn, cold_round, rounds=ROUNDS)
    # The interpreter: wall time of a few calls, only so that the table's machinery runs.
    return lambda fn: 1e3 * median_s(fn, time.perf_counter, 3)


def ragged_lens(batch: int, context: int) -> list[int]:
    """A decode bucket's ragged batch: `batch` contexts spread evenly from `context` down to a
    quarter of it, longest first (the engine's order)."""
    return [context - (context - context // 4) * i // max(batch - 1, 1) for i in range(batch)]


def _decode_variants(b: Bucket, device: torch.device, gen: torch.Generator, peers: bool) -> Variants:
    """A decode bucket's Variants: every candidate on `batch` rows of the bucket's context
    (SDPA's peer on the same), and from 2 rows up, on ragged_lens' rows with the grid sized for
    the bucket's context, as the engine sizes its graphs' grids for max_model_len."""
    s, dtype = b.shape, SHORT_DTYPES[b.dtype]
    q = randn((s["batch"], s["heads"], b.head_dim), dtype, device, gen)
    on_gpu = device.type == "cuda"

    def launches(lens: list[int]):
        cache = paged_cache(lens, b.page, s["kv"], b.head_dim, dtype, device, gen)
        ctx, out = torch.tensor(lens, dtype=torch.int32, device=device), torch.empty_like(q)
        args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx, out, s["context"], b.head_dim**-0.5)
        return cache, out, lambda c: partial(launch_decode, *args, c), lambda what: check_decode(out, q, cache, ctx, what)

    cache, out, launch, check = launches([s["context"]] * s["batch"])
    configs = [c for c in decode_candidates(b.page, tma_able(cache.k_cache, cache.v_cache, b.head_dim), on_gpu) if fits_page(c, b.page)]
    candidates = {decode_name(c): (c.as_dict(), launch(c)) for c in configs}
    ragged = None
    if s["batch"] > 1:
        _, ragged_out, ragged_launch, ragged_check = launches(ragged_lens(s["batch"], s["context"]))
        ragged = ({decode_name(c): ragged_launch(c) for c in configs}, ragged_out, ragged_check)
    peer = None
    if peers:
        k, v = (paged_gather(c, cache.block_table, s["context"]).transpose(1, 2).contiguous() for c in (cache.k_cache, cache.v_cache))
        peer = partial(F.scaled_dot_product_attention, q[:, :, None], k, v, enable_gqa=s["heads"] != s["kv"])
    return Variants(candidates, out, check, peer, ragged=ragged)


def _cascade_variants(b: Bucket, device: torch.device, gen: torch.Generator, peers: bool) -> Variants:
    """A cascade bucket's Variants: its batch shares a prefix of `shared` tokens, then each row
    has a seeded suffix; the peer, timed whatever `peers` says, is plain decode on that cache."""
    s, dtype = b.shape, SHORT_DTYPES[b.dtype]
    on_gpu = device.type == "cuda"
    lens = shared_prefix_lens(s["batch"], s["shared"], on_gpu)
    q = randn((s["batch"], s["heads"], b.head_dim), dtype, device, gen)
    cache = share_prefix(paged_cache(lens, b.page, s["kv"], b.head_dim, dtype, device, gen), lens, s["shared"] // b.page)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    shared = torch.tensor([s["shared"]], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    args = (q, cache.k_cache, cache.v_cache, cache.block_table, ctx)
    candidates = {cascade_name(c): (c.as_dict(), partial(launch_cascade, *args, shared, out, max(lens), s["shared"], b.head_dim**-0.5, c)) for c in cascade_candidates(on_gpu)}
    plain = partial(launch_decode, *args, torch.empty_like(q), max(lens), b.head_dim**-0.5, decode_config(q, cache.k_cache, cache.v_cache, max(lens)))
    return Variants(candidates, out, lambda what: check_decode(out, q, cache, ctx, what), plain)


def _prefill_variants(b: Bucket, device: torch.device, gen: torch.Generator, peers: bool) -> Variants:
    """A prefill bucket's Variants, contiguous keys (page 0) or a paged prefix, with cuDNN's SDPA
    as the peer on contiguous keys and matmuls_alone."""
    s, dtype = b.shape, SHORT_DTYPES[b.dtype]
    batch, n, new, causal = s["batch"], s["seqlen"], s["new"], s["causal"]
    q = randn((batch * new, s["heads"], b.head_dim), dtype, device, gen)
    k, v = (randn((batch * n, s["kv"], b.head_dim), dtype, device, gen) for _ in "kv")
    out = torch.empty_like(q)
    cu_q, cu_k = cu_seqlens([new] * batch, device), cu_seqlens([n] * batch, device)
    if b.page:
        cache = paged_cache([n] * batch, b.page, s["kv"], b.head_dim, dtype, device, gen)
        k, v = (paged_gather(c, cache.block_table, n).reshape(batch * n, s["kv"], b.head_dim) for c in (cache.k_cache, cache.v_cache))
        kk, vv, table = cache.k_cache, cache.v_cache, cache.block_table
    else:
        kk, vv, table = k, v, None
    candidates = {}
    for tile, tma in prefill_candidates(device.type == "cuda"):
        for gather in (False, True) if b.page else (False,):
            launches = prefill_launches(q, kk, vv, out, cu_q, cu_k, new, n, b.head_dim**-0.5, causal, table, tile=tile, tma=tma, gather=gather)
            used_tma = launches[-1][2]["TMA"]
            candidates[prefill_name(tile, used_tma, gather)] = (prefill_table_config(tile, used_tma, gather), partial(run_launches, launches))
    for tile in overlap_tiles(device.type == "cuda"):
        gather = bool(b.page)  # over a paged cache it runs on the keys copied out
        launches = prefill_launches(q, kk, vv, out, cu_q, cu_k, new, n, b.head_dim**-0.5, causal, table, tile=tile, gather=gather, overlap=True)
        if launches[-1][0] is _flash_fwd_overlap:  # else this card or shape cannot run it
            candidates[prefill_name(tile, True, gather, True)] = (prefill_table_config(tile, True, gather, True), partial(run_launches, launches))

    def check(what):
        check_prefill(out, q, k, v, batch, new, causal, what, prefix=n - new)

    peer = None
    if peers and not b.page:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q4, k4, v4 = (t.view(batch, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))

        def peer():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, enable_gqa=s["heads"] != s["kv"])

    def matmuls_alone(tile):
        kernel, grid, kwargs = prefill_plan(q, kk, vv, out, cu_q, cu_k, new, n, b.head_dim**-0.5, causal, table, tile=tile, softmax=False)
        return partial(kernel[grid], **kwargs)

    return Variants(candidates, out, check, peer, matmuls_alone)


def _linear_variants(b: Bucket, device: torch.device, gen: torch.Generator, peers: bool) -> Variants:
    """A projection bucket's Variants in its form (b.kernel, of FORMS): the unfused steps, as
    the engine runs them without the kernel, are a candidate, not a peer; the check holds y to
    the unfused references in float64 and in the dtype."""
    s, dtype, form = b.shape, SHORT_DTYPES[b.dtype], b.kernel
    x = randn((s["rows"], 2 * s["k"] if form == "gated_linear" else s["k"]), dtype, device, gen)
    residual = randn((s["rows"], s["k"]), dtype, device, gen)
    norm_weight = (0.5 + torch.rand(s["k"], generator=gen, device=device)).to(dtype)
    weight = randn((s["n"], s["k"]), dtype, device, gen) / s["k"] ** 0.5
    out = torch.empty(s["rows"], s["n"], dtype=dtype, device=device)
    fused = dict(linear={}, norm_linear=dict(residual=residual, norm_weight=norm_weight, eps=NORM_EPS), gated_linear=dict(gated=True))[form]

    def step_before(x, residual, norm_weight, rms, silu):
        """The projection's input after the form's unfused step, with these norm and SiLU ops."""
        return x if form == "linear" else silu(x) if form == "gated_linear" else rms(x, norm_weight, NORM_EPS, residual)[0]

    def unfused():
        torch.mm(step_before(x, residual, norm_weight, rms_norm, silu_and_mul), weight.t(), out=out)

    def reference(x, residual, norm_weight, weight):
        return F.linear(step_before(x, residual, norm_weight, rms_norm_ref, silu_and_mul_ref), weight)

    candidates = {}
    for tile in linear_candidates(s["rows"], device.type == "cuda"):
        fn = unfused if tile is None else partial(skinny_linear, x, weight, tile=tile, out=out, **fused)
        candidates[linear_name(tile)] = (linear_config(tile), fn)
    inputs = (x, residual, norm_weight, weight)

    def check(what):
        assert_within_tolerance(out, reference(*(t.double() for t in inputs)), reference(*inputs), what)

    return Variants(candidates, out, check)


def compile_filter(candidates: dict, target: str) -> dict[str, str]:
    """{name: why} for the candidates ({name: (config, fn)}) whose launches do not compile for
    `target` or ask for more shared memory than it has per block; fn is recorded, not run."""
    dropped = {}
    for name, (_, fn) in candidates.items():
        bad = cc.misfit(fn, target)
        if bad is not None:
            dropped[name] = bad.verdict()
    return dropped


def dry_run(chosen: list[Bucket], target: str) -> int:
    """Print, per bucket, each candidate the tuner would time on a `target` GPU and the shared
    memory its launches ask for, or why it would be dropped; times nothing. Returns how many
    candidates would be dropped."""
    from benchmarks.compile_check import bucket_candidates  # it imports this module

    dropped = 0
    for b in chosen:
        print(f"{b.name}:", flush=True)
        for name, launches in bucket_candidates(b, target).items():
            results = [cc.compile_for(launch, target) for launch in launches]
            bad = next((r for r in results if not r.fits), None)
            dropped += bad is not None
            if bad is None:
                families = "+".join(sorted({f for r in results for f in r.families})) or "no MMA or TMA"
                print(f"  {name}: kept: {max(r.shared for r in results)} B shared of {results[0].limit}, {families}", flush=True)
            else:
                print(f"  {name}: dropped: {bad.verdict()}", flush=True)
    return dropped


def _first_line(e: Exception) -> str:
    """The first line of an exception's message, at most 200 characters ('' for none)."""
    return (str(e).splitlines() or [""])[0][:200]


def tune_bucket(b: Bucket, device: torch.device, time_ms, peers: bool, matmuls: bool = False) -> tuple[list[dict], float | None, float | None]:
    """Every candidate of the bucket as {name, config, ms or None, error}, fastest first, with
    ragged_ms where the bucket has a ragged batch; the peer's ms; and with `matmuls`, the prefill
    winner's ms with its softmax left out. A candidate that raises or fails the float64 check, on
    either batch, is never timed."""
    gen = generator(b.head_dim + b.page + sum(b.shape.values()), device)
    build = _linear_variants if b.kernel in FORMS else {"decode": _decode_variants, "prefill": _prefill_variants, "cascade": _cascade_variants}[b.kernel]
    candidates, out, check, peer, matmuls_alone, ragged = build(b, device, gen, peers)
    ragged_fns, ragged_out, ragged_check = ragged or ({}, None, None)
    rows = []
    if device.type == "cuda":  # what cannot compile or fit this card is dropped before anything is timed
        for name, reason in compile_filter(candidates, cc.device_target(device)).items():
            rows.append(dict(name=name, config=candidates.pop(name)[0], ms=None, error=f"filtered before timing: {reason}"))
    for name, (config, fn) in candidates.items():
        try:
            out.fill_(float("nan"))  # a candidate that leaves rows unwritten fails the check
            fn()
            check(name)
            row = dict(name=name, config=config, ms=time_ms(fn), error=None)
            if ragged_fns:
                ragged_out.fill_(float("nan"))
                ragged_fns[name]()
                ragged_check(f"{name} on the ragged batch")
                row["ragged_ms"] = time_ms(ragged_fns[name])
            rows.append(row)
        except ToleranceError as e:  # a wrong answer, raised under python -O too: reported, never timed
            rows.append(dict(name=name, config=config, ms=None, error=f"wrong output: {_first_line(e)}"))
        except Exception as e:  # a config the compiler or the launch refuses is reported, not fatal
            rows.append(dict(name=name, config=config, ms=None, error=f"{type(e).__name__}: {_first_line(e)}"))
    peer_ms = None
    if peer is not None:
        try:
            peer()
            peer_ms = time_ms(peer)
        except RuntimeError as e:
            print(f"  peer refused: {str(e).splitlines()[0][:120]}", flush=True)
    rows.sort(key=lambda r: (r["ms"] is None, r["ms"] or 0.0))
    alone_ms = None
    if matmuls and matmuls_alone is not None and rows and rows[0]["ms"] is not None:
        fn = matmuls_alone(tuple(rows[0]["config"]["tile"]))
        fn()
        alone_ms = time_ms(fn)
    return rows, peer_ms, alone_ms


def table_ranking(timed: list[dict]) -> tuple[list[dict], str]:
    """The timed rows (fastest first on the bucket's batch) in the order the table takes them, and
    the timing that order and the winner's margin follow. Rows with ragged_ms (decode): those
    within RAGGED_SLACK of the fastest, fastest on the ragged batch first, then the rest as they
    were; the margin is on the ragged batch where two rows are that near, else on the uniform one."""
    if not timed or "ragged_ms" not in timed[0]:
        return timed, "ms"
    near = sorted((r for r in timed if r["ms"] <= timed[0]["ms"] * (1 + RAGGED_SLACK)), key=lambda r: r["ragged_ms"])
    return near + [r for r in timed if r not in near], "ragged_ms" if len(near) > 1 else "ms"


def provenance(device: torch.device) -> dict:
    """The card and software a table's figures were measured with, when, at which commit; the
    compute capability lets a card without a table of its own find this one as family."""
    return dict(
        software_facts(device, interpreting()),
        compute_capability=list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), commit=commit(), tool="python -m benchmarks.tune",
    )


def missing_buckets(chosen: list[Bucket], path: Path) -> list[Bucket]:
    """The buckets of `chosen` that the table at `path` (none if absent) holds no entry for."""
    held = {entry_id(e) for e in read_table(path)["entries"]} if path.is_file() else set()
    return [b for b in chosen if entry_id(b.entry_key) not in held]


def part(text: str) -> tuple[int, int]:
    """Parse --part I/N: this process tunes buckets I, I+N, I+2N, ... of the selection."""
    try:
        index, count = (int(n) for n in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid part {text!r}: give I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"invalid part {text!r}: I must be in [0, N)")
    return index, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only this kernel's buckets; repeatable")
    parser.add_argument("--bucket", action="append", help="only buckets whose name contains this text; repeatable")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="tune decode, prefill and cascade at this model's heads (its GQA group); repeatable (default qwen3-8b; the CPU run keeps its tiny shapes)")
    parser.add_argument("--dtype", action="append", choices=TUNED_DTYPES, help="only this dtype; repeatable (default bf16 and fp16; bf16 on the CPU)")
    parser.add_argument("--out", type=output_dir, help="table directory (default: MINIVLLM_KERNEL_CONFIGS or minivllm/kernels/configs)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no bucket after this many seconds (default 540)")
    parser.add_argument("--no-peers", action="store_true", help="do not time SDPA beside each bucket")
    parser.add_argument("--matmuls-alone", action="store_true", help="also time each prefill winner without its softmax (a diagnostic)")
    parser.add_argument("--json", type=output_file, help="also write every candidate's row here")
    parser.add_argument("--missing", action="store_true", help="only buckets the table in --out lacks: resume a run its budget cut, or fill a grid that grew")
    parser.add_argument("--part", type=part, metavar="I/N", help="tune only buckets I, I+N, ... of the selection (a tuning array's task I of N)")
    parser.add_argument("--dry-run", action="store_true", help="time nothing: list each bucket's candidates for --target (default: this GPU), with their shared memory or why they would be dropped")
    parser.add_argument("--target", help="with --dry-run: the GPU to compile for, e.g. sm_100 (B200, GB200) or sm_90 (H100, H200)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.target and not args.dry_run:
        parser.error("--target goes with --dry-run: a tuning run times the GPU it runs on")
    if args.missing and args.dry_run:
        parser.error("--missing reads this GPU's table, which a dry run for --target has none of")
    if args.dry_run:
        if interpreting():
            parser.error("--dry-run compiles the kernels for a target, which Triton's interpreter cannot: unset TRITON_INTERPRET")
        if args.target:
            try:
                cc.target_of(args.target)
            except ValueError as e:
                parser.error(f"--target: {e}")
            target = args.target
        elif device.type == "cuda":
            target = cc.device_target(device)
        else:
            parser.error("--dry-run without a GPU needs --target, e.g. --target sm_100")
    on_gpu = device.type == "cuda" or args.dry_run  # a dry run lists what a GPU would tune
    chosen = [b for b in buckets(on_gpu, args.dtype or (list(TUNED_DTYPES) if on_gpu else ["bf16"]), tuple(args.preset or ATTENTION_MODELS))
              if (not args.kernel or b.kernel in args.kernel) and (not args.bucket or any(t in b.name for t in args.bucket))]
    if not chosen:
        parser.error("no bucket matches --kernel/--bucket")
    path = (args.out or config_dir()) / f"{device_slug(device)}.json"
    if args.missing:
        chosen = missing_buckets(chosen, path)
        if not chosen:
            print(f"{path} holds every chosen bucket; nothing to tune", flush=True)
            return 0
    if args.part:
        chosen = chosen[args.part[0] :: args.part[1]]
        if not chosen:
            print(f"part {args.part[0]}/{args.part[1]}: no bucket left for this part", flush=True)
            return 0
    if args.dry_run:
        dropped = dry_run(chosen, target)
        print(f"{len(chosen)} buckets for {target}; {dropped} candidates would be dropped before timing", flush=True)
        return 0
    prov = provenance(device)
    print(f"{prov['gpu']}: torch {prov['torch']}, triton {prov['triton']}; {len(chosen)} buckets -> {path}", flush=True)
    time_ms = _timer(device, ColdRound(device) if on_gpu else None)
    start, winners, rows, left_out = time.monotonic(), [], [], []
    for b in chosen:
        if time.monotonic() - start > args.budget_s:
            left_out.append(b.name)
            continue
        ranked, peer_ms, alone_ms = tune_bucket(b, device, time_ms, peers=on_gpu and not args.no_peers, matmuls=args.matmuls_alone)
        rows += [dict(r, bucket=b.name, peer_ms=peer_ms, matmuls_alone_ms=alone_ms) for r in ranked]
        for r in ranked:
            if r["error"]:
                print(f"  {b.name}: {r['name']} not timed: {r['error']}", flush=True)
        timed = [r for r in ranked if r["ms"] is not None]
        if not timed:
            print(f"{b.name}: no candidate passed; left as it was", flush=True)
            continue
        timed, key = table_ranking(timed)
        best = timed[0]
        if b.kernel == "cascade":
            # The bucket's verdict: the cascade where it beats plain decode on this shape, else never.
            gains = peer_ms is not None and best["ms"] < peer_ms
            best = dict(best, config=dict(best["config"], min_rows=1 if gains else NEVER, min_shared=1 if gains else NEVER))
        margin = timed[1][key] / best[key] - 1 if len(timed) > 1 else None
        ragged = {"ragged_ms": best["ragged_ms"], "ragged_lens": ragged_lens(b.shape["batch"], b.shape["context"])} if "ragged_ms" in best else {}
        winners.append(dict(b.entry_key, config=best["config"], ms=best["ms"], margin=margin, runner_up=timed[1]["name"] if len(timed) > 1 else None, shape=b.shape, **ragged))
        versus = f"  ragged {best['ragged_ms']:.4f} ms (fastest there {min(r['ragged_ms'] for r in timed):.4f})" if ragged else ""
        versus += f"  peer {peer_ms:.4f} ms (ours {peer_ms / best['ms']:.2f}x)" if peer_ms else ""
        versus += f"  matmuls alone {alone_ms:.4f} ms ({100 * alone_ms / best['ms']:.0f}% of it)" if alone_ms else ""
        print(f"{b.name}: {best['name']} {best['ms']:.4f} ms, margin {100 * (margin or 0):.1f}% over {winners[-1]['runner_up']}{versus}", flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    if winners:
        write_table(path, prov, winners)
        clear_cache()
    if args.json:
        write_atomic(args.json, json.dumps(dict(provenance=prov, rows=rows), indent=1))
    print(f"wrote {len(winners)} entries to {path} in {time.monotonic() - start:.0f} s", flush=True)
    if left_out:
        print(f"budget of {args.budget_s:.0f} s spent; {len(left_out)} buckets left out: " + "; ".join(left_out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
