"""Sweep files: the benchmark suites' own node ids, split into the tasks of a Slurm array.

    python -m slurm.sweep --tasks 8 [--preset P ...] [--tp T ...] [--dtype D ...] [-k EXPR] [-m MARKEXPR]
                          [--grid gpu|cpu] [-o SWEEP] [-- more pytest args for every task]

The task list comes from `pytest benchmarks --collect-only` with the chosen options, so a sweep
holds exactly what the suites would run and can never drift from them. A sweep file is text:
`#` header lines (the grid, the pytest options every task passes, provenance), then one line per
array task, its node ids shell-quoted. Task i is the i-th non-header line. The file is written in
full or not at all.
"""

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.output_paths import output_file
from benchmarks.repo import REPO, commit
from minivllm.atomic_write import write_atomic
from slurm.jobs import ARRAY_ID, SlurmOptions, array_command, merge_command, shell_script

GRIDS = ("gpu", "cpu")
FORMAT = "minivllm-sweep 1"


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the grid its ids were collected for, the pytest options every task
    passes (before its node ids), and each task's node ids."""

    grid: str
    pytest_args: list[str]
    tasks: list[list[str]]

    def __post_init__(self):
        assert self.grid in GRIDS, self.grid
        assert self.tasks and all(self.tasks), "a sweep has at least one task and no empty task"


def collect(pytest_args: list[str], grid: str) -> list[str]:
    """The benchmark node ids that `pytest benchmarks --collect-only` selects with these options,
    collected for `grid`'s shapes whatever this machine has. Raises ValueError with pytest's own
    message when pytest refuses the options."""
    env = {**os.environ, "MINIVLLM_BENCH_GRID": grid}
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    ids = [line for line in proc.stdout.splitlines() if line.startswith("benchmarks/") and "::" in line]
    if proc.returncode not in (0, 5):  # 5: nothing collected, reported below
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ValueError(f"pytest refused the sweep's options {pytest_args}: {' | '.join(message[-3:])}")
    if not ids:
        raise ValueError(f"no benchmarks selected by {pytest_args or 'the defaults'} on the {grid} grid")
    return ids


def split(ids: list[str], tasks: int) -> list[list[str]]:
    """`ids` in order, cut into `tasks` contiguous chunks whose sizes differ by at most one.

    Contiguous, so a task's benchmarks share shapes and reuse its compiled kernels."""
    if tasks < 1:
        raise ValueError(f"--tasks: expected at least 1, got {tasks}")
    if tasks > len(ids):
        raise ValueError(f"--tasks: {tasks} tasks for only {len(ids)} benchmarks; expected at most {len(ids)}")
    size, extra = divmod(len(ids), tasks)
    bounds = [i * size + min(i, extra) for i in range(tasks + 1)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def sweep_text(sweep: Sweep, provenance: str) -> str:
    """The sweep file's text for `sweep`, as `write_sweep` writes it and `read_sweep` reads it."""
    for ids in sweep.tasks:
        for node_id in ids:
            if "\n" in node_id:
                raise ValueError(f"node id {node_id!r} holds a newline; a sweep line cannot carry it")
    count = sum(len(ids) for ids in sweep.tasks)
    lines = [
        f"# {FORMAT}",
        f"# {provenance}",
        f"# benchmarks: {count} in {len(sweep.tasks)} tasks",
        f"# grid: {sweep.grid}",
        f"# pytest-args: {shlex.join(sweep.pytest_args)}",
        *(shlex.join(ids) for ids in sweep.tasks),
    ]
    return "\n".join(lines) + "\n"


def write_sweep(path: Path, sweep: Sweep, provenance: str) -> None:
    """Write `sweep` to `path` (atomically: a reader sees the old file or the whole new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, sweep_text(sweep, provenance))


def read_sweep(path: Path) -> Sweep:
    """Parse a sweep file written by `write_sweep`; ValueError names what is wrong with it."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"sweep {path}: cannot read: {e}") from e
    if not lines or lines[0] != f"# {FORMAT}":
        raise ValueError(f"sweep {path}: not a sweep file (its first line is not '# {FORMAT}')")
    header = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# ") and ": " in line)
    if header.get("grid") not in GRIDS or "pytest-args" not in header:
        raise ValueError(f"sweep {path}: header lacks 'grid: gpu|cpu' or 'pytest-args:'")
    tasks = [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]
    if not tasks or not all(tasks):
        raise ValueError(f"sweep {path}: no tasks, or an empty task line")
    return Sweep(header["grid"], shlex.split(header["pytest-args"]), tasks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose a sweep's benchmarks and its task count (shared with slurm.submit)."""
    group = parser.add_argument_group("what to sweep (as for pytest benchmarks)")
    group.add_argument("--tasks", type=int, default=1, help="array tasks to split the benchmarks into (default 1)")
    group.add_argument("--preset", action="append", default=[], help="model preset, repeatable, or all (default: the grid's default)")
    group.add_argument("--tp", action="append", default=[], help="tensor-parallel degree to shard by, repeatable")
    group.add_argument("--dtype", action="append", default=[], help="element type, repeatable: bf16, fp16, fp32")
    group.add_argument("-k", dest="keyword", help="pytest -k expression selecting benchmarks, e.g. 'decode and triton_paged'")
    group.add_argument("-m", dest="markexpr", help="pytest -m marker expression")
    group.add_argument("--grid", choices=GRIDS, default="gpu", help="which shapes to collect: the GPU grid (default) or the CPU smoke shapes")
    group.add_argument("pytest_extra", nargs="*", metavar="-- PYTEST_ARG", help="passed to every task's pytest run, e.g. -- --benchmark-max-time=0.05")


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    """Collect and split the benchmarks the parsed options select."""
    shard_args = [f"--preset={p}" for p in args.preset] + [f"--tp={t}" for t in args.tp] + [f"--dtype={d}" for d in args.dtype]
    pytest_args = shard_args + list(args.pytest_extra)
    filters = (["-k", args.keyword] if args.keyword else []) + (["-m", args.markexpr] if args.markexpr else [])
    ids = collect(pytest_args + filters, args.grid)
    return Sweep(args.grid, pytest_args, split(ids, args.tasks))


def default_path(out: Path) -> Path:
    """Where a new sweep file goes when none is named: OUT/sweeps/<UTC time>.txt."""
    return out / "sweeps" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}.txt"


def provenance() -> str:
    """Where and when a sweep was generated, from which commit."""
    return f"generated {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} on {os.uname().nodename} at commit {commit()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.sweep", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("-o", "--output", type=output_file, help="sweep file to write (default OUT/sweeps/<UTC time>.txt)")
    parser.add_argument("--out", type=Path, default=REPO / "results", help="results root the printed commands use (default results/)")
    args = parser.parse_args(argv)
    try:
        sweep = sweep_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    path = args.output or default_path(args.out)
    write_sweep(path, sweep, provenance())
    print(f"# {path}: {sum(map(len, sweep.tasks))} benchmarks in {len(sweep.tasks)} tasks. Submit them with")
    print(f"#   python -m slurm.submit --sweep {path} [-p PARTITION -A ACCOUNT -t TIME ...], or by hand:")
    opts = SlurmOptions()
    print(shell_script(array_command(path, len(sweep.tasks), args.out, opts), merge_command(path, args.out, ARRAY_ID, opts, [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
