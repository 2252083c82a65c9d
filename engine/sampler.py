"""Next-token choice from logits: greedy, or temperature sampling with optional top-k / top-p."""

import torch


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None,
    top_ks: torch.Tensor | None = None,
    top_ps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    logits: fp32 (batch, vocab). temperatures: fp32 (batch,), 0 means greedy (argmax); None means
    every row is greedy. top_ks: int (batch,), 0 keeps every token; top_ps: fp32 (batch,), 1.0
    keeps every token; both None (the caller knows no row filters) skips the vocabulary sort that
    filtering needs. Returns int64 (batch,). Sampling draws argmax(p / E) with E ~ Exp(1), which
    picks token i with probability p_i; nothing here reads device memory on the host.
    """
    greedy = logits.argmax(dim=-1)
    if temperatures is None:
        return greedy
    scaled = logits / temperatures.clamp_min(1e-6)[:, None]
    if top_ks is not None or top_ps is not None:
        scaled = _filter(scaled, top_ks, top_ps)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperatures == 0, greedy, sampled)


def _filter(scaled: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None) -> torch.Tensor:
    """`scaled` with the tokens outside each row's top-k and top-p set to -inf."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        rank = torch.arange(vocab, device=scaled.device)[None, :]
        drop |= rank >= torch.where(top_ks > 0, top_ks, vocab)[:, None]
    if top_ps is not None:
        # top-p keeps the smallest prefix whose mass reaches p: a token goes once the mass before it does.
        probs_sorted = sorted_logits.softmax(dim=-1)
        drop |= (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_ps[:, None]
    drop[:, 0] = False
    return torch.empty_like(scaled).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
