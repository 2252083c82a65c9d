"""Tensor parallelism: each rank's share of heads, FFN columns and vocabulary, the collectives the
sharded layers call, and how the ranks come up.

Ranks come up one of two ways. Under a launcher (torchrun, or srun with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set), every process runs the user's script and its LLM
joins the launcher's group. Otherwise an LLM with tensor_parallel_size N > 1 spawns N - 1 worker
processes that build the same engine and serve rank 0's commands. Either way the ranks run the
same schedule in lockstep (SPMD): rank 0 broadcasts each generate() call's inputs and each
step's sampled tokens. NCCL carries tensors on GPUs, gloo on CPUs; a gloo group always carries
the pickled commands.
"""

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

INIT_VAR = "MINIVLLM_TP_INIT"  # the rendezvous a spawned worker joins
TIMEOUT = timedelta(minutes=10)  # a collective waiting on a rank that died
WORKER_ERROR_WAIT_S = 10  # how long rank 0 waits for a failed worker's report
WATCH_EVERY_S = 0.05  # how often rank 0, waiting for a step on a GPU, checks that its workers live


def head_shard(num_heads: int, num_kv_heads: int, size: int) -> tuple[int, int]:
    """(q heads, kv heads) each of `size` ranks holds: q heads split evenly; kv heads split too,
    or replicated (each rank holds the one its q heads read) once size exceeds their count.
    ValueError where the heads do not divide."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {size}")
    if num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the {num_heads} query heads")
    if (num_kv_heads % size) if size <= num_kv_heads else (size % num_kv_heads):
        raise ValueError(f"tensor_parallel_size {size} neither divides nor is a multiple of the {num_kv_heads} kv heads")
    return num_heads // size, max(1, num_kv_heads // size)


def check_shardable(num_heads: int, num_kv_heads: int, intermediate_size: int, attention_bias: bool, size: int) -> None:
    """ValueError, before any process starts, for a model that `size` ranks cannot split."""
    head_shard(num_heads, num_kv_heads, size)
    TPGroup(0, size).split(intermediate_size, "FFN columns (intermediate_size)")
    if attention_bias and size > 1:
        raise ValueError("attention_bias with tensor parallelism is not supported: o_proj's bias would be summed once per rank")


@dataclass(frozen=True)
class TPGroup:
    """This process's rank among `size`, and the collectives over them (no-ops when size is 1)."""

    rank: int = 0
    size: int = 1
    control: object = field(default=None, compare=False, repr=False)  # the gloo group for pickled commands
    watch: Callable[[], None] | None = field(default=None, compare=False, repr=False)  # raises once a spawned worker stopped

    def q_heads(self, num_heads: int, num_kv_heads: int) -> range:
        q, _ = head_shard(num_heads, num_kv_heads, self.size)
        return range(self.rank * q, (self.rank + 1) * q)

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> range:
        """The kv heads this rank's q heads read: its own slice, or the one it replicates."""
        _, kv = head_shard(num_heads, num_kv_heads, self.size)
        first = self.q_heads(num_heads, num_kv_heads).start // (num_heads // num_kv_heads)
        return range(first, first + kv)

    def split(self, n: int, what: str) -> range:
        """This rank's even share of n rows (FFN columns); ValueError when n does not divide."""
        if n % self.size:
            raise ValueError(f"tensor_parallel_size {self.size} does not divide the {n} {what}")
        part = n // self.size
        return range(self.rank * part, (self.rank + 1) * part)

    def vocab(self, vocab_size: int) -> range:
        """This rank's vocabulary rows; every rank holds ceil(vocab / size) of them, the last padded."""
        part = -(-vocab_size // self.size)
        return range(self.rank * part, min((self.rank + 1) * part, vocab_size))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x side by side along the last dim, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min(self, value: int) -> int:
        """The smallest of every rank's value."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, 0)
        return x

    def wait(self, device: torch.device) -> None:
        """Wait for the work queued on `device`. On a GPU rank 0 with spawned workers it polls and
        checks the workers in between: an NCCL collective whose peer died never completes, so a
        plain wait would last until the group's timeout and the worker's error would not be seen."""
        if device.type != "cuda":
            return
        if self.watch is None:
            torch.cuda.synchronize(device)
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        checked = time.monotonic()
        while not done.query():
            if time.monotonic() - checked > WATCH_EVERY_S:
                self.watch()
                checked = time.monotonic()

    def to_host(self, x: torch.Tensor) -> list:
        """x.tolist(); with a watch, after wait() (without one, tolist's own wait is the same)."""
        if self.watch is not None:
            self.wait(x.device)
        return x.tolist()

    def broadcast_object(self, obj=None):
        """Rank 0's obj (picklable) on every rank; the others pass None."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]


def launcher_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a launcher's environment, or None outside one."""
    if not all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def init_group(rank: int, size: int, device: torch.device, watch: Callable[[], None] | None = None) -> TPGroup:
    """Join the process group: the launcher's (env://) or the engine's own rendezvous file.
    `watch` (rank 0 of spawned workers: Workers.check) raises once a worker has stopped."""
    if size == 1:
        return TPGroup()
    init = os.environ.get(INIT_VAR, "env://")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank, world_size=size, timeout=TIMEOUT)
    return TPGroup(rank, size, dist.new_group(backend="gloo", timeout=TIMEOUT), watch)


def leave_group(failed: bool) -> None:
    """Leave the process group. After a failure NCCL's communicators are aborted instead, since a
    collective still waiting for a dead peer would keep an orderly shutdown waiting too."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and abort is not None and dist.get_backend() == "nccl":
        abort()
    else:
        dist.destroy_process_group()


class Workers:
    """Ranks 1..size-1 as spawned processes, each running `serve_worker`; their failures come back
    through a queue. Daemonic, so none outlives the process that spawned it."""

    def __init__(self, size: int, model: str, config: dict):
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        fd, self.path = tempfile.mkstemp(prefix="minivllm-tp-")
        os.close(fd)
        os.unlink(self.path)  # the file store creates it; it must not exist beforehand
        self.init = f"file://{self.path}"
        os.environ[INIT_VAR] = self.init
        self.procs = [
            ctx.Process(target=serve_worker, args=(rank, size, self.init, model, config, self.errors), daemon=True, name=f"minivllm-tp{rank}")
            for rank in range(1, size)
        ]
        for p in self.procs:
            p.start()

    def check(self) -> None:
        """RuntimeError once a worker has exited or reported an error; failure() then says which."""
        if not self.errors.empty() or not all(p.is_alive() for p in self.procs):
            raise RuntimeError("a tensor-parallel worker stopped")

    def failure(self, cause: BaseException) -> RuntimeError:
        """The error to raise on rank 0 after `cause`: a worker's own report when one failed."""
        reports = []
        try:
            reports.append(self.errors.get(timeout=WORKER_ERROR_WAIT_S))
            while not self.errors.empty():
                reports.append(self.errors.get_nowait())
        except Exception:  # noqa: BLE001 - no report came: rank 0's own error stands
            pass
        self.stop()
        if not reports:
            return RuntimeError(f"tensor parallelism failed on rank 0 ({type(cause).__name__}: {cause}); the workers were stopped")
        return RuntimeError("\n".join(f"tensor-parallel worker {rank} failed:\n{text}" for rank, text in reports))

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to exit, then terminate any that did not."""
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(timeout)
        os.environ.pop(INIT_VAR, None)
        if os.path.exists(self.path):
            os.unlink(self.path)


def serve_worker(rank: int, size: int, init: str, model: str, config: dict, errors) -> None:
    """A spawned rank: build the engine's shard, then run rank 0's commands until told to stop.
    Any error is reported to rank 0 with its traceback, and the process exits, which fails the
    collective rank 0 is waiting in."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), **{INIT_VAR: init})
    try:
        from engine.llm import LLM

        llm = LLM(model, **config)
        llm.serve()
    except BaseException:  # noqa: BLE001 - everything goes back to rank 0
        errors.put((rank, traceback.format_exc()))
        errors.close()
        errors.join_thread()
        os._exit(1)
