"""A card's committed baseline from one or more runs on it.

    python -m benchmarks.baseline OUT.json RUN.json [RUN.json ...]

A device session often measures a suite in several calls (one per model, say), and a row too
costly to measure again (transformers' generate on the 8B) may be kept from the previous
baseline. This writes them as one file that `report`, `compare` and `history` read like any
run:
- the benchmarks of every RUN, a later RUN's row replacing an earlier one of the same name
  (list the old baseline first to carry over the rows the new runs lack);
- per-round samples dropped (`stats["data"]`), the statistics kept;
- machine_info and commit_info from the last RUN, with `machine_info["merged_runs"]`: for each RUN
  that gave a row, its file name, datetime, commit, measured ceilings and the names of the rows
  it gave.

Runs of different GPU models, or a GPU run with an interpreter run, are refused (ValueError), as
is a partial run (a run cut short is no baseline).
"""

import argparse
import json
import sys
from pathlib import Path

from benchmarks.compare import mismatch
from benchmarks.output_paths import output_file
from benchmarks.results import CEILING_KEYS, ResultsError, load, partial_info
from minivllm.atomic_write import write_atomic


def merge_runs(runs: list[tuple[str, dict]]) -> dict:
    """One baseline from (name, loaded run) pairs, oldest first (see the module docstring)."""
    if not runs:
        raise ValueError("runs must hold at least one run")
    for name, data in runs:
        if partial_info(data):
            raise ValueError(f"{name} is a partial run: a baseline needs whole runs")
    for name, data in runs[1:]:
        if problems := mismatch(runs[0][1], data):
            raise ValueError(f"runs must come from one GPU model, all on it or all interpreted; {runs[0][0]} against {name}: {'; '.join(problems)}")
    rows, source = {}, {}
    for i, (_, data) in enumerate(runs):
        for bench in data["benchmarks"]:
            key = bench.get("fullname", bench["name"])
            rows[key] = dict(bench, stats={k: v for k, v in bench["stats"].items() if k != "data"})
            source[key] = i
    last = runs[-1][1]
    merged = []
    for i, (name, data) in enumerate(runs):
        given = [rows[k]["name"] for k in rows if source[k] == i]
        if given:
            info = data["machine_info"]
            merged.append(dict(file=Path(name).name, datetime=data.get("datetime"), commit=data.get("commit_info", {}).get("id"),
                               **{k: info[k] for k in CEILING_KEYS if k in info}, benchmarks=given))
    machine = {k: v for k, v in last["machine_info"].items() if k != "merged_runs"}
    return dict(last, machine_info=dict(machine, merged_runs=merged), benchmarks=list(rows.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=output_file, help="the baseline file to write (replaced atomically)")
    parser.add_argument("runs", nargs="+", help="pytest-benchmark JSON files, oldest first")
    args = parser.parse_args(argv)
    try:
        baseline = merge_runs([(path, load(path)) for path in args.runs])
    except (ResultsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(baseline, indent=4) + "\n")
    for run in baseline["machine_info"]["merged_runs"]:
        print(f"{run['file']}: {len(run['benchmarks'])} rows (commit {str(run['commit'])[:7]}, {run['datetime']})")
    print(f"wrote {len(baseline['benchmarks'])} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
