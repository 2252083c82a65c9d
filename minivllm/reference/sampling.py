"""Next-token sampling at a temperature, in plain PyTorch."""

import torch


def sample_ref(logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: fp32 (batch, vocab); temperatures: fp32 (batch,) >= 0. Returns int64 (batch,):
    argmax where the temperature is 0, else a draw from softmax(logits / temperature), made as
    argmax(p / E) with E ~ Exp(1) per token, which picks token i with probability p_i."""
    probs = (logits / temperatures.clamp_min(1e-6)[:, None]).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.where(temperatures == 0, logits.argmax(dim=-1), (probs / noise).argmax(dim=-1))


def filter_probs_ref(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The sort-based definition of the filters, one row: fp64 (vocab,) probabilities of drawing
    each token from fp32 `logits` (vocab,) at `temperature` > 0 after transformers' warpers in
    their order: top-k (0 is off), top-p over what top-k kept, renormalized (1.0 is off), min-p
    (0.0 is off). The vocabulary is sorted by logit; ties break by sort order."""
    values, order = logits.double().sort(descending=True)
    probs = (values / temperature).softmax(dim=-1)
    if top_k:
        probs[top_k:] = 0
        probs /= probs.sum()
    if top_p < 1:
        probs[probs.cumsum(dim=-1) - probs >= top_p] = 0
        probs /= probs.sum()
    if min_p:
        probs[probs < min_p * probs[0]] = 0
        probs /= probs.sum()
    return torch.zeros_like(probs).scatter_(0, order, probs)
