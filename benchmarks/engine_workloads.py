"""The engine suite's workloads: what requests arrive, and the engine settings each runs under.

- nano: nano-vllm's benchmark. 256 prompts of random ids, prompt and output lengths each uniform
  in [100, 1024]; every prompt fits one step's token budget.
- shared_prefix: requests that share one system prompt, then a suffix of their own; after the
  first request computes it, the prefix cache serves it to the rest.
- long_context: a few prompts several times the step's token budget, so they are prefilled in
  chunks over many steps, beside the decodes of those already started.
- qwen3_sampling: nano's requests with Qwen3's generation defaults (temperature 0.6, top_k 20,
  top_p 0.95) on every one, where the others sample at temperature 0.6 alone: the filters' cost.

Sizes are the GPU's; on the CPU (the Triton interpreter) each shrinks to a smoke run of the same
shape. Every workload is drawn with a seeded generator, the same on every run.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.grid import GPU_GRID
from benchmarks.presets import PRESETS, ModelPreset
from minivllm.engine import LLM, SamplingParams
from minivllm.testing.random_checkpoint import write_random_qwen3

ROPE_THETA = 1e6  # every Qwen3 model's

TEMPERATURE = 0.6  # every request's, as nano-vllm's benchmark samples
ENGINE_PRESETS = tuple(sorted(name for name, p in PRESETS.items() if p.ffn is not None))  # the engine runs dense Qwen3 models only
MAX_TOKEN_ID = 10000  # prompt ids are drawn from [0, min(this, vocab - 1)], as nano-vllm's benchmark does


@dataclass(frozen=True)
class Workload:
    """Requests of prompt lengths uniform in prompt_lens and output lengths in output_lens, each
    prompt after `shared_prefix` tokens common to all; run with max_num_batched_tokens (None:
    the engine's default) and a max_model_len that holds the longest request. Every request
    samples at TEMPERATURE with these top_k and top_p (0 and 1.0: off)."""

    name: str
    num_seqs: int
    prompt_lens: tuple[int, int]
    output_lens: tuple[int, int]
    shared_prefix: int = 0
    max_num_batched_tokens: int | None = None
    top_k: int = 0
    top_p: float = 1.0

    @property
    def max_model_len(self) -> int:
        return self.shared_prefix + self.prompt_lens[1] + self.output_lens[1]

    def engine_settings(self) -> dict:
        """LLM config the workload needs beyond the defaults."""
        budget = {} if self.max_num_batched_tokens is None else dict(max_num_batched_tokens=self.max_num_batched_tokens)
        return dict(max_model_len=self.max_model_len, **budget)

    def draw(self, seed: int, vocab: int) -> tuple[list[list[int]], list[int]]:
        """(prompts, output lengths): the shared prefix (if any) then each request's own ids."""
        rng = random.Random(seed)
        top = min(MAX_TOKEN_ID, vocab - 1)
        prefix = [rng.randint(0, top) for _ in range(self.shared_prefix)]
        prompts = [prefix + [rng.randint(0, top) for _ in range(rng.randint(*self.prompt_lens))] for _ in range(self.num_seqs)]
        return prompts, [rng.randint(*self.output_lens) for _ in range(self.num_seqs)]

    def generate(self, llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> list[dict]:
        """`llm.generate` on the drawn requests, each decoding exactly its output length."""
        # Every sampling field explicit: a checkpoint's generation_config.json would fill in unset ones.
        params = [
            SamplingParams(temperature=TEMPERATURE, max_tokens=n, ignore_eos=True, top_k=self.top_k, top_p=self.top_p, min_p=0.0)
            for n in output_lens
        ]
        return llm.generate(prompts, params, use_tqdm=False)


if GPU_GRID:
    WORKLOADS = (
        Workload("nano", 256, (100, 1024), (100, 1024), max_num_batched_tokens=16384),
        Workload("shared_prefix", 256, (100, 1024), (100, 1024), shared_prefix=2048, max_num_batched_tokens=16384),
        Workload("long_context", 16, (16384, 32768), (128, 512), max_num_batched_tokens=8192),
        Workload("qwen3_sampling", 256, (100, 1024), (100, 1024), max_num_batched_tokens=16384, top_k=20, top_p=0.95),
    )
else:
    WORKLOADS = (
        Workload("nano", 4, (3, 9), (3, 9)),
        Workload("shared_prefix", 4, (3, 9), (3, 9), shared_prefix=34),
        Workload("long_context", 2, (40, 60), (3, 9), max_num_batched_tokens=16),
        Workload("qwen3_sampling", 4, (3, 9), (3, 9), top_k=20, top_p=0.95),
    )
WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}
MAX_POSITIONS = max(w.max_model_len for w in WORKLOADS)  # the random checkpoints' max_position_embeddings


def check_outputs(outputs: list[list[int]], output_lens: list[int], vocab: int, impl: str) -> None:
    """No request lost or cut short: every sequence has its requested length in valid ids
    (AssertionError otherwise, raised explicitly so that a tool run under python -O checks too)."""
    got = [len(o) for o in outputs]
    if got != output_lens:
        raise AssertionError(f"{impl}: output lengths {got[:8]}... differ from the requested {output_lens[:8]}...")
    if not all(0 <= t < vocab for o in outputs for t in o):
        raise AssertionError(f"{impl}: a token id outside [0, {vocab})")


def write_checkpoint(preset: ModelPreset, dtype: torch.dtype, directory: Path) -> Path:
    """A seeded random-weight Qwen3 checkpoint in `preset`'s shapes, without a tokenizer, that holds
    every workload's longest request: what the engine suite and the engine profile run."""
    return write_random_qwen3(
        directory, num_layers=preset.layers, hidden_size=preset.hidden, num_heads=preset.num_heads, num_kv_heads=preset.num_kv_heads,
        head_dim=preset.head_dim, intermediate_size=preset.ffn, vocab_size=preset.vocab, tie_word_embeddings=preset.tied,
        rope_theta=ROPE_THETA, max_position_embeddings=MAX_POSITIONS, dtype=dtype, with_tokenizer=False,
    )
