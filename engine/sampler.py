"""Next-token choice from logits: greedy, or temperature sampling with optional top-k / top-p."""

import torch


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    logits: fp32 (batch, vocab). temperatures: fp32 (batch,), 0 means greedy (argmax). top_ks: int
    (batch,), 0 keeps every token; top_ps: fp32 (batch,), 1.0 keeps every token. Returns int64
    (batch,). Sampling draws argmax(p / E) with E ~ Exp(1), which picks token i with probability
    p_i without a host sync.
    """
    greedy = logits.argmax(dim=-1)
    if bool((temperatures == 0).all()):
        return greedy
    scaled = logits / temperatures.clamp_min(1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_ks > 0, top_ks, vocab)[:, None]
    drop = rank >= k
    # top-p keeps the smallest prefix whose mass reaches p: a token goes once the mass before it does.
    probs_sorted = sorted_logits.softmax(dim=-1)
    drop |= (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_ps[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    probs = filtered.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy, sampled)
