"""Every kernel config the harness can pick on a GPU, compiled ahead of time for that GPU's target.

    python -m benchmarks.compile_check [--target sm_90 --target sm_100] [--dtype bf16 --dtype fp16] [--json OUT.json] [--jobs N]

For each target, dtype and preset head_dim it gathers the launches a device of that target can
make (minivllm/kernels/compile_check.py compiles them):
- heuristic: what the wrappers choose with no tuning table (the decode heuristic at each page
  size and GQA group, the prefill autotuner's candidate tiles with and without TMA, contiguous
  and paged, and the fused elementwise kernels at the presets' widths);
- table: every entry of every committed table a device of that compute capability falls back to;
- tuner: the candidates `python -m benchmarks.tune` would time.
The projections' kernel (skinny_linear) has no head_dim: its launches are listed once per target
and dtype, under head_dim 0, each in the form its table entry or tuner bucket names.
Each distinct launch compiles once per target; --jobs N splits them over N processes. The exit
status is 1 when any launch does not compile or asks for more shared memory than the target
allows per block. It runs on any machine, GPU or not: Triton compiles for a target without one.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from minivllm.interpreter import interpreting

if __name__ == "__main__" and interpreting():
    # Interpreted kernels cannot be compiled: run again with them compiled.
    import os

    sys.exit(subprocess.run([sys.executable, "-m", "benchmarks.compile_check", *sys.argv[1:]], env=os.environ | {"TRITON_INTERPRET": "0"}).returncode)

import torch  # noqa: E402

from benchmarks import tune  # noqa: E402  (its candidate sets, looked up when used)
from benchmarks.output_paths import output_file  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402
from minivllm.atomic_write import write_atomic  # noqa: E402
from minivllm.dtypes import SHORT_DTYPES, dtype_name  # noqa: E402
from minivllm.kernels import cascade_attention_decode, naive_attention, paged_attention_decode, qk_norm_rope, rms_norm, sample_tokens, silu_and_mul, store_kvcache  # noqa: E402
from minivllm.kernels import compile_check as cc  # noqa: E402
from minivllm.kernels.cascade_attention import CascadeConfig, launch_cascade  # noqa: E402
from minivllm.kernels.flash_attention import prefill_launches, tiles_for  # noqa: E402
from minivllm.kernels.flash_overlap import _flash_fwd_overlap  # noqa: E402
from minivllm.kernels.launch import head_dim_block  # noqa: E402
from minivllm.kernels.paged_attention import DecodeConfig, launch_decode, tma_able  # noqa: E402
from minivllm.kernels.skinny_linear import DEFAULT_TILE, FORMS, skinny_linear  # noqa: E402
from minivllm.kernels.tuning_table import DEFAULT_DIR, read_table  # noqa: E402

PAGES = (16, 256)  # the block sizes the suites and the engine run with
GROUPS = sorted({p.num_heads // p.num_kv_heads for p in PRESETS.values()})
HEAD_DIMS = sorted({p.head_dim for p in PRESETS.values()})


def _randn(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def _decode_args(dtype, head_dim: int, page: int, group: int, kv_heads: int = 2):
    """(q, k_cache, v_cache, block_table, context_lens, out, max_context, scale): two sequences
    over a scattered table, long enough that the split policy splits them."""
    blocks = 8
    q = _randn(2, kv_heads * group, head_dim, dtype=dtype)
    kc, vc = (_randn(2 * blocks, page, kv_heads, head_dim, dtype=dtype) for _ in "kv")
    table = torch.randperm(2 * blocks, dtype=torch.int32).reshape(2, blocks)
    lens = torch.tensor([blocks * page - 3, blocks * page // 2 + 1], dtype=torch.int32)
    return q, kc, vc, table, lens, torch.empty_like(q), int(lens.max()), head_dim**-0.5


def prefill_launch_plans(target: str, dtype, head_dim: int, page: int, tile, tma: bool, causal: bool = True, gather: bool = False,
                         overlap: bool = False) -> list[tuple]:
    """prefill_launches' [(kernel, grid, kwargs)] for `tile` on `target` with TMA asked for (it
    falls back where it cannot apply), over contiguous keys (page 0) or a paged cache; with
    `gather` (paged only) the keys' copy comes first; with `overlap`, flash_overlap's kernel where
    it applies."""
    heads, kv_heads, seq = 4, 2, 300
    q = _randn(seq, heads, head_dim, dtype=dtype)
    cu = torch.tensor([0, seq], dtype=torch.int32)
    if page:
        blocks = math.ceil(seq / page) + 1
        k, v = (_randn(blocks, page, kv_heads, head_dim, dtype=dtype) for _ in "kv")
        table = torch.randperm(blocks, dtype=torch.int32)[None]
    else:
        k, v = (_randn(seq, kv_heads, head_dim, dtype=dtype) for _ in "kv")
        table = None
    with cc.recording(target):  # planned, not launched: the device's capability decides TMA
        return prefill_launches(q, k, v, torch.empty_like(q), cu, cu, seq, seq, head_dim**-0.5, causal, table, tile=tuple(tile), tma=tma, gather=gather,
                                overlap=overlap)


def _prefill_launches(target: str, dtype, head_dim: int, page: int, tile, tma: bool, causal: bool = True, gather: bool = False,
                      overlap: bool = False) -> list[cc.Launch]:
    """The launches of one prefill config: its kernel's, after the keys' copy with `gather`."""
    plans = prefill_launch_plans(target, dtype, head_dim, page, tile, tma, causal, gather, overlap)
    return [cc.Launch.from_kwargs(kernel, (), kwargs) for kernel, _, kwargs in plans]


def _prefill_launch(target: str, dtype, head_dim: int, page: int, tile, tma: bool, causal: bool = True) -> cc.Launch:
    (launch,) = _prefill_launches(target, dtype, head_dim, page, tile, tma, causal)
    return launch


def heuristic_launches(target: str, dtype, head_dim: int) -> list[cc.Launch]:
    """What the wrappers launch on `target` with no tuning table."""
    with cc.recording(target) as out:
        for page in PAGES:
            for group in GROUPS:  # split and unsplit: the merge kernel and both decode variants
                q, kc, vc, table, lens, _, max_ctx, _ = _decode_args(dtype, head_dim, page, group)
                paged_attention_decode(q, kc, vc, table, lens, max_context_len=max_ctx)
                paged_attention_decode(q, kc, vc, table, lens, max_context_len=max_ctx, num_splits=1)
            # The cascade's shared-prefix kernel and the decode kernel's cascade variant.
            args = _cascade_args(dtype, head_dim, page)
            cascade_attention_decode(*args[:6], max_context_len=args[7])
    out += [_prefill_launch(target, dtype, head_dim, page, tile, tma) for page in (0, *PAGES) for tile in tiles_for(head_dim_block(head_dim), dtype) for tma in (True, False)]
    with cc.recording(target) as elementwise:
        for p in PRESETS.values():
            if p.head_dim != head_dim:
                continue
            rms_norm(_randn(3, p.hidden, dtype=dtype), _randn(p.hidden, dtype=dtype), 1e-6, residual=_randn(3, p.hidden, dtype=dtype))
            if p.ffn:
                silu_and_mul(_randn(3, 2 * p.ffn, dtype=dtype))
            q, k, v = _randn(3, p.num_heads, head_dim, dtype=dtype), _randn(3, p.num_kv_heads, head_dim, dtype=dtype), _randn(3, p.num_kv_heads, head_dim, dtype=dtype)
            w, cos = _randn(head_dim, dtype=dtype), _randn(3, head_dim, dtype=dtype)
            kc = _randn(4, PAGES[0], p.num_kv_heads, head_dim, dtype=dtype)
            slots = torch.tensor([5, 17, 40], dtype=torch.int32)
            qk_norm_rope(q, k, w, w, cos, cos, 1e-6, v=v, k_cache=kc, v_cache=kc.clone(), slot_mapping=slots)
            store_kvcache(k, v, kc, kc.clone(), slots)
            sample_tokens(_randn(2, p.vocab, dtype=dtype), torch.ones(2), 0)
            sample_tokens(_randn(2, p.vocab, dtype=dtype), torch.ones(2), 0, cuts=torch.full((2,), -1.0))
        cu = torch.tensor([0, 50, 77], dtype=torch.int32)
        naive_attention(_randn(77, 4, head_dim, dtype=dtype), *(_randn(77, 2, head_dim, dtype=dtype) for _ in "kv"), cu, 50)
    return out + elementwise


def capability_tables(target: str, directory: Path) -> list[tuple[Path, dict]]:
    """(path, table) of each committed table whose card has `target`'s compute capability: what
    a device of that capability can fall back to."""
    capability = divmod(cc.target_of(target).arch, 10)
    tables = [(path, read_table(path)) for path in sorted(directory.glob("*.json"))]
    return [(path, table) for path, table in tables if tuple(table["provenance"].get("compute_capability") or ()) == capability]


def table_launches(target: str, dtype, head_dim: int, directory: Path = DEFAULT_DIR) -> list[tuple[str, cc.Launch]]:
    """(table file, launch) for every entry of a committed table of `target`'s compute capability."""
    out = []
    for path, table in capability_tables(target, directory):
        for e in table["entries"]:
            if e["dtype"] != dtype_name(dtype) or e["head_dim"] != head_dim:
                continue
            if e["kernel"] == "decode":
                with cc.recording(target) as launches:
                    launch_decode(*_decode_args(dtype, head_dim, e["page"], GROUPS[-1]), DecodeConfig(**e["config"]))
                out += [(path.name, launch) for launch in launches]
            elif e["kernel"] == "cascade":
                out += [(path.name, launch) for launch in _cascade_launches(target, dtype, head_dim, e["page"], CascadeConfig(**e["config"]))]
            else:
                c = e["config"]
                out += [(path.name, x) for x in _prefill_launches(target, dtype, head_dim, e["page"], c["tile"], c["tma"], gather=bool(c.get("gather")),
                                                                overlap=bool(c.get("overlap")))]
    return out


