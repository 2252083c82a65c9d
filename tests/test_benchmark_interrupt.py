"""A benchmark run cut short keeps what it measured, and every reader says it is partial.

Real `pytest benchmarks` subprocesses (the CPU smoke grid of the decode suite, four benchmarks,
each held to about two seconds by --benchmark-max-time) are sent SIGTERM or SIGKILL once the
JSON-lines file shows a finished benchmark; the merge of a Slurm task cut short is checked on files
shaped as bench_array.sbatch leaves them (tests/test_slurm.py does it on a real cluster).
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import compare, history, report
from benchmarks.results import ResultsError, jsonl_path, load, partial_info, read_jsonl
from benchmarks.run_guard import RunGuard
from minivllm.interpreter import interpreting
from slurm import merge
from slurm.sweep import Sweep, write_sweep
from tests.benchmark_json import bench, write

REPO = Path(__file__).resolve().parents[1]
SUITE = "benchmarks/test_decode.py"
COLLECTED = 4  # the decode suite's CPU smoke grid: one shape, four implementations


# The smoke grid on a GPU machine too (the run guard is what is under test, not the shapes), and
# pytest's output unbuffered, so a progress line can be waited for.
# An xdist worker's variables would make the child's pytest-benchmark take itself for a worker
# and disable timing (no JSON), so the child gets none of them.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"MINIVLLM_BENCH_GRID": "cpu", "PYTHONUNBUFFERED": "1"}


def start_run(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pytest", SUITE, "-p", "no:cacheprovider", f"--benchmark-json={out}", "--benchmark-max-time=2", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lines_of(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def after_first_benchmark(proc: subprocess.Popen, out: Path, sig: int, printed: str = "") -> str:
    """Send `sig` once the JSON-lines file holds its header and one benchmark and the output
    matches the regex `printed`; pytest's output."""
    output: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 240
    while len(lines_of(jsonl_path(out))) < 2 or not re.search(printed, "".join(output)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            reader.join(timeout=10)
            pytest.fail(f"no benchmark recorded in {jsonl_path(out)} or no line matching {printed!r} (exit {proc.returncode}):\n{''.join(output)}")
        time.sleep(0.1)
    proc.send_signal(sig)
    proc.wait(timeout=240)
    reader.join(timeout=10)
    return "".join(output)


def test_sigterm_stops_after_the_benchmark_in_progress_and_writes_the_json(tmp_path):
    out = tmp_path / "out.json"
    # Signalled once the second benchmark has started: its progress line is printed as it starts.
    second = rf"\[progress\] decode: 1/{COLLECTED} done, .*~\d+:\d\d left"
    output = after_first_benchmark(start_run(out, "--bench-progress=0"), out, signal.SIGTERM, second)
    assert "SIGTERM: stopping after the test in progress" in output, output
    assert re.search(rf"\[progress\] decode: 0/{COLLECTED} done, timing tiny-\S+, elapsed \d+:\d\d", output), output
    data = json.loads(out.read_text())  # valid JSON, written by pytest-benchmark at the session's end
    names = [b["fullname"] for b in data["benchmarks"]]
    assert 1 <= len(names) < COLLECTED and all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    partial = data["machine_info"]["partial"]
    assert partial == {"reason": "SIGTERM", "after": names[-1], "finished": len(names), "collected": COLLECTED, "benchmarks": len(names)}
    # The JSON-lines file holds the same benchmarks, as pytest-benchmark wrote them into the JSON.
    lines = [json.loads(line) for line in lines_of(jsonl_path(out))]
    assert lines[0]["collected"] == COLLECTED and lines[0]["machine_info"]["interpreter"] is interpreting() and "partial" not in lines[0]["machine_info"]
    assert lines[1:] == data["benchmarks"]
    shown = subprocess.run([sys.executable, "-m", "benchmarks.report", str(out)], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and "!!! PARTIAL RUN (SIGTERM)" in shown.stdout and "## decode" in shown.stdout, shown.stdout + shown.stderr


def test_sigkill_leaves_json_lines_that_every_reader_loads_as_partial(tmp_path, capsys):
    out = tmp_path / "out.json"
    after_first_benchmark(start_run(out), out, signal.SIGKILL)
    # No JSON: pytest-benchmark 5.3 writes it only at the end; 5.2 opened it empty at the start.
    assert not out.exists() or out.stat().st_size == 0
    data = load(out)  # falls back to out.jsonl
    assert data["benchmarks"] and all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    partial = partial_info(data)
    assert partial["reason"] == "killed: no JSON written" and partial["collected"] == COLLECTED and partial["source"] == str(jsonl_path(out))
    assert partial["benchmarks"] == len(data["benchmarks"]) and partial["after"] == data["benchmarks"][-1]["fullname"]
    assert load(jsonl_path(out))["benchmarks"] == data["benchmarks"]

    assert report.main([str(out)]) == 0
    assert "!!! PARTIAL RUN (killed: no JSON written)" in capsys.readouterr().out
    compare.main([str(out), str(out)])
    assert capsys.readouterr().out.count("!!! PARTIAL RUN") == 2
    db = tmp_path / "history.db"
    assert history.main(["add", str(db), str(out)]) == 0
    assert "PARTIAL RUN" in capsys.readouterr().out
    assert history.main(["show", str(db)]) == 0
    assert "(PARTIAL: killed: no JSON written)" in capsys.readouterr().out


def test_quiet_run_prints_no_progress(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", SUITE, "-q", "-k", "sdpa_dense", "-p", "no:cacheprovider", "--bench-progress=0", f"--benchmark-json={tmp_path / 'q.json'}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[progress]" not in proc.stdout and "partial" not in json.loads((tmp_path / "q.json").read_text())["machine_info"]


class OptionsOnly:
    """The parts of a pytest config that RunGuard reads at construction and session start."""

    def __init__(self, benchmark_json):
        self.options = {"benchmark_json": benchmark_json, "bench_progress": 30}
        self.option = SimpleNamespace(collectonly=False)

    def getoption(self, name, default=None):
        return self.options.get(name, default)

    def get_verbosity(self):
        return 0


@pytest.mark.parametrize("given", ["path", "opened file"])
def test_a_new_run_clears_stale_results_but_keeps_the_file_pytest_benchmark_opened(tmp_path, given):
    """--benchmark-json reaches plugins as a Path (pytest-benchmark 5.3) or as the file it has already
    opened and truncated (5.2, on the GPU machines): the JSON-lines file goes beside it either way,
    and only a stale JSON is deleted, never the one pytest-benchmark will write into."""
    out, stale_lines = tmp_path / "out.json", tmp_path / "out.jsonl"
    out.write_text("{}")
    stale_lines.write_text("{}\n")
    with open(out, "wb") if given == "opened file" else contextlib.nullcontext(out) as option:
        guard = RunGuard(OptionsOnly(option))
        guard.pytest_sessionstart(session=None)
        guard.pytest_unconfigure(config=None)
        assert Path(guard.json) == out and guard.jsonl == stale_lines and not stale_lines.exists()
        assert out.exists() == (given == "opened file")


def test_json_lines_reader_skips_a_torn_last_line_and_refuses_a_torn_middle(tmp_path):
    path = tmp_path / "r.jsonl"
    header = json.dumps({"collected": 3, "machine_info": {"gpu": "G"}, "commit_info": {"id": "abc"}, "datetime": "2026-12-05T00:00:00"})
    rows = [json.dumps(bench("decode", impl, 1e-4)) for impl in ("triton_paged", "sdpa_dense")]
    path.write_text("\n".join([header, *rows, rows[0][:40]]))
    data = read_jsonl(path)
    assert [b["extra_info"]["impl"] for b in data["benchmarks"]] == ["triton_paged", "sdpa_dense"]
    assert data["machine_info"]["gpu"] == "G" and data["commit_info"] == {"id": "abc"} and partial_info(data)["collected"] == 3
    path.write_text("\n".join([header, rows[0][:40], rows[1]]))
    with pytest.raises(ResultsError, match="line 2 is not JSON"):
        read_jsonl(path)
    # A JSON-lines file without a benchmark does not stand in for a missing JSON.
    (tmp_path / "e.jsonl").write_text(header + "\n")
    with pytest.raises(ResultsError, match="cannot read JSON"):
        load(tmp_path / "e.json")


# --- the Slurm merge of a task cut short (files as bench_array.sbatch leaves them) ---


def junit(outcomes: dict[str, str]) -> str:
    cases = []
    for node_id, outcome in outcomes.items():
        module, name = node_id.split("::")
        cases.append(f'<testcase classname="{module[:-3].replace("/", ".")}" name="{name}">{"<skipped/>" if outcome == "skipped" else ""}</testcase>')
    return f'<testsuites><testsuite hostname="n1">{"".join(cases)}</testsuite></testsuites>'


def test_merge_marks_a_task_cut_short_partial_and_keeps_what_it_measured(tmp_path):
    rows = [[bench("prefill", impl, 1e-3, size=512 << t) for impl in ("flash_triton", "sdpa_cudnn", "sdpa_flash")] for t in range(3)]
    results, logs = tmp_path / "77", tmp_path / "logs"
    results.mkdir()
    logs.mkdir()
    # Task 0 finished; task 1 stopped by the time limit's SIGTERM after two of its three (pytest exit 2,
    # the JSON marked partial); task 2 was SIGKILLed after one, leaving only its JSON-lines file.
    write(results / "0.json", rows[0], node="n1")
    (results / "0.xml").write_text(junit({b["fullname"]: "passed" for b in rows[0]}))
    (results / "0.exit").write_text("0\n")
    cut = {"reason": "SIGTERM", "after": rows[1][1]["fullname"], "finished": 2, "collected": 3, "benchmarks": 2}
    write(results / "1.json", rows[1][:2], node="n1", partial=cut)
    (results / "1.xml").write_text(junit({b["fullname"]: "passed" for b in rows[1][:2]}))
    (results / "1.exit").write_text("2\n")
    header = {"collected": 3, "machine_info": json.loads((results / "0.json").read_text())["machine_info"]}
    (results / "2.jsonl").write_text(json.dumps(header) + "\n" + json.dumps(rows[2][0]) + "\n")
    (logs / "77_2.out").write_text("slurmstepd: error: *** JOB 80 ON n1 CANCELLED AT 2026-12-05 DUE TO TIME LIMIT ***\n")

    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("gpu", [], [[b["fullname"] for b in row] for row in rows]), "test")
    code = merge.main([str(sweep), str(tmp_path), "77"])
    merged = json.loads((results / "merged.json").read_text())
    text = (results / "report.md").read_text()
    status = {t["task"]: (t["status"], t["detail"]) for t in merged["slurm"]["tasks"]}
    assert code == 1 and merged["slurm"]["not_ok_tasks"] == [] and merged["slurm"]["partial_tasks"] == [1, 2]
    assert status[0] == ("ok", "")
    assert status[1][0] == "partial" and "pytest exit 2" in status[1][1] and "2 benchmarks kept (SIGTERM)" in status[1][1]
    assert status[2][0] == "partial" and "1 benchmarks kept (killed: no JSON written; from 2.jsonl)" in status[2][1] and "TIME LIMIT" in status[2][1]
    assert sorted(b["extra_info"]["slurm_task"] for b in merged["benchmarks"]) == [0, 0, 0, 1, 1, 2]
    assert merged["machine_info"]["partial"]["tasks"] == [1, 2] and merged["machine_info"]["node"] == "n1"
    assert "PARTIAL: tasks 1, 2 were cut short" in text and "!!! PARTIAL RUN (sweep tasks cut short: 1, 2)" in text
    rows_shown = {line.split("|")[1].strip(): line for line in text.splitlines() if re.match(r"\|\s+\d+ \|", line)}
    assert "PARTIAL" in rows_shown["1"] and "PARTIAL" in rows_shown["2"]


def test_a_failure_before_the_signal_still_fails_the_task(tmp_path):
    """A task cut short is partial only if what it ran passed: a failed benchmark keeps it FAILED."""
    row = [bench("prefill", impl, 1e-3) for impl in ("flash_triton", "sdpa_cudnn", "sdpa_flash")]
    results = tmp_path / "77"
    results.mkdir()
    write(results / "0.json", row[:1], partial={"reason": "SIGTERM", "after": row[1]["fullname"], "finished": 2, "collected": 3})
    cases = f'<testcase classname="benchmarks.test_prefill" name="{row[0]["fullname"].split("::")[1]}"/>'
    cases += f'<testcase classname="benchmarks.test_prefill" name="{row[1]["fullname"].split("::")[1]}"><failure/></testcase>'
    (results / "0.xml").write_text(f"<testsuites><testsuite hostname='n1'>{cases}</testsuite></testsuites>")
    (results / "0.exit").write_text("2\n")
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("gpu", [], [[b["fullname"] for b in row]]), "test")
    assert merge.main([str(sweep), str(tmp_path), "77"]) == 1
    merged = json.loads((results / "merged.json").read_text())
    assert merged["slurm"]["not_ok_tasks"] == [0] and merged["slurm"]["tasks"][0]["status"] == "failed"


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_the_array_script_asks_for_a_warning_signal_to_pytest():
    script = (REPO / "slurm" / "bench_array.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=TERM@\d+$", script, re.M)  # to the srun step (pytest), not B: the shell
