"""Next-token choice from logits: greedy, or temperature sampling with optional top-k / top-p."""

import torch

from minivllm.engine.backend import TRITON, Backend


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None,
    top_ks: torch.Tensor | None = None,
    top_ps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: Backend = TRITON,
) -> torch.Tensor:
    """Pick one token per row.

    logits: (batch, vocab), fp32 or the model's bf16/fp16 (filtering and the torch backend's draw
    upcast; the triton draw reads them as they are). temperatures: fp32 (batch,), 0 means greedy
    (argmax); None means every row is greedy. top_ks: int (batch,), 0 keeps every token; top_ps: fp32 (batch,), 1.0
    keeps every token; both None (the caller knows no row filters) skips the vocabulary sort that
    filtering needs. All tensors live on logits' device. The TRITON backend draws in one pass over
    the logits (kernels.sample_tokens) with a seed drawn on the host, so `generator` is a CPU one;
    TORCH draws noise on the logits' device with reference.sample_ref, so `generator` lives there
    (default, either way: torch's global one; minivllm/engine/backend.py). Returns int64 (batch,); nothing
    here reads device memory on the host.
    """
    if temperatures is None:
        return logits.argmax(dim=-1)
    if top_ks is not None or top_ps is not None:
        # Filtering keeps each row's argmax, so greedy rows are unchanged by it.
        logits = _filter(logits.float(), temperatures, top_ks, top_ps)
    return backend.draw(logits, temperatures, generator)


def _filter(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None) -> torch.Tensor:
    """fp32 `logits` with the tokens outside each row's top-k and top-p set to -inf. Tokens are
    ranked by their logits, which no temperature reorders, and only top-p's probabilities are
    taken at the row's temperature: logits scaled first by a huge temperature could tie below
    float32's resolution, and top_k=1 would then keep whichever tied token sorted first."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        rank = torch.arange(vocab, device=logits.device)[None, :]
        drop |= rank >= torch.where(top_ks > 0, top_ks, vocab)[:, None]
    if top_ps is not None:
        # top-p keeps the smallest prefix whose mass reaches p: a token goes once the mass before it does.
        probs_sorted = (sorted_logits / temperatures.clamp_min(1e-6)[:, None]).softmax(dim=-1)
        drop |= (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_ps[:, None]
    drop[:, 0] = False
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
