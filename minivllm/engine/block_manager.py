"""The KV cache's block allocator, with prefix caching.

A full block is named by a hash chained over every token up to its end, so equal hashes mean equal
prefixes and a later request can reuse the KV already computed for them. A block is registered
under its hash once a scheduled step writes its last token's KV and that token's id is known
(cache_blocks), never before: a request admitted later must not hit KV still to be computed.
Freed blocks keep their hash and stay hittable until a miss evicts them, least recently freed first.
"""

import struct
from collections import OrderedDict

import xxhash

from minivllm.engine.sequence import Sequence


def compute_hash(token_ids: list[int], prefix_hash: int | None) -> int:
    """The hash of a full block: its tokens chained on the hash of the block before (None for the first)."""
    h = xxhash.xxh64()
    if prefix_hash is not None:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.intdigest()


class Block:
    """One physical KV block. `hash` and `token_ids` are set only while it holds a full, cached block."""

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] = []

    def reset(self) -> None:
        """Forget the cached contents: the block is about to hold new tokens."""
        self.hash = None
        self.token_ids = []


class BlockManager:
    """Hands out physical blocks to sequences and shares full blocks between equal prefixes."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks!r} and {block_size!r}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in the order they were freed, never-used ones first: the front is evicted first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cache_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no live sequence; some still hold cached prefixes."""
        return len(self.free_blocks)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The physical blocks that can serve seq's leading blocks from the cache right now. The
        scheduler hashes a waiting sequence's prefix once, here, and hands the result to
        can_allocate and allocate."""
        hits: list[int] = []
        prefix_hash = None
        # The block with the last token is never a hit: the model must compute that token's logits.
        for i in range((len(seq) - 1) // self.block_size):
            tokens = seq.block(i)
            prefix_hash = compute_hash(tokens, prefix_hash)
            block_id = self.hash_to_block.get(prefix_hash)
            # Comparing tokens guards against hash collisions; a block already hit guards against a
            # colliding hash serving one block twice in a table.
            if block_id is None or self.blocks[block_id].token_ids != tokens or block_id in hits:
                break
            hits.append(block_id)
        return hits

    def _num_blocks_to_take(self, seq: Sequence, hits: list[int]) -> int:
        """Free blocks allocating seq consumes: one per miss, and one per hit on a freed cached block."""
        return seq.num_blocks - len(hits) + sum(self.blocks[b].ref_count == 0 for b in hits)

    def can_allocate(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        """Whether `allocate(seq)` would succeed now; `hits` is match_prefix(seq) when the caller
        has it. Hits on blocks in use by others cost nothing."""
        return self._num_blocks_to_take(seq, self.match_prefix(seq) if hits is None else hits) <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int] | None = None) -> None:
        """Give seq a block table covering all its tokens, reusing cached blocks for its prefix
        (`hits`: match_prefix(seq), taken with nothing allocated or freed since)."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        hits = self.match_prefix(seq) if hits is None else hits
        needed = self._num_blocks_to_take(seq, hits)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"no room for sequence {seq.seq_id}: it needs {needed} free blocks, {self.num_free_blocks} are free")
        table = []
        for i in range(seq.num_blocks):
            if i < len(hits):
                block = self.blocks[hits[i]]
                if block.ref_count == 0:
                    del self.free_blocks[block.block_id]
                block.ref_count += 1
                self.num_cache_hit_blocks += 1
            else:
                block = self._take_free_block()
            table.append(block.block_id)
        seq.block_table = table
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)

    def cache_blocks(self, seq: Sequence) -> None:
        """Register seq's full blocks whose KV a scheduled step writes (num_computed_tokens) and
        whose token ids are known, so later requests can hit them."""
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        for i in range(seq.num_hashed_blocks, full):
            prefix_hash = self.blocks[seq.block_table[i - 1]].hash if i else None
            tokens = seq.block(i)
            self._register(self.blocks[seq.block_table[i]], tokens, compute_hash(tokens, prefix_hash))
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def deallocate(self, seq: Sequence, forget: bool = False) -> None:
        """Release seq's blocks. Freed blocks keep their hash so a later request can still hit them,
        unless `forget`: then they leave the prefix cache, since their KV may never have been
        written, and are the first to be reused."""
        # Tail first, so a prefix's tail is evicted before its head, which more requests share.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count < 1:
                raise RuntimeError(f"block {block_id} of sequence {seq.seq_id} is already free")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if forget:
                    self._forget(block)
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_cached_tokens = seq.num_computed_tokens = seq.num_hashed_blocks = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether `may_append(seq)` would succeed now."""
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        """Make seq's table cover its newest token, whose KV the coming decode step writes."""
        missing = seq.num_blocks - len(seq.block_table)
        if missing > 1 or not seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} of {len(seq)} tokens has {len(seq.block_table)} blocks: allocate it first")
        if missing == 1:
            if not self.free_blocks:
                raise RuntimeError(f"no free block to extend sequence {seq.seq_id}")
            seq.block_table.append(self._take_free_block().block_id)

    def _take_free_block(self) -> Block:
        """Claim the least recently freed block for new tokens, evicting whatever it cached."""
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block

    def _forget(self, block: Block) -> None:
        """Take block out of the prefix cache: no request hits it again."""
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.reset()

    def _register(self, block: Block, tokens: list[int], block_hash: int) -> None:
        """Make a full block hittable; a newer copy of the same prefix replaces an older one."""
        block.hash = block_hash
        block.token_ids = list(tokens)
        self.hash_to_block[block_hash] = block.block_id
