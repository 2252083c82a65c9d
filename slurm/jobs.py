"""The sbatch command lines of a sweep: the benchmark array and the merge job that waits for it.

Partition, account, time limit and QOS are never chosen here. Each comes from the command line
when given there, else from sbatch's own environment variables (SBATCH_PARTITION,
SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_QOS), else from the cluster's defaults.
"""

import argparse
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.repo import REPO

SLURM_DIR = REPO / "slurm"
ARRAY_ID = "@ARRAY_JOB_ID@"  # stands for the array's job id until sbatch has given it
# sbatch's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit.
SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:unlimited|infinite)")
TIME_FORMATS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED"


def check_time(flag: str, value: str | None) -> None:
    """ValueError naming `flag` when `value` is not a Slurm time limit. Checked here, since sbatch
    would refuse it only after the sweep is written, or, for the merge job, after the array ran."""
    if value is not None and not SLURM_TIME.fullmatch(value):
        raise ValueError(f"{flag}: expected a Slurm time limit ({TIME_FORMATS}), got {value!r}")


@dataclass(frozen=True)
class SlurmOptions:
    """What a sweep asks of Slurm. None leaves a setting to sbatch's environment or the cluster."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None
    qos: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int | None = None
    exclusive: bool = False
    throttle: int | None = None  # array tasks running at once; None: all of them
    merge_time: str | None = None
    sbatch_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.gpus_per_task < 0:
            raise ValueError(f"--gpus-per-task: expected 0 (a CPU sweep) or more, got {self.gpus_per_task}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task: expected at least 1, got {self.cpus_per_task}")
        if self.throttle is not None and self.throttle < 1:
            raise ValueError(f"--throttle: expected at least 1 task at once, got {self.throttle}")
        check_time("--time", self.time)
        check_time("--merge-time", self.merge_time)


def _common(opts: SlurmOptions, time: str | None) -> list[str]:
    named = {"--partition": opts.partition, "--account": opts.account, "--time": time, "--qos": opts.qos}
    # MINIVLLM_PYTHON: the tasks run the Python (and so the virtualenv) the sweep was submitted from.
    return [f"{flag}={value}" for flag, value in named.items() if value] + [f"--chdir={REPO}", f"--export=ALL,MINIVLLM_PYTHON={sys.executable}"]


def _array(job_name: str, tasks: int, out: Path, opts: SlurmOptions, script: list[str]) -> list[str]:
    throttle = min(opts.throttle or tasks, tasks)
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--array=0-{tasks - 1}%{throttle}", "--ntasks=1"]
    cmd += [f"--output={out.resolve()}/logs/%A_%a.out", *_common(opts, opts.time)]
    if opts.gpus_per_task:
        cmd.append(f"--gpus-per-task={opts.gpus_per_task}")
    if opts.cpus_per_task:
        cmd.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.exclusive:
        cmd.append("--exclusive")
    return [*cmd, *opts.sbatch_args, *script]


def _after(job_name: str, out: Path, array_id: str, opts: SlurmOptions, script: list[str]) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--dependency=afterany:{array_id}", "--ntasks=1"]
    cmd += [f"--output={out.resolve()}/logs/{array_id}_merge.out", *_common(opts, opts.merge_time)]
    return [*cmd, *script]


def array_command(sweep: Path, tasks: int, out: Path, opts: SlurmOptions) -> list[str]:
    """sbatch for the benchmark array: task i runs row i of `sweep`, writing OUT/<array id>/i.json."""
    return _array("minivllm-bench", tasks, out, opts, [str(SLURM_DIR / "bench_array.sbatch"), str(sweep.resolve()), str(out.resolve())])


def merge_command(sweep: Path, out: Path, array_id: str, opts: SlurmOptions, merge_args: list[str]) -> list[str]:
    """sbatch for the merge job, which starts when every array task has ended, however it ended."""
    return _after("minivllm-merge", out, array_id, opts, [str(SLURM_DIR / "merge.sbatch"), str(sweep.resolve()), str(out.resolve()), array_id, *merge_args])


def tune_array_command(tasks: int, out: Path, opts: SlurmOptions, tune_args: list[str]) -> list[str]:
    """sbatch for a tuning array: task i of N tunes buckets i, i+N, ... (benchmarks.tune --part)."""
    return _array("minivllm-tune", tasks, out, opts, [str(SLURM_DIR / "tune_array.sbatch"), str(out.resolve()), *tune_args])


def tune_merge_command(out: Path, array_id: str, tasks: int, opts: SlurmOptions) -> list[str]:
    """sbatch for the job that merges a tuning array's tables once every task has ended."""
    return _after("minivllm-tune-merge", out, array_id, opts, [str(SLURM_DIR / "tune_merge.sbatch"), str(out.resolve()), array_id, str(tasks)])


def shell_script(array_cmd: list[str], merge_cmd: list[str]) -> str:
    """The two submissions as shell lines to paste: the second waits on the id the first prints."""
    first = f"ARRAY_JOB_ID=$({shlex.join(array_cmd)}) && ARRAY_JOB_ID=${{ARRAY_JOB_ID%%;*}}"
    second = " ".join('"${ARRAY_JOB_ID}"'.join(shlex.quote(part) if part else "" for part in arg.split(ARRAY_ID)) for arg in merge_cmd)
    return f"{first}\n{second}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Slurm options of `slurm.submit` and `slurm.sweep`."""
    group = parser.add_argument_group("Slurm (unset: sbatch's SBATCH_* environment, then the cluster's defaults)")
    group.add_argument("-p", "--partition")
    group.add_argument("-A", "--account")
    group.add_argument("-t", "--time", help=f"time limit of each array task, e.g. 01:00:00 ({TIME_FORMATS})")
    group.add_argument("-q", "--qos")
    group.add_argument("--gpus-per-task", type=int, default=1, help="GPUs per array task, bound by Slurm (CUDA_VISIBLE_DEVICES); 0 for a CPU sweep")
    group.add_argument("--cpus-per-task", type=int)
    group.add_argument("--exclusive", action="store_true", help="each array task gets whole nodes")
    group.add_argument("--throttle", type=int, help="at most this many array tasks at once (default: all)")
    group.add_argument("--merge-time", help="time limit of the merge job")
    group.add_argument("--sbatch-arg", action="append", default=[], help="one more sbatch option for the array, e.g. --sbatch-arg=--constraint=gb200")


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(
        args.partition, args.account, args.time, args.qos, args.gpus_per_task, args.cpus_per_task, args.exclusive, args.throttle, args.merge_time, tuple(args.sbatch_arg)
    )
