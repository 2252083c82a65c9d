"""Merge a tuning array's per-task tables into one tuning table for the GPU the tasks ran on.

    python -m slurm.tune_merge OUT ARRAY_JOB_ID TASKS

Reads OUT/<id>/<task>.exit and OUT/<id>/tables/<task>/*.json (slurm/tune_array.sbatch writes
them) and writes OUT/<id>/<gpu>.json: every task's winners, every task's run in `runs` (GPU,
driver, torch, Triton, date, commit), each entry naming its own. Copy it into minivllm/kernels/configs/
(or point MINIVLLM_KERNEL_CONFIGS at OUT/<id>) for the kernels to use it. Exit status: 0 when every task finished and the tables merged; 1 when a task failed, never
finished or never ran, or left a table that cannot be read (a task killed mid-write): the others'
tables are still merged, and the missing or skipped ones named; 2 when no table can be read, or
the tables come from different GPU models, which are never merged into one (nothing is written).
The merged table is written atomically.
"""

import argparse
import sys
from pathlib import Path

from minivllm.kernels.tuning_table import merge_tables, read_table, save_table


def task_status(results: Path, task: int) -> str:
    """'ok', 'failed (exit N)' or 'unfinished or never ran' from the task's exit file."""
    exit_file = results / f"{task}.exit"
    if not exit_file.is_file():
        return "unfinished or never ran"
    code = exit_file.read_text().strip()
    return "ok" if code == "0" else f"failed (exit {code})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.tune_merge", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the results root (holds <array id>/ and logs/)")
    parser.add_argument("array_job_id")
    parser.add_argument("tasks", type=int, help="how many tasks the array had")
    args = parser.parse_args(argv)
    results = args.out / args.array_job_id
    statuses = {task: task_status(results, task) for task in range(args.tasks)}
    paths, tables = [], []
    for path in sorted((results / "tables").glob("*/*.json")):
        try:
            tables.append(read_table(path))
            paths.append(path)
        except ValueError as e:
            # One task killed mid-write must not cost the others' buckets: its own are left out, and named.
            print(f"warning: skipped {e}", file=sys.stderr)
            task = int(path.parent.name) if path.parent.name.isdigit() else None
            if task in statuses:
                statuses[task] += ", but its table is unreadable: skipped"
    try:
        if not tables:
            raise ValueError("no task wrote a readable table")
        merged = merge_tables(tables)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        for task, status in statuses.items():
            print(f"task {task}: {status}")
        return 2
    names = {p.name for p in paths}
    if len(names) != 1:  # one GPU model, one slug: a second name would be a second model
        print(f"error: the tasks' tables are named {sorted(names)}; one GPU model writes one name", file=sys.stderr)
        return 2
    target = results / names.pop()
    save_table(target, merged)
    for task, status in statuses.items():
        print(f"task {task}: {status}")
    print(f"merged {len(merged['entries'])} entries from {len(tables)} tables ({merged['provenance'].get('gpu')}) into {target}")
    not_ok = [task for task, status in statuses.items() if status != "ok"]
    if not_ok:
        print(f"NOT OK: tasks {', '.join(map(str, not_ok))}; their buckets are missing from the table")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
