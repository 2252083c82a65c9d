"""What the engine's end-to-end tests share: tiny model configs, prompts around block edges, the
engine settings they run under, and transformers' greedy generation as the reference."""

import torch

from minivllm.engine import LLM, SamplingParams
from minivllm.testing.transformers_reference import load_transformers_model

CONFIGS = {
    "gqa-d32": dict(num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False),
    "mqa-d64-tied": dict(num_heads=4, num_kv_heads=1, head_dim=64, tie_word_embeddings=True),
    "mha-d128": dict(num_heads=2, num_kv_heads=2, head_dim=128, tie_word_embeddings=False),
}
BLOCK = 16
# Lengths around the block edges; with 12 new tokens the decode crosses an edge too.
PROMPT_LENS = (5, 16, 17, 33)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(lens, seed=0, vocab=256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]


def engine(checkpoint, backend, **config) -> LLM:
    """float32 on the test device; on a GPU the triton backend captures CUDA graphs for decode."""
    config = dict(max_model_len=96, max_num_batched_tokens=256, kvcache_block_size=BLOCK, num_kvcache_blocks=64) | config
    return LLM(str(checkpoint), attention_backend=backend, dtype="float32", **config)


def transformers_greedy(checkpoint, device):
    """run(prompt, n): transformers' own float32 Qwen3, greedy, exactly n new tokens."""
    model = load_transformers_model(checkpoint, dtype=torch.float32, device=device)

    def run(prompt: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return out[0, len(prompt) :].tolist()

    return run
