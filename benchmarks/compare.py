"""Compare two benchmark runs pair by pair and fail on slowdowns past a threshold.

    python -m benchmarks.compare BASELINE.json NEW.json [--threshold 10%] [--field median|min|mean]
                                 [--impl NAME ...] [--allow-different-gpu] [--allow-missing]

Benchmarks pair by fullname (name when a file lacks it). The verdict is pytest-benchmark's own
PercentageRegressionCheck, the one behind `--benchmark-compare-fail`. Exit status: 0 no regression;
1 a regression, or a baseline benchmark missing from NEW; 2 a refusal: unreadable input, runs from
different GPUs (or interpreter against compiled) without --allow-different-gpu, an --impl that
neither file holds, or no benchmark in both files (after --impl), since a gate that compared
nothing has passed nothing.
"""

import argparse
import re
import sys

from pytest_benchmark.utils import parse_compare_fail

from benchmarks.results import ResultsError, is_interpreter, load, machine_lines, number, pipe_table


def threshold(text: str) -> int:
    """Parse --threshold: a whole percentage written '10%' or '10'."""
    match = re.fullmatch(r"\s*(\d+)\s*%?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid threshold {text!r}: give a whole percentage such as 10% or 10")
    return int(match[1])


def fmt_time(seconds: float) -> str:
    """A duration in the largest unit that keeps it at or above 1: '812.4 µs', '3.142 ms'."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def by_key(path: str, data: dict, field: str, impls: list[str]) -> dict[str, dict]:
    """The file's stats keyed by fullname, only for `impls` when given; ResultsError on a repeated
    key or a missing `field`."""
    stats = {}
    for bench in data["benchmarks"]:
        if impls and bench["extra_info"].get("impl") not in impls:
            continue
        key = bench.get("fullname") or bench["name"]
        if key in stats:
            raise ResultsError(f"{path}: benchmark {key!r} appears twice")
        if number(bench["stats"].get(field)) is None:
            raise ResultsError(f"{path}: benchmark {key!r} has no numeric stats.{field}")
        stats[key] = bench["stats"]
    return stats


def mismatch(base: dict, new: dict) -> list[str]:
    """Why two runs' timings are not comparable: different GPUs, or interpreter against compiled kernels."""
    problems = []
    gpus = [data["machine_info"].get("gpu", "unknown") for data in (base, new)]
    if gpus[0] != gpus[1]:
        problems.append(f"different GPUs: baseline {gpus[0]!r}, new {gpus[1]!r}")
    modes = ["interpreter" if is_interpreter(data["machine_info"]) else "compiled" for data in (base, new)]
    if modes[0] != modes[1]:
        problems.append(f"baseline ran Triton {modes[0]}, new ran Triton {modes[1]}")
    return problems


def unknown_impls(wanted: list[str], *runs: dict) -> str | None:
    """Why `wanted` (--impl) cannot gate these runs: the names no benchmark of any run has, with
    those present; None when every name is present somewhere. A typo would otherwise filter
    everything out and pass."""
    impls = (bench["extra_info"].get("impl") for data in runs for bench in data["benchmarks"])
    present = sorted({impl for impl in impls if isinstance(impl, str)})
    unknown = [name for name in wanted if name not in present]
    if not unknown:
        return None
    return f"--impl {', '.join(map(repr, unknown))}: no benchmark in either file has that implementation; present: {', '.join(present) or 'none'}"


