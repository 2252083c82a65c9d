"""Tensor parallelism: each rank's share of heads, FFN columns and vocabulary, the collectives the
sharded layers call, and how the ranks come up.

Ranks come up one of two ways. Under a launcher (torchrun, or srun with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set), every process runs the user's script and its LLM
joins the launcher's group. Otherwise an LLM with tensor_parallel_size N > 1 spawns N - 1 worker
processes that build the same engine and serve rank 0's commands. Either way the ranks run the
same schedule in lockstep (SPMD): rank 0 broadcasts each generate() call's inputs and each
step's sampled tokens. NCCL carries tensors on GPUs, gloo on CPUs; a gloo group always carries
the pickled commands.

Spawned workers end with their LLM: close() tells them to stop; any error or interrupt on rank 0
terminates them at once (they wait in a collective rank 0 will not join), and interpreter exit
without close() does too. The rendezvous file goes with them.
"""

import contextlib
import os
import signal
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm.std import tqdm

INIT_VAR = "MINIVLLM_TP_INIT"  # the rendezvous a spawned worker joins
TIMEOUT = timedelta(minutes=10)  # a collective waiting on a rank that died
WATCH_EVERY_S = 0.05  # how often rank 0, waiting for a step on a GPU or for its workers to join, checks that they live
STOP_WAIT_S = 10.0  # how long close() lets the told-to-stop workers exit before terminating them
KILL_AFTER_S = 5.0  # how long a terminated worker gets before it is killed