def _decode_candidate_launches(target: str, dtype, head_dim: int, page: int) -> dict[str, list[cc.Launch]]:
    """{tuner's name: launches} of the decode candidates the tuner times on `target` at this page:
    TMA ones where TMA can address the cache, as the tuner decides."""
    args = _decode_args(dtype, head_dim, page, GROUPS[-1])
    out = {}
    with cc.recording(target):
        candidates = tune.decode_candidates(page, tma_able(args[1], args[2], head_dim), True)
    for c in candidates:
        if tune.fits_page(c, page):
            with cc.recording(target) as out[tune.decode_name(c)]:
                launch_decode(*args, c)
    return out


def _cascade_args(dtype, head_dim: int, page: int):
    """launch_cascade's arguments up to its config: _decode_args' two sequences sharing their
    first block, a shared length of one page bounded by the whole context."""
    q, kc, vc, table, lens, out, max_ctx, scale = _decode_args(dtype, head_dim, page, GROUPS[-1])
    table[1, 0] = table[0, 0]
    return q, kc, vc, table, lens, torch.tensor([page], dtype=torch.int32), out, max_ctx, max_ctx, scale


def _cascade_launches(target: str, dtype, head_dim: int, page: int, config) -> list[cc.Launch]:
    with cc.recording(target) as launches:
        launch_cascade(*_cascade_args(dtype, head_dim, page), config)
    return launches


