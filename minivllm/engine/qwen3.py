"""Qwen3 for causal LM over packed tokens and a paged KV cache.

Layers take packed (num_tokens, hidden) activations, as the kernels do: no padding, no batch
dimension. Projections are fused (qkv, gate_up); the loader splits checkpoint weights into them.
Under tensor parallelism (minivllm/engine/tensor_parallel.py) each rank holds its share: qkv and gate_up split by
output rows (heads, FFN columns), o_proj and down_proj by input columns with a sum over ranks
after them, and the embedding and lm_head by vocabulary rows.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.engine.attention import AttentionMetadata, attend
from minivllm.engine.backend import TRITON, Backend
from minivllm.engine.linear import Projections
from minivllm.engine.tensor_parallel import TPGroup
from minivllm.reference import rope_cos_sin


@dataclass(frozen=True)
class ModelArgs:
    """The fields of a Qwen3 config.json the model needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    torch_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]


class RMSNorm(nn.Module):
    """forward(x) -> normalised x; forward(x, residual) -> (normalised x + residual, x + residual),
    the residual add fused into the norm that follows it."""

    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__()
        self.eps, self.fn = eps, backend.rms_norm
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.fn(x, self.weight, self.eps, residual)


class Qwen3Attention(nn.Module):
    def __init__(self, args: ModelArgs, backend: Backend, tp: TPGroup):
        super().__init__()
        self.num_heads = len(tp.q_heads(args.num_heads, args.num_kv_heads))
        self.num_kv_heads = len(tp.kv_heads(args.num_heads, args.num_kv_heads))
        self.head_dim, self.backend, self.tp = args.head_dim, backend, tp
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(args.hidden_size, q_size + 2 * kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(q_size, args.hidden_size, bias=args.attention_bias)
        # The per-head norms are applied with the rotary embedding, and k and v stored in the
        # cache, in one pass (kernels.qk_norm_rope).
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, backend)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, backend)
        self.norm_rope_store = backend.norm_rope_store

    def forward(self, qkv, cos, sin, kv_cache, meta: AttentionMetadata, proj: Projections):
        """qkv: the qkv projection's output (the layer fuses the norm before it); returns the o
        projection's, summed over ranks."""
        q, k, v = qkv.split(self.split, dim=-1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.norm_rope_store(
            q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim), v,
            self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps, kv_cache[0], kv_cache[1], meta.slot_mapping,
        )
        out = attend(q, k, v, kv_cache[0], kv_cache[1], meta, self.backend)
        return self.tp.all_reduce(proj.linear(out.flatten(1), self.o_proj))


class Qwen3MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp: TPGroup):
        super().__init__()
        self.tp = tp
        width = len(tp.split(args.intermediate_size, "FFN columns (intermediate_size)"))
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, args.hidden_size, bias=False)

    def forward(self, gate_up, proj: Projections):
        """gate_up: the gate_up projection's output (the layer fuses the norm before it); returns
        the down projection's, summed over ranks."""
        return self.tp.all_reduce(proj.gated_linear(gate_up, self.down_proj))


class VocabEmbedding(nn.Module):
    """The embedding's rows of this rank's vocabulary share (all of it on one rank); a token
    another rank holds embeds to zeros here, and the sum over ranks completes every row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup):
        super().__init__()
        self.tp, self.rows = tp, tp.vocab(vocab_size)
        self.weight = nn.Parameter(torch.zeros(tp.vocab_rows(vocab_size), hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.rows.start
        mine = (local >= 0) & (local < len(self.rows))
        x = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(x)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, backend: Backend, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)
        self.self_attn = Qwen3Attention(args, backend, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, backend)
        self.mlp = Qwen3MLP(args, tp)
        self.proj = Projections(backend)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        """x: the previous layer's MLP output, not yet added to `residual` (None before the first
        layer, where x is the embedding): each residual add and norm is fused into the projection
        after it where the kernel takes the shape (minivllm/engine/linear.py).
        Returns this layer's (MLP output, residual)."""
        attn, mlp, proj = self.self_attn, self.mlp, self.proj
        norm = self.input_layernorm
        qkv, residual = proj.norm_linear(x, residual, norm.weight, norm.eps, attn.qkv_proj)
        norm = self.post_attention_layernorm
        gate_up, residual = proj.norm_linear(attn(qkv, cos, sin, kv_cache, meta, proj), residual, norm.weight, norm.eps, mlp.gate_up_proj)
        return mlp(gate_up, proj), residual


class Qwen3ForCausalLM(nn.Module):
    """forward(input_ids, positions, kv_caches, meta) -> hidden states (num_tokens, hidden);
    compute_logits(hidden) -> logits (rows, vocab) in the model's dtype, on every rank. kv_caches[i] is layer
    i's (k_cache, v_cache) pair, each (num_blocks, block_size, num_kv_heads, head_dim) with this
    rank's `num_kv_heads`."""

    def __init__(self, args: ModelArgs, backend: Backend = TRITON, tp: TPGroup | None = None):
        super().__init__()
        self.args, self.tp, self.backend = args, tp or TPGroup(), backend
        self.embed_tokens = VocabEmbedding(args.vocab_size, args.hidden_size, self.tp)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(args, self.backend, self.tp) for _ in range(args.num_layers))
        # This rank's heads under tensor parallelism: what its kernels launch over.
        self.num_heads, self.num_kv_heads = self.layers[0].self_attn.num_heads, self.layers[0].self_attn.num_kv_heads
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, self.backend)
        self.lm_head = nn.Linear(args.hidden_size, self.embed_tokens.weight.shape[0], bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (num_tokens, head_dim) in `dtype` for int positions (num_tokens,), each below
        max_position_embeddings: rows of one table of every position (reference.rope_cos_sin's
        values), built on first use per dtype and device. A step then gathers two rows a token
        instead of computing them in about ten small kernels, which a decode step of a few tokens
        pays for in launches; the engine's first forward runs before any graph capture."""
        if self._rope is None or self._rope[0].dtype != dtype or self._rope[0].device != positions.device:
            every = torch.arange(self.args.max_position_embeddings, device=positions.device)
            self._rope = rope_cos_sin(every, self.args.head_dim, self.args.rope_theta, dtype)
        cos, sin = self._rope
        return cos[positions], sin[positions]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Left in the model's dtype: the sampler reads bf16 as it is, with no fp32 copy of the
        # (batch, vocab) logits a step.
        return self.tp.gather_last(self.lm_head(hidden))[:, : self.args.vocab_size]
