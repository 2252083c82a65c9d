"""Tensor parallelism's arithmetic and collectives: each rank's share of heads, FFN columns and
vocabulary, and the all-reduce / gather / broadcast the sharded layers and the engine call. The
model and the loader import this; how the ranks' processes come up is minivllm/engine/tp_processes.py."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

WATCH_EVERY_S = 0.05  # how often rank 0, waiting for a step on a GPU or for its workers to join, checks that they live


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
        """Wait for all the work queued on `device` so far (see wait_event)."""
        if device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        self.wait_event(done)

    def wait_event(self, done: torch.cuda.Event) -> None:
        """Wait until `done` (a CUDA event) has passed. On a GPU rank 0 with spawned workers it
        polls and checks the workers in between: an NCCL collective whose peer died never
        completes, so a plain wait would last until the group's timeout and the worker's error
        would not be seen."""
        if self.watch is None:
            done.synchronize()
            return
        checked = time.monotonic()
        while not done.query():
            if time.monotonic() - checked > WATCH_EVERY_S:
                self.watch()
                checked = time.monotonic()

    def broadcast_object(self, obj=None):
        """Rank 0's obj (picklable) on every rank; the others pass None."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0, group=self.control)
        return box[0]
