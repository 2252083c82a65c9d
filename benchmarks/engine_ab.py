"""Does a tuning table speed the engine up end to end? Engine runs under two or more tables, each
in a fresh process, in turn.

    python -m benchmarks.engine_ab --arm NAME=DIR --arm NAME=DIR [...] [--workload long_context]
                                   [--preset qwen3-0.6b] [--dtype bf16] [--seeds 0 2] [--processes 3]
                                   [--json FILE]

Each --arm names a table directory: its processes run with MINIVLLM_KERNEL_CONFIGS set to it
(`python -m benchmarks.tune --out DIR` writes one; minivllm/kernels/configs holds the committed
tables). A process looks each kernel's config up once and keeps it, so arms never share one.
--processes runs the arms in turn, A B A for two arms at the default 3, so that a drift of the
machine over the run shows as a difference between an arm's own processes rather than between
arms. Every process loads the engine on the same seeded random checkpoint in the preset's shapes
(benchmarks/engine_workloads.py), warms it up as the engine suite does, then runs the workload
drawn with each of --seeds, timed by the wall clock; every sequence must return exactly its
requested tokens. A seed's row gives wall time, output tok/s and the engine's step seconds per
phase and batch bucket (engine/step_profile.summarize), so a table change shows in the buckets
it acts on. The summary gives each arm's median over its processes and its ratio to the first
arm's. Without a GPU it runs the tiny preset's smoke workloads under Triton's interpreter.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minivllm.interpreter import interpret_without_gpu

if __name__ == "__main__":
    interpret_without_gpu()

from benchmarks.engine_workloads import ENGINE_PRESETS, WORKLOADS_BY_NAME, check_outputs, write_checkpoint  # noqa: E402
from benchmarks.output_paths import output_file  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402
from benchmarks.repo import REPO, commit  # noqa: E402
from minivllm.atomic_write import write_atomic  # noqa: E402
from minivllm.dtypes import SHORT_DTYPES  # noqa: E402
from minivllm.engine import LLM  # noqa: E402
from minivllm.engine.step_profile import summarize  # noqa: E402
from minivllm.kernels.tuning_table import ENV_DIR, config_dir  # noqa: E402

WARM_SEED = 1  # the engine suite's warm-up draw
ROWS_MARK = "engine_ab rows: "  # a child's result line, told apart from anything else it prints


def arm(text: str) -> tuple[str, Path]:
    """--arm NAME=DIR: a name for the report and an existing table directory."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a directory of tuning tables")
    return name, Path(path).resolve()


def process_order(arms: list[str], processes: int) -> list[str]:
    """The arm each process runs: the arms in turn, A B A B ... for two."""
    return [arms[i % len(arms)] for i in range(processes)]


def _bucket_order(name: str) -> tuple[bool, int]:
    """Prefill first, then the decode buckets by batch."""
    return name != "prefill", int(name.partition("<=")[2] or 0)


def step_buckets(rows: list[dict]) -> dict[str, float]:
    """summarize()'s rows as {'prefill' or 'decode<=N': total seconds}, prefill first, then by batch."""
    named = {("prefill" if r["phase"] == "prefill" else f"decode<={r['batch_up_to']}"): r["total_s"] for r in rows}
    return {b: named[b] for b in sorted(named, key=_bucket_order)}


