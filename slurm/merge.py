"""Merge a sweep's task results into one pytest-benchmark JSON, with its report and regression check.

    python -m slurm.merge SWEEP OUT ARRAY_JOB_ID [--baseline BASE.json] [--compare "--threshold 10% --impl flash_triton"]
        [--history DB]

Reads OUT/<id>/<task>.{json,xml,exit} and OUT/logs/<id>_<task>.out, and writes into OUT/<id>/:
merged.json (every task's benchmarks, each tagged with its task and node), report.md (the task
table, the benchmark tables of `benchmarks.report`, and `benchmarks.compare` against the
baseline) and plots/, each file atomically (minivllm.atomic_write). Every task of the sweep gets
a row: a task that failed, never finished or never ran is named there and makes the exit status
1; otherwise the status is the comparison's.
A task cut short (SIGTERM at its time limit's warning, or killed) is PARTIAL: what it measured,
from its JSON or else its JSON-lines file (benchmarks.results.load), is merged, and it too makes
the status 1.
With --history, merged.json is added to that regression history (benchmarks.history) and the
GPU's new run checked against the runs before it; a slower-than-its-band figure makes the status 1,
a check that cannot judge (nothing compared, a stored median that is not a time) 2.
"""

import argparse
import json
import shlex
import statistics
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import compare, history, report
from benchmarks.results import CEILING_KEYS, ResultsError, load, partial_info, pipe_table, read_any
from minivllm.atomic_write import write_atomic
from slurm.sweep import Sweep, read_sweep

LOG_TAIL = 3  # log lines quoted for a task that went wrong


@dataclass
class TaskResult:
    """What one array task left behind, and the verdict on it: ok, failed, unfinished or never ran."""

    task: int
    status: str
    detail: str = ""
    node: str = ""
    gpu: str = ""
    benchmarks: list[dict] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    data: dict | None = None


