"""A kernel compiles once per shape, not per call: an int argument that changes from call to call
in serving (a sampling seed, a split count, the width of a step's block table) must not make
Triton build another variant when its value turns divisible by 16 or equal to 1. Such a compile
costs an engine step about 0.4 s (benchmarks/NOTES.md, eleventh session). GPU only: the
interpreter compiles nothing. Also the compile counter itself, on any device."""

import pytest
import torch
import triton

from minivllm.kernels import compiles
from minivllm.kernels.compiles import compiles_so_far, watch_compiles
from minivllm.kernels.flash_attention import flash_attn_varlen
from minivllm.kernels.paged_attention import paged_attention_decode
from minivllm.kernels.sampling import sample_tokens
from minivllm.reference.inputs import generator, paged_cache, randn

# Values of each kind Triton would tell apart: divisible by 16, equal to 1, neither.
SPECIAL_INTS = (16, 1, 3, 32, 48)


def new_compiles(fn) -> int:
    """Triton compiles while fn() runs."""
    watch_compiles()
    before = compiles_so_far()
    fn()
    torch.cuda.synchronize()
    return compiles_so_far() - before


def test_counter_counts_and_keeps_an_earlier_hook(monkeypatch):
    """The counter chains the post-compile hook it finds, and counts each call of its own."""
    seen = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(kw["key"]))
    monkeypatch.setattr(compiles, "_watching", False)
    before = compiles_so_far()
    watch_compiles()
    watch_compiles()  # idempotent: one counting hook, not two
    triton.knobs.runtime.jit_post_compile_hook(key="k1")
    triton.knobs.runtime.jit_post_compile_hook(key="k2")
    assert compiles_so_far() - before == 2
    assert seen == ["k1", "k2"]


@pytest.mark.gpu
def test_sampling_compiles_once_whatever_the_seed_and_batch():
    """The seed changes every step, the split count with the batch."""
    vocab = 151936  # Qwen3's: enough slices that the split count moves with the batch
    gen = generator(1, torch.device("cuda"))
    logits = torch.randn(80, vocab, device="cuda", generator=gen)
    temps = torch.full((80,), 0.7, device="cuda")
    sample_tokens(logits[:5], temps[:5], seed=7)

    def calls():
        for i, batch in enumerate(range(1, 81)):
            sample_tokens(logits[:batch], temps[:batch], seed=SPECIAL_INTS[i % len(SPECIAL_INTS)] + 64 * i)

    assert new_compiles(calls) == 0


@pytest.mark.gpu
def test_paged_prefill_compiles_once_whatever_the_table_width():
    """A step's block table is as wide as its longest sequence; padding columns (-1) change the
    width, not the answer."""
    device = torch.device("cuda")
    gen = generator(2, device)
    context_lens, page, heads, kv_heads, dim = (13, 7), 16, 6, 2, 64
    cache = paged_cache(context_lens, page, kv_heads, dim, torch.bfloat16, device, gen)
    new = (5, 7)
    q = randn((sum(new), heads, dim), torch.bfloat16, device, gen)
    cu_q = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, context_lens[0], sum(context_lens)], dtype=torch.int32, device=device)

    def attend(width: int) -> torch.Tensor:
        table = torch.full((2, width), -1, dtype=torch.int32, device=device)
        table[:, : cache.block_table.shape[1]] = cache.block_table
        return flash_attn_varlen(q, cache.k_cache, cache.v_cache, cu_q, cu_k, max(new), max(context_lens), block_table=table)

    first = attend(2)
    outs = []
    # A table narrower than the cache's own cannot hold its blocks.
    widths = [w for w in SPECIAL_INTS if w >= cache.block_table.shape[1]]
    assert new_compiles(lambda: outs.extend(attend(w) for w in widths)) == 0
    for out in outs:
        torch.testing.assert_close(out, first, rtol=0, atol=0)


@pytest.mark.gpu
def test_decode_merge_compiles_once_per_split_width():
    """Outside a CUDA graph the split count follows the batch: counts that share the merge's
    power-of-two width share its compiled variant."""
    device = torch.device("cuda")
    gen = generator(3, device)
    cache = paged_cache((300, 41), 16, 2, 64, torch.float16, device, gen)
    q = randn((2, 4, 64), torch.float16, device, gen)
    ctx = torch.tensor([300, 41], dtype=torch.int32, device=device)

    def decode(num_splits: int) -> torch.Tensor:
        return paged_attention_decode(q, cache.k_cache, cache.v_cache, cache.block_table, ctx, num_splits=num_splits)

    first = decode(9)
    outs = []
    assert new_compiles(lambda: outs.extend(decode(n) for n in (16, 10, 13, 15))) == 0
    for out in outs:
        torch.testing.assert_close(out, first, rtol=2e-3, atol=2e-3)