def _cascade_candidate_launches(target: str, dtype, head_dim: int, page: int) -> dict[str, list[cc.Launch]]:
    """{tuner's name: launches} of the cascade candidates at this page."""
    return {tune.cascade_name(c): _cascade_launches(target, dtype, head_dim, page, c) for c in tune.cascade_candidates(True)}


def _prefill_candidate_launches(target: str, dtype, head_dim: int, page: int, causal: bool = True) -> dict[str, list[cc.Launch]]:
    """{tuner's name: launches} of the prefill candidates at this page (0: contiguous keys), each
    also copying the keys out first over a paged cache, as the tuner times them."""
    out = {}
    for tile, tma in tune.prefill_candidates(True):
        for gather in (False, True) if page else (False,):
            launches = _prefill_launches(target, dtype, head_dim, page, tile, tma, causal, gather)
            out[tune.prefill_name(tile, dict(launches[-1].constexprs)["TMA"], gather)] = launches
    for tile in tune.overlap_tiles(True):
        launches = _prefill_launches(target, dtype, head_dim, page, tile, True, causal, bool(page), overlap=True)
        if launches[-1].kernel is _flash_fwd_overlap:  # as the tuner, only where it applies
            out[tune.prefill_name(tile, True, bool(page), True)] = launches
    return out


