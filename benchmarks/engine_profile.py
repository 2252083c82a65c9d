"""Where an engine step's time goes, kernel by kernel: prefill steps, full-batch and few-row decode steps.

    python -m benchmarks.engine_profile [--preset qwen3-0.6b] [--dtype bf16] [--workload nano]
                                        [--decode-steps 64] [--rows 1] [--top 20] [--trace-dir DIR]

Two runs on a seeded random checkpoint in the preset's shapes (benchmarks/engine_workloads.py),
each after two warm-up runs drawn with other seeds (the prefix cache would serve a repeated
prompt, and a process's first sight of a shape costs the host once):
- full batch: the workload's prompts, each decoded for --decode-steps tokens: its prefill steps,
  then decode steps at the whole batch (256 sequences for nano);
- one row (or --rows N): the first N of those prompts decoded for --decode-steps tokens, in the
  decode CUDA graph of N rows (the batch buckets between one row and the whole batch, where the
  engine suite's "engine steps" table may show a gap of their own).
For each it prints the engine's step records summarised per phase and batch (schedule, prepare,
launch, wait: engine/step_profile.format_summary, as `main.py --profile` prints them),
then, from the same run under torch.profiler, the device's kernels grouped by name and grid,
per kind of step (the engine names each step's launch in the trace, step_profile.step_annotation, and CUPTI
ties each kernel, a graph replay's too, to its launch): µs a step, calls a step, µs a call, and
how much of the kernels' span the device was busy. A step whose wait is most of it, on a busy
device, is bound by its kernels, not the host. Under the decode kernels it prints their
attention's rate: the attention kernels' µs a step against the K/V of the steps' contexts (each
sequence's whole context, a shared prefix once per sequence, so a cascade step's rate is an
upper bound), and that rate against the device's measured read ceiling (benchmarks/ceilings.py).
--trace-dir also writes each run's Chrome trace, gzipped (full_batch.json.gz, and one_row.json.gz or N_rows.json.gz). Without a GPU it runs the
tiny preset under Triton's interpreter: step records only.
"""

import argparse
import bisect
import gc
import gzip
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from minivllm.interpreter import interpret_without_gpu

if __name__ == "__main__":
    interpret_without_gpu()

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.ceilings import ceilings  # noqa: E402
from benchmarks.engine_workloads import ENGINE_PRESETS, TEMPERATURE, WORKLOADS_BY_NAME, Workload, write_checkpoint  # noqa: E402
from benchmarks.extra_info import kv_token_bytes  # noqa: E402
from benchmarks.output_paths import output_dir  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402
from minivllm.dtypes import SHORT_DTYPES  # noqa: E402
from minivllm.engine import LLM, SamplingParams  # noqa: E402
from minivllm.engine.step_profile import StepRecord, annotated_kind, format_summary  # noqa: E402

WARM_SEEDS = (1, 3)  # the measured runs draw with seeds 0 (full batch) and 2 (few rows)
# A decode step's attention: the kernels that read its K/V, and the merge of their splits.
ATTENTION_KERNELS = ("_paged_decode", "_merge_splits", "_shared_prefix")


def _step_kinds(events: list[dict]) -> dict[int, str]:
    """{correlation id: 'prefill' or 'decode'} of each launch made inside an engine step's range
    (engine/step_profile.step_annotation; a graph replay's kernels share its launch's id)."""
    steps = sorted((e["ts"], e["ts"] + e["dur"], annotated_kind(e["name"])) for e in events
                   if e.get("cat") == "user_annotation" and annotated_kind(e["name"]))
    starts = [s[0] for s in steps]
    kinds = {}
    for e in events:
        corr = e.get("args", {}).get("correlation")
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and corr is not None:
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i >= 0 and e["ts"] <= steps[i][1]:
                kinds[corr] = steps[i][2]
    return kinds


def kernel_tables(trace: dict, steps: dict[str, int]) -> tuple[dict[str, list[tuple[str, float, float, float]]], float, float]:
    """({step kind: rows}, busy_us, span_us) of a Chrome trace's device kernels. Each kernel goes to
    the kind of the step that launched it ('other' outside any step); rows are (name and grid, µs
    a step, calls a step, µs a call), most time first, over `steps[kind]` steps of that kind.
    busy is the kernels' summed time, span their first start to last end."""
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if not kernels:
        return {}, 0.0, 0.0
    kinds = _step_kinds(events)
    groups = defaultdict(lambda: defaultdict(list))
    for e in kernels:
        args = e.get("args", {})
        grid = args.get("grid")
        groups[kinds.get(args.get("correlation"), "other")][f"{e['name'][:60]} {grid}" if grid else e["name"][:60]].append(e["dur"])
    tables = {}
    for kind, by_name in groups.items():
        n = max(1, steps.get(kind, 1))
        tables[kind] = sorted(((name, sum(d) / n, len(d) / n, statistics.median(d)) for name, d in by_name.items()), key=lambda r: -r[1])
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    return tables, sum(e["dur"] for e in kernels), span


def attention_rate(rows: list[tuple[str, float, float, float]], records: list[StepRecord], kv_token_bytes: int) -> tuple[float, float]:
    """(µs, bytes) a decode step of its attention: the ATTENTION_KERNELS' share of a decode
    kernel table (kernel_tables' rows) and the K/V of the decode records' contexts
    (StepRecord.context_tokens, kv_token_bytes each: one token's K and V over all layers)."""
    decode = [r for r in records if not r.prefill]
    us = sum(r[1] for r in rows if r[0].startswith(ATTENTION_KERNELS))
    return us, kv_token_bytes * sum(r.context_tokens for r in decode) / max(1, len(decode))


