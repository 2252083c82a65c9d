"""Every kernel config the harness can pick compiles for Hopper (sm_90) and Blackwell (sm_100)
and fits its shared memory, checked on the CPU: Triton compiles for a target without its GPU.

The compiles run in subprocesses with the kernels imported compiled (this process interprets
them), one per target, side by side, each over a share of this machine's cores (`--jobs`).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.compiled import COMPILED, ROOT, run_python

TARGETS = ("sm_90", "sm_100")
# Compile processes per target: a GPU machine's 16 cores cut a cold check from over 300 s; CI's 2 keep one each.
JOBS = max(1, len(os.sched_getaffinity(0)) // (2 * len(TARGETS)))


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict[str, dict]:
    """{target: {"rows": [...], "out": printed summary, "code": exit status}} of
    `python -m benchmarks.compile_check --target T --json`, the targets compiled concurrently."""
    out = tmp_path_factory.mktemp("compile_check")
    procs = {t: subprocess.Popen([sys.executable, "-m", "benchmarks.compile_check", "--target", t, "--jobs", str(JOBS), "--json", str(out / f"{t}.json")],
                                 cwd=ROOT, env=COMPILED, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for t in TARGETS}
    results = {}
    for target, proc in procs.items():
        printed, _ = proc.communicate(timeout=3000)
        rows = json.loads((out / f"{target}.json").read_text()) if (out / f"{target}.json").is_file() else []
        results[target] = dict(rows=rows, out=printed, code=proc.returncode)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_every_config_the_harness_can_pick_compiles_and_fits(checked, target):
    res = checked[target]
    print(f"\n{res['out']}")
    assert res["code"] == 0, res["out"][-3000:]
    rows = res["rows"]
    assert {r["dtype"] for r in rows} == {"bf16", "fp16"} and {r["head_dim"] for r in rows} >= {128}
    assert {r["origin"] for r in rows} >= {"heuristic", "tuner"}
    kernels = {r["kernel"] for r in rows}
    assert kernels >= {"_flash_fwd", "_paged_decode", "_shared_prefix", "_merge_splits", "_rms_norm", "_qk_norm_rope", "_silu_and_mul", "_store_kv", "_gumbel_max", "_naive_attn"}
    assert all(r["ok"] and 0 <= r["shared"] <= r["limit"] == 227 * 1024 for r in rows)
    tables = {r["origin"] for r in rows if r["origin"].startswith("table")}
    # Hopper cards fall back to the committed H100 and H200 tables; no Blackwell table exists yet.
    assert tables == ({"table nvidia-h100-80gb-hbm3.json", "table nvidia-h200.json"} if target == "sm_90" else set())


@pytest.mark.slow
def test_each_target_gets_its_own_tensor_core_family(checked):
    """Hopper's warpgroup MMA never reaches Blackwell, whose prefill runs on tcgen05; both use TMA."""
    def families(target, kernel):
        return {f for r in checked[target]["rows"] if r["kernel"] == kernel for f in r["families"]}

    assert {"wgmma", "tma"} <= families("sm_90", "_flash_fwd") and "tcgen05" not in families("sm_90", "_flash_fwd")
    assert {"tcgen05", "tma"} <= families("sm_100", "_flash_fwd") and "wgmma" not in families("sm_100", "_flash_fwd")
    assert not {"wgmma"} & {f for r in checked["sm_100"]["rows"] for f in r["families"]}


