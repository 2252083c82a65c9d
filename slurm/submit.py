"""One command for a whole sweep: generate it, submit the benchmark array and the merge job after it.

    python -m slurm.submit --preset qwen3-8b --tp 1 --tasks 8 --throttle 4 -p gpu -A myacct -t 01:00:00 \\
        [--baseline benchmarks/baselines/B.json] [--history history.db] [--out results] [--dry-run] [-- --benchmark-max-time=0.05]

`--tune` submits a tuning array instead: `--tasks` tasks, each tuning its share of
`benchmarks.tune`'s buckets on its GPU (`--kernel` narrows them; the arguments after `--` go to
the tuner), and a job that merges their tables into OUT/<array id>/<gpu>.json (slurm/tune_merge.py).
`--sweep FILE` submits an existing sweep file instead of generating one. `--dry-run` writes no
file and submits nothing: it prints, as shell to paste, what a submission would do (create the
logs directory, write the generated sweep file, and the two sbatch lines). Otherwise it writes the
sweep file to OUT/sweeps/ and prints the job ids and where the results, logs and merged report
will land. Bad options (a --time Slurm would refuse, --compare options benchmarks.compare would
refuse) and bad paths (an --out that is a file or under one, a --sweep or --baseline that cannot
be read, a --history that is a directory, another program's database or not writable) stop it,
dry run or not, before anything is collected, written or submitted.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from benchmarks import compare, history
from benchmarks.output_paths import output_dir
from benchmarks.repo import REPO
from benchmarks.results import ResultsError, by_name, load
from slurm.jobs import ARRAY_ID, array_command, merge_command, options_from_args, shell_script, tune_array_command, tune_merge_command
from slurm.jobs import add_arguments as add_slurm_arguments
from slurm.sweep import add_arguments as add_sweep_arguments
from slurm.sweep import default_path, provenance, read_sweep, sweep_from_args, sweep_text, write_sweep

SWEEP_OPTIONS = ("--tasks", "--preset", "--tp", "--dtype", "--grid")
HEREDOC_END = "MINIVLLM_SWEEP_EOF"


def history_target(target: str) -> str:
    """The history database as the merge job, started elsewhere, must name it: an absolute path
    (an sqlite:/// URL keeps its form with its path made absolute)."""
    prefix = "sqlite:///" if target.startswith("sqlite:///") else ""
    return prefix + str(Path(target.removeprefix(prefix)).resolve())


def check_compare_options(text: str) -> argparse.Namespace:
    """benchmarks.compare's options parsed from `text`; ValueError when compare would refuse them:
    otherwise the merge job would find out only after the whole array ran."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"--compare: cannot split {text!r} into options: {e}") from None
    parser = compare.build_parser()

    def refuse(message: str):
        raise ValueError(f"--compare: benchmarks.compare refuses {text!r}: {message}")

    parser.error = refuse  # argparse would print its usage and exit, as if the whole command were compare
    try:
        return parser.parse_args(["BASELINE.json", "NEW.json", *words])
    except SystemExit:  # -h or --version: compare printed and would exit; the merge job would do no comparing
        raise ValueError(f"--compare: {text!r} asks benchmarks.compare for help, not a comparison") from None


def check_merge_inputs(baseline: Path | None, compare_text: str, history_db: str | None) -> None:
    """ValueError when the merge job would refuse what it is given: compare options benchmarks.compare
    refuses, a baseline it cannot compare with (unreadable, not a run, a benchmark twice, a compared
    figure that is not a positive time), or a history `add` could not write. Checked before the
    array runs, not after."""
    options = check_compare_options(compare_text)
    if baseline:
        try:
            by_name(baseline, load(baseline), options.field)
        except ResultsError as e:
            raise ValueError(f"--baseline: {e}") from None
    if history_db:
        try:
            history.check_writable(history_db)
        except history.HistoryError as e:
            raise ValueError(f"--history: {e}") from None


def dry_run_script(path: Path, text: str | None, out: Path, array_cmd: list[str], merge_cmd: list[str]) -> str:
    """The shell a submission runs, for --dry-run to print instead: make the logs directory, write
    the sweep file when `text` (a generated sweep) is given, submit the array and its merge job."""
    lines = [f"mkdir -p {shlex.quote(str(out.resolve() / 'logs'))}"]
    if text is not None:
        # Quoted, so the shell expands nothing in the node ids; no sweep line can read HEREDOC_END,
        # as each is a '#' header or node ids, which start with 'benchmarks/'.
        where = path.resolve()
        lines.append(f"mkdir -p {shlex.quote(str(where.parent))} && cat > {shlex.quote(str(where))} <<'{HEREDOC_END}'")
        lines.append(text + HEREDOC_END)
    lines.append(shell_script(array_cmd, merge_cmd))
    return "\n".join(lines)


def sbatch(cmd: list[str]) -> str:
    """Run one sbatch --parsable; the job id it printed. RuntimeError carries sbatch's own complaint."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError("sbatch not found: run this on a Slurm login node, or use --dry-run") from e
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"


def submit_tuning(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--tune: the tuning array and its merge job (or, with --dry-run, their shell)."""
    sweep_only = [o for o, v in (("--sweep", args.sweep), ("--baseline", args.baseline), ("--compare", args.compare), ("--history", args.history),
                                 ("-k", args.keyword), ("-m", args.markexpr), ("--preset", args.preset), ("--tp", args.tp), ("--dtype", args.dtype)) if v]
    if not args.tune:
        parser.error("--kernel chooses what a tuning array tunes: add --tune")
    if sweep_only:
        parser.error(f"--tune: {', '.join(sweep_only)} belong to benchmark sweeps; the tuner takes its options after --")
    if args.tasks < 1:
        parser.error(f"--tasks must be >= 1, got {args.tasks}")
    try:
        opts = options_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    tune_args = [f"--kernel={k}" for k in args.kernel] + list(args.pytest_extra)
    array_cmd = tune_array_command(args.tasks, args.out, opts, tune_args)
    print(f"tune   {args.tasks} tasks, tuner args {shlex.join(tune_args) or '(none)'}")
    if args.dry_run:
        print(f"mkdir -p {shlex.quote(str(args.out.resolve() / 'logs'))}\n" + shell_script(array_cmd, tune_merge_command(args.out, ARRAY_ID, args.tasks, opts)))
        return 0
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        array_id = sbatch(array_cmd)
        merge_id = sbatch(tune_merge_command(args.out, array_id, args.tasks, opts))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = args.out.resolve() / array_id
    print(f"array  job {array_id}: tables {results}/tables/<task>/; logs {args.out.resolve()}/logs/{array_id}_<task>.out")
    print(f"merge  job {merge_id}, when the array has ended: {results}/<gpu>.json")
    print(f"watch  squeue -j {array_id},{merge_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.splitlines()[0])
    add_sweep_arguments(parser)
    add_slurm_arguments(parser)
    parser.add_argument("--sweep", type=Path, help="submit this sweep file, as written, instead of generating one")
    parser.add_argument("--out", type=output_dir, default=str(REPO / "results"),
                        help="results root: sweeps/, logs/ and <array id>/ go here, created if missing (default results/)")
    parser.add_argument("--baseline", type=Path, help="the merge job compares the merged results with this pytest-benchmark JSON")
    parser.add_argument("--compare", default="", help="options for benchmarks.compare, one string, e.g. '--threshold 5%% --impl flash_triton'")
    parser.add_argument("--history", help="the merge job adds the merged run to this benchmarks.history database and checks it")
    parser.add_argument("--tune", action="store_true", help="submit a tuning array (benchmarks.tune split over --tasks) and its table merge, not a sweep")
    parser.add_argument("--kernel", action="append", choices=("decode", "prefill", "cascade", "linear", "norm_linear", "gated_linear"), default=[],
                        help="with --tune: only this kernel's buckets; repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="write no file and submit nothing: print, as shell, the sweep file and the sbatch lines a submission would use")
    args = parser.parse_args(argv)
    if args.tune or args.kernel:
        return submit_tuning(parser, args)
    text = None  # the generated sweep's file text, which a dry run prints instead of writing
    try:
        opts = options_from_args(args)
        check_merge_inputs(args.baseline, args.compare, args.history)
        if args.sweep:
            chosen = [name for name in SWEEP_OPTIONS if getattr(args, name.lstrip("-").replace("-", "_")) != parser.get_default(name.lstrip("-").replace("-", "_"))]
            if chosen or args.pytest_extra or args.keyword or args.markexpr:
                raise ValueError(f"--sweep: a sweep file's tasks are submitted as written; drop {chosen or 'the pytest options'}, or leave out --sweep")
            path, sweep = args.sweep, read_sweep(args.sweep)
        else:
            path, sweep = default_path(args.out), sweep_from_args(args)
            if args.dry_run:
                text = sweep_text(sweep, provenance())
            else:
                write_sweep(path, sweep, provenance())
    except ValueError as e:
        parser.error(str(e))
    merge_args = ([f"--baseline={args.baseline.resolve()}"] if args.baseline else []) + ([f"--compare={args.compare}"] if args.compare else [])
    merge_args += [f"--history={history_target(args.history)}"] if args.history else []
    array_cmd = array_command(path, len(sweep.tasks), args.out, opts)
    count = sum(map(len, sweep.tasks))
    unwritten = " (dry run: not written; the shell below writes it)" if text is not None else ""
    print(f"sweep  {path}{unwritten}: {count} benchmarks in {len(sweep.tasks)} tasks, {sweep.grid} grid, pytest args {shlex.join(sweep.pytest_args) or '(none)'}")
    if args.dry_run:
        print(dry_run_script(path, text, args.out, array_cmd, merge_command(path, args.out, ARRAY_ID, opts, merge_args)))
        return 0
    # Slurm opens log files before a job starts and does not create their directory.
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        array_id = sbatch(array_cmd)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results, logs = args.out.resolve() / array_id, args.out.resolve() / "logs"
    throttle = min(opts.throttle or len(sweep.tasks), len(sweep.tasks))
    print(f"array  job {array_id}: {len(sweep.tasks)} tasks, at most {throttle} at once; logs {logs}/{array_id}_<task>.out")
    print(f"       results {results}/<task>.json")
    merge_cmd = merge_command(path, args.out, array_id, opts, merge_args)
    try:
        merge_id = sbatch(merge_cmd)
    except RuntimeError as e:
        print(f"error: the array is submitted but its merge job is not: {e}\nmerge by hand once it ends: {shlex.join(merge_cmd)}", file=sys.stderr)
        return 1
    print(f"merge  job {merge_id}, when the array has ended: {results}/report.md, merged.json, plots/; log {logs}/{array_id}_merge.out")
    print(f"watch  squeue -j {array_id},{merge_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
