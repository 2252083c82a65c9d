"""Time decode-kernel variants (tile, TMA, split count) beside SDPA over a contiguous cache.

    python -m benchmarks.tune_decode [--json OUT.json] [--shape B,CTX,H,KV,PAGE ...] [--variant TEXT]

The tool for issue 7's kernel work, like tune_prefill for prefill: every variant's output is
checked against SDPA over the same keys gathered contiguously, then timed the way the suites
time (benchmarks/timing.py: CUDA events, L2 rewritten and the host's launch covered before each
call, median); a short decode kernel must not be timed as its own launch. Bandwidth counts the K and V
bytes of every context once. The suites (`pytest benchmarks`) remain the figures of record.
"""

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F
import triton

from benchmarks.ceilings import ceilings
from benchmarks.timing import Prelude
from benchmarks.tuning import checked_median_ms, write_rows
from kernels.paged_attention import launch_decode
from reference.paging import paged_gather
from tests.cases import generator, paged_cache, randn

# (batch, context, heads, kv_heads, block_size): issue 7's target shapes, Qwen3-8B's 32/8 and
# the 235B preset's TP=4 shard (16/1), d=128.
SHAPES = [
    *((b, n, 32, 8, page) for page in (16, 256) for b, n in ((16, 1024), (16, 2048), (16, 8192), (64, 4096), (256, 2048))),
    *((b, n, 32, 8, page) for page in (16, 256) for b, n in ((1, 8192), (1, 32768), (4, 32768))),
    (64, 4096, 16, 1, 256),
    (16, 1024, 32, 8, 1),
]
TILES = ((16, 4, 6), (16, 4, 8), (16, 4, 10), (16, 4, 12), (32, 4, 6), (32, 4, 8), (64, 4, 3), (64, 4, 6))  # (BLOCK_N, warps, stages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--shape", action="append", help="only this shape (batch,context,heads,kv_heads,block_size); repeatable")
    parser.add_argument("--variant", help="only variants whose name contains this text (a profiler run's filter)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device, dtype, d = torch.device("cuda"), torch.bfloat16, 128
    ceiling, prelude = ceilings(device), Prelude(device)
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}; ceilings {ceiling}", flush=True)
    rows = []
    for batch, ctx, heads, kv, page in shapes:
        gen = generator(ctx + batch, device)
        q = randn((batch, heads, d), dtype, device, gen)
        cache = paged_cache([ctx] * batch, page, kv, d, dtype, device, gen)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        k = paged_gather(cache.k_cache, cache.block_table, ctx).transpose(1, 2).contiguous()
        v = paged_gather(cache.v_cache, cache.block_table, ctx).transpose(1, 2).contiguous()
        dense = partial(F.scaled_dot_product_attention, q[:, :, None], k, v, enable_gqa=heads != kv)
        expected = dense()[:, :, 0].float()
        nbytes = 2 * batch * ctx * kv * d * q.element_size()
        out = torch.empty_like(q)
        variants = {"sdpa_dense": dense, "shipped": partial(launch_decode, q, cache.k_cache, cache.v_cache, cache.block_table, lens, out, ctx, d**-0.5)}
        for tile in TILES:
            for tma in (False, True) if page % tile[0] == 0 else (False,):
                variants[f"tile {tile} tma={tma}"] = partial(launch_decode, q, cache.k_cache, cache.v_cache, cache.block_table, lens, out, ctx, d**-0.5, tile=tile, tma=tma)
        for splits in (1, 2, 4, 8, 16, 32, 64):
            variants[f"splits={splits}, default tile"] = partial(launch_decode, q, cache.k_cache, cache.v_cache, cache.block_table, lens, out, ctx, d**-0.5, num_splits=splits)
        for name, fn in variants.items():
            if args.variant and args.variant not in name:
                continue
            timed = checked_median_ms(name, fn, lambda result, name=name, out=out: result[:, :, 0] if name == "sdpa_dense" else out, expected, prelude)
            if timed is None:
                continue
            ms, err = timed
            gbps = nbytes / ms / 1e6
            rows.append(dict(batch=batch, context=ctx, heads=heads, kv_heads=kv, block_size=page, variant=name, ms=ms, gbps=gbps, rel_err=err))
            print(f"b{batch:<4} ctx {ctx:<6} {heads}/{kv} block {page:<4} {name:32} {ms:8.4f} ms {gbps:7.0f} GB/s "
                  f"({100 * gbps / ceiling['copy_gbps']:3.0f}% of copy)  err {err:.1e}", flush=True)
        del q, cache, k, v, out, expected
        torch.cuda.empty_cache()
    if args.json:
        write_rows(args.json, ceiling, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