def bucket_candidates(b: "tune.Bucket", target: str) -> dict[str, list[cc.Launch]]:
    """{name: launches} of what `python -m benchmarks.tune` would time for bucket `b` on a GPU of `target`."""
    if b.kernel == "decode":
        return _decode_candidate_launches(target, SHORT_DTYPES[b.dtype], b.head_dim, b.page)
    if b.kernel == "cascade":
        return _cascade_candidate_launches(target, SHORT_DTYPES[b.dtype], b.head_dim, b.page)
    if b.kernel in FORMS:
        return _linear_candidate_launches(target, SHORT_DTYPES[b.dtype], b.kernel, b.shape["rows"], b.shape["n"], b.shape["k"])
    return _prefill_candidate_launches(target, SHORT_DTYPES[b.dtype], b.head_dim, b.page, b.shape["causal"])


def tuner_launches(target: str, dtype, head_dim: int) -> list[cc.Launch]:
    """The candidates `python -m benchmarks.tune` times on a GPU of `target`."""
    out = []
    for page in PAGES:
        out += [x for launches in _decode_candidate_launches(target, dtype, head_dim, page).values() for x in launches]
        out += [x for launches in _cascade_candidate_launches(target, dtype, head_dim, page).values() for x in launches]
    for page in (0, *PAGES):
        out += [x for launches in _prefill_candidate_launches(target, dtype, head_dim, page).values() for x in launches]
    return out


def _linear_launches(target: str, dtype, form: str, rows: int, n: int, k: int, tile) -> list[cc.Launch]:
    """skinny_linear's launches for `tile` at `rows` rows of an (n, k) weight in `form` (of
    skinny_linear.FORMS), as the engine runs it (minivllm/engine/linear.py): the norm form both
    after the residual add and without it (the first layer)."""
    x, weight, norm_weight = torch.empty(rows, k, dtype=dtype), torch.empty(n, k, dtype=dtype), torch.empty(k, dtype=dtype)
    with cc.recording(target) as launches:
        if form == "linear":
            skinny_linear(x, weight, tile=tile)
        elif form == "norm_linear":
            skinny_linear(x, weight, norm_weight=norm_weight, tile=tile)
            skinny_linear(x, weight, residual=torch.empty_like(x), norm_weight=norm_weight, tile=tile)
        else:
            skinny_linear(torch.empty(rows, 2 * k, dtype=dtype), weight, gated=True, tile=tile)
    return launches


def _linear_candidate_launches(target: str, dtype, form: str, rows: int, n: int, k: int) -> dict[str, list[cc.Launch]]:
    """{tuner's name: launches} of a projection bucket's kernel candidates (the unfused steps launch none of skinny_linear's)."""
    return {tune.linear_name(t): _linear_launches(target, dtype, form, rows, n, k, t) for t in tune.linear_candidates(rows, True) if t is not None}


def linear_launches(target: str, short: str, directory: Path = DEFAULT_DIR) -> list[tuple[str, cc.Launch]]:
    """(origin, launch) for skinny_linear on `target` in dtype `short` (bf16, fp16): its default
    tile in each form at one and four rows of the first tuned model's projection of that form (the
    engine itself runs the unfused steps without a table entry), the committed tables' entries of
    the target's compute capability, and the tuner's candidates."""
    dtype = SHORT_DTYPES[short]
    shapes = tune.linear_shapes(PRESETS[tune.LINEAR_MODELS[0]])
    out = []
    for form in FORMS:
        n, k = next(shapes[role] for role, f in tune.ROLE_FORMS.items() if f == form)
        out += [("heuristic", x) for rows in (1, 4) for x in _linear_launches(target, dtype, form, rows, n, k, DEFAULT_TILE)]
    for path, table in capability_tables(target, directory):
        for e in table["entries"]:
            if e["kernel"] in FORMS and e["dtype"] == dtype_name(dtype) and "tile" in e["config"]:
                out += [(f"table {path.name}", x) for x in _linear_launches(target, dtype, e["kernel"], *e["bucket"], tuple(e["config"]["tile"]))]
    for b in tune.buckets(True, [short]):
        if b.kernel in FORMS:
            s = b.shape
            out += [("tuner", x) for launches in _linear_candidate_launches(target, dtype, b.kernel, s["rows"], s["n"], s["k"]).values() for x in launches]
    return out


