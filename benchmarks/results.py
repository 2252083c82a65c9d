"""Reading pytest-benchmark JSON and the plain-text pieces shared by `report`, `compare` and `history`.

They load files through `load`, describe the machine with `machine_lines` and print with
`pipe_table`, `fmt` and `fmt_duration`, so a file one of them accepts the others accept too.

A run cut short is still read. benchmarks/run_guard.py records a run stopped by SIGTERM or SIGINT
as `machine_info["partial"]` in its JSON, and appends each finished benchmark to `jsonl_path(json)`
as it is measured; `load` reads that JSON-lines file when the JSON is missing or empty (SIGKILL,
a lost node), and marks what it returns partial either way. `partial_line` says so in one line.
"""

import json
import math
from collections.abc import Collection
from pathlib import Path

DASH = "–"

# The machine_info keys holding a measured ceiling (benchmarks/ceilings.py). Files written before
# read_gbps existed lack it; readers show a dash.
CEILING_KEYS = ("copy_gbps", "read_gbps", "matmul_tflops")
# The machine_info keys our conftest adds, in the order a header shows them.
MACHINE_KEYS = ("gpu", "torch", "triton", "driver", *CEILING_KEYS)


class ResultsError(Exception):
    """A file that is unreadable, not pytest-benchmark JSON, or holds no benchmarks."""


def jsonl_path(json_path: str | Path) -> Path:
    """The JSON-lines file a run writes beside its `--benchmark-json` file: out.json -> out.jsonl."""
    path = Path(json_path)
    return path.with_suffix(".jsonl") if path.suffix == ".json" else path.with_name(path.name + ".jsonl")


def read_jsonl(path: str | Path) -> dict:
    """A run's JSON-lines file as pytest-benchmark-shaped JSON, marked partial: its header line's
    machine_info, commit_info, datetime and version, and one benchmark per line after it. A torn
    last line (the writer killed mid-line) is left out. Raises ResultsError when unreadable."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read JSON lines: {exc}") from exc
    header: dict = {}
    benchmarks = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if lineno == len(lines):
                break  # torn by a kill mid-write
            raise ResultsError(f"{path}: line {lineno} is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ResultsError(f"{path}: line {lineno} is not a JSON object")
        if "stats" in record:
            benchmarks.append(record)
        else:
            header.update(record)
    machine = header.get("machine_info") if isinstance(header.get("machine_info"), dict) else {}
    partial = dict(machine.get("partial") or {})
    partial.setdefault("reason", "killed: no JSON written")
    partial.update(source=str(path), benchmarks=len(benchmarks), after=benchmarks[-1].get("fullname") if benchmarks else None)
    partial.setdefault("collected", header.get("collected"))
    return {
        "machine_info": {**machine, "partial": partial},
        "commit_info": header.get("commit_info") or {},
        "benchmarks": benchmarks,
        "datetime": header.get("datetime"),
        "version": header.get("version"),
    }


def read_any(path: str | Path) -> dict:
    """One run's JSON, or its JSON-lines file when the JSON is missing, empty or torn, unchecked.
    Raises ResultsError when neither can be read."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if jsonl_path(path).exists():
            data = read_jsonl(jsonl_path(path))
            if data["benchmarks"]:
                return data
        raise ResultsError(f"{path}: cannot read JSON: {exc}") from exc


def partial_info(data: dict) -> dict | None:
    """The record of a run cut short ({"reason", "after", "finished", "collected", ...}), or None for a whole run."""
    partial = (data.get("machine_info") or {}).get("partial")
    return partial if isinstance(partial, dict) else None


def partial_line(partial: dict) -> str:
    """The one line that says a run is partial: why, how far it got and where it stopped."""
    counts = []
    if partial.get("finished") is not None:
        counts.append(f"{partial['finished']} of {partial.get('collected', '?')} tests finished")
    elif partial.get("collected") is not None:
        counts.append(f"{partial['collected']} tests collected")
    if partial.get("benchmarks") is not None:
        counts.append(f"{partial['benchmarks']} benchmarks recorded")
    done = ", ".join(counts) or "how far unknown"
    source = f", read from {partial['source']}" if partial.get("source") else ""
    return f"!!! PARTIAL RUN ({partial.get('reason', 'cut short')}): {done}, last {partial.get('after') or 'none'}{source} !!!"


