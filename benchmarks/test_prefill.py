"""Prefill attention: our Triton kernels against the PyTorch reference and SDPA's backends.

Grid as in flash-attn's benchmark: seqlen 512..16k with batch x seqlen near 16k tokens, causal and
not, per model shard and dtype; plus seqlen 128, where the naive one-tile kernel still runs. Every implementation's output is checked against the float64
reference (the tests' tolerance rule) before it is timed; a wrong one fails and is never timed.
"""

import re
import warnings

import pytest
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.extra_info import prefill_counts, record
from benchmarks.grid import GPU_GRID
from benchmarks.timing import measure
from minivllm.dtypes import dtype_name
from minivllm.kernels import flash_attn_varlen, naive_attention
from minivllm.kernels.flash_attention import prefill_config
from minivllm.kernels.launch import head_dim_block
from minivllm.kernels.naive_attention import NAIVE_MAX_SEQLEN
from minivllm.reference import attention_ref
from minivllm.reference.inputs import cu_seqlens, generator, randn
from minivllm.reference.prefill_check import check_prefill

# On a GPU, 128 first: naive_triton's one-tile limit at head_dim 128 (every preset's), its one shape there.
SEQLENS = (NAIVE_MAX_SEQLEN[128], 512, 1024, 2048, 4096, 8192, 16384) if GPU_GRID else (67,)
TOKENS = 16384 if GPU_GRID else 134  # batch x seqlen; the CPU smoke shape is 2 x 67
CAUSAL = (False, True) if GPU_GRID else (True,)
SDPA = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
IMPLS = ("torch_standard", "naive_triton", "flash_triton", *SDPA)
# torch_standard holds ~4 score-sized tensors (scores, masked, probabilities, masked again).
STANDARD_SCORE_COPIES = 4


def _implementation(impl, q, k, v, batch, seqlen, causal, free_bytes):
    """(fn, packed): fn runs `impl` on packed (batch*seqlen, heads, head_dim) inputs with nothing
    else in it, since it is what gets timed; packed(fn()) is the output in q's packed layout.
    pytest.skip where the implementation cannot run this shape."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    cu = cu_seqlens([seqlen] * batch, q.device)
    if impl == "torch_standard":
        need = STANDARD_SCORE_COPIES * num_heads * seqlen**2 * q.element_size()
        if need > free_bytes // 2:
            pytest.skip(f"torch_standard materialises {need / 2**30:.1f} GiB of scores per sequence; {free_bytes / 2**30:.1f} GiB free")
        return (lambda: attention_ref(q, k, v, cu, cu, causal=causal)), _same
    if impl == "naive_triton":
        limit = NAIVE_MAX_SEQLEN[head_dim_block(q.shape[-1])]
        if seqlen > limit:
            pytest.skip(f"naive_triton holds a whole sequence in one tile: seqlen {seqlen} is past its limit of {limit} at head_dim {q.shape[-1]}")
        return (lambda: naive_attention(q, k, v, cu, seqlen, causal=causal)), _same
    if impl == "flash_triton":
        return (lambda: flash_attn_varlen(q, k, v, cu, cu, seqlen, seqlen, causal=causal)), _same
    if q.device.type != "cuda":
        pytest.skip(f"{impl} is a GPU peer: SDPA's fused backends need CUDA")
    # SDPA wants (batch, heads, seqlen, head_dim): a transposed view of the same packed storage,
    # which its kernels read natively, so no copy is timed.
    q4, k4, v4 = (t.view(batch, seqlen, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))

    def sdpa():
        with sdpa_kernel(SDPA[impl]):
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, enable_gqa=num_heads != num_kv_heads)

    return sdpa, lambda out: out.transpose(1, 2).reshape(q.shape)


def _same(out):
    return out


def _first_call(impl, fn):
    """Run fn once (compiling it); turn an SDPA backend's refusal of the shape into a skip."""
    if impl not in SDPA:
        return fn()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn()
        except RuntimeError as e:
            pytest.skip(f"{impl} refuses this shape: {_refusal(caught) or str(e).splitlines()[0]}")


def _refusal(caught) -> str:
    """SDPA's reason for refusing, from the warnings it raised: its first sentence, without the
    "not used because:" headers, the "runtime disabled" notes for the other backends, or the
    source locations."""
    reasons = []
    for w in caught:
        text = re.sub(r"\s*\(Triggered internally at [^)]*\)", "", str(w.message)).strip()
        if text and not text.endswith("because:") and "runtime disabled" not in text:
            reasons.append(text.split(". ")[0])
    return "; ".join(dict.fromkeys(reasons))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda c: "causal" if c else "full")
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_prefill(benchmark, request, device, ceiling, cold_round, free_bytes, shard, dtype, seqlen, causal, impl):
    batch = max(1, TOKENS // seqlen)
    gen = generator(seqlen, device)
    q = randn((batch * seqlen, shard.num_heads, shard.head_dim), dtype, device, gen)
    k = randn((batch * seqlen, shard.num_kv_heads, shard.head_dim), dtype, device, gen)
    v = randn((batch * seqlen, shard.num_kv_heads, shard.head_dim), dtype, device, gen)

    fn, packed = _implementation(impl, q, k, v, batch, seqlen, causal, free_bytes)
    check_prefill(packed(_first_call(impl, fn)), q, k, v, batch, seqlen, causal, impl)

    benchmark.group = f"prefill {shard.id} {dtype_name(dtype)} {'causal' if causal else 'full'} b={batch} s={seqlen}"
    measure(benchmark, fn, device, request.config, cold_round)
    flops, nbytes = prefill_counts(batch, seqlen, shard.num_heads, shard.num_kv_heads, shard.head_dim, causal, dtype)
    source = {"config_source": prefill_config(q, k, seqlen, causal, paged=False)[1]} if impl == "flash_triton" else {}
    record(benchmark, ceiling, suite="prefill", impl=impl, shard=shard, dtype=dtype, flops=flops, nbytes=nbytes, batch=batch, seqlen=seqlen, causal=causal, **source)
