"""The regression history (benchmarks/history.py) on synthetic runs: a 20% slowdown is flagged,
noise within the history's own spread passes, GPUs are never compared with each other, a
duplicate add is a no-op, and a damaged or foreign database or file is reported, never reset."""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import history

NAMES = ("benchmarks/test_decode.py::test_decode[a]", "benchmarks/test_decode.py::test_decode[b]")


def run_file(tmp_path, gpu: str, commit: str, time: str, medians: dict[str, float]):
    """A --benchmark-json file of one run."""
    benches = [
        {"name": name.split("::")[1], "fullname": name, "group": "decode", "stats": {"median": m, "iqr": m / 50, "rounds": 20},
         "extra_info": {"suite": "decode", "gbps": 1 / m, "ceiling": "read_gbps"}}
        for name, m in medians.items()
    ]
    data = {"machine_info": {"gpu": gpu, "read_gbps": 4500.0}, "commit_info": {"id": commit}, "datetime": time, "benchmarks": benches}
    path = tmp_path / f"{gpu.replace(' ', '_')}-{commit}-{time.replace(':', '')}.json"
    path.write_text(json.dumps(data))
    return path


def add_runs(tmp_path, db, gpu: str, series: list[float], other: float = 1.0):
    """One run per value of `series` (NAMES[0]'s median; NAMES[1] stays at `other`), in time order."""
    for i, m in enumerate(series):
        path = run_file(tmp_path, gpu, f"c{i:03d}", f"2026-12-01T00:{i:02d}:00", {NAMES[0]: m, NAMES[1]: other})
        assert history.main(["add", str(db), str(path)]) == 0


def test_a_20_percent_slowdown_is_flagged(tmp_path, capsys):
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.00, 1.01, 0.99, 1.00, 1.20])
    assert history.main(["check", str(db), "--threshold", "10%"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 benchmark(s)" in out and "GPU A: " + NAMES[0] + ": +20.0%" in out and NAMES[1] + ": " not in out.split("FAIL")[1]


def test_check_history_returns_the_verdict_as_data(tmp_path):
    """What slurm.merge reads instead of the check's printout: a section per GPU, the failures."""
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.00, 1.01, 0.99, 1.00, 1.20])
    add_runs(tmp_path, db, "GPU B", [1.0])
    result = history.check_history(history.open_db(str(db), create=False), threshold=10)
    assert result.code == 1 and result.compared == 2 and result.failures == [f"GPU A: {NAMES[0]}: +20.0% against a band of 10.0%"]
    a, b = result.gpus
    assert (a.gpu, a.newest[0], a.earlier, [row[-1] for row in a.rows]) == ("GPU A", "c004", 4, ["SLOWER", "ok"])
    assert (b.gpu, b.earlier, b.rows) == ("GPU B", 0, [])
    assert "GPU B: one run, nothing to compare it with" in history.render_check(result)
    assert history.check_history(history.open_db(str(db), create=False), gpu="GPU B").code == 0


def test_noise_within_the_historys_spread_passes(tmp_path, capsys):
    """A benchmark that swings ±8% run to run gets a band wider than the 5% floor, so +9% passes;
    a steady one keeps the floor, so the same +9% fails there."""
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.00, 1.08, 0.92, 1.06, 0.94, 1.00, 1.09])
    assert history.main(["check", str(db), "--threshold", "5%"]) == 0
    assert "OK: no benchmark slower" in capsys.readouterr().out
    steady = tmp_path / "steady.db"
    add_runs(tmp_path, steady, "GPU A", [1.00, 1.00, 1.01, 0.99, 1.00, 1.00, 1.09])
    assert history.main(["check", str(steady), "--threshold", "5%"]) == 1


def test_a_gpu_is_never_compared_with_another(tmp_path, capsys):
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 1.0])
    path = run_file(tmp_path, "GPU B", "c999", "2026-12-02T00:00:00", {NAMES[0]: 5.0, NAMES[1]: 5.0})
    assert history.main(["add", str(db), str(path)]) == 0
    assert history.main(["check", str(db)]) == 0  # B's one run is 5x A's figures, and compared with nothing
    out = capsys.readouterr().out
    assert "GPU B: one run, nothing to compare it with" in out
    assert history.main(["check", str(db), "--gpu", "GPU A"]) == 0


def test_adding_a_run_twice_stores_it_once(tmp_path, capsys):
    db = tmp_path / "h.db"
    path = run_file(tmp_path, "GPU A", "c1", "2026-12-01T00:00:00", {NAMES[0]: 1.0})
    assert history.main(["add", str(db), str(path)]) == 0
    assert history.main(["add", f"sqlite:///{db}", str(path)]) == 0
    assert "already in the history, skipped" in capsys.readouterr().out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1