# Set in a spawned worker: tells rank 0 (Workers.await_join) that this rank is entering the rendezvous.
_on_join: Callable[[], None] | None = None


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

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of the vocabulary every rank holds: ceil(vocab / size), the last rank's padded."""
        return -(-vocab_size // self.size)

    def vocab(self, vocab_size: int) -> range:
        """This rank's vocabulary rows (vocab_rows of them, fewer on the last rank)."""
        part = self.vocab_rows(vocab_size)
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
    if _on_join is not None:
        _on_join()
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
    through a queue. However rank 0 ends (close(), an error, or interpreter exit without either),
    they are stopped and the rendezvous file removed: see stop()."""

    def __init__(self, size: int, model: str, config: dict, serve: Callable[[str, dict], None]):
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        self.joining = [ctx.Event() for _ in range(1, size)]
        fd, self.path = tempfile.mkstemp(prefix="minivllm-tp-")
        os.close(fd)
        os.unlink(self.path)  # the file store creates it; it must not exist beforehand
        self.init = f"file://{self.path}"
        os.environ[INIT_VAR] = self.init
        self.procs = []
        # Runs at garbage collection or interpreter exit unless stop() ran first; it holds the list
        # itself, so a start failing part way still ends the workers already started.
        self._end = weakref.finalize(self, end_workers, self.procs, self.init)
        for rank, joining in enumerate(self.joining, 1):
            args = (rank, size, self.init, serve, model, config, self.errors, joining)
            p = ctx.Process(target=serve_worker, args=args, daemon=True, name=f"minivllm-tp{rank}")
            p.start()
            self.procs.append(p)

    def await_join(self, timeout: timedelta = TIMEOUT) -> None:
        """Return once every worker is entering the rendezvous. RuntimeError as soon as one has
        exited instead (init_process_group would wait out its timeout for it), or after `timeout`."""
        deadline = time.monotonic() + timeout.total_seconds()
        for rank, (p, joining) in enumerate(zip(self.procs, self.joining, strict=True), 1):
            while not joining.wait(WATCH_EVERY_S):
                if p.exitcode is not None:
                    raise RuntimeError(died_before_join(rank, p.exitcode))
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel worker {rank} did not join the process group within {timeout}")

    def check(self) -> None:
        """RuntimeError once a worker has exited or reported an error; failure() then says which."""
        if not self.errors.empty() or not all(p.is_alive() for p in self.procs):
            raise RuntimeError("a tensor-parallel worker stopped")

    def failure(self, cause: BaseException) -> BaseException:
        """Stop the workers at once after `cause` on rank 0, and return what to raise: the failed
        workers' own reports for an Exception, else `cause` itself (a KeyboardInterrupt stays one)
        with a note of any worker that had exited and that the LLM is closed.

        A worker that failed reported before it exited, and rank 0 only meets a worker's failure
        once it has exited, so the reports are already here: none is waited for."""
        reports = []
        while not self.errors.empty():
            reports.append(self.errors.get())
        exits = [f"worker {rank} {exit_status(p.exitcode)}" for rank, p in enumerate(self.procs, 1) if p.exitcode is not None]
        self.stop()
        if reports and isinstance(cause, Exception):
            return RuntimeError("\n".join(f"tensor-parallel worker {rank} failed:\n{text}" for rank, text in reports))
        cause.add_note("tensor parallelism: " + "; ".join([*exits, "the workers were stopped and this LLM is closed"]))
        return cause

    def stop(self, wait_s: float = 0.0) -> None:
        """End the workers, giving them wait_s to exit by themselves (as they do once told to
        stop), and remove the rendezvous file; later calls do nothing."""
        if self._end.detach() is not None:
            end_workers(self.procs, self.init, wait_s)


def end_workers(procs: list, init: str, wait_s: float = 0.0) -> None:
    """Let `procs` exit for up to wait_s, then terminate those left (a worker waiting in a
    collective never exits by itself), killing any that outlast KILL_AFTER_S; then remove the
    rendezvous file of `init`, which no live process uses any more."""
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(KILL_AFTER_S)
        if p.is_alive():
            p.kill()
            p.join()
    remove_rendezvous(init)


def remove_rendezvous(init: str) -> None:
    """Remove the file behind the file:// rendezvous `init`, and rank 0's pointer to it."""
    if os.environ.get(INIT_VAR) == init:
        del os.environ[INIT_VAR]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(init.removeprefix("file://"))


def exit_status(exitcode: int) -> str:
    """How a process ended, from its multiprocessing exit code."""
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    names = {s.value: s.name for s in signal.Signals}
    return f"was killed by {names.get(-exitcode, f'signal {-exitcode}')}"


def died_before_join(rank: int, exitcode: int) -> str:
    """The error for a worker that ended before joining the group, with the likely cause."""
    message = f"tensor-parallel worker {rank} {exit_status(exitcode)} before joining the process group"
    if exitcode < 0:
        return message
    # A worker failing in serve_worker reports its traceback, which failure() raises instead of
    # this; one that ends without a report got no further than spawn's re-import of the main module.
    return (
        f"{message}, most likely on re-importing the main module: a spawned worker imports the script first, so "
        'a script must build a tensor-parallel LLM under `if __name__ == "__main__":` (the worker\'s own traceback went '
        "to stderr)"
    )


def serve_worker(rank: int, size: int, init: str, serve: Callable[[str, dict], None], model: str, config: dict, errors, joining) -> None:
    """A spawned rank: `serve(model, config)` builds the engine's shard and runs rank 0's commands
    until told to stop (the API hands it in, so this module imports no engine above it).
    Any error is reported to rank 0 with its traceback, and the process exits, which fails the
    collective rank 0 is waiting in. A worker whose rank 0 was killed fails too, in its next
    collective, and removes the rendezvous file rank 0 could not. Ctrl-C is left to rank 0, which
    stops the workers itself: a worker interrupted too would race it with a report of its own."""
    global _on_join
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _on_join = joining.set
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), **{INIT_VAR: init})
    # tqdm's default lock is a named semaphore, which a terminated worker leaves to the resource
    # tracker to unlink, with a warning; a worker draws no bar, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    try:
        serve(model, config)
    except BaseException:  # noqa: BLE001 - everything goes back to rank 0
        errors.put((rank, traceback.format_exc()))
        errors.close()
        errors.join_thread()
        if not mp.parent_process().is_alive():
            remove_rendezvous(init)
        os._exit(1)
