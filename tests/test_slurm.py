"""The sweep scripts on a real single-node Slurm cluster, started by slurm/local_cluster.sh.

Real sbatch, array tasks, dependencies and squeue; CPU smoke sweeps in the Triton interpreter.
Needs root and Debian's slurmctld, slurmd, slurm-client and munge. Without them the tests skip
and say why, except under CI (CI set), where a cluster that cannot start fails the run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.results import load, partial_info
from minivllm.kernels.skinny_linear import FORMS
from slurm.merge import read_junit
from slurm.sweep import Sweep, collect, read_sweep, write_sweep

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
WAIT_S = 600  # generous: a 5-task CPU sweep takes about 30 s on 2 cores
BROKEN_ID = "benchmarks/test_prefill.py::test_prefill[no-such-shape]"
GPUS = 4  # the local node's stand-in GPUs, as on a GB200 node


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their submitting user)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install -y slurmctld slurmd slurm-client munge"
    return None


def cannot_run(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Slurm tests, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """An environment whose SLURM_CONF points at a freshly started local cluster of one node with
    GPUS stand-in GPUs, stopped afterwards by pid."""
    reason = unavailable()
    if reason:
        cannot_run(reason)
    state = tmp_path_factory.mktemp("slurm")
    try:
        start = subprocess.run([CLUSTER, "start", state, str(GPUS)], capture_output=True, text=True, timeout=120)
        if start.returncode != 0:
            cannot_run(f"slurm/local_cluster.sh start failed (exit {start.returncode}): {start.stderr.strip()}")
        yield {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        subprocess.run([CLUSTER, "stop", state], capture_output=True, timeout=120)
        for name in ("slurmctld.pid", "slurmd.pid", "munged.pid"):
            assert not (state / name).exists(), f"local_cluster.sh stop left {name} behind"


def run(cmd: list, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def submit(env: dict, *args) -> tuple[str, str]:
    """python -m slurm.submit ARGS on the local cluster: (array job id, merge job id)."""
    out = run([sys.executable, "-m", "slurm.submit", "--gpus-per-task=0", *args], env).stdout
    array, merge = re.search(r"^array\s+job (\d+)", out, re.M), re.search(r"^merge\s+job (\d+)", out, re.M)
    assert array and merge, out
    return array.group(1), merge.group(1)


def wait(env: dict, *job_ids: str) -> None:
    """Poll squeue until none of the jobs (array tasks included) is pending or running."""
    deadline = time.monotonic() + WAIT_S
    while run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], env, check=False).stdout.strip():
        if time.monotonic() > deadline:
            jobs = run(["scontrol", "show", "job"], env, check=False).stdout
            pytest.fail(f"jobs {job_ids} still queued after {WAIT_S} s:\n{jobs}")
        time.sleep(0.5)


def exit_code(env: dict, job_id: str) -> int:
    """The finished job's exit status, from slurmctld's memory of it (kept MinJobAge, 300 s by default)."""
    shown = run(["scontrol", "show", "job", "-o", job_id], env).stdout
    return int(re.search(r"\bExitCode=(\d+):", shown).group(1))


def check_task(results: Path, task: int, row: list[str]) -> None:
    """Task `task` ran exactly its row: each benchmark passed or was skipped (the GPU-only SDPA
    peers), and its JSON holds a timed result for each one that passed, and nothing else."""
    outcomes, _ = read_junit(results / f"{task}.xml")
    assert sorted(outcomes) == sorted(row) and set(outcomes.values()) <= {"passed", "skipped"}, outcomes
    passed = sorted(i for i, o in outcomes.items() if o == "passed")
    if not passed:  # pytest-benchmark writes no JSON when it timed nothing
        assert not (results / f"{task}.json").exists()
        return
    data = json.loads((results / f"{task}.json").read_text())
    assert sorted(b["fullname"] for b in data["benchmarks"]) == passed
    for bench in data["benchmarks"]:
        assert bench["stats"]["median"] > 0 and bench["extra_info"]["impl"] in bench["fullname"]
    assert data["machine_info"]["interpreter"] is True


def test_sweep_array_and_merge_report_every_task(slurm_env, tmp_path):
    """A good 5-task sweep merges with exit 0. The same sweep with task 2 broken and task 4
    cancelled merges with exit 1, names both tasks, and keeps the other tasks' results."""
    good_out = tmp_path / "good"
    array, merge = submit(slurm_env, "--grid=cpu", "--tasks=5", "--throttle=2", f"--out={good_out}")
    wait(slurm_env, array, merge)
    sweep_path = next((good_out / "sweeps").glob("*.txt"))
    sweep = read_sweep(sweep_path)
    assert len(sweep.tasks) == 5 and [i for row in sweep.tasks for i in row] == collect([], "cpu")
    results = good_out / array
    for task, row in enumerate(sweep.tasks):
        assert (results / f"{task}.exit").read_text().strip() == "0"
        check_task(results, task, row)
        log = (good_out / "logs" / f"{array}_{task}.out").read_text()
        assert f"task {task} of array {array}" in log and f"/minivllm-triton-{array}_{task}, started " in log
    merged = json.loads((results / "merged.json").read_text())
    assert merged["slurm"]["not_ok_tasks"] == []
    timed = [task for task in range(5) for outcome in read_junit(results / f"{task}.xml")[0].values() if outcome == "passed"]
    assert sorted(b["extra_info"]["slurm_task"] for b in merged["benchmarks"]) == timed
    report = (results / "report.md").read_text()
    assert f"5 tasks (5 ok), {len(timed)} benchmark results" in report and "all tasks ok" in report
    assert "## prefill" in report and "## decode" in report and "flash_triton" in report and "triton_paged" in report
    assert all(list((results / "plots").glob(f"{suite}_*.png")) for suite in ("prefill", "prefix", "decode"))
    assert exit_code(slurm_env, merge) == 0

    # Task 2 names a benchmark the suites no longer have, as when the code changed under a sweep.
    broken = tmp_path / "broken.txt"
    write_sweep(broken, Sweep(sweep.grid, sweep.pytest_args, [*sweep.tasks[:2], [BROKEN_ID], *sweep.tasks[3:]]), "test: task 2 broken")
    bad_out = tmp_path / "bad"
    baseline = results / "merged.json"
    array, merge = submit(slurm_env, f"--sweep={broken}", "--throttle=2", f"--out={bad_out}", f"--baseline={baseline}", "--compare=--allow-missing")
    # With two tasks at a time, task 4 is still pending here; cancelled, it never runs.
    run(["scancel", f"{array}_4"], slurm_env)
    wait(slurm_env, array, merge)
    results = bad_out / array
    assert (results / "2.exit").read_text().strip() == "4"  # pytest's usage error: node id not found
    assert not (results / "4.exit").exists()
    for task in (0, 1, 3):
        check_task(results, task, sweep.tasks[task])
    merged = json.loads((results / "merged.json").read_text())
    assert merged["slurm"]["not_ok_tasks"] == [2, 4]
    assert sorted({b["extra_info"]["slurm_task"] for b in merged["benchmarks"]}) == sorted(set(timed) & {0, 1, 3})
    report = (results / "report.md").read_text()
    assert "NOT OK: tasks 2, 4" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if re.match(r"\|\s+\d+ \|", line)}
    assert "FAILED" in rows["2"] and "pytest exit 4" in rows["2"] and "not found" in rows["2"]
    assert "NEVER RAN" in rows["4"]
    # Interpreter timings of concurrent CPU tasks swing by orders of magnitude, so only that the
    # comparison ran is checked here; test_slurm_tools checks that its verdict sets the exit status.
    assert re.search(rf"## Against {re.escape(str(baseline))} \(benchmarks.compare exit [01]\)", report) and "new/base" in report
    assert exit_code(slurm_env, merge) == 1