def build_parser() -> argparse.ArgumentParser:
    """compare's command line; slurm.submit checks its --compare options with this same parser."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__.splitlines()[0],
        epilog="exit status: 0 no regression; 1 a regression, or a baseline benchmark missing from NEW; "
        "2 a refusal: unreadable input, different GPUs (without --allow-different-gpu), an --impl neither file has, "
        "or nothing compared",
    )
    parser.add_argument("baseline", help="pytest-benchmark JSON of the reference run")
    parser.add_argument("new", help="pytest-benchmark JSON of the run under test")
    parser.add_argument(
        "--threshold",
        type=threshold,
        default=10,
        help="fail when a benchmark is slower by more than this percentage (default 10%%)",
    )
    parser.add_argument(
        "--field", choices=("median", "min", "mean"), default="median", help="statistic compared (default median)"
    )
    parser.add_argument(
        "--allow-different-gpu",
        action="store_true",
        help="compare runs from different GPUs, or interpreter against compiled, anyway",
    )
    parser.add_argument("--allow-missing", action="store_true", help="do not fail when a baseline benchmark is absent from NEW")
    parser.add_argument(
        "--impl",
        action="append",
        default=[],
        help="gate only this implementation (extra_info impl), repeatable; host-bound references are noisy, see benchmarks/README.md (Regression gate); "
        "one that neither file holds is refused (exit 2)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the pairwise comparison; return 0, 1 (regression or missing benchmark) or 2 (bad or
    mismatched input, or nothing to compare)."""
    args = build_parser().parse_args(argv)
    try:
        base, new = load(args.baseline), load(args.new)
        problem = unknown_impls(args.impl, base, new)
        if problem:
            raise ResultsError(problem)
        base_stats, new_stats = (by_key(path, data, args.field, args.impl) for path, data in ((args.baseline, base), (args.new, new)))
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = mismatch(base, new)
    if problems and not args.allow_different_gpu:
        print(
            f"error: refusing to compare {args.baseline} with {args.new}: {'; '.join(problems)} (override with --allow-different-gpu)",
            file=sys.stderr,
        )
        return 2
    warning = f"WARNING: TIMINGS NOT COMPARABLE: {'; '.join(problems)}"
    banner = f"{'!' * len(warning)}\n{warning}\n{'!' * len(warning)}" if problems else ""
    if banner:
        print(banner + "\n")
    for label, path, data in (("baseline", args.baseline, base), ("new", args.new, new)):
        print("\n".join(machine_lines(f"{label} {path}", data["machine_info"])))

    check = parse_compare_fail(f"{args.field}:{args.threshold}%")
    rows, regressions = [], []
    for key, stats in base_stats.items():
        if key not in new_stats:
            continue
        before, after = stats[args.field], new_stats[key][args.field]
        change = check.compute(new_stats[key], stats)
        failed = check.fails(new_stats[key], stats)
        if failed:
            regressions.append(f"  {key}: {change:+.1f}% ({fmt_time(before)} -> {fmt_time(after)})")
        ratio = f"{after / before:.3f}" if before else "inf"
        rows.append([key, fmt_time(before), fmt_time(after), ratio, f"{change:+.1f}%", "REGRESSION" if failed else "ok"])
    headers = ["benchmark", f"baseline {args.field}", f"new {args.field}", "new/base", "change", f"verdict (>{args.threshold}%)"]
    print("\n" + pipe_table(headers, rows, right={1, 2, 3, 4}) if rows else "\nno benchmark appears in both files")

    missing = [key for key in base_stats if key not in new_stats]
    added = [key for key in new_stats if key not in base_stats]
    if added:
        print(f"\nnew benchmarks, not in the baseline ({len(added)}, not compared):\n" + "\n".join(f"  {k}" for k in added))
    if missing:
        verdict = "accepted by --allow-missing" if args.allow_missing else "FAIL: a vanished benchmark can hide a regression"
        print(f"\nMISSING FROM NEW ({len(missing)}; {verdict}):\n" + "\n".join(f"  {k}" for k in missing))
    if regressions:
        print(f"\nFAIL: {len(regressions)} benchmark(s) slower than baseline by more than {args.threshold}% in {args.field}:")
        print("\n".join(regressions))
    elif rows:
        print(f"\nOK: no {args.field} slower than baseline by more than {args.threshold}% ({len(rows)} compared)")
    if banner:
        print("\n" + banner)
    if not rows:
        filtered = f" with --impl {' '.join(args.impl)}" if args.impl else ""
        print(f"error: nothing compared: no benchmark{filtered} appears in both {args.baseline} and {args.new}", file=sys.stderr)
        return 2
    return 1 if regressions or (missing and not args.allow_missing) else 0


if __name__ == "__main__":
    sys.exit(main())
