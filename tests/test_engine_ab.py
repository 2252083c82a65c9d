"""benchmarks.engine_ab: the process order, the summary, its arguments, and a whole run on this device."""

import json

import pytest

from benchmarks import engine_ab
from minivllm.kernels.tuning_table import DEFAULT_DIR


def test_processes_take_the_arms_in_turn():
    assert engine_ab.process_order(["a", "b"], 3) == ["a", "b", "a"]
    assert engine_ab.process_order(["a", "b", "c"], 5) == ["a", "b", "c", "a", "b"]


def test_step_buckets_put_prefill_first_then_decode_by_batch():
    rows = [dict(phase="decode", batch_up_to=16, total_s=3.0), dict(phase="decode", batch_up_to=2, total_s=2.0),
            dict(phase="prefill", batch_up_to=5, total_s=1.0)]
    assert list(engine_ab.step_buckets(rows).items()) == [("prefill", 1.0), ("decode<=2", 2.0), ("decode<=16", 3.0)]


def test_summary_takes_each_arms_median_and_its_ratio_to_the_first_arm():
    """Three processes of arm a, one of b, two seeds; a bucket one process lacks counts 0 there."""
    def row(arm, seed, wall, decode):
        return dict(arm=arm, seed=seed, wall_s=wall, steps={"prefill": 1.0, **decode})

    rows = [row("a", 0, 10.0, {"decode<=8": 4.0}), row("a", 2, 7.0, {}), row("b", 0, 9.0, {"decode<=8": 3.0}),
            row("b", 2, 7.7, {}), row("a", 0, 12.0, {"decode<=8": 5.0}), row("a", 2, 8.0, {}), row("a", 0, 11.0, {})]
    got = {(r["seed"], r["arm"]): r for r in engine_ab.summary(rows, ["a", "b"])}
    assert got[0, "a"]["wall_s"] == 11.0 and got[0, "a"]["processes"] == 3 and got[0, "a"]["ratio"] == 1.0
    assert got[0, "a"]["steps"] == {"prefill": 1.0, "decode<=8": 4.0}
    assert got[0, "b"]["ratio"] == pytest.approx(9.0 / 11.0)
    assert got[2, "a"]["wall_s"] == 7.5 and got[2, "b"]["ratio"] == pytest.approx(7.7 / 7.5)
    assert [(r["seed"], r["arm"]) for r in engine_ab.summary(rows, ["a", "b"])] == [(0, "a"), (0, "b"), (2, "a"), (2, "b")]


@pytest.mark.parametrize("argv, message", [
    ([], "--arm: give at least one NAME=DIR"),
    (["--arm", "nodir"], "expected NAME=DIR"),
    (["--arm", "a=/no/such/dir"], "is not a directory of tuning tables"),
    (["--arm", f"a={DEFAULT_DIR}", "--arm", f"a={DEFAULT_DIR}"], "names must differ"),
    (["--arm", f"a={DEFAULT_DIR}", "--arm", f"b={DEFAULT_DIR}", "--processes", "1"], "--processes must be at least the 2 arms"),
])
def test_bad_arguments_are_refused_before_any_run(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        engine_ab.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_gives_each_process_its_arms_table(capsys, device, tmp_path):
    """The CPU run: two arms in three fresh processes, A B A; every process looked its kernels up
    in its own arm's directory, and every seed's row and the summary come back."""
    if device.type == "cuda":
        pytest.skip("on a GPU it runs Qwen3-0.6B's workload for minutes; tests run its CPU smoke run")
    other = tmp_path / "tables"
    other.mkdir()
    out = tmp_path / "ab.json"
    assert engine_ab.main(["--arm", f"committed={DEFAULT_DIR}", "--arm", f"empty={other}", "--workload", "nano", "--seeds", "0", "3",
                           "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert [(r["process"], r["arm"], r["seed"]) for r in runs] == [(0, "committed", 0), (0, "committed", 3), (1, "empty", 0), (1, "empty", 3),
                                                                   (2, "committed", 0), (2, "committed", 3)]
    assert {r["arm"]: r["table_dir"] for r in runs} == {"committed": str(DEFAULT_DIR.resolve()), "empty": str(other.resolve())}
    assert all(r["wall_s"] > 0 and "prefill" in r["steps"] and any(b.startswith("decode<=") for b in r["steps"]) for r in runs)
    assert [(r["seed"], r["arm"], r["processes"]) for r in record["summary"]] == [(0, "committed", 2), (0, "empty", 1), (3, "committed", 2), (3, "empty", 1)]
    printed = capsys.readouterr().out
    assert "median over each arm's processes" in printed and printed.count(" seed 3: ") == 5


def test_a_failing_process_stops_the_run_with_its_error(capsys, device, tmp_path):
    """A process that fails (here: its arm's table is not JSON) ends the run with exit status 1 and
    its own error on stderr, not a parse error of its missing result."""
    if device.type == "cuda":
        pytest.skip("the CPU run's table is cpu.json; on a GPU the engine would run Qwen3-0.6B first")
    (tmp_path / "cpu.json").write_text("{not json")
    assert engine_ab.main(["--arm", f"broken={tmp_path}", "--workload", "nano", "--seeds", "0", "--processes", "1"]) == 1
    err = capsys.readouterr().err
    assert "process 0 (broken) failed with exit code 1" in err and f"tuning table {tmp_path / 'cpu.json'} is unreadable" in err