def run_child(preset_name: str, dtype: str, workload_name: str, seeds: list[int], checkpoint: Path) -> list[dict]:
    """This process's runs: the engine on `checkpoint`, warmed up, then one timed run per seed."""
    preset, workload = PRESETS[preset_name], WORKLOADS_BY_NAME[workload_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    llm = LLM(str(checkpoint), dtype=SHORT_DTYPES[dtype], device=device, **workload.engine_settings())
    try:
        warm, _ = workload.draw(WARM_SEED, preset.vocab)
        workload.generate(llm, warm, [2] * workload.num_seqs)
        rows = []
        for seed in seeds:
            prompts, output_lens = workload.draw(seed, preset.vocab)
            sync()
            start = time.perf_counter()
            outputs = workload.generate(llm, prompts, output_lens)
            sync()
            wall = time.perf_counter() - start
            check_outputs([o["token_ids"] for o in outputs], output_lens, preset.vocab, f"minivllm, seed {seed}")
            rows.append(dict(seed=seed, table_dir=str(config_dir()), wall_s=wall, tokens_per_s=sum(output_lens) / wall,
                             steps=step_buckets(summarize(llm.step_records))))
        return rows
    finally:
        llm.close()


def summary(rows: list[dict], arms: list[str]) -> list[dict]:
    """Per (seed, arm): the median over the arm's processes of wall time and of each step bucket,
    and the wall time's ratio to the first arm's median at that seed."""
    out = []
    for seed in dict.fromkeys(r["seed"] for r in rows):
        first = None
        for name in arms:
            mine = [r for r in rows if r["seed"] == seed and r["arm"] == name]
            if not mine:
                continue
            wall = statistics.median(r["wall_s"] for r in mine)
            first = wall if first is None else first
            buckets = sorted({b for r in mine for b in r["steps"]}, key=_bucket_order)
            steps = {b: statistics.median(r["steps"].get(b, 0.0) for r in mine) for b in buckets}
            out.append(dict(seed=seed, arm=name, processes=len(mine), wall_s=wall, ratio=wall / first, steps=steps))
    return out


def _row_text(r: dict) -> str:
    steps = "  ".join(f"{b} {s:.3f}" for b, s in r["steps"].items())
    return f"{r['arm']:>12} seed {r['seed']}: {r['wall_s']:.3f} s" + (f", {r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else "") + f"  [{steps}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_ab", description=__doc__.splitlines()[0])
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--arm", action="append", type=arm, default=[], help="NAME=DIR: a tuning-table directory to run under; repeatable, at least one")
    parser.add_argument("--workload", default="long_context", choices=sorted(WORKLOADS_BY_NAME), help="the engine suite's workload (default long_context)")
    parser.add_argument("--preset", default="qwen3-0.6b" if on_gpu else "tiny", choices=ENGINE_PRESETS, help="dense model shapes (default qwen3-0.6b; tiny on the CPU)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2], help="the workload's draws each process runs (default 0 2)")
    parser.add_argument("--processes", type=int, default=3, help="processes in all, the arms in turn (default 3: A B A)")
    parser.add_argument("--json", type=output_file, help="also write every run and the summary here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a process's checkpoint: run it and print its rows as JSON
    args = parser.parse_args(argv)
    if args.child:
        print(ROWS_MARK + json.dumps(run_child(args.preset, args.dtype, args.workload, args.seeds, Path(args.child))))
        return 0
    names = [name for name, _ in args.arm]
    if not names:
        parser.error("--arm: give at least one NAME=DIR")
    if len(set(names)) != len(names):
        parser.error(f"--arm: names must differ, got {names}")
    if args.processes < len(names):
        parser.error(f"--processes must be at least the {len(names)} arms, got {args.processes}")
    dirs = dict(args.arm)
    device = torch.cuda.get_device_name() if on_gpu else "the CPU (interpreter)"
    code = commit()
    print(f"{args.workload}, {args.preset} {args.dtype}, seeds {args.seeds}, on {device}, commit {code}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(PRESETS[args.preset], SHORT_DTYPES[args.dtype], Path(tmp) / args.preset)
        for index, name in enumerate(process_order(names, args.processes)):
            command = [sys.executable, "-m", "benchmarks.engine_ab", "--child", str(checkpoint), "--workload", args.workload,
                       "--preset", args.preset, "--dtype", args.dtype, "--seeds", *map(str, args.seeds)]
            done = subprocess.run(command, cwd=REPO, env={**os.environ, ENV_DIR: str(dirs[name])}, capture_output=True, text=True)
            marked = [line for line in done.stdout.splitlines() if line.startswith(ROWS_MARK)]
            if done.returncode != 0 or not marked:
                print(f"process {index} ({name}) failed with exit code {done.returncode}:\n{done.stderr[-4000:]}", file=sys.stderr)
                return 1
            for r in json.loads(marked[-1][len(ROWS_MARK):]):
                rows.append(dict(arm=name, process=index, **r))
                # Printed as each process ends, so a run cut short still shows what it measured.
                print(f"process {index} {_row_text(rows[-1])}", flush=True)
    result = summary(rows, names)
    print("median over each arm's processes (ratio: wall time over the first arm's):")
    for r in result:
        print(f"{_row_text(r)}  ratio {r['ratio']:.3f}")
    if args.json:
        record = dict(device=device, commit=code, workload=args.workload, preset=args.preset, dtype=args.dtype,
                      arms={n: str(d) for n, d in dirs.items()}, runs=rows, summary=result)
        write_atomic(args.json, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