def profiled(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], trace_file: Path) -> dict:
    """One generate under torch.profiler (the device's kernels where there is a GPU); its Chrome trace."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_file))
    return json.loads(trace_file.read_text())


def report(title: str, llm: LLM, trace: dict, top: int, kv_token_bytes: int, read_gbps: float) -> None:
    records = llm.step_records
    print(f"\n{title}: {len(records)} steps ({sum(r.prefill for r in records)} prefill)")
    print("\n".join("  " + line for line in format_summary(records).splitlines()))
    steps = {"prefill": sum(r.prefill for r in records), "decode": sum(not r.prefill for r in records), "other": 1}
    tables, busy, span = kernel_tables(trace, steps)
    if not tables:
        print("  no device kernels in the trace (no GPU: the kernels ran in Triton's interpreter)")
        return
    print(f"  device kernels: busy {busy / 1e3:.1f} ms of their {span / 1e3:.1f} ms span ({100 * busy / span:.0f}%)")
    for kind in ("prefill", "decode", "other"):
        rows = tables.get(kind)
        if not rows:
            continue
        where = f"{kind} steps ({steps[kind]})" if kind != "other" else "outside any step"
        print(f"  {where}: {sum(r[1] for r in rows) / 1e3:.3f} ms of kernels{' a step' if kind != 'other' else ''}")
        print("    µs a step  calls a step  µs a call  kernel [grid]")
        for name, per_step, calls, each in rows[:top]:
            print(f"    {per_step:9.1f} {calls:13.1f} {each:10.2f}  {name}")
        if len(rows) > top:
            print(f"    {sum(r[1] for r in rows[top:]):9.1f}  in {len(rows) - top} more kernels")
        if kind == "decode":
            us, nbytes = attention_rate(rows, records, kv_token_bytes)
            if us:
                gbps = nbytes / us / 1e3
                print(f"    attention {us:.1f} µs a step over {nbytes / 1e6:.1f} MB of its rows' K/V: {gbps:.0f} GB/s, "
                      f"{100 * gbps / read_gbps:.1f}% of the {read_gbps:.0f} GB/s read ceiling")


def run(llm: LLM, workload: Workload, vocab: int, seed: int, max_tokens: int, rows: int | None, trace_file: Path) -> dict:
    """The warm-up runs, then the profiled one: the workload's prompts drawn with `seed` (the first
    `rows` of them, or all when None), each decoded for max_tokens; its Chrome trace."""
    draw = lambda s: workload.draw(s, vocab)[0][:rows]  # noqa: E731
    params = lambda n: [SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, ignore_eos=True, top_k=0, top_p=1.0, min_p=0.0)] * n  # noqa: E731
    for warm in WARM_SEEDS:
        prompts = draw(warm + seed)
        llm.generate(prompts, params(len(prompts)), use_tqdm=False)
    prompts = draw(seed)
    return profiled(llm, prompts, params(len(prompts)), trace_file)


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-0.6b" if on_gpu else "tiny", choices=ENGINE_PRESETS, help="dense model shapes (default qwen3-0.6b; tiny on the CPU)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--workload", default="nano", choices=sorted(WORKLOADS_BY_NAME), help="whose prompts and engine settings (default nano)")
    parser.add_argument("--decode-steps", type=int, default=64, help="decode steps of each run (default 64)")
    parser.add_argument("--rows", type=int, default=1, help="prompts of the second run (default 1: the one-row step)")
    parser.add_argument("--top", type=int, default=20, help="kernels listed per run (default 20)")
    parser.add_argument("--trace-dir", type=output_dir, help="also write each run's Chrome trace here (full_batch.json.gz, one_row.json.gz or N_rows.json.gz)")
    args = parser.parse_args(argv)
    if args.decode_steps < 1:
        parser.error(f"--decode-steps must be at least 1, got {args.decode_steps}")
    preset, workload, dtype = PRESETS[args.preset], WORKLOADS_BY_NAME[args.workload], SHORT_DTYPES[args.dtype]
    if not 1 <= args.rows <= workload.num_seqs:
        parser.error(f"--rows must be 1 to the workload's {workload.num_seqs} prompts, got {args.rows}")
    if args.trace_dir:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if on_gpu else "cpu")
    read_gbps = ceilings(device)["read_gbps"] if on_gpu else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(preset, dtype, Path(tmp) / preset.name)
        print(f"{args.preset} {args.dtype}, workload {args.workload}, on {torch.cuda.get_device_name() if on_gpu else 'the CPU (interpreter)'}")
        for title, seed, rows in (("full batch", 0, None), ("one row" if args.rows == 1 else f"{args.rows} rows", 2, args.rows)):
            llm = LLM(str(path), dtype=dtype, device=device, **workload.engine_settings())
            try:
                trace_file = Path(tmp) / "trace.json"
                trace = run(llm, workload, preset.vocab, seed, args.decode_steps + 1, rows, trace_file)
                report(title, llm, trace, args.top, kv_token_bytes(preset, dtype), read_gbps)
                if args.trace_dir:
                    with gzip.open(args.trace_dir / f"{title.replace(' ', '_')}.json.gz", "wb") as out:
                        out.write(trace_file.read_bytes())
            finally:
                llm.close()
                del llm
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
