"""One request as the scheduler and block manager see it: its tokens, its state, its KV blocks."""

from enum import Enum, auto
from itertools import count

from minivllm.engine.request_metrics import RequestMetrics
from minivllm.engine.sampling_params import SamplingParams

PENDING = -1  # the id held for a token sampled on the device whose value the host does not know yet


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A prompt and the tokens generated after it, cut into logical blocks of `block_size` tokens.

    `block_table[i]` is the physical KV block holding logical block i. `num_computed_tokens` counts
    the leading tokens whose KV is in the cache or is written by a step already scheduled: the
    prefix cache's hits, then each prefill chunk and decode step. `num_cached_tokens` counts the
    hits alone, at the latest allocation. `num_hashed_blocks` leading blocks are registered in the
    prefix cache.

    Under async scheduling a token is sampled on the device one step before the host learns it:
    it is appended as PENDING, so lengths and positions stay exact, and filled in once known.
    Pending tokens are always the newest ones.
    """

    _next_id = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        if not token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        self.seq_id = next(Sequence._next_id)
        self.status = SequenceStatus.WAITING
        # Copied so the caller's list never grows under it.
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.num_pending_tokens = 0
        self.block_table: list[int] = []
        self.block_size = block_size
        # The LLM fills unset fields from the checkpoint's generation defaults; any it left (a
        # Sequence built directly) take the library's. Kept whole for tensor-parallel workers.
        sampling_params = sampling_params.resolve({})
        self.sampling_params = sampling_params
        self.temperature = sampling_params.temperature
        self.max_tokens = sampling_params.max_tokens
        self.ignore_eos = sampling_params.ignore_eos
        self.top_k = sampling_params.top_k
        self.top_p = sampling_params.top_p
        self.min_p = sampling_params.min_p
        self.metrics = RequestMetrics()

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, {self.status.name}, tokens={len(self)}, blocks={self.block_table})"

    @property
    def is_finished(self) -> bool:
        """Whether the scheduler has finished this sequence."""
        return self.status == SequenceStatus.FINISHED

    @property
    def num_known_tokens(self) -> int:
        """Leading tokens whose ids the host knows: all but the pending ones."""
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def num_completion_tokens(self) -> int:
        """How many tokens have been generated so far, pending ones included."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's tokens (a copy)."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        """The generated tokens (a copy)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        """Logical blocks needed to hold every token, the last one possibly partial."""
        return -(-len(self.token_ids) // self.block_size)

    def block(self, i: int) -> list[int]:
        """The token ids of logical block i (fewer than block_size for a partial last block)."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for a sequence of {self.num_blocks} blocks")
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        """Add a sampled token whose id is known; its KV is written by the next decode step."""
        if self.num_pending_tokens:
            raise RuntimeError(f"sequence {self.seq_id} has pending tokens: fill those first")
        self.token_ids.append(token_id)

    def append_pending(self) -> None:
        """Hold the place of a token the step being launched samples on the device."""
        self.token_ids.append(PENDING)
        self.num_pending_tokens += 1

    def fill_pending(self, token_id: int) -> None:
        """The oldest pending token's id, now known on the host."""
        if not self.num_pending_tokens:
            raise RuntimeError(f"sequence {self.seq_id} has no pending token to fill")
        self.token_ids[self.num_known_tokens] = token_id
        self.num_pending_tokens -= 1

    def drop_pending(self) -> None:
        """Forget the pending tokens: sampled for a sequence that had finished before them."""
        del self.token_ids[self.num_known_tokens :]
        self.num_pending_tokens = 0
