"""Time every candidate tile of the flash prefill kernel, with and without TMA, beside SDPA's backends.

    python -m benchmarks.tune_prefill [--shapes main|grid|all] [--json OUT.json]

The tool behind benchmarks/NOTES.md: it shows which tile the autotuner should find and how far
each is from cuDNN and FA2 in the same run. Each figure is a median of CUDA-event times taken
the way the suites take them (benchmarks/timing.py); every variant's output is checked against
SDPA's before it is timed. The suites (`pytest benchmarks`) remain the figures of record.
"""

import argparse
import sys
from functools import partial

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.ceilings import ceilings
from benchmarks.timing import Prelude
from benchmarks.tuning import checked_median_ms, write_rows
from kernels import flash_attn_varlen
from kernels.flash_attention import launch_plan, tiles_for
from kernels.launch import head_dim_block
from tests.cases import cu_seqlens

TOKENS = 16384
EXTRA_TILES = ((128, 64, 8, 3), (128, 64, 8, 4))  # beside the kernel's own candidates


def shapes(which: str) -> list[dict]:
    """(seqlen, heads, kv_heads, head_dim, causal, dtype) rows, batch x seqlen = 16k tokens: 'grid'
    is issue 6's target grid; 'main' its 4k GQA pair, on which `all` also times every tile."""
    main = [dict(seqlen=n, heads=h, kv=kv, d=128, causal=c, dtype="bf16") for n in (512, 4096) for h, kv in ((16, 16), (32, 8)) for c in (False, True)]
    grid = [
        dict(seqlen=n, heads=h, kv=kv, d=128, causal=c, dtype="bf16")
        for h, kv in ((16, 16), (32, 8))
        for c in (False, True)
        for n in (512, 1024, 2048, 4096, 8192, 16384)
    ]
    grid += [dict(seqlen=4096, heads=h, kv=kv, d=d, causal=c, dtype="bf16") for d, h, kv in ((64, 32, 8), (256, 16, 8)) for c in (False, True)]
    grid += [dict(seqlen=4096, heads=32, kv=8, d=128, causal=c, dtype="fp16") for c in (False, True)]
    grid += [dict(seqlen=4096, heads=32, kv=8, d=128, causal=c, dtype="bf16", page=p) for p in (16, 256) for c in (False, True)]
    return {"main": main, "grid": grid, "all": grid}[which]


def inputs(shape: dict, gen: torch.Generator):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[shape["dtype"]]
    batch, n = TOKENS // shape["seqlen"], shape["seqlen"]
    q, k, v = (torch.randn(batch * n, h, shape["d"], generator=gen, device="cuda").to(dtype) for h in (shape["heads"], shape["kv"], shape["kv"]))
    return batch, n, q, k, v


def paged_copy(k: torch.Tensor, v: torch.Tensor, batch: int, n: int, gen: torch.Generator, page: int):
    """k, v scattered into a paged cache (randperm block ids) with a block table per sequence."""
    blocks = batch * n // page
    order = torch.randperm(blocks, generator=gen).to("cuda")
    kc, vc = (torch.empty(blocks, page, t.shape[1], t.shape[2], dtype=t.dtype, device="cuda") for t in (k, v))
    kc[order] = k.view(blocks, page, *k.shape[1:])
    vc[order] = v.view(blocks, page, *v.shape[1:])
    return kc, vc, order.view(batch, n // page).to(torch.int32)


def sdpa(backend, q4, k4, v4, causal, gqa):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, enable_gqa=gqa)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_prefill", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=("main", "grid", "all"), default="all")
    parser.add_argument("--json", help="write every row here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device = torch.device("cuda")
    ceiling, prelude = ceilings(device), Prelude(device)
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, triton {triton.__version__}; ceilings {ceiling}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape in shapes(args.shapes):
        batch, n, q, k, v = inputs(shape, gen)
        flops = 4 * batch * shape["heads"] * n * n * shape["d"] // (2 if shape["causal"] else 1)
        cu = cu_seqlens([n] * batch, device)
        q4, k4, v4 = (t.view(batch, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))

        sdpa_args = (q4, k4, v4, shape["causal"], shape["heads"] != shape["kv"])
        variants = {"sdpa_cudnn": partial(sdpa, SDPBackend.CUDNN_ATTENTION, *sdpa_args), "sdpa_flash": partial(sdpa, SDPBackend.FLASH_ATTENTION, *sdpa_args)}
        expected = variants["sdpa_flash"]().transpose(1, 2).reshape(q.shape).float()
        out = torch.empty_like(q)
        kk, vv, table = (k, v, None)
        if shape.get("page"):
            kk, vv, table = paged_copy(k, v, batch, n, torch.Generator().manual_seed(1), shape["page"])
        plan_args = (q, kk, vv, out, cu, cu, n, n, shape["d"] ** -0.5, shape["causal"], table)
        variants["flash_triton (autotuned)"] = partial(flash_attn_varlen, q, kk, vv, cu, cu, n, n, causal=shape["causal"], block_table=table, out=out)
        if args.shapes != "grid" and shape in shapes("main"):
            bucket = triton.next_power_of_2(n)
            for tile in sorted({*tiles_for(128, q.dtype, 512), *tiles_for(128, q.dtype, 1 << 15), *EXTRA_TILES}):
                kernel, grid, kargs, meta = launch_plan(*plan_args, tile=tile)
                variants[f"tile {tile} tma={meta['TMA']}"] = partial(kernel[grid], *kargs, **meta)
            best = tiles_for(head_dim_block(shape["d"]), q.dtype, bucket)[0]
            kernel, grid, kargs, meta = launch_plan(*plan_args, tile=best, softmax=False)
            variants[f"tile {best} matmuls alone (no softmax)"] = partial(kernel[grid], *kargs, **meta)
        for name, fn in variants.items():
            sdpa_layout = name.startswith("sdpa")
            timed = checked_median_ms(
                name, fn, lambda result, sdpa_layout=sdpa_layout, packed=q.shape, out=out: result.transpose(1, 2).reshape(packed) if sdpa_layout else out,
                expected, prelude, check="no softmax" not in name,
            )
            if timed is None:
                continue
            ms, err = timed
            tflops = flops / ms / 1e9
            row = dict(shape, batch=batch, variant=name, ms=ms, tflops=tflops, rel_err=err)
            rows.append(row)
            print(f"{shape['dtype']} {shape['heads']}/{shape['kv']} d{shape['d']} {batch}x{n} {'causal' if shape['causal'] else 'full':6} "
                  f"{'page ' + str(shape['page']) + ' ' if shape.get('page') else ''}{name:34} {ms:8.3f} ms {tflops:6.0f} TFLOP/s  err {err:.1e}", flush=True)
        del q, k, v, kk, vv, out, expected
        torch.cuda.empty_cache()
    if args.json:
        write_rows(args.json, ceiling, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