def load(path: str | Path) -> dict:
    """Read and check one `--benchmark-json` file (or, when it is missing or empty, the JSON-lines
    file beside it; or a .jsonl file named directly); raise ResultsError saying what is wrong with it.
    A run cut short comes back with `machine_info["partial"]` (see `partial_info`)."""
    data = read_any(path)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ResultsError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' list at top level)")
    if not isinstance(data.get("machine_info", {}), dict):
        raise ResultsError(f"{path}: 'machine_info' is not an object")
    if not data["benchmarks"]:
        raise ResultsError(f"{path}: holds no benchmarks (were they all skipped or deselected?)")
    for i, bench in enumerate(data["benchmarks"]):
        if not isinstance(bench, dict) or not isinstance(bench.get("name"), str) or not isinstance(bench.get("stats"), dict):
            raise ResultsError(f"{path}: benchmark #{i} lacks a 'name' or a 'stats' object")
        if not isinstance(bench.setdefault("extra_info", {}), dict):
            raise ResultsError(f"{path}: benchmark {bench['name']!r} has a non-object 'extra_info'")
    data.setdefault("machine_info", {})
    return data


def by_name(path: str | Path, data: dict, field: str = "median", impls: Collection[str] = ()) -> dict[str, dict]:
    """A loaded file's benchmarks keyed by fullname (name when it lacks one), only those whose
    extra_info impl is in `impls` when given. ResultsError on a name that appears twice (one copy
    would silently stand for both) or a stats.`field` that is not a positive number: a time of zero
    or less is no measurement, and a ratio against it is meaningless."""
    benches = {}
    for bench in data["benchmarks"]:
        if impls and bench["extra_info"].get("impl") not in impls:
            continue
        key = bench.get("fullname") or bench["name"]
        if key in benches:
            raise ResultsError(f"{path}: benchmark {key!r} appears twice")
        value = number(bench["stats"].get(field))
        if value is None or value <= 0:
            raise ResultsError(f"{path}: benchmark {key!r} has no positive stats.{field} (it has {bench['stats'].get(field)!r})")
        benches[key] = bench
    return benches


def number(value) -> float | None:
    """`value` as a finite float, or None for a missing, non-numeric or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value, decimals: int | None = None) -> str:
    """A dash for a missing value; a number to `decimals` places (two significant digits where those places would
    show too little, as for CPU throughputs); anything else as str."""
    x = number(value)
    if value is None:
        return DASH
    if x is None or decimals is None:
        return str(value)
    if x and abs(x) < 10 ** (1 - decimals):
        return f"{x:.2g}"
    return f"{x:.{decimals}f}"


def fmt_duration(seconds: float | None) -> str:
    """A duration in the largest unit that keeps it at or above 1: '812.4 µs', '3.142 ms'; a dash
    for a missing one."""
    if seconds is None:
        return DASH
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def is_interpreter(machine_info: dict) -> bool:
    """True when the Triton kernels ran in the CPU interpreter, so their timings mean nothing for a GPU."""
    return bool(machine_info.get("interpreter"))


def machine_lines(label: str, machine_info: dict) -> list[str]:
    """A one-line description of the machine a file was measured on, plus a loud line for interpreter runs."""
    parts = [f"{key}={fmt(machine_info.get(key), 1 if key in CEILING_KEYS else None)}" for key in MACHINE_KEYS]
    lines = [f"{label}: " + ", ".join(parts)]
    partial = partial_info({"machine_info": machine_info})
    if partial:
        lines.append(partial_line(partial))
    if is_interpreter(machine_info):
        lines.append("!!! TRITON INTERPRETER TIMINGS ON CPU: these are NOT kernel performance figures !!!")
    return lines


def pipe_table(headers: list[str], rows: list[list[str]], right: Collection[int] = ()) -> str:
    """A markdown pipe table with padded columns; columns whose index is in `right` are right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        padded = (str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
