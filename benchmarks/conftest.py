"""Options, parametrization and machine_info for the benchmark suites.

`--preset` (repeatable, or `all`) and `--tp` pick the model shards; `--dtype` the element types.
The root conftest has already chosen the device and, without a GPU, set TRITON_INTERPRET, so
triton may be imported here; whether the kernels are interpreted is minivllm.interpreter.interpreting(),
the predicate the kernels themselves use.

A run cut short keeps what it measured, and prints its progress: benchmarks/run_guard.py.
"""

import pytest
import torch

from benchmarks.ceilings import ceilings, machine_facts
from benchmarks.grid import GPU_GRID
from benchmarks.presets import PRESETS, select
from benchmarks.run_guard import RunGuard
from benchmarks.timing import ColdRound
from minivllm.dtypes import SHORT_DTYPES
from minivllm.interpreter import interpreting

HAS_CUDA = torch.cuda.is_available()
INTERPRETER_NOTE = "Triton INTERPRETER timings on CPU: a smoke run of every implementation, NOT kernel performance"


def pytest_addoption(parser):
    group = parser.getgroup("minivllm benchmarks")
    group.addoption("--preset", action="append", default=[], help=f"model preset, repeatable: all, {', '.join(PRESETS)}")
    group.addoption("--tp", action="append", type=int, default=[], help="tensor-parallel degree to shard each preset by, repeatable (default 1)")
    group.addoption("--dtype", action="append", choices=sorted(SHORT_DTYPES), default=[], help="element type, repeatable (default bf16 and fp16 on the GPU grid, bf16 on the CPU grid)")
    group.addoption("--hf-batch", type=int, default=64, help="sequences per transformers generate() call in the engine suite (default 64)")
    group.addoption("--hf-peer", action="store_true", help="on a GPU, also run transformers' generate on the nano workload (about 2.5 min on an H100, "
                    "so the default run leaves it out; the CPU smoke run always has it)")
    group.addoption("--bench-progress", type=float, default=30.0, metavar="SECONDS", help="a progress line at most this often within a suite (default 30; 0: after every test); -q: none")


SHARDS = pytest.StashKey[tuple]()


def pytest_configure(config):
    # Checked here, before collection, so a bad --preset/--tp is a one-line usage error.
    try:
        config.stash[SHARDS] = select(config.getoption("preset"), config.getoption("tp") or [1], on_gpu=GPU_GRID)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.pluginmanager.register(RunGuard(config), "minivllm-run-guard")


def pytest_report_header(config):
    shards, notes = config.stash[SHARDS]
    lines = [f"minivllm benchmarks: shards {', '.join(s.id for s in shards)}", *notes]
    if interpreting():
        lines.append(INTERPRETER_NOTE)
    elif HAS_CUDA:
        lines.append("timing: CUDA events around each call after an L2 flush and a launch cover (benchmarks/timing.py); the timer named above is not used")
    return lines


def pytest_generate_tests(metafunc):
    if "shard" in metafunc.fixturenames:
        shards, _ = metafunc.config.stash[SHARDS]
        metafunc.parametrize("shard", shards, ids=[s.id for s in shards])
    if "dtype" in metafunc.fixturenames:
        names = metafunc.config.getoption("dtype") or (["bf16", "fp16"] if GPU_GRID else ["bf16"])
        names = list(dict.fromkeys(names))
        metafunc.parametrize("dtype", [SHORT_DTYPES[n] for n in names], ids=names)


@pytest.fixture(scope="session")
def ceiling(device) -> dict:
    """The run's measured ceilings (benchmarks/ceilings.py): copy, read and matmul."""
    return ceilings(device)


@pytest.fixture(scope="session")
def cold_round(device) -> ColdRound | None:
    return ColdRound(device) if device.type == "cuda" else None


@pytest.fixture
def free_bytes(device) -> int:
    """Device memory a test may still allocate: free memory plus what PyTorch caches unused."""
    if device.type != "cuda":
        return 1 << 62
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine_facts(torch.device("cuda" if HAS_CUDA else "cpu"), interpreting()))


def pytest_terminal_summary(terminalreporter, config):
    if interpreting():
        terminalreporter.write_sep("=", INTERPRETER_NOTE, yellow=True, bold=True)

