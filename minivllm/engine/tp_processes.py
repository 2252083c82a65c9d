"""How the tensor-parallel ranks' processes come up, fail and end.

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

This module knows no engine above minivllm/engine/tensor_parallel.py: the worker's entry point is handed in.
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
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm.std import tqdm

from minivllm.engine.tensor_parallel import WATCH_EVERY_S, TPGroup

TIMEOUT = timedelta(minutes=10)  # a collective waiting on a rank that died
STOP_WAIT_S = 10.0  # how long close() lets the told-to-stop workers exit before terminating them
KILL_AFTER_S = 5.0  # how long a terminated worker gets before it is killed


@dataclass(frozen=True)
class Rendezvous:
    """Which rank of how many this process is, and where the ranks meet."""

    rank: int
    size: int
    local_rank: int  # the GPU index on this host
    init_method: str  # "env://" under a launcher; the engine's own "file://..." for spawned workers
    joining: object = None  # a spawned worker's Event, set as it enters the group (Workers.await_join waits for it)


def launcher_rendezvous() -> Rendezvous | None:
    """This process's place in a launcher's group (torchrun, srun), read from the environment the
    launcher sets, or None outside one."""
    if not all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        return None
    rank = int(os.environ["RANK"])
    return Rendezvous(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)), "env://")


def join_group(rendezvous: Rendezvous, device: torch.device, watch: Callable[[], None] | None = None) -> TPGroup:
    """Join the process group at `rendezvous`. `watch` (rank 0 of spawned workers: Workers.check)
    raises once a worker has stopped."""
    if rendezvous.size == 1:
        return TPGroup()
    if rendezvous.joining is not None:
        rendezvous.joining.set()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=rendezvous.init_method, rank=rendezvous.rank, world_size=rendezvous.size, timeout=TIMEOUT)
    return TPGroup(rendezvous.rank, rendezvous.size, dist.new_group(backend="gloo", timeout=TIMEOUT), watch)


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

    def __init__(self, size: int, model: str, config: dict, serve: Callable[[str, dict, Rendezvous], None]):
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        self.joining = [ctx.Event() for _ in range(1, size)]
        fd, self.path = tempfile.mkstemp(prefix="minivllm-tp-")
        os.close(fd)
        os.unlink(self.path)  # the file store creates it; it must not exist beforehand
        self.rendezvous = Rendezvous(0, size, 0, f"file://{self.path}")  # rank 0's, this process's
        self.procs = []
        # Runs at garbage collection or interpreter exit unless stop() ran first; it holds the list
        # itself, so a start failing part way still ends the workers already started.
        self._end = weakref.finalize(self, end_workers, self.procs, self.path)
        for rank, joining in enumerate(self.joining, 1):
            args = (Rendezvous(rank, size, rank, self.rendezvous.init_method, joining), serve, model, config, self.errors)
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
            end_workers(self.procs, self.path, wait_s)


def end_workers(procs: list, rendezvous_file: str, wait_s: float = 0.0) -> None:
    """Let `procs` exit for up to wait_s, then terminate those left (a worker waiting in a
    collective never exits by itself), killing any that outlast KILL_AFTER_S; then remove the
    rendezvous file, which no live process uses any more."""
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
    remove_rendezvous_file(rendezvous_file)


def remove_rendezvous_file(path: str) -> None:
    """Remove the file store behind a spawned group's rendezvous, if still there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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


def serve_worker(rendezvous: Rendezvous, serve: Callable[[str, dict, Rendezvous], None], model: str, config: dict, errors) -> None:
    """A spawned rank: `serve(model, config, rendezvous)` builds the engine's shard and runs rank
    0's commands until told to stop (the API hands it in, so this module imports no engine above
    it). Any error is reported to rank 0 with its traceback, and the process exits, which fails
    the collective rank 0 is waiting in. A worker whose rank 0 was killed fails too, in its next
    collective, and removes the rendezvous file rank 0 could not. Ctrl-C is left to rank 0, which
    stops the workers itself: a worker interrupted too would race it with a report of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a named semaphore, which a terminated worker leaves to the resource
    # tracker to unlink, with a warning; a worker draws no bar, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    try:
        serve(model, config, rendezvous)
    except BaseException:  # noqa: BLE001 - everything goes back to rank 0
        errors.put((rendezvous.rank, traceback.format_exc()))
        errors.close()
        errors.join_thread()
        if not mp.parent_process().is_alive():
            remove_rendezvous_file(rendezvous.init_method.removeprefix("file://"))
        os._exit(1)