@pytest.mark.slow
def test_a_too_large_candidate_is_dropped_with_its_reason(tmp_path):
    """A test-only prefill tile far past 227 KB of shared memory: the compile check refuses it,
    the tuner's filter drops it before timing, and the dry run lists it as dropped, each naming
    the kernel, the config, the bytes and the target."""
    res = run_python("""
        import benchmarks.tune as tune
        from benchmarks.compile_check import prefill_launch_plans
        from minivllm.kernels import compile_check as cc
        import torch

        HUGE = (256, 128, 8, 4)
        ((kernel, grid, kwargs),) = prefill_launch_plans("sm_90", torch.bfloat16, 128, 0, HUGE, True)
        result = cc.compile_for(cc.Launch.from_kwargs(kernel, (), kwargs), "sm_90")
        print("CHECK", result.fits, result.shared, result.verdict())
        (small,) = prefill_launch_plans("sm_90", torch.bfloat16, 128, 0, (64, 64, 4, 3), True)
        candidates = {"huge": ({}, lambda: kernel[grid](**kwargs)), "small": ({}, lambda: small[0][small[1]](**small[2]))}
        print("FILTER", sorted(tune.compile_filter(candidates, "sm_90")))
        real = tune.prefill_candidates
        tune.prefill_candidates = lambda on_gpu: real(on_gpu) + [(HUGE, True)]
        tune.main(["--dry-run", "--target", "sm_90", "--kernel", "prefill", "--dtype", "bf16", "--bucket", "page0 batch=16"])
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    check = next(line for line in res.stdout.splitlines() if line.startswith("CHECK"))
    assert check.startswith("CHECK False") and "_flash_fwd(" in check and "BLOCK_M=256" in check and "over sm_90's 232448 B per block" in check
    assert "FILTER ['huge']" in res.stdout
    dropped = [line for line in res.stdout.splitlines() if "dropped:" in line]
    buckets = [line for line in res.stdout.splitlines() if line.startswith("prefill bf16 d128 page0 batch=16")]
    assert buckets and len(dropped) == len(buckets), res.stdout  # the huge tile in each bucket, nothing else
    assert all("tile (256, 128, 8, 4) tma=True: dropped: _flash_fwd(" in line and "over sm_90's 232448 B per block" in line for line in dropped)
    assert f"{len(dropped)} candidates would be dropped" in res.stdout


@pytest.mark.slow
def test_a_config_that_cannot_compile_names_kernel_config_and_target(tmp_path):
    """A compiler refusal (here num_warps=3) comes back as one line naming what failed, not a traceback."""
    res = run_python("""
        import dataclasses, torch
        from benchmarks.compile_check import _prefill_launch
        from minivllm.kernels import compile_check as cc

        launch = dataclasses.replace(_prefill_launch("sm_100", torch.bfloat16, 128, 0, (64, 64, 4, 3), True), options=(("num_warps", 3),))
        print(cc.compile_for(launch, "sm_100").verdict())
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = res.stdout.strip().splitlines()
    assert line.startswith("_flash_fwd(") and "num_warps=3" in line and "does not compile for sm_100: " in line and "Traceback" not in line


def test_parts_split_the_distinct_compiles_and_cover_the_plan(tmp_path):
    """--jobs's parts: every planned row in exactly one part, and each distinct (launch, target)
    compiled by one part only."""
    res = run_python("""
        from collections import Counter
        from benchmarks.compile_check import plan, shard

        planned = plan(["sm_90", "sm_100"], ["bf16"])
        parts = [shard(planned, i, 3) for i in range(3)]
        owners = {}
        for i, part in enumerate(parts):
            for row in part:
                owners.setdefault((row[4], row[0]), set()).add(i)
        print("ROWS", len(planned), sum(map(len, parts)), sorted(map(len, parts)))
        print("COVERED", Counter(r for part in parts for r in part) == Counter(planned))
        print("ONE_OWNER", all(len(o) == 1 for o in owners.values()), len(owners))
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = next(line for line in res.stdout.splitlines() if line.startswith("ROWS")).split()
    assert rows[1] == rows[2] and int(rows[1]) > 100, res.stdout
    assert "COVERED True" in res.stdout and "ONE_OWNER True" in res.stdout, res.stdout


def test_unknown_targets_are_refused_by_name():
    for argv in (["-m", "benchmarks.compile_check", "--target", "sm_42"], ["-m", "benchmarks.tune", "--dry-run", "--target", "hopper"]):
        res = subprocess.run([sys.executable, *argv], cwd=ROOT, env=COMPILED, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "--target: target must be sm_ and a compute capability" in res.stderr, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--target", "sm_100"], cwd=ROOT, env=COMPILED, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--target goes with --dry-run" in res.stderr


def test_a_dry_run_under_the_interpreter_is_refused_by_name():
    """The interpreter compiles nothing, so a dry run there would list no launches: it is refused."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--dry-run", "--target", "sm_90"], cwd=ROOT, env=dict(COMPILED, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--dry-run compiles the kernels for a target" in res.stderr, res.stderr[-2000:]