def plan(targets: list[str], dtypes: list[str]) -> list[tuple[str, str, int, str, cc.Launch]]:
    """(target, dtype, head_dim, origin, launch) for every launch each origin can make, in a fixed
    order (a launch may appear under several origins)."""
    out = []
    for target in targets:
        for short in dtypes:
            dtype = SHORT_DTYPES[short]
            for head_dim in HEAD_DIMS:
                origins = [("heuristic", x) for x in heuristic_launches(target, dtype, head_dim)]
                origins += [(f"table {name}", x) for name, x in table_launches(target, dtype, head_dim)]
                origins += [("tuner", x) for x in tuner_launches(target, dtype, head_dim)]
                out += [(target, short, head_dim, origin, launch) for origin, launch in dict.fromkeys(origins)]
            # The projections have no head_dim: listed once, under 0.
            out += [(target, short, 0, origin, launch) for origin, launch in dict.fromkeys(linear_launches(target, short))]
    return out


def shard(planned: list[tuple], index: int, count: int) -> list[tuple]:
    """Part `index` of `count` of a plan: every row of the distinct (launch, target) compiles
    numbered index, index + count, ... in order of first appearance, so each compiles in one part."""
    keys = {key: i for i, key in enumerate(dict.fromkeys((row[4], row[0]) for row in planned))}
    return [row for row in planned if keys[row[4], row[0]] % count == index]


def check(planned: list[tuple]) -> list[dict]:
    """One row per planned (target, dtype, head_dim, origin, launch): where the launch came from
    and what compiling it gave."""
    rows = []
    for target, short, head_dim, origin, launch in planned:
        result = cc.compile_for(launch, target)
        rows.append(dict(target=target, dtype=short, head_dim=head_dim, origin=origin, kernel=launch.name, config=launch.describe(),
                         ok=result.fits, shared=result.shared, limit=result.limit, families=list(result.families), verdict=result.verdict()))
    return rows


def check_in_parts(targets: list[str], dtypes: list[str], jobs: int, scratch: Path) -> list[dict]:
    """check() of the whole plan split over `jobs` processes of this tool (compiling is CPU-bound
    and each process compiles one at a time), their rows part after part."""
    common = [sys.executable, "-m", "benchmarks.compile_check", *(f"--target={t}" for t in targets), *(f"--dtype={d}" for d in dtypes)]
    procs = [subprocess.Popen([*common, f"--part={i}/{jobs}", f"--json={scratch / f'part{i}.json'}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(jobs)]
    parts = []
    for i, proc in enumerate(procs):
        printed, _ = proc.communicate()
        path = scratch / f"part{i}.json"
        if not path.is_file():
            raise RuntimeError(f"compile_check part {i}/{jobs} wrote no rows (exit {proc.returncode}):\n{printed[-3000:]}")
        parts += json.loads(path.read_text())
    return parts


def summary(rows: list[dict]) -> str:
    """Per target: launches compiled, distinct ones, failures, and the families each kernel's launches use."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        bad = [r for r in mine if not r["ok"]]
        lines.append(f"{target}: {len(mine)} (launch, dtype, head_dim, origin) rows, {len({(r['config'], r['dtype'], r['head_dim']) for r in mine})} distinct compiles, {len(bad)} failing")
        for kernel in sorted({r["kernel"] for r in mine}):
            fams = sorted({f for r in mine if r["kernel"] == kernel for f in r["families"]})
            peak = max(r["shared"] for r in mine if r["kernel"] == kernel)
            lines.append(f"  {kernel}: families {'+'.join(fams) or 'none'}, peak shared {peak} B")
        lines += [f"  FAIL {r['dtype']} d{r['head_dim']} {r['origin']}: {r['config']}: {r['verdict']}" for r in bad]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", help=f"sm_ and a compute capability, repeatable (default: {' and '.join(cc.TARGETS)})")
    parser.add_argument("--dtype", action="append", choices=["bf16", "fp16"], help="repeatable (default: both)")
    parser.add_argument("--json", type=output_file, help="write every row here")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--part", type=tune.part, metavar="I/N", help="compile only part I of N of the distinct launches (what --jobs runs)")
    args = parser.parse_args(argv)
    for target in args.target or ():
        try:
            cc.target_of(target)
        except ValueError as e:
            parser.error(f"--target: {e}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    targets, dtypes = args.target or list(cc.TARGETS), args.dtype or ["bf16", "fp16"]
    start = time.perf_counter()
    if args.jobs > 1 and args.part is None:
        with tempfile.TemporaryDirectory() as scratch:
            rows = check_in_parts(targets, dtypes, args.jobs, Path(scratch))
    else:
        planned = plan(targets, dtypes)
        rows = check(shard(planned, *args.part) if args.part else planned)
    print(summary(rows))
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
