"""The engine's one switch between its two backends: "triton" (our kernels) and "torch" (the
PyTorch references of the same contracts). The model, its runner and the sampler call a
Backend's ops; nothing else compares backend names."""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minivllm.engine.linear import skinny_tile
from minivllm.kernels import cascade_attention_decode, flash_attn_varlen, paged_attention_decode, qk_norm_rope, rms_norm, sample_tokens, silu_and_mul
from minivllm.reference import (
    attention_ref,
    paged_decode_gather,
    qk_norm_rope_ref,
    rms_norm_ref,
    sample_ref,
    silu_and_mul_ref,
    store_kvcache_ref,
)


@dataclass(frozen=True)
class Backend:
    """The ops of one backend, with the kernels' signatures (minivllm/kernels/README.md):
    norm_rope_store(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, slot_mapping)
    returns the normalised, rotated (q, k) and writes k and v into their cache slots;
    prefill(q, k, v, cu_q, cu_k, max_q, max_k, block_table, out=None) is causal; decode(q, k_cache,
    v_cache, block_tables, context_lens, max_context_len, out=None) (each writes into `out` when
    given, and returns it); cascade_decode(q, k_cache, v_cache, block_tables, context_lens,
    max_context_len, shared_len, max_shared_len)
    is decode for rows sharing leading blocks (the references compute it as plain decode);
    draw(logits, temperatures, generator, cuts) samples one token per row, among the tokens whose
    logit is at least the row's fp32 cut (cuts None: every token). linear_tile(form, rows,
    weight) is the skinny_linear tile the engine's projections take in that form at that shape
    (minivllm/engine/linear.py), or None for the unfused steps. `cuda_graphs`: decode may be
    captured in CUDA graphs (the references' host reads of device tensors cannot be)."""

    name: str
    norm_rope_store: Callable
    prefill: Callable
    decode: Callable
    cascade_decode: Callable
    rms_norm: Callable
    silu_and_mul: Callable
    draw: Callable
    linear_tile: Callable
    cuda_graphs: bool


def _triton_norm_rope_store(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, slot_mapping):
    # One pass: the store rides on the kernel that already holds each token's rotated k.
    return qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def _torch_norm_rope_store(q, k, v, q_weight, k_weight, cos, sin, eps, k_cache, v_cache, slot_mapping):
    q, k = qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps)
    store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """`result` copied into `out` when given (the references allocate their own), else itself."""
    return result if out is None else out.copy_(result)


def _triton_draw(logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator | None, cuts: torch.Tensor | None) -> torch.Tensor:
    # The kernel's Philox seed is drawn on the host, so `generator` is a CPU one.
    return sample_tokens(logits, temperatures, int(torch.randint(2**31 - 1, (1,), generator=generator)), cuts)


def _torch_draw(logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator | None, cuts: torch.Tensor | None) -> torch.Tensor:
    # Draws its noise on the logits' device, so `generator` lives there; in fp32, as the reference takes.
    logits = logits.float()
    if cuts is not None:
        logits = logits.masked_fill(logits < cuts[:, None], float("-inf"))
    return sample_ref(logits, temperatures, generator)


TRITON = Backend(
    name="triton",
    norm_rope_store=_triton_norm_rope_store,
    prefill=lambda q, k, v, cu_q, cu_k, max_q, max_k, block_table, out=None: flash_attn_varlen(
        q, k, v, cu_q, cu_k, max_q, max_k, causal=True, block_table=block_table, out=out
    ),
    decode=lambda q, kc, vc, tables, lens, max_len, out=None: paged_attention_decode(q, kc, vc, tables, lens, max_context_len=max_len, out=out),
    cascade_decode=lambda q, kc, vc, tables, lens, max_len, shared, max_shared: cascade_attention_decode(
        q, kc, vc, tables, lens, shared, max_context_len=max_len, max_shared_len=max_shared
    ),
    rms_norm=rms_norm,
    silu_and_mul=silu_and_mul,
    draw=_triton_draw,
    linear_tile=skinny_tile,
    cuda_graphs=True,
)
TORCH = Backend(
    name="torch",
    norm_rope_store=_torch_norm_rope_store,
    prefill=lambda q, k, v, cu_q, cu_k, max_q, max_k, block_table, out=None: _into(out, attention_ref(q, k, v, cu_q, cu_k, causal=True, block_table=block_table)),
    decode=lambda q, kc, vc, tables, lens, max_len, out=None: _into(out, paged_decode_gather(q, kc, vc, tables, lens)),
    cascade_decode=lambda q, kc, vc, tables, lens, max_len, shared, max_shared: paged_decode_gather(q, kc, vc, tables, lens),
    rms_norm=rms_norm_ref,
    silu_and_mul=silu_and_mul_ref,
    draw=_torch_draw,
    linear_tile=lambda form, rows, weight: None,
    cuda_graphs=False,
)
BACKENDS = {b.name: b for b in (TRITON, TORCH)}
