"""A benchmark run cut short keeps what it measured, and says how far it has got.

The first SIGTERM or SIGINT stops pytest after the test in
progress (session.shouldstop), so pytest-benchmark still writes --benchmark-json, with
machine_info["partial"] saying why and where; a second one aborts at once, and the test it
interrupts is left out. Each finished test's benchmarks are also appended to the JSON-lines file
beside that JSON (benchmarks.results.jsonl_path) as they are measured, which benchmarks.results.load
reads when the JSON is missing: what a SIGKILL leaves. Progress goes to the terminal (one line per
suite as it starts, then one every --bench-progress seconds, and one as it ends); -q silences it.
"""

import contextlib
import os
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pytest_benchmark.utils import safe_dumps

from benchmarks.results import jsonl_path


def clock(seconds: float) -> str:
    """Wall-clock time as a person reads it on a progress line: '4:07', '1:02:09' (not a
    measurement, which benchmarks.results.fmt_duration formats)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _suite(nodeid: str) -> str:
    """`decode` for benchmarks/test_decode.py::..., else the file's name."""
    name = Path(nodeid.split("::", 1)[0]).stem
    return name.removeprefix("test_")


class RunGuard:
    """Keeps a stopped run's measurements (signals, the JSON-lines file, the partial marker) and
    prints progress. Registered as a plugin by pytest_configure."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, config):
        self.config = config
        json_option = config.getoption("benchmark_json", None)
        # pytest-benchmark 5.2 (on the GPU machines) hands over the file it has already opened and
        # truncated (argparse.FileType), 5.3 a Path. An opened file is this run's, and stays.
        self.json_opened = hasattr(json_option, "write")
        self.json = json_option.name if self.json_opened else json_option
        self.jsonl = jsonl_path(self.json) if self.json else None
        self.signal_name: str | None = None
        self.aborted = False
        self.repeats = 0  # signals after the first
        self.previous: dict = {}
        self.collected = 0
        self.finished: list[str] = []  # node ids, in the order they ended
        self.written = 0  # entries of the benchmark session's list handled so far
        self.recorded = 0  # benchmarks appended to the JSON-lines file
        self.header_written = False
        self.session = None
        self.running: str | None = None  # the node id of the test in progress
        # progress
        self.quiet = config.get_verbosity() < 0
        self.every = config.getoption("bench_progress")
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.suite_start: dict[str, float] = {}
        self.last_line = 0.0
        self.run_start = time.monotonic()

    # --- signals -------------------------------------------------------------------------------
    def pytest_sessionstart(self, session):
        self.session = session
        if self.config.option.collectonly:
            return
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)
        if self.jsonl:
            # A new run: an older run's JSON and lines must not pass for this one's if it is killed.
            # Like the JSON, the JSON-lines file is written only once a benchmark has finished.
            if not self.json_opened:
                Path(self.json).unlink(missing_ok=True)
            self.jsonl.unlink(missing_ok=True)

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            if self.session is not None:
                self.session.shouldstop = f"{name}: stopping after the test in progress; the results so far are kept"
            self._write(f"{name}: stopping after the test in progress (send it again to abort now)")
            return
        self.repeats += 1
        if self.running is None and self.repeats < 3:  # between tests or writing the results: not cut short, unless asked a third time
            self._write(f"{name} again: no test in progress; writing the results so far")
            return
        self.aborted = True
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        raise KeyboardInterrupt(f"second {name}: aborting the test in progress")

    def pytest_unconfigure(self, config):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _write(self, text: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        # Past output capturing (a signal arrives mid-test), and on a line of its own after pytest's dots.
        try:
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                if reporter.currentfspath is None and reporter._tw.width_of_current_line:
                    reporter._tw.line()
                reporter.write_line(text)
        except Exception:  # noqa: BLE001 - a line not shown must never cost the run its results
            pass

    # --- the JSON-lines file and the partial marker --------------------------------------------
    def _bench_session(self):
        return getattr(self.config, "_benchmarksession", None)

    @pytest.hookimpl(trylast=True)  # after pytest's own progress figure
    def pytest_runtest_logfinish(self, nodeid, location):
        self.running = None
        self.finished.append(nodeid)
        bs = self._bench_session()
        if bs is not None:
            new, self.written = bs.benchmarks[self.written :], len(bs.benchmarks)
            if self.jsonl:
                # The dict pytest-benchmark writes into the JSON's "benchmarks" list, serialized as it does.
                lines = [safe_dumps(bench.as_dict(include_data=True), ensure_ascii=True) for bench in new if bench and not bench.has_error]
                if lines:
                    self._append(lines)
        self._progress_after(nodeid)

    def _append(self, lines: list[str]) -> None:
        self.recorded += len(lines)
        if not self.header_written:
            header = {"collected": self.collected, "datetime": datetime.now(UTC).isoformat()}
            bs = self._bench_session()
            try:
                header["machine_info"] = bs.get_machine_info()
                commit = self.config.hook.pytest_benchmark_generate_commit_info(config=self.config)
                self.config.hook.pytest_benchmark_update_commit_info(config=self.config, commit_info=commit)
                header["commit_info"] = commit
            except Exception as exc:  # noqa: BLE001 - the results matter more than the header
                header["header_error"] = repr(exc)
            header["machine_info"] = {k: v for k, v in header.get("machine_info", {}).items() if k != "partial"}
            lines = [safe_dumps(header, ensure_ascii=True), *lines]
            self.header_written = True
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl, "a") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        # Before pytest-benchmark writes its JSON: an aborted test's half-timed entry is dropped.
        bs = self._bench_session()
        if bs is not None and self.aborted:
            done = set(self.finished)
            bs.benchmarks[:] = [b for b in bs.benchmarks if b.fullname in done]
        yield

    def partial(self) -> dict | None:
        if self.signal_name is None:
            return None
        reason = self.signal_name + (", second signal: the test in progress aborted" if self.aborted else "")
        return {"reason": reason, "after": self.finished[-1] if self.finished else None, "finished": len(self.finished), "collected": self.collected, "benchmarks": self.recorded}

    def pytest_benchmark_update_machine_info(self, config, machine_info):
        partial = self.partial()
        if partial:
            machine_info["partial"] = partial

    # --- progress --------------------------------------------------------------------------------
    def pytest_collection_finish(self, session):
        self.collected = len(session.items)
        for item in session.items:
            suite = _suite(item.nodeid)
            self.totals[suite] = self.totals.get(suite, 0) + 1

    @pytest.hookimpl(tryfirst=True)  # before pytest names the file, so its dots follow on one line
    def pytest_runtest_logstart(self, nodeid, location):
        self.running = nodeid
        suite = _suite(nodeid)
        if self.quiet or suite not in self.totals:
            return
        now = time.monotonic()
        if suite not in self.suite_start:
            self.suite_start[suite] = now
            self._line(suite, nodeid, now)
        elif self.every <= 0 or now - self.last_line >= self.every:
            self._line(suite, nodeid, now)

    def _progress_after(self, nodeid: str) -> None:
        suite = _suite(nodeid)
        if suite not in self.totals:
            return
        self.done[suite] = self.done.get(suite, 0) + 1
        if not self.quiet and self.done[suite] == self.totals[suite]:
            took = time.monotonic() - self.suite_start.get(suite, self.run_start)
            self._write(f"[progress] {suite}: {self.done[suite]}/{self.totals[suite]} done in {clock(took)}")
            self.last_line = time.monotonic()

    def _line(self, suite: str, nodeid: str, now: float) -> None:
        done, total = self.done.get(suite, 0), self.totals[suite]
        elapsed = now - self.suite_start[suite]
        left = f"~{clock(elapsed / done * (total - done))} left" if done else "time left unknown"
        run_done = sum(self.done.values())
        run_elapsed = now - self.run_start
        run_left = f", run ~{clock(run_elapsed / run_done * (self.collected - run_done))} left" if run_done else ""
        shape = nodeid.split("[", 1)[1].rstrip("]") if "[" in nodeid else nodeid.split("::")[-1]
        self._write(f"[progress] {suite}: {done}/{total} done, timing {shape}, elapsed {clock(elapsed)}, {left} (run {run_done}/{self.collected}{run_left})")
        self.last_line = now
