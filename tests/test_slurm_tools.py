"""The sweep tooling without a cluster: sweep files, task splitting, the sbatch lines, the merge verdicts.

tests/test_slurm.py runs the same scripts on a real Slurm cluster.
"""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import merge, submit
from slurm.jobs import SlurmOptions
from slurm.sweep import Sweep, collect, read_sweep, split, write_sweep
from tests.benchmark_json import bench, write

ODD_IDS = ["benchmarks/test_prefill.py::test_prefill[a b]", "benchmarks/x.py::t[it's \"quoted\" $HOME `x`]", "benchmarks/y.py::t[*]"]


@pytest.mark.parametrize("count, tasks", [(10, 5), (10, 3), (7, 7), (1393, 8), (5, 1)])
def test_split_is_contiguous_and_balanced(count, tasks):
    ids = [f"id{i}" for i in range(count)]
    chunks = split(ids, tasks)
    assert len(chunks) == tasks and [i for chunk in chunks for i in chunk] == ids
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


@pytest.mark.parametrize("tasks, message", [(0, "at least 1"), (4, "at most 3")])
def test_split_refuses_bad_task_counts(tasks, message):
    with pytest.raises(ValueError, match=f"--tasks: .*{message}"):
        split(["a", "b", "c"], tasks)


def test_sweep_file_round_trips_through_python_and_bash(tmp_path):
    sweep = Sweep("gpu", ["--preset=qwen3-8b", "-k", "decode and not b1"], [ODD_IDS[:2], ODD_IDS[2:]])
    path = tmp_path / "sweep.txt"
    write_sweep(path, sweep, "test")
    assert read_sweep(path) == sweep
    # The array script unquotes the same lines with bash's eval; each word must come back whole.
    script = 'eval "common=( $(sed -n "s/^# pytest-args: //p" "$1") )"; eval "ids=( $(grep -v "^#" "$1" | sed -n 1p) )"; printf "%s\\n" "${common[@]}" "${ids[@]}"'
    out = subprocess.run(["bash", "-c", script, "bash", path], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == sweep.pytest_args + ODD_IDS[:2]


@pytest.mark.parametrize("text, message", [("hello\n", "not a sweep file"), ("# minivllm-sweep 1\n# grid: gpu\n# pytest-args: \n", "no tasks"), ("# minivllm-sweep 1\nx\n", "header lacks")])
def test_read_sweep_names_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "s.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_sweep(path)


def test_collect_lists_the_gpu_grid_from_a_cpu_machine():
    ids = collect(["--preset=qwen3-8b", "--dtype=bf16", "-k", "prefill and flash_triton"], "gpu")
    # Seven seqlens (128, the naive kernel's limit, then 512..16k), causal and not.
    assert len(ids) == 14 and all("qwen3-8b-tp1-bf16" in i and i.endswith("flash_triton]") for i in ids)
    assert any("-16384-causal-" in i for i in ids)


@pytest.mark.parametrize("args, message", [(["--preset=nope"], "--preset: unknown"), (["-k", "no_such_benchmark"], "no benchmarks selected")])
def test_collect_refuses_what_pytest_refuses(args, message):
    with pytest.raises(ValueError, match=message):
        collect(args, "cpu")


@pytest.mark.parametrize("kwargs", [dict(gpus_per_task=-1), dict(cpus_per_task=0), dict(throttle=0)])
def test_slurm_options_refuse_bad_values(kwargs):
    with pytest.raises(ValueError, match="--" + next(iter(kwargs)).replace("_", "-")):
        SlurmOptions(**kwargs)


def spy_replace(monkeypatch) -> list[Path]:
    """Record the target of every os.replace from now on: each file a tool writes atomically."""
    replaced, real = [], os.replace

    def spy(src, dst):
        real(src, dst)
        replaced.append(Path(dst))

    monkeypatch.setattr(os, "replace", spy)
    return replaced


def fake_sbatch(bin_dir: Path, log: Path) -> None:
    """An `sbatch` that records its arguments and answers --parsable with job ids 101, 102, ..."""
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> {log}\necho $((100 + $(wc -l < {log})))";cluster1"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_dry_run_prints_shell_that_chains_the_merge_to_the_array(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("gpu", [], [["a"], ["b"], ["c"], ["d"], ["e"]]), "test")
    baseline = write(tmp_path / "base.json", [bench("prefill", "flash_triton", 1e-3)])
    argv = [f"--sweep={sweep}", "--throttle=2", "-p", "gb200", "-t", "01:00:00", "--exclusive", f"--out={tmp_path / 'r s'}", f"--baseline={baseline}",
            "--history=sqlite:///rel/h.db", "--dry-run"]
    assert submit.main(argv) == 0
    script = capsys.readouterr().out.split("\n", 1)[1]
    mkdir_line, array_line, merge_line = script.strip().splitlines()
    assert mkdir_line == f"mkdir -p '{tmp_path}/r s/logs'"  # Slurm does not create its log directory
    for flag in ("--array=0-4%2", "--partition=gb200", "--time=01:00:00", "--exclusive", "--gpus-per-task=1", f"MINIVLLM_PYTHON={sys.executable}"):
        assert flag in array_line
    assert "--account" not in array_line and "--qos" not in array_line  # unset: sbatch's environment decides
    # Run the printed shell with a fake sbatch: the merge must wait on the id the array got.
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake_sbatch(bin_dir, log)
    subprocess.run(["bash", "-ec", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "bench_array.sbatch" in calls[0] and (tmp_path / "r s" / "logs").is_dir()
    assert "--dependency=afterany:101 " in calls[1] and f"--output={tmp_path}/r s/logs/101_merge.out" in calls[1]
    # The history's relative path is made absolute: the merge job does not start where submit ran.
    assert calls[1].endswith(f"merge.sbatch {sweep} {tmp_path}/r s 101 --baseline={baseline} --history=sqlite:///{Path.cwd()}/rel/h.db")


def test_dry_run_writes_nothing_and_prints_the_sweep_it_would_write(tmp_path, capsys):
    """The printed shell, run, writes the very sweep a real submission would; the dry run itself writes no file."""
    out = tmp_path / "out"
    selection = ["--preset=tiny", "-k", "flash_triton"]
    assert submit.main(["--grid=cpu", *selection, f"--out={out}", "--dry-run"]) == 0
    assert not out.exists()
    header, script = capsys.readouterr().out.split("\n", 1)
    assert "dry run: not written" in header
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake_sbatch(bin_dir, log)
    subprocess.run(["bash", "-ec", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True)
    (sweep_path,) = (out / "sweeps").glob("*.txt")
    assert [i for row in read_sweep(sweep_path).tasks for i in row] == collect(selection, "cpu")
    assert str(sweep_path) in log.read_text().splitlines()[0] and (out / "logs").is_dir()


@pytest.mark.parametrize("time", ["60", "5:30", "01:00:00", "2-12", "2-12:30", "2-12:30:00", "UNLIMITED", "infinite"])
def test_slurm_options_take_slurms_time_formats(time):
    assert SlurmOptions(time=time, merge_time=time).time == time


@pytest.mark.parametrize("flag, time", [("--time", "banana"), ("--time", "1:2:3:4"), ("--time", "1h"), ("--merge-time", "-5"), ("--merge-time", "")])
def test_slurm_options_refuse_other_times(flag, time):
    with pytest.raises(ValueError, match=f"{flag}: expected a Slurm time limit .* got '{time}'"):
        SlurmOptions(**{flag.lstrip("-").replace("-", "_"): time})


@pytest.mark.parametrize(
    "option, message",
    [
        ("--time=banana", "--time: expected a Slurm time limit"),
        ("--merge-time=soon", "--merge-time: expected a Slurm time limit"),
        ("--compare=--threshold abc", "--compare: benchmarks.compare refuses '--threshold abc': argument --threshold: invalid threshold 'abc'"),
        ("--compare=--field max", "--compare: .*invalid choice: 'max'"),
        ("--compare=--no-such-option", "--compare: .*unrecognized arguments: --no-such-option"),
        ("--compare=--impl 'flash", "--compare: cannot split"),
        ("--compare=--help", "--compare: '--help' asks benchmarks.compare for help"),
    ],
)
def test_submit_refuses_bad_options_before_writing_anything(tmp_path, capsys, monkeypatch, option, message):
    """Refused before the sweep is collected or written, with or without --dry-run; no sbatch on PATH
    guards against a submission should the check be missing."""
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "out"
    for dry_run in ([], ["--dry-run"]):
        with pytest.raises(SystemExit) as exc:
            submit.main(["--grid=cpu", "--preset=tiny", "-k", "flash_triton", f"--out={out}", option, *dry_run])
        assert exc.value.code == 2 and re.search(message, capsys.readouterr().err)
        assert not out.exists()


PATH_CASES = {
    "out is a file": (lambda d: [f"--out={d / 'file'}"], "argument --out: {d}/file is not a directory"),
    "out under a file": (lambda d: [f"--out={d / 'file' / 'r'}"], "argument --out: {d}/file is not a directory, so {d}/file/r cannot be created"),
    "history is a directory": (lambda d: [f"--history={d}"], "--history: {d}: a directory, not a history database"),
    "history is not one": (lambda d: [f"--history=sqlite:///{d / 'file'}"], "--history: {d}/file: damaged or not an SQLite database"),
    "history under a file": (lambda d: [f"--history={d / 'file' / 'h.db'}"], "--history: {d}/file/h.db: {d}/file is not a directory"),
    "baseline missing": (lambda d: [f"--baseline={d / 'nope.json'}"], "--baseline: {d}/nope.json: cannot read JSON"),
    "baseline not a run": (lambda d: [f"--baseline={d / 'file'}"], "--baseline: {d}/file: cannot read JSON"),
    "baseline zero median": (lambda d: [f"--baseline={d / 'zero.json'}"], "--baseline: {d}/zero.json: benchmark .* has no positive stats.median"),
    "baseline field": (lambda d: [f"--baseline={d / 'nomin.json'}", "--compare=--field min"], "--baseline: {d}/nomin.json: benchmark .* has no positive stats.min"),
    "sweep missing": (lambda d: [f"--sweep={d / 'nope.txt'}"], "sweep {d}/nope.txt: cannot read"),
    "tune out is a file": (lambda d: ["--tune", f"--out={d / 'file'}"], "argument --out: {d}/file is not a directory"),
}


@pytest.mark.parametrize("case", PATH_CASES)
def test_submit_checks_every_path_before_writing_or_submitting(tmp_path, capsys, monkeypatch, case):
    """Every path option, with or without --dry-run, is checked before anything is collected,
    written or submitted: a --history that is a directory used to fail only in the merge job,
    after the whole array had run; an --out that is a file, as a raw traceback (or, in a dry
    run, as a printed mkdir that would fail)."""
    (tmp_path / "file").write_text("not a directory, a database or a run")
    zero, nomin = bench("prefill", "flash_triton", 1e-3), bench("prefill", "flash_triton", 1e-3)
    zero["stats"]["median"] = 0.0
    del nomin["stats"]["min"]
    write(tmp_path / "zero.json", [zero])
    write(tmp_path / "nomin.json", [nomin])
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("cpu", [], [["a"]]), "test")
    options, message = PATH_CASES[case]
    argv = options(tmp_path)
    if not any(o.startswith(("--sweep", "--tune")) for o in argv):
        argv.append(f"--sweep={sweep}")
    if not any(o.startswith("--out") for o in argv):
        argv.append(f"--out={tmp_path / 'out'}")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: a check that is missing shows as exit 1, not 2
    before = sorted(tmp_path.rglob("*"))
    for dry_run in ([], ["--dry-run"]):
        with pytest.raises(SystemExit) as exc:
            submit.main([*argv, *dry_run])
        assert exc.value.code == 2 and re.search(message.format(d=tmp_path), capsys.readouterr().err)
        assert sorted(tmp_path.rglob("*")) == before


def test_sweep_output_naming_a_directory_is_refused_before_collecting(tmp_path, capsys):
    from slurm import sweep

    with pytest.raises(SystemExit) as exc:
        sweep.main(["--grid=cpu", "-o", str(tmp_path)])
    assert exc.value.code == 2 and f"argument -o/--output: {tmp_path} is a directory, not a file" in capsys.readouterr().err


def test_submit_passes_good_compare_options_to_the_merge_job(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("cpu", [], [["a"]]), "test")
    assert submit.main([f"--sweep={sweep}", "--compare=--threshold 5% --impl flash_triton --allow-missing", "--dry-run"]) == 0
    assert "'--compare=--threshold 5% --impl flash_triton --allow-missing'" in capsys.readouterr().out


def test_submit_refuses_sweep_options_beside_a_sweep_file(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("cpu", [], [["a"]]), "test")
    with pytest.raises(SystemExit) as exc:
        submit.main([f"--sweep={sweep}", "--tasks=4"])
    assert exc.value.code == 2 and "drop ['--tasks']" in capsys.readouterr().err


def test_submit_reports_what_sbatch_says(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("cpu", [], [["a"]]), "test")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert submit.main([f"--sweep={sweep}", f"--out={tmp_path}"]) == 1
    assert "sbatch not found" in capsys.readouterr().err


# --- merge: each task's files as bench_array.sbatch leaves them ---

IMPLS = ("flash_triton", "sdpa_cudnn", "sdpa_flash")


def task_row(task: int) -> list[dict]:
    return [bench("prefill", impl, 1e-3, size=512 << task) for impl in IMPLS]


def junit(benches: list[dict], outcome: dict[str, str], host: str) -> str:
    cases = []
    for b in benches:
        module, name = b["fullname"].split("::")
        child = {"passed": "", "failed": "<failure/>", "skipped": "<skipped/>"}[outcome.get(b["fullname"], "passed")]
        cases.append(f'<testcase classname="{module[:-3].replace("/", ".")}" name="{name}">{child}</testcase>')
    return f'<testsuites><testsuite hostname="{host}">{"".join(cases)}</testsuite></testsuites>'


def finished(results: Path, task: int, code: int, benches: list[dict], host: str = "n1", outcome: dict | None = None, **machine) -> None:
    outcome = outcome or {}
    timed = [b for b in benches if outcome.get(b["fullname"], "passed") == "passed"]
    write(results / f"{task}.json", timed, node=host, **machine)
    (results / f"{task}.xml").write_text(junit(benches, outcome, host))
    (results / f"{task}.exit").write_text(f"{code}\n")


def merge_run(tmp_path: Path, rows: list[list[dict]], *extra: str) -> tuple[int, str, dict]:
    sweep = tmp_path / "sweep.txt"
    write_sweep(sweep, Sweep("gpu", ["--preset=qwen3-8b"], [[b["fullname"] for b in row] for row in rows]), "test")
    code = merge.main([str(sweep), str(tmp_path), "77", *extra])
    return code, (tmp_path / "77" / "report.md").read_text(), json.loads((tmp_path / "77" / "merged.json").read_text())


def test_merge_of_a_clean_sweep_exits_0(tmp_path, monkeypatch):
    replaced = spy_replace(monkeypatch)
    rows = [task_row(t) for t in range(3)]
    results = tmp_path / "77"
    results.mkdir()
    for t, row in enumerate(rows):
        finished(results, t, 0, row, host=f"n{t}", copy_gbps=3000.0 + t, read_gbps=4000.0 - t)
    code, report, merged = merge_run(tmp_path, rows)
    assert code == 0 and "3 tasks (3 ok), 9 benchmark results" in report and "all tasks ok" in report
    assert merged["slurm"]["not_ok_tasks"] == [] and len(merged["benchmarks"]) == 9
    assert merged["machine_info"]["copy_gbps"] == 3001.0  # the median of the tasks' ceilings
    assert merged["machine_info"]["read_gbps"] == 3999.0
    assert merged["machine_info"]["node"] == "mixed: n0 | n1 | n2" and merged["machine_info"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert {b["extra_info"]["node"] for b in merged["benchmarks"]} == {"n0", "n1", "n2"}
    assert "## prefill" in report and f"plots in {results / 'plots'}: 1" in report and len(list((results / "plots").glob("*.png"))) == 1
    # Every file the merge wrote was renamed into place whole (and the sweep file before it).
    assert sorted(replaced) == sorted([tmp_path / "sweep.txt", results / "merged.json", results / "report.md", *(results / "plots").glob("*.png")])


def test_merge_names_every_task_that_went_wrong(tmp_path):
    rows = [task_row(t) for t in range(6)]
    results, logs = tmp_path / "77", tmp_path / "logs"
    results.mkdir()
    logs.mkdir()
    finished(results, 0, 0, rows[0], outcome={rows[0][2]["fullname"]: "skipped"})
    finished(results, 1, 1, rows[1], outcome={rows[1][1]["fullname"]: "failed"})
    (logs / "77_1.out").write_text("E   AssertionError: sdpa_cudnn off by 3 ulp\n= 1 failed, 2 passed =\n")
    (logs / "77_2.out").write_text("task 2 of array 77 on n1\nslurmstepd: error: *** JOB 79 ON n1 CANCELLED AT 2026-11-27 DUE TO TIME LIMIT ***\n")
    # task 3: nothing at all, as after scancel of a pending task
    finished(results, 4, 0, rows[4] + [bench("decode", "triton_paged", 1e-4)])  # a result from outside its row
    finished(results, 5, 0, rows[5])
    (results / "5.json").write_text("{truncated")
    code, report, merged = merge_run(tmp_path, rows)
    assert code == 1 and "NOT OK: tasks 1, 2, 3, 4, 5" in report
    assert merged["slurm"]["not_ok_tasks"] == [1, 2, 3, 4, 5]
    status = {t["task"]: (t["status"], t["detail"]) for t in merged["slurm"]["tasks"]}
    assert status[0] == ("ok", "")
    assert status[1][0] == "failed" and "pytest exit 1" in status[1][1] and "sdpa_cudnn" in status[1][1] and "1 failed, 2 passed" in status[1][1]
    assert status[2][0] == "unfinished" and "DUE TO TIME LIMIT" in status[2][1]
    assert status[3][0] == "never ran"
    assert status[4][0] == "failed" and "1 results from outside its row, dropped" in status[4][1]
    assert status[5][0] == "failed" and "no readable 5.json" in status[5][1]
    # Kept: task 0's two timed results, task 1's two that passed, task 4's three from its row.
    assert sorted(b["extra_info"]["slurm_task"] for b in merged["benchmarks"]) == [0, 0, 1, 1, 4, 4, 4]


def test_merge_of_an_all_skipped_task_is_ok(tmp_path):
    rows = [task_row(0)]
    results = tmp_path / "77"
    results.mkdir()
    finished(results, 0, 0, rows[0], outcome={b["fullname"]: "skipped" for b in rows[0]})
    (results / "0.json").unlink()  # pytest-benchmark writes none when it timed nothing
    code, report, _ = merge_run(tmp_path, rows)
    assert code == 0 and "3 skipped" in report and "No task produced benchmark results" in report


@pytest.mark.parametrize("scale, expected", [(1.0, 0), (1.5, 1)])
def test_merge_exit_follows_the_comparison_with_the_baseline(tmp_path, scale, expected):
    rows = [task_row(0)]
    results = tmp_path / "77"
    results.mkdir()
    finished(results, 0, 0, rows[0])
    baseline = write(tmp_path / "base.json", [bench("prefill", impl, 1e-3 / scale, size=512) for impl in IMPLS])
    code, report, _ = merge_run(tmp_path, rows, f"--baseline={baseline}", "--compare=--threshold 20%")
    assert code == expected and f"(benchmarks.compare exit {expected})" in report


def test_merge_adds_the_run_to_the_history_and_fails_a_slowdown(tmp_path):
    """Two sweeps' merges into one history: the first has nothing to compare with; the second,
    3x slower on the same GPU, fails against it."""
    db = tmp_path / "history.db"
    for array_id, scale, expected in (("77", 1.0, 0), ("78", 3.0, 1)):
        rows = [task_row(0)]
        results = tmp_path / array_id
        results.mkdir()
        for b in rows[0]:
            b["stats"]["median"] *= scale
        finished(results, 0, 0, rows[0])
        sweep = tmp_path / "sweep.txt"
        write_sweep(sweep, Sweep("gpu", ["--preset=qwen3-8b"], [[b["fullname"] for b in row] for row in rows]), "test")
        code = merge.main([str(sweep), str(tmp_path), array_id, f"--history={db}"])
        report = (results / "report.md").read_text()
        assert code == expected and f"## History {db} (add exit 0, check exit {expected})" in report
    assert "FAIL: 3 benchmark(s) slower than their history's band" in report


def tuning_table(gpu: str, kernel: str) -> dict:
    entry = {"kernel": kernel, "dtype": "bfloat16", "head_dim": 128, "page": 16, "bucket": [64, 2048, 4], "config": {"tile": [64, 64, 4, 3]}, "run": 0}
    return {"provenance": {"gpu": gpu}, "runs": [{"gpu": gpu, "tool": "python -m benchmarks.tune"}], "entries": [entry]}


def test_tune_merge_refuses_tables_of_two_gpu_models_and_names_missing_tasks(tmp_path, capsys):
    from slurm import tune_merge

    results = tmp_path / "9"
    for task, (gpu, kernel) in enumerate((("NVIDIA GB200", "decode"), ("NVIDIA H200", "prefill"))):
        (results / "tables" / str(task)).mkdir(parents=True)
        (results / "tables" / str(task) / "nvidia-gb200.json").write_text(json.dumps(tuning_table(gpu, kernel)))
        (results / f"{task}.exit").write_text("0\n")
    assert tune_merge.main([str(tmp_path), "9", "2"]) == 2
    assert "different GPU models (NVIDIA GB200, NVIDIA H200)" in capsys.readouterr().err
    assert not (results / "nvidia-gb200.json").exists()
    (results / "tables" / "1" / "nvidia-gb200.json").write_text(json.dumps(tuning_table("NVIDIA GB200", "prefill")))
    (results / "2.exit").unlink(missing_ok=True)
    assert tune_merge.main([str(tmp_path), "9", "3"]) == 1  # task 2 never ran
    out = capsys.readouterr().out
    assert "task 2: unfinished or never ran" in out and "NOT OK: tasks 2" in out
    merged = json.loads((results / "nvidia-gb200.json").read_text())
    assert [(e["kernel"], e["run"]) for e in merged["entries"]] == [("decode", 0), ("prefill", 1)] and len(merged["runs"]) == 2


@pytest.mark.parametrize("damage", ['{"provenance": {"gpu": "NVIDIA GB200"}, "runs": [{"gp', '{"provenance": {"gpu": "NVIDIA GB200"}, "entries": []}'], ids=["truncated", "no runs"])
def test_tune_merge_skips_an_unreadable_table_and_merges_the_others(tmp_path, capsys, monkeypatch, damage):
    """A task killed mid-write (or a table missing a key) costs that task's buckets only: the other
    tables are merged, the bad one is named, and the task counts as not ok (exit 1)."""
    from slurm import tune_merge

    results = tmp_path / "9"
    for task, kernel in enumerate(("decode", "prefill", "decode")):
        (results / "tables" / str(task)).mkdir(parents=True)
        table = tuning_table("NVIDIA GB200", kernel)
        table["entries"][0]["bucket"] = [64, 1024 << task, 4]
        (results / "tables" / str(task) / "nvidia-gb200.json").write_text(json.dumps(table))
        (results / f"{task}.exit").write_text("0\n")
    bad = results / "tables" / "1" / "nvidia-gb200.json"
    bad.write_text(damage)
    replaced = spy_replace(monkeypatch)
    assert tune_merge.main([str(tmp_path), "9", "3"]) == 1
    out, err = capsys.readouterr()
    assert f"warning: skipped tuning table {bad}" in err and "task 1: ok, but its table is unreadable: skipped" in out and "NOT OK: tasks 1" in out
    merged = json.loads((results / "nvidia-gb200.json").read_text())
    assert [(e["bucket"], e["run"]) for e in merged["entries"]] == [([64, 1024, 4], 0), ([64, 4096, 4], 1)] and len(merged["runs"]) == 2
    assert results / "nvidia-gb200.json" in replaced  # written atomically


def test_submit_tune_prints_the_array_and_its_merge(tmp_path, capsys):
    assert submit.main(["--tune", "--tasks=3", "--kernel=decode", "-p", "gb200", f"--out={tmp_path}", "--dry-run", "--", "--budget-s=300"]) == 0
    out = capsys.readouterr().out
    assert "--array=0-2%3" in out and "--gpus-per-task=1" in out and "tune_array.sbatch" in out and "--kernel=decode --budget-s=300" in out
    assert 'tune_merge.sbatch' in out and '"${ARRAY_JOB_ID}" 3' in out
    with pytest.raises(SystemExit):
        submit.main(["--tune", "--preset=qwen3-8b", "--dry-run"])
    assert "belong to benchmark sweeps" in capsys.readouterr().err