def test_show_prints_trends_and_plots_a_png_per_group(tmp_path, capsys):
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 1.1, 1.2])
    assert history.main(["show", str(db), "-k", "decode and a]", "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert NAMES[0] in out and NAMES[1] not in out and "+20.0%" in out
    (png,) = (tmp_path / "plots").iterdir()
    assert png.name == "GPU-A-decode.png" and png.read_bytes().startswith(b"\x89PNG")
    assert history.main(["show", str(db), "-k", "nothing_matches"]) == 2  # not 1: that is the gate's "slower"


@pytest.mark.parametrize("content, reason", [(b"this is not sqlite at all" * 100, "damaged or not an SQLite database"), (None, "not a benchmark history")])
def test_a_damaged_or_foreign_database_is_reported_not_reset(tmp_path, capsys, content, reason):
    db = tmp_path / "h.db"
    if content is None:
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE other (x)")
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    path = run_file(tmp_path, "GPU A", "c1", "2026-12-01T00:00:00", {NAMES[0]: 1.0})
    for command in (["add", str(db), str(path)], ["show", str(db)], ["check", str(db)]):
        assert history.main(command) == 2
        assert reason in capsys.readouterr().err
    assert db.read_bytes() == before


def test_a_malformed_file_or_missing_database_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert history.main(["add", str(tmp_path / "h.db"), str(bad)]) == 2
    assert "cannot read JSON" in capsys.readouterr().err
    assert history.main(["check", str(tmp_path / "missing.db")]) == 2
    assert "no such history database" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parent.parent


# A child that imports the history, says it is ready, waits for the go file, then runs `history add`:
# so the adds start together instead of staggered by their imports.
STARTER = """
import sys, time
from pathlib import Path
from benchmarks import history
ready, go, *argv = sys.argv[1:]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
sys.exit(history.main(argv))
"""


def test_concurrent_adds_to_a_fresh_database_store_every_run(tmp_path):
    """Six `history add` processes at once on a new database, as merge jobs and CI runs on a shared
    file system do, two of them adding the same file: every run is stored once, every exit is 0,
    and the second copy is reported as already there. Four rounds, each on a fresh database."""
    files = [run_file(tmp_path, "GPU A", f"c{i}", f"2026-12-01T00:0{i}:00", {NAMES[0]: 1.0, NAMES[1]: 2.0}) for i in range(5)]
    for round_ in range(4):
        db, go = tmp_path / f"h{round_}.db", tmp_path / f"go{round_}"
        ready = [tmp_path / f"ready{round_}-{i}" for i in range(6)]
        procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(r), str(go), "add", str(db), str(f)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r, f in zip(ready, [*files, files[0]], strict=True)]
        while not all(r.exists() for r in ready) and all(p.poll() is None for p in procs):
            time.sleep(0.01)
        go.touch()
        outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        assert [code for code, _, _ in outs] == [0] * 6, [err for _, _, err in outs]
        said = "".join(out for _, out, _ in outs)
        assert said.count(": added") == 5 and said.count("already in the history, skipped") == 1
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 5
            assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 10
            # Not WAL, which needs every writer on one host: merge jobs on several nodes share the file.
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def read_only(monkeypatch):
    """Make every database the history opens read-only, as a file without write permission is to
    anyone but root (these tests may run as root, who can write any file)."""
    real = sqlite3.connect
    monkeypatch.setattr(history.sqlite3, "connect", lambda path, *args, **kwargs: real(f"file:{path}?mode=ro", *args, uri=True, **kwargs))


def test_a_read_only_database_refuses_add_with_exit_2_and_still_checks(tmp_path, capsys, monkeypatch):
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 1.0])
    path = run_file(tmp_path, "GPU A", "c9", "2026-12-02T00:00:00", {NAMES[0]: 1.0})
    read_only(monkeypatch)
    assert history.main(["add", str(db), str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{db}: cannot write" in err and "readonly database" in err
    assert history.main(["check", str(db)]) == 0 and history.main(["show", str(db)]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a file without write permission")
def test_a_database_without_write_permission_refuses_add_with_exit_2(tmp_path, capsys):
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0])
    db.chmod(0o444)
    path = run_file(tmp_path, "GPU A", "c9", "2026-12-02T00:00:00", {NAMES[0]: 1.0})
    assert history.main(["add", str(db), str(path)]) == 2
    assert f"{db}: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("median, what", [(0.0, "0"), (-1.0, "-1"), (None, "none")])
def test_a_bad_median_already_in_the_history_is_refused_not_compared(tmp_path, capsys, median, what):
    """A database written before `add` refused such figures (or by another tool) can hold a zero,
    negative or missing median: `check` names the benchmark and exits 2; it never divides by zero
    (exit 1, read as a regression) nor compares a negative time as if real."""
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 1.0, 1.0, 1.0])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE results SET median = ? WHERE name = ? AND run_id < 4", (median, NAMES[0]))
    code = history.main(["check", str(db)])
    out, err = capsys.readouterr()
    if median is None:  # no figure is no bad figure: the other benchmark is still compared
        assert code == 0 and "(1 compared)" in out
        return
    assert code == 2 and f"GPU A: {NAMES[0]}: the median of run c000" in err and f"is {what} s, not a time" in err