def read_junit(path: Path) -> tuple[dict[str, str], str]:
    """From pytest's --junitxml file: node id -> passed, failed, error or skipped, and the host
    that ran them. ({}, "") when the file is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}, ""
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    outcomes = {}
    for case in root.iter("testcase"):
        node_id = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        kinds = {child.tag for child in case}
        outcomes[node_id] = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed").replace("failure", "failed")
    return outcomes, suite.get("hostname", "") if suite is not None else ""


def log_tail(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-LOG_TAIL:])


def read_task(task: int, expected: list[str], results: Path, log: Path) -> TaskResult:
    """The verdict on one task from its files; never raises for a missing or broken file. Its
    results come from its JSON or, when that is missing or empty, its JSON-lines file."""
    exit_file, json_file = results / f"{task}.exit", results / f"{task}.json"
    result = TaskResult(task, "ok")
    json_problem = ""
    try:
        result.data = read_any(json_file)
        result.benchmarks = list(result.data["benchmarks"])
        result.node = str(result.data["machine_info"].get("node", ""))
        result.gpu = str(result.data["machine_info"].get("gpu", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ResultsError) as e:
        result.data, result.benchmarks = None, []
        json_problem = f"no readable {json_file.name} ({type(e).__name__})"
    partial = partial_info(result.data) if result.data else None
    kept = f"{len(result.benchmarks)} benchmarks kept"
    if partial:
        kept += f" ({partial.get('reason')}" + (f"; from {Path(partial['source']).name})" if partial.get("source") else ")")
    if not exit_file.exists():
        result.benchmarks = [b for b in result.benchmarks if b.get("fullname") in set(expected)]
        if result.benchmarks:
            result.status = "partial"
            result.detail = f"no exit status: killed, timed out or lost its node; {kept}. log: {log_tail(log)}"
            result.outcomes = Counter(read_junit(results / f"{task}.xml")[0].get(node_id, "not run") for node_id in expected)
            return result
        if log.exists():
            return TaskResult(task, "unfinished", f"no exit status: killed, timed out or lost its node. log: {log_tail(log)}")
        return TaskResult(task, "never ran", f"no log at {log}: cancelled, or never started")
    code = exit_file.read_text().strip()
    outcomes, host = read_junit(results / f"{task}.xml")
    result.node = result.node or host
    result.outcomes = Counter(outcomes.get(node_id, "not run") for node_id in expected)
    # pytest-benchmark writes no file when every benchmark of the task was skipped.
    if json_problem and not (result.outcomes["passed"] or json_file.exists()):
        json_problem = ""
    bad = [f"{node_id} {outcomes.get(node_id, 'not run')}" for node_id in expected if outcomes.get(node_id, "not run") not in ("passed", "skipped")]
    # Results from outside the task's row would duplicate another task's; they are dropped, loudly.
    row = set(expected)
    outside = [b for b in result.benchmarks if b.get("fullname") not in row]
    if outside:
        result.benchmarks = [b for b in result.benchmarks if b.get("fullname") in row]
        bad.insert(0, f"{len(outside)} results from outside its row, dropped")
    ran_bad = [b for b in bad if not b.endswith(" not run")]
    if partial and result.benchmarks and not json_problem and not ran_bad:
        # Stopped by a signal (its time limit's warning): the tests it did not reach are expected missing.
        result.status = "partial"
        result.detail = f"pytest exit {code}, cut short: {kept}, last {partial.get('after') or 'none'}"
    elif code != "0" or json_problem or bad:
        result.status = "failed"
        parts = [f"pytest exit {code}"] + ([json_problem] if json_problem else []) + bad[:LOG_TAIL]
        if len(bad) > LOG_TAIL:
            parts.append(f"... {len(bad) - LOG_TAIL} more not passed")
        result.detail = "; ".join(parts) + (f". log: {log_tail(log)}" if code != "0" else "")
    return result


def merged_value(key: str, values: list):
    """One machine_info value for the merged file: the common value, the median ceiling, or 'mixed: ...'."""
    if len({json.dumps(v, sort_keys=True) for v in values}) == 1:
        return values[0]
    if key in CEILING_KEYS and all(isinstance(v, int | float) for v in values):
        return statistics.median(values)
    return "mixed: " + " | ".join(sorted({str(v) for v in values}))


def merge(sweep: Sweep, array_id: str, tasks: list[TaskResult]) -> dict:
    """One pytest-benchmark-shaped dict of every task's benchmarks, with a `slurm` section naming each task's verdict."""
    ran = [t for t in tasks if t.data]
    machine: dict = {}
    for key in dict.fromkeys(k for t in ran for k in t.data.get("machine_info", {}) if k != "partial"):
        machine[key] = merged_value(key, [t.data["machine_info"].get(key) for t in ran])
    partial = [t.task for t in tasks if t.status == "partial"]
    if partial:
        # benchmarks.results.partial_info reads this, so report, compare and history say the sweep is partial.
        kept = sum(len(t.benchmarks) for t in tasks if t.status == "partial")
        machine["partial"] = {"reason": f"sweep tasks cut short: {', '.join(map(str, partial))}", "tasks": partial, "benchmarks": kept}
    commit: dict = {}
    for key in dict.fromkeys(k for t in ran for k in t.data.get("commit_info", {})):
        commit[key] = merged_value(key, [t.data["commit_info"].get(key) for t in ran])
    benchmarks = []
    for t in ran:
        for bench in t.benchmarks:
            bench.setdefault("extra_info", {}).update(slurm_task=t.task, node=t.node)
            benchmarks.append(bench)
    return {
        "machine_info": machine,
        "commit_info": commit,
        "benchmarks": benchmarks,
        "datetime": datetime.now(UTC).isoformat(),
        "version": ran[0].data.get("version") if ran else None,
        "slurm": {
            "array_job_id": array_id,
            "grid": sweep.grid,
            "pytest_args": sweep.pytest_args,
            "tasks": [{"task": t.task, "status": t.status, "detail": t.detail, "node": t.node, "gpu": t.gpu, "benchmarks": len(t.benchmarks)} for t in tasks],
            "not_ok_tasks": [t.task for t in tasks if t.status not in ("ok", "partial")],
            "partial_tasks": partial,
        },
    }


def task_table(tasks: list[TaskResult]) -> str:
    rows = []
    for t in tasks:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(t.outcomes.items())) or "–"
        rows.append([str(t.task), t.status.upper() if t.status != "ok" else "ok", t.node or "–", t.gpu or "–", counts, t.detail or ""])
    return pipe_table(["task", "status", "node", "gpu", "benchmarks", "detail"], rows, right={0})


def report_section(merged_path: Path, plots: Path) -> list[str]:
    """benchmarks.report's tables of the merged run, its figures written into `plots`."""
    try:
        rendered = report.render([(merged_path, load(merged_path))], plot=plots)
    except ResultsError as e:
        return ["## Benchmarks", f"error: {e}"]
    summary = f"plots in {plots}: {len(rendered.figures)}" if rendered.tables else "no prefill, prefix, decode or engine benchmarks: no tables"
    return ["## Benchmarks", rendered.text.rstrip(), summary]