def test_gpu_sweep_on_a_node_without_gpus_fails_loudly(slurm_env, tmp_path):
    array, merge = submit(slurm_env, "--grid=gpu", "--preset=tiny", "-k", "flash_triton and 512-full", f"--out={tmp_path}")
    wait(slurm_env, array, merge)
    assert (tmp_path / array / "0.exit").read_text().strip() == "3"
    report = (tmp_path / array / "report.md").read_text()
    assert "FAILED" in report and "sees no CUDA GPU" in report and "No task produced benchmark results" in report
    assert exit_code(slurm_env, merge) == 1


def test_torchrun_template_runs_a_two_rank_job(slurm_env, tmp_path):
    env = {**slurm_env, "NPROC_PER_NODE": "2", "MINIVLLM_PYTHON": sys.executable}
    job = run(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", "slurm/torchrun.sbatch", "slurm/distributed_check.py"], env).stdout.strip()
    wait(slurm_env, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert "rank 0/2" in log and "rank 1/2" in log and "distributed check: ok, 2 ranks, gloo all-reduce adds up" in log, log
    assert exit_code(slurm_env, job) == 0


def test_srun_template_runs_the_engine_on_two_ranks(slurm_env, tmp_path):
    """srun's tasks become torch.distributed ranks; main.py shards the demo model over both."""
    env = {**slurm_env, "MINIVLLM_PYTHON": sys.executable}
    cmd = ["sbatch", "--parsable", "--ntasks=2", f"--output={tmp_path}/%j.out", "slurm/srun_ranks.sbatch", "main.py", "--device", "cpu", "--max-tokens", "4", "Hello"]
    job = run(cmd, env).stdout.strip()
    wait(slurm_env, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert "2 ranks on 1 node(s)" in log and log.count("Completion:") == 1 and "tensor parallel 2" in log, log
    assert exit_code(slurm_env, job) == 0


def test_partition_from_sbatch_environment_reaches_the_cluster(slurm_env, tmp_path):
    """No partition is chosen by the tools: SBATCH_PARTITION decides, and sbatch's refusal reaches the user."""
    env = {**slurm_env, "SBATCH_PARTITION": "no-such-partition"}
    proc = run([sys.executable, "-m", "slurm.submit", "--grid=cpu", "--preset=tiny", "-k", "flash_triton", "--gpus-per-task=0", f"--out={tmp_path}"], env, check=False)
    assert proc.returncode == 1 and "sbatch failed" in proc.stderr and "invalid partition" in proc.stderr.lower(), proc.stderr


def test_each_task_gets_its_own_gpu_and_no_more_than_four_run_at_once(slurm_env, tmp_path):
    """Six one-GPU tasks on a node of four GPUs (device nodes standing in for them): every task
    sees exactly one CUDA_VISIBLE_DEVICES entry, tasks running at the same time never share one,
    at most four run at once, and the others wait for a GPU and then run."""
    out = tmp_path / "gpus"
    array, merge = submit(slurm_env, "--grid=cpu", "--tasks=6", "--throttle=6", "--gpus-per-task=1", f"--out={out}")
    wait(slurm_env, array, merge)
    spans = []
    for task in range(6):
        log = (out / "logs" / f"{array}_{task}.out").read_text()
        found = re.search(r"CUDA_VISIBLE_DEVICES=([^,]*), TRITON_CACHE_DIR=.*, started ([\d.]+)", log)
        assert found, log
        assert found.group(1) in {str(i) for i in range(GPUS)}, f"task {task} sees CUDA_VISIBLE_DEVICES={found.group(1)!r}"
        assert (out / array / f"{task}.exit").read_text().strip() == "0"
        spans.append((float(found.group(2)), (out / array / f"{task}.exit").stat().st_mtime, found.group(1)))
    for start, _, _ in spans:
        running = [gpu for begin, end, gpu in spans if begin <= start < end]
        assert len(running) <= GPUS and len(set(running)) == len(running), f"at {start}: GPUs {running}"
    assert any(begin >= end for begin, _, _ in spans for _, end, _ in spans), "no task waited for a GPU"
    assert exit_code(slurm_env, merge) == 0


def test_a_tuning_array_merges_one_table_for_its_gpu(slurm_env, tmp_path):
    """submit --tune over two tasks: each tunes its share of the tuner's buckets (on the CPU, in
    the interpreter, with the tuner's tiny candidate sets), and the merge job writes one table
    holding both tasks' winners and both runs' provenance."""
    out = tmp_path / "tune"
    printed = run([sys.executable, "-m", "slurm.submit", "--tune", "--tasks=2", "--gpus-per-task=0", f"--out={out}"], slurm_env).stdout
    array, merge = (re.search(rf"^{word}\s+job (\d+)", printed, re.M).group(1) for word in ("array", "merge"))
    wait(slurm_env, array, merge)
    assert exit_code(slurm_env, merge) == 0, (out / "logs" / f"{array}_merge.out").read_text()
    table = json.loads((out / array / "cpu.json").read_text())
    assert sorted(e["kernel"] for e in table["entries"]) == sorted(["cascade", "decode", "prefill", *FORMS])
    assert {e["run"] for e in table["entries"]} == {0, 1} and len(table["runs"]) == 2
    assert all(r["tool"] == "python -m benchmarks.tune" and r["commit"] and r["gpu"] == table["provenance"]["gpu"] for r in table["runs"])


def test_a_task_cut_short_by_its_time_limit_is_merged_as_partial(slurm_env, tmp_path):
    """One task holding the whole CPU smoke grid (18 benchmarks, each held to about 8 s by
    --benchmark-max-time), with a one-minute limit and a 10 s warning signal. Slurm's SIGTERM (the
    warning, at 20-50 s since slurmctld checks every 30 s, or else the limit itself) reaches pytest,
    which stops after the benchmark in progress and writes its JSON marked partial. The merge keeps
    what the task measured and marks it PARTIAL, not lost, and exits 1."""
    out = tmp_path / "late"
    array, merge = submit(slurm_env, "--grid=cpu", "--tasks=1", "--time=1", "--sbatch-arg=--signal=TERM@10", f"--out={out}", "--", "--benchmark-max-time=8")
    wait(slurm_env, array, merge)
    results = out / array
    log = (out / "logs" / f"{array}_0.out").read_text()
    assert "SIGTERM: stopping after the test in progress" in log, log
    data = load(results / "0.json")  # the JSON, or the JSON-lines file had KillWait's SIGKILL come first
    partial = partial_info(data)
    assert partial and partial["reason"].startswith(("SIGTERM", "killed")), partial
    names = [b["fullname"] for b in data["benchmarks"]]
    assert 1 <= len(names) < len(collect(["--benchmark-max-time=8"], "cpu")) and all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    merged = json.loads((results / "merged.json").read_text())
    assert merged["slurm"]["partial_tasks"] == [0] and merged["slurm"]["not_ok_tasks"] == []
    assert merged["slurm"]["tasks"][0]["status"] == "partial" and merged["slurm"]["tasks"][0]["benchmarks"] == len(names)
    assert sorted(b["fullname"] for b in merged["benchmarks"]) == sorted(names)
    report = (results / "report.md").read_text()
    assert "PARTIAL: tasks 0 were cut short" in report and "!!! PARTIAL RUN (sweep tasks cut short: 0)" in report
    assert exit_code(slurm_env, merge) == 1
