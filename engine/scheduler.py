"""Continuous batching: each step is either a prefill of newly admitted requests or one decode token
for every running one, and a full KV cache preempts the youngest requests to be recomputed later."""

from collections import deque
from collections.abc import Collection

from engine.block_manager import BlockManager
from engine.config import Config
from engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides which sequences run in each step and keeps their KV blocks in step with their tokens."""

    def __init__(self, config: Config):
        if config.num_kvcache_blocks < 1:
            raise ValueError(f"size the KV cache before building the scheduler; num_kvcache_blocks is {config.num_kvcache_blocks}")
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.block_manager = BlockManager(config.num_kvcache_blocks, config.kvcache_block_size)
        self.waiting: deque[Sequence] = deque()
        # Oldest admission first: preemption takes from the right.
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new request behind those already waiting."""
        if len(seq) > self.max_model_len:
            raise ValueError(f"sequence {seq.seq_id} has {len(seq)} prompt tokens, more than max_model_len ({self.max_model_len})")
        if seq.block_size != self.block_manager.block_size:
            raise ValueError(f"sequence {seq.seq_id} has block_size {seq.block_size}, the cache {self.block_manager.block_size}")
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        """Whether every request added so far has finished."""
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next step's sequences and whether it is a prefill. Prefills go first, so new requests
        join the batch as soon as the cache has room for them."""
        batch = self._schedule_prefill()
        if batch:
            return batch, True
        batch = self._schedule_decode()
        if batch:
            return batch, False
        if self.waiting:
            seq = self.waiting[0]
            raise RuntimeError(
                f"cannot schedule sequence {seq.seq_id} of {len(seq)} tokens: it needs {seq.num_blocks} KV blocks of "
                f"{self.block_manager.block_size} tokens and the cache has {len(self.block_manager.blocks)}"
            )
        raise RuntimeError("schedule() called with no sequences left; check is_finished() first")

    def _schedule_prefill(self) -> list[Sequence]:
        """Admit waiting sequences in order while they fit the step's limits and the cache."""
        batch: list[Sequence] = []
        num_new_tokens = 0
        # Admission is first come first served: a request that does not fit holds back those behind it.
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.block_manager.match_prefix(seq)
            new_tokens = len(seq) - len(hits) * seq.block_size
            if num_new_tokens + new_tokens > self.max_num_batched_tokens or not self.block_manager.can_allocate(seq, hits):
                break
            self.block_manager.allocate(seq, hits)
            num_new_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            batch.append(seq)
        return batch

    def _schedule_decode(self) -> list[Sequence]:
        """One token for every running sequence that keeps its blocks, preempting the youngest for room."""
        batch: list[Sequence] = []
        # Victims come off the right end, so every sequence left of i has already been scheduled.
        i = 0
        while i < len(self.running) and len(batch) < self.max_num_seqs:
            seq = self.running[i]
            while not self.block_manager.can_append(seq):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                batch.append(seq)
                i += 1
        return batch

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it at the head of the queue; its tokens are recomputed on readmission."""
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], token_ids: list[int], eos_token_ids: Collection[int]) -> list[Sequence]:
        """Append each sequence's sampled token and retire those that are done; returns the finished ones.
        eos_token_ids may hold several ids (a checkpoint's generation config often lists two)."""
        finished = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            seq.append_token(token_id)
            hit_eos = not seq.ignore_eos and token_id in eos_token_ids
            if hit_eos or seq.num_completion_tokens == seq.max_tokens or len(seq) >= self.max_model_len:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
