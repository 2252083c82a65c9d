"""Continuous batching with chunked prefill: each step gives every running sequence's decode its
one token, then fills the rest of the token budget with prefill chunks, of prompts already
started and then of newly admitted ones; a full KV cache preempts the youngest requests, to be
recomputed later."""

import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.config import Config
from minivllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """One step's work: row i computes tokens [starts[i], starts[i] + num_new[i]) of seqs[i], and
    samples that sequence's next token when the chunk reaches its last token (samples[i]).
    `is_decode`: every row is one token at its sequence's last position, so the step can replay a
    captured decode graph."""

    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)

    def add(self, seq: Sequence, num_new: int) -> None:
        """Row for the next num_new tokens of seq, which count as computed from here on."""
        self.seqs.append(seq)
        self.starts.append(seq.num_computed_tokens)
        self.num_new.append(num_new)
        self.samples.append(seq.num_computed_tokens + num_new == len(seq))
        seq.num_computed_tokens += num_new

    def lengthen(self, row: int, extra: int) -> None:
        """Give row `row` the next `extra` tokens of its sequence too."""
        seq = self.seqs[row]
        self.num_new[row] += extra
        seq.num_computed_tokens += extra
        self.samples[row] = seq.num_computed_tokens == len(seq)

    def longest_first(self) -> None:
        """Put the rows in descending order of their context (starts), ties in their order."""
        order = sorted(range(len(self.seqs)), key=lambda i: -self.starts[i])
        for rows in (self.seqs, self.starts, self.num_new, self.samples):
            rows[:] = [rows[i] for i in order]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.num_new) and all(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences this step samples a token for, in row order."""
        return [s for s, sampled in zip(self.seqs, self.samples, strict=True) if sampled]


class Scheduler:
    """Decides which tokens of which sequences each step computes, and keeps their KV blocks in step
    with their tokens. With async scheduling the next step is planned before the tokens of the one
    in flight are known: those are PENDING in their sequences (minivllm/engine/sequence.py) until
    postprocess fills them in."""

    def __init__(self, config: Config):
        if config.num_kvcache_blocks < 1:
            raise ValueError(f"size the KV cache before building the scheduler; num_kvcache_blocks is {config.num_kvcache_blocks}")
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.chunk_cap = config.long_prefill_token_threshold
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
        seq.metrics.arrival_s = time.perf_counter()
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        """Whether every request added so far has finished."""
        return not self.waiting and not self.running

    def _done_growing(self, seq: Sequence) -> bool:
        """Whether seq, pending tokens counted, has sampled all the tokens it may have: it waits for
        them to be known and is not scheduled again. A prompt of max_model_len tokens still
        samples one."""
        return seq.num_completion_tokens > 0 and (seq.num_completion_tokens >= seq.max_tokens or len(seq) >= self.max_model_len)

    def schedule(self, in_flight: bool = False) -> ScheduledStep:
        """The next step. Running sequences go first, decodes and started prefills in admission
        order, then waiting ones are admitted first come first served while the budget, the
        sequence limit and the cache allow. A prefill chunk takes at most long_prefill_token_threshold
        tokens in that pass, so one long prompt leaves room for the requests behind it; budget
        still left then lengthens the capped chunks. An empty step is returned only while a step
        is `in_flight` (every sequence waits for its tokens); otherwise RuntimeError."""
        step, budget = ScheduledStep(), self.max_num_batched_tokens
        # Victims come off the right end, so every sequence left of i has already been scheduled.
        i = 0
        while i < len(self.running) and len(step.seqs) < self.max_num_seqs and budget > 0:
            seq = self.running[i]
            remaining = len(seq) - seq.num_computed_tokens
            if remaining == 1 and self._done_growing(seq):
                i += 1
                continue
            if remaining == 1:
                while not self.block_manager.can_append(seq):
                    victim = self.running.pop()
                    self._preempt(victim)
                    if victim is seq:
                        break
                else:
                    self.block_manager.may_append(seq)
                    self._add(step, seq, 1)
                    budget -= 1
                    i += 1
                continue
            chunk = min(remaining, budget, self.chunk_cap)
            self._add(step, seq, chunk)
            budget -= chunk
            i += 1
        self._admit(step, budget)
        self._lengthen_capped_chunks(step)
        for seq in step.sampled_seqs:
            seq.append_pending()
        if not step.seqs and not in_flight:
            self._raise_unschedulable()
        return step

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        """Admit waiting sequences in order while they fit the step's limits and the cache. A
        sequence whose tokens are still pending (preempted while a step sampled for it) holds the
        queue until they are known."""
        while self.waiting and len(self.running) < self.max_num_seqs and len(step.seqs) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break
            hits = self.block_manager.match_prefix(seq)
            if not self.block_manager.can_allocate(seq, hits):
                break
            self.block_manager.allocate(seq, hits)
            if not seq.metrics.num_preemptions:
                # First admission only: a readmission hits blocks computed for this request
                # itself, generated tokens included, which are no prefix hit of its prompt.
                seq.metrics.num_cached_tokens = seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            chunk = min(len(seq) - seq.num_computed_tokens, budget, self.chunk_cap)
            self._add(step, seq, chunk)
            budget -= chunk

    def _add(self, step: ScheduledStep, seq: Sequence, num_new: int) -> None:
        """Put seq's next num_new tokens in the step and register the blocks they complete at
        once, so a request admitted later in this same step can hit them: every layer stores the
        step's keys and values before it attends."""
        step.add(seq, num_new)
        self.block_manager.cache_blocks(seq)

    def _lengthen_capped_chunks(self, step: ScheduledStep) -> None:
        """Give budget the first pass left to chunks it cut short, in row order."""
        budget = self.max_num_batched_tokens - step.num_tokens
        for row, seq in enumerate(step.seqs):
            if budget <= 0:
                return
            extra = min(budget, len(seq) - seq.num_computed_tokens)
            if extra > 0:
                step.lengthen(row, extra)
                self.block_manager.cache_blocks(seq)
                budget -= extra

    def _raise_unschedulable(self) -> None:
        if self.waiting:
            seq = self.waiting[0]
            raise RuntimeError(
                f"cannot schedule sequence {seq.seq_id} of {len(seq)} tokens: it needs {seq.num_blocks} KV blocks of "
                f"{self.block_manager.block_size} tokens and the cache has {len(self.block_manager.blocks)}"
            )
        raise RuntimeError("schedule() called with no sequences left; check is_finished() first")

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it at the head of the queue; its tokens are recomputed on readmission."""
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort_all(self) -> list[Sequence]:
        """Drop every request, waiting or running, when the steps run for them stop part way (an
        exception or KeyboardInterrupt in the engine loop); returns the dropped ones, marked
        finished with their pending tokens dropped. Their blocks are freed, and those of running
        requests also leave the prefix cache: the step scheduled last may have registered them
        without ever writing their KV. Blocks freed earlier, by finished or preempted requests,
        were written by steps already launched and stay cached."""
        dropped = [*self.running, *self.waiting]
        for seq in dropped:
            if seq.block_table:
                self.block_manager.deallocate(seq, forget=True)
            seq.drop_pending()
            seq.status = SequenceStatus.FINISHED
        self.running.clear()
        self.waiting.clear()
        return dropped

    def postprocess(self, step: ScheduledStep, token_ids: list[int], eos_token_ids: Collection[int]) -> list[Sequence]:
        """Fill in the tokens `step` sampled (one per step.sampled_seqs, in order) and retire the
        sequences that are done; returns the finished ones. A sequence that ended on an EOS drops
        any later token a step already in flight sampled for it, so its output never holds a token
        past its end. eos_token_ids may hold several ids (a checkpoint's generation config often
        lists two)."""
        finished = []
        now = time.perf_counter()
        for seq, token_id in zip(step.sampled_seqs, token_ids, strict=True):
            if seq.is_finished:
                continue  # it ended on an earlier token; this one was sampled past its end
            seq.fill_pending(token_id)
            seq.metrics.token_times_s.append(now)
            self.block_manager.cache_blocks(seq)
            hit_eos = not seq.ignore_eos and token_id in eos_token_ids
            known = seq.num_known_tokens
            if hit_eos or known - seq.num_prompt_tokens >= seq.max_tokens or known >= self.max_model_len:
                seq.drop_pending()
                seq.status = SequenceStatus.FINISHED
                if seq.block_table:
                    self.block_manager.deallocate(seq)
                (self.running if seq in self.running else self.waiting).remove(seq)
                finished.append(seq)
        return finished