def compare_section(baseline: Path, merged_path: Path, options: str) -> tuple[int, list[str]]:
    """benchmarks.compare of the merged run against `baseline` with `options` (its command-line
    options, one string): its exit status and its section of the report."""
    try:
        comparison = compare.from_args(compare.build_parser().parse_args([str(baseline), str(merged_path), *shlex.split(options)]))
        code, text = comparison.code, compare.render(comparison) + (f"\n{comparison.error}" if comparison.error else "")
    except ResultsError as e:
        code, text = 2, f"error: {e}"
    return code, [f"## Against {baseline} (benchmarks.compare exit {code})", text]


def history_section(target: str, merged_path: Path, gpu: str) -> tuple[int, list[str]]:
    """The merged run added to the benchmarks.history at `target`, and the GPU's newest run
    checked against the runs before it: the check's exit status and the report's section."""
    try:
        db = history.open_db(target, create=True)
        added = history.add(db, str(merged_path))
    except (history.HistoryError, ResultsError) as e:
        return 2, [f"## History {target} (add exit 2, check exit 2)", f"error: {e}"]
    check = history.check_history(db, gpu=gpu)
    add_text = f"{merged_path}: {'added' if added else 'already in the history, skipped'}"
    return check.code, [f"## History {target} (add exit 0, check exit {check.code})", add_text, history.render_check(check)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.merge", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep file the array ran")
    parser.add_argument("out", type=Path, help="the sweep's results root (holds <array id>/ and logs/)")
    parser.add_argument("array_job_id")
    parser.add_argument("--baseline", type=Path, help="pytest-benchmark JSON to check the merged run against")
    parser.add_argument("--compare", default="", help="options for benchmarks.compare, one string, e.g. '--threshold 5%% --impl flash_triton'")
    parser.add_argument("--history", help="a benchmarks.history database (file or sqlite:/// URL) to add the merged run to and check it against")
    args = parser.parse_args(argv)
    try:
        sweep = read_sweep(args.sweep)
    except ValueError as e:
        parser.error(str(e))
    results = args.out / args.array_job_id
    results.mkdir(parents=True, exist_ok=True)
    tasks = [read_task(i, ids, results, args.out / "logs" / f"{args.array_job_id}_{i}.out") for i, ids in enumerate(sweep.tasks)]
    merged = merge(sweep, args.array_job_id, tasks)
    merged_path = results / "merged.json"
    write_atomic(merged_path, json.dumps(merged, indent=2))

    not_ok, partial = merged["slurm"]["not_ok_tasks"], merged["slurm"]["partial_tasks"]
    verdicts = [f"NOT OK: tasks {', '.join(map(str, not_ok))} (see their rows)"] if not_ok else []
    if partial:
        verdicts.append(f"PARTIAL: tasks {', '.join(map(str, partial))} were cut short; what they measured is merged")
    verdict = "; ".join(verdicts) or "all tasks ok"
    counts = Counter(t.status for t in tasks)
    sections = [
        f"# Sweep {args.sweep}, array job {args.array_job_id}",
        f"{len(tasks)} tasks ({', '.join(f'{n} {s}' for s, n in counts.most_common())}), "
        f"{len(merged['benchmarks'])} benchmark results in {merged_path}. {verdict}.",
        task_table(tasks),
    ]
    code = 1 if not_ok or partial else 0
    if merged["benchmarks"]:
        sections += report_section(merged_path, results / "plots")
        if args.baseline:
            compare_code, section = compare_section(args.baseline, merged_path, args.compare)
            sections += section
            code = code or compare_code
        if args.history:
            check_code, section = history_section(args.history, merged_path, str(merged["machine_info"].get("gpu", "")))
            sections += section
            code = code or check_code
    else:
        sections.append("No task produced benchmark results: no tables, no comparison.")
    text = "\n\n".join(sections) + "\n"
    write_atomic(results / "report.md", text)
    print(text)
    print(f"merge: exit {code}; report {results / 'report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
