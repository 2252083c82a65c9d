"""Next-token sampling at a temperature, in plain PyTorch."""

import torch


def sample_ref(logits: torch.Tensor, temperatures: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: fp32 (batch, vocab); temperatures: fp32 (batch,) >= 0. Returns int64 (batch,):
    argmax where the temperature is 0, else a draw from softmax(logits / temperature), made as
    argmax(p / E) with E ~ Exp(1) per token, which picks token i with probability p_i."""
    probs = (logits / temperatures.clamp_min(1e-6)[:, None]).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.where(temperatures == 0, logits.argmax(dim=-1), (probs / noise).argmax(dim=-1))
