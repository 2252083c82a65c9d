"""The KV block manager: prefix-cache hits, eviction order, and a stateful model of ref counting."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minivllm.engine import block_manager
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sampling_params import SamplingParams
from minivllm.engine.sequence import Sequence


def seq_of(tokens: list[int], block_size: int) -> Sequence:
    return Sequence(tokens, SamplingParams(), block_size)


def compute(bm: BlockManager, seq: Sequence) -> None:
    """What a step computing all of seq's tokens does: they count as computed, and the full
    blocks among them become hittable."""
    seq.num_computed_tokens = len(seq)
    bm.cache_blocks(seq)


def allocate(bm: BlockManager, seq: Sequence) -> None:
    """Allocate seq and prefill it whole."""
    bm.allocate(seq)
    compute(bm, seq)


def test_shared_prefix_hits_the_same_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(10)), 4)
    allocate(bm, a)
    b = seq_of(list(range(8)) + [100, 101, 102], 4)
    allocate(bm, b)
    assert a.block_table == [0, 1, 2] and a.num_cached_tokens == 0
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] == 3
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    assert bm.num_cache_hit_blocks == 2 and bm.num_free_blocks == 4


def test_block_with_the_last_token_is_never_a_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(8)), 4)
    allocate(bm, a)
    b = seq_of(list(range(8)), 4)
    # The whole prompt is cached, but its last block must be computed for the logits.
    assert len(bm.match_prefix(b)) == 1
    allocate(bm, b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0] and b.block_table[1] not in a.block_table
    c = seq_of(list(range(8)) + [50], 4)
    allocate(bm, c)
    assert c.num_cached_tokens == 8


def test_one_token_prompt_is_never_a_hit():
    bm = BlockManager(num_blocks=4, block_size=1)
    a = seq_of([7], 1)
    allocate(bm, a)
    b = seq_of([7], 1)
    allocate(bm, b)
    assert b.num_cached_tokens == 0 and b.block_table != a.block_table


def test_freed_blocks_stay_hittable():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq_of(list(range(9)), 4)
    allocate(bm, a)
    bm.deallocate(a)
    assert a.block_table == [] and bm.num_free_blocks == 4
    b = seq_of(list(range(8)) + [99], 4)
    assert bm.can_allocate(b)
    allocate(bm, b)
    # Hits on freed blocks take them back off the free list; the miss takes the never-used block.
    assert b.block_table == [0, 1, 3] and b.num_cached_tokens == 8
    assert bm.num_free_blocks == 1 and list(bm.free_blocks) == [2]


def test_eviction_takes_the_least_recently_freed_block():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = seq_of([1, 2, 3, 4, 5], 2)
    allocate(bm, a)
    bm.deallocate(a)
    # Never-used blocks first, then a's blocks tail first.
    assert list(bm.free_blocks) == [3, 4, 5, 2, 1, 0]
    x = seq_of([9] * 9, 2)
    allocate(bm, x)
    assert x.block_table == [3, 4, 5, 2, 1]
    # Block 1 ([3, 4]) was evicted; block 0 ([1, 2]) still serves the prefix's head.
    assert len(bm.match_prefix(seq_of([1, 2, 3, 4, 5], 2))) == 1
    bm.deallocate(x)
    b = seq_of([1, 2, 3, 4, 5], 2)
    allocate(bm, b)
    assert b.block_table == [0, 1, 2] and b.num_cached_tokens == 2


def test_hash_collision_is_not_a_hit(monkeypatch):
    monkeypatch.setattr(block_manager, "compute_hash", lambda token_ids, prefix_hash: 42)
    bm = BlockManager(num_blocks=12, block_size=2)
    a = seq_of([1, 2, 3, 4, 5], 2)
    allocate(bm, a)
    b = seq_of([7, 8, 3, 4, 5], 2)
    allocate(bm, b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    # Equal tokens under one colliding hash must not put one block twice in a table.
    s = seq_of([5] * 5, 2)
    allocate(bm, s)
    t = seq_of([5] * 5, 2)
    allocate(bm, t)
    assert t.num_cached_tokens == 2 and len(set(t.block_table)) == 3


def test_can_allocate_counts_hits_on_blocks_in_use_as_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of([1, 2, 3, 4, 5], 2)
    allocate(bm, a)
    assert bm.num_free_blocks == 1
    b = seq_of([1, 2, 3, 4, 6], 2)
    # Three blocks needed, one free: the two shared ones cost nothing.
    assert bm.can_allocate(b)
    allocate(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and bm.num_free_blocks == 0
    c = seq_of([1, 2, 3, 4, 7], 2)
    assert len(bm.match_prefix(c)) == 2 and not bm.can_allocate(c)
    with pytest.raises(RuntimeError, match="no room"):
        allocate(bm, c)
    assert c.block_table == [] and [blk.ref_count for blk in bm.blocks] == [2, 2, 1, 1]


def test_hit_on_a_freed_block_costs_a_free_block():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq_of([1, 2, 3], 2)
    allocate(bm, a)
    bm.deallocate(a)
    x = seq_of([9], 2)
    allocate(bm, x)
    b = seq_of([1, 2, 3, 4, 5], 2)
    # One hit on freed block 0 plus two misses: three free blocks needed, two left.
    assert len(bm.match_prefix(b)) == 1 and not bm.can_allocate(b)


def test_decode_registers_completed_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = seq_of([1, 2, 3], 2)
    allocate(bm, a)
    for token, table_len in ((4, 2), (5, 3)):
        a.append_token(token)
        assert bm.can_append(a)
        bm.may_append(a)
        compute(bm, a)
        assert len(a.block_table) == table_len
    b = seq_of([1, 2, 3, 4, 9], 2)
    allocate(bm, b)
    assert b.num_cached_tokens == 4 and b.block_table[:2] == a.block_table[:2]


def test_blocks_become_hittable_only_once_computed_and_known():
    """A block whose KV no scheduled step writes yet, or whose last token the host does not know
    yet (sampled on the device, PENDING), must not serve another request."""
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq_of([1, 2, 3, 4, 5], 2)
    bm.allocate(a)
    probe = seq_of([1, 2, 3, 4, 5, 6, 7], 2)
    assert bm.match_prefix(probe) == []
    a.num_computed_tokens = 3  # a chunk of 3 tokens: block 0 is written, block 1 half
    bm.cache_blocks(a)
    assert bm.match_prefix(probe) == a.block_table[:1]
    a.num_computed_tokens = 5
    a.append_pending()  # the step that writes token 5's KV samples token 6 on the device
    bm.may_append(a)
    a.num_computed_tokens = 6
    bm.cache_blocks(a)
    assert bm.match_prefix(probe) == a.block_table[:2]  # [5, pending] is not registered
    a.fill_pending(6)
    bm.cache_blocks(a)
    assert bm.match_prefix(probe) == a.block_table[:3] and a.num_hashed_blocks == 3


def test_misuse_raises():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq_of([1, 2, 3], 2)
    allocate(bm, a)
    with pytest.raises(RuntimeError, match="already holds"):
        allocate(bm, a)
    a.append_token(4)
    a.append_token(5)
    assert not bm.can_append(a)
    with pytest.raises(RuntimeError, match="no free block"):
        bm.may_append(a)
    with pytest.raises(RuntimeError, match="allocate it first"):
        bm.may_append(seq_of([1], 2))


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / decode / free traffic over a tiny vocabulary, so prefixes collide often.

    A shadow KV cache records, for every slot written, the whole prefix its token saw; a cache hit
    must find exactly the prefix the sequence would have written itself.
    """

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(1, 12))
    def setup(self, block_size, num_blocks):
        self.bm = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.live: list[Sequence] = []
        self.prompts: list[list[int]] = [[0]]
        self.kv: dict[int, tuple[int, ...]] = {}

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _allocate(self, tokens: list[int]) -> None:
        seq = seq_of(tokens, self.block_size)
        if not self.bm.can_allocate(seq):
            before = [(b.ref_count, b.hash) for b in self.bm.blocks], list(self.bm.free_blocks)
            with pytest.raises(RuntimeError):
                allocate(self.bm, seq)
            assert ([(b.ref_count, b.hash) for b in self.bm.blocks], list(self.bm.free_blocks)) == before
            return
        allocate(self.bm, seq)
        assert len(seq.block_table) == seq.num_blocks and seq.num_cached_tokens < len(seq)
        for pos in range(len(seq)):
            prefix = tuple(seq.token_ids[: pos + 1])
            if pos < seq.num_cached_tokens:
                assert self.kv[self._slot(seq, pos)] == prefix
            else:
                self.kv[self._slot(seq, pos)] = prefix
        self.live.append(seq)
        self.prompts.append(list(tokens))

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=12))
    def allocate_new(self, tokens):
        self._allocate(tokens)

    @rule(data=st.data(), tail=st.lists(st.integers(0, 2), max_size=5))
    def allocate_extension(self, data, tail):
        base = data.draw(st.sampled_from(self.prompts))
        cut = data.draw(st.integers(0, len(base)))
        self._allocate((base[:cut] + tail) or [0])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        seq = data.draw(st.sampled_from(self.live))
        seq.append_token(token)
        if not self.bm.can_append(seq):
            # What the scheduler would do: preempt it.
            self.bm.deallocate(seq)
            self.live.remove(seq)
            return
        self.bm.may_append(seq)
        compute(self.bm, seq)
        assert len(seq.block_table) == seq.num_blocks
        self.kv[self._slot(seq, len(seq) - 1)] = tuple(seq.token_ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def deallocate(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.bm.deallocate(seq)
        self.live.remove(seq)
        assert seq.block_table == [] and seq.num_cached_tokens == 0

    @invariant()
    def ref_counts_match_live_tables(self):
        uses = [0] * len(self.bm.blocks)
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                uses[b] += 1
        assert [b.ref_count for b in self.bm.blocks] == uses

    @invariant()
    def free_list_is_exactly_the_unused_blocks(self):
        free = set(self.bm.free_blocks)
        in_use = {b.block_id for b in self.bm.blocks if b.ref_count > 0}
        assert all(b.ref_count >= 0 for b in self.bm.blocks)
        assert all(self.bm.blocks[b].ref_count == 0 for b in free) and not free & in_use
        assert self.bm.num_free_blocks + len(in_use) == len(self.bm.blocks)

    @invariant()
    def hash_map_points_at_full_blocks_with_that_hash(self):
        for h, b in self.bm.hash_to_block.items():
            assert self.bm.blocks[b].hash == h and len(self.bm.blocks[b].token_ids) == self.block_size

    def teardown(self):
        for seq in self.live:
            self.bm.deallocate(seq)
        assert self.bm.num_free_blocks == len(self.bm.blocks)
        assert all(b.ref_count == 0 for b in self.bm.blocks)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
test_block_manager_state_machine = BlockManagerMachine.TestCase
