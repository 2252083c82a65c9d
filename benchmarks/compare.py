"""Compare two benchmark runs pair by pair and fail on slowdowns past a threshold.

    python -m benchmarks.compare BASELINE.json NEW.json [--threshold 10%] [--field median|min|mean]
                                 [--impl NAME ...] [--allow-different-gpu] [--allow-missing]

Benchmarks pair by fullname (name when a file lacks it). The verdict is pytest-benchmark's own
PercentageRegressionCheck, the one behind `--benchmark-compare-fail`. Exit status: 0 no regression;
1 a regression, or a baseline benchmark missing from NEW; 2 a refusal: unreadable input (including
a benchmark twice in one file, or a compared figure that is not a positive time:
benchmarks.results.by_name, which `history add` applies too), runs from different GPUs (or
interpreter against compiled) without --allow-different-gpu, an --impl that neither file holds,
or no benchmark in both files (after --impl), since a gate that compared nothing has passed
nothing.
"""

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from pytest_benchmark.utils import parse_compare_fail

from benchmarks.results import ResultsError, by_name, fmt_duration, is_interpreter, load, machine_lines, pipe_table


def threshold(text: str) -> int:
    """Parse --threshold: a whole percentage written '10%' or '10'."""
    match = re.fullmatch(r"\s*(\d+)\s*%?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid threshold {text!r}: give a whole percentage such as 10% or 10")
    return int(match[1])


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


@dataclass
class Comparison:
    """NEW against BASELINE, pair by pair: the table's rows (benchmark, both figures, ratio, change,
    verdict), the regressions, the benchmarks only one file has, and why the runs' timings are not
    comparable when they were compared anyway (--allow-different-gpu)."""

    baseline: str
    new: str
    field: str
    threshold: int
    impls: list[str]
    allow_missing: bool
    machines: list[str]
    problems: list[str]
    rows: list[list[str]] = dataclass_field(default_factory=list)
    regressions: list[str] = dataclass_field(default_factory=list)
    added: list[str] = dataclass_field(default_factory=list)
    missing: list[str] = dataclass_field(default_factory=list)

    @property
    def code(self) -> int:
        """The exit status: 0 no regression; 1 a regression, or a missing benchmark (unless
        allowed); 2 nothing compared."""
        if not self.rows:
            return 2
        return 1 if self.regressions or (self.missing and not self.allow_missing) else 0

    @property
    def error(self) -> str | None:
        """Why the comparison is a refusal (nothing compared), or None."""
        if self.rows:
            return None
        filtered = f" with --impl {' '.join(self.impls)}" if self.impls else ""
        return f"error: nothing compared: no benchmark{filtered} appears in both {self.baseline} and {self.new}"


def compare_files(baseline: str, new: str, *, field: str = "median", threshold: int = 10, impls: Iterable[str] = (), allow_different_gpu: bool = False,
                  allow_missing: bool = False) -> Comparison:
    """Pair the two files' benchmarks and judge each with pytest-benchmark's regression check.
    ResultsError for an unreadable file (by_name's refusals included), an impl neither holds, or
    runs from different GPUs (or interpreter against compiled) unless allow_different_gpu."""
    impls = list(impls)
    base_data, new_data = load(baseline), load(new)
    problem = unknown_impls(impls, base_data, new_data)
    if problem:
        raise ResultsError(problem)
    base_stats, new_stats = ({key: b["stats"] for key, b in by_name(path, data, field, impls).items()} for path, data in ((baseline, base_data), (new, new_data)))
    problems = mismatch(base_data, new_data)
    if problems and not allow_different_gpu:
        raise ResultsError(f"refusing to compare {baseline} with {new}: {'; '.join(problems)} (override with --allow-different-gpu)")
    machines = ["\n".join(machine_lines(f"{label} {path}", data["machine_info"])) for label, path, data in (("baseline", baseline, base_data), ("new", new, new_data))]
    result = Comparison(str(baseline), str(new), field, threshold, impls, allow_missing, machines, problems)
    check = parse_compare_fail(f"{field}:{threshold}%")
    for key, stats in base_stats.items():
        if key not in new_stats:
            continue
        before, after = stats[field], new_stats[key][field]
        change = check.compute(new_stats[key], stats)
        failed = check.fails(new_stats[key], stats)
        if failed:
            result.regressions.append(f"  {key}: {change:+.1f}% ({fmt_duration(before)} -> {fmt_duration(after)})")
        result.rows.append([key, fmt_duration(before), fmt_duration(after), f"{after / before:.3f}", f"{change:+.1f}%", "REGRESSION" if failed else "ok"])
    result.missing = [key for key in base_stats if key not in new_stats]
    result.added = [key for key in new_stats if key not in base_stats]
    return result


def render(c: Comparison) -> str:
    """The comparison as `compare` prints it: the machines, the table, what only one file has, and
    the verdict, between loud banners when the timings are not comparable."""
    lines = []
    warning = f"WARNING: TIMINGS NOT COMPARABLE: {'; '.join(c.problems)}"
    banner = f"{'!' * len(warning)}\n{warning}\n{'!' * len(warning)}" if c.problems else ""
    if banner:
        lines.append(banner + "\n")
    lines += c.machines
    headers = ["benchmark", f"baseline {c.field}", f"new {c.field}", "new/base", "change", f"verdict (>{c.threshold}%)"]
    lines.append("\n" + pipe_table(headers, c.rows, right={1, 2, 3, 4}) if c.rows else "\nno benchmark appears in both files")
    if c.added:
        lines.append(f"\nnew benchmarks, not in the baseline ({len(c.added)}, not compared):\n" + "\n".join(f"  {k}" for k in c.added))
    if c.missing:
        verdict = "accepted by --allow-missing" if c.allow_missing else "FAIL: a vanished benchmark can hide a regression"
        lines.append(f"\nMISSING FROM NEW ({len(c.missing)}; {verdict}):\n" + "\n".join(f"  {k}" for k in c.missing))
    if c.regressions:
        lines.append(f"\nFAIL: {len(c.regressions)} benchmark(s) slower than baseline by more than {c.threshold}% in {c.field}:")
        lines.append("\n".join(c.regressions))
    elif c.rows:
        lines.append(f"\nOK: no {c.field} slower than baseline by more than {c.threshold}% ({len(c.rows)} compared)")
    if banner:
        lines.append("\n" + banner)
    return "\n".join(lines)


def from_args(args: argparse.Namespace) -> Comparison:
    """compare_files with build_parser()'s parsed options."""
    return compare_files(args.baseline, args.new, field=args.field, threshold=args.threshold, impls=args.impl,
                         allow_different_gpu=args.allow_different_gpu, allow_missing=args.allow_missing)


def main(argv: list[str] | None = None) -> int:
    """Print the pairwise comparison; return 0, 1 (regression or missing benchmark) or 2 (bad or
    mismatched input, or nothing to compare)."""
    try:
        comparison = from_args(build_parser().parse_args(argv))
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(comparison))
    if comparison.error:
        print(comparison.error, file=sys.stderr)
    return comparison.code


if __name__ == "__main__":
    sys.exit(main())
