"""The regression history (benchmarks/history.py) on synthetic runs: a 20% slowdown is flagged,
noise within the history's own spread passes, GPUs are never compared with each other, a
duplicate add is a no-op, and a damaged or foreign database or file is reported, never reset."""

import json
import sqlite3

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
    assert history.main(["show", str(db), "-k", "nothing_matches"]) == 1


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