@pytest.mark.parametrize("median", [0.0, -2.0, float("nan"), "fast", None])
def test_add_refuses_a_file_whose_median_is_not_a_positive_time(tmp_path, capsys, median):
    db = tmp_path / "h.db"
    path = run_file(tmp_path, "GPU A", "c1", "2026-12-01T00:00:00", {NAMES[0]: 1.0, NAMES[1]: 1.0})
    data = json.loads(path.read_text())
    data["benchmarks"][1]["stats"]["median"] = median
    path.write_text(json.dumps(data))
    assert history.main(["add", str(db), str(path)]) == 2
    assert f"{path}: benchmark {NAMES[1]!r} has no positive stats.median" in capsys.readouterr().err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_add_refuses_a_file_holding_one_benchmark_twice(tmp_path, capsys):
    """Stored by (run, name), the second copy silently replaced the first; compare refuses such a file too."""
    db = tmp_path / "h.db"
    path = run_file(tmp_path, "GPU A", "c1", "2026-12-01T00:00:00", {NAMES[0]: 1.0})
    data = json.loads(path.read_text())
    data["benchmarks"].append(dict(data["benchmarks"][0], stats={"median": 9.0}))
    path.write_text(json.dumps(data))
    assert history.main(["add", str(db), str(path)]) == 2
    assert f"benchmark {NAMES[0]!r} appears twice" in capsys.readouterr().err


def test_check_that_compares_nothing_exits_2(tmp_path, capsys):
    """The newest run has earlier runs on its GPU but no figure in common with them (its medians
    missing): a gate that compared nothing has passed nothing. So for a --gpu the history lacks,
    and an empty history."""
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 1.0, 1.0])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE results SET median = NULL WHERE run_id = 3")
    assert history.main(["check", str(db)]) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out and "GPU A: nothing compared: no benchmark of the newest run (c002" in err and "2 earlier run(s)" in err
    assert history.main(["check", str(db), "--gpu", "GPU Z"]) == 2
    assert "--gpu 'GPU Z': no run of that GPU in the history; it holds GPU A" in capsys.readouterr().err
    empty = tmp_path / "empty.db"
    history.open_db(str(empty), create=True).close()
    assert history.main(["check", str(empty)]) == 2
    assert "the history holds no run" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["check", "show"])
@pytest.mark.parametrize("last", ["0", "-1", "two"])
def test_last_must_be_a_positive_count(tmp_path, capsys, command, last):
    """--last 0 checked the newest run against nothing and passed; -1 is SQLite's 'no limit'."""
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 2.0])
    with pytest.raises(SystemExit) as exc:
        history.main([command, str(db), "--last", last])
    assert exc.value.code == 2 and f"--last: expected a whole number of runs >= 1, got {last!r}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="last"):
        history.check_history(history.open_db(str(db), create=False), last=0)


def test_show_plot_naming_a_file_is_a_usage_error_and_plots_are_written_atomically(tmp_path, capsys, monkeypatch):
    db = tmp_path / "h.db"
    add_runs(tmp_path, db, "GPU A", [1.0, 1.1])
    taken = tmp_path / "plots"
    taken.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        history.main(["show", str(db), "--plot", str(taken / "sub")])
    assert exc.value.code == 2 and f"--plot: {taken} is not a directory" in capsys.readouterr().err
    replaced, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (real(src, dst), replaced.append(Path(dst))))
    assert history.main(["show", str(db), "--plot", str(tmp_path / "ok")]) == 0
    assert replaced == list((tmp_path / "ok").iterdir()) and len(replaced) == 1
