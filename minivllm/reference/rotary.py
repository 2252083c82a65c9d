"""Rotary position embedding (rotate-half convention) and Qwen3's per-head q/k RMSNorm before it."""

import torch

from .rms_norm import rms_norm_ref


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (num_tokens, head_dim) in `dtype`, for int positions (num_tokens,): the
    angle of pair i is position * theta^(-2i / head_dim), computed in fp32, and each half of the
    row repeats the angles (rotate-half layout). Computed once per step and shared by every layer."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (num_tokens, heads, head_dim); cos, sin: (num_tokens, head_dim). Rotates the pair
    (x[i], x[i + head_dim/2]) by each token's angle, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's attention inputs: each head of q (num_tokens, heads, head_dim) and k (num_tokens,
    kv_heads, head_dim) RMS-normalised over head_dim with its weight (head_dim,), then rotated.
    Returns new (q, k) of the same shapes and dtype."""
    q = rms_norm_ref(q.reshape(-1, q.shape[-1]), q_weight, eps).view(q.shape)
    k = rms_norm_ref(k.reshape(-1, k.shape[-1]), k_weight, eps).view(k.shape)
    return apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
