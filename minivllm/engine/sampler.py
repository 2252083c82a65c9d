"""Next-token choice from logits: greedy, or temperature sampling with optional top-k, top-p and min-p.

The filters never sort the vocabulary. Each row's kept tokens are those whose logit reaches a
cut: top-k, top-p and min-p each keep a set of the highest logits, so their intersection is one
too. torch.topk finds the few highest logits the cut can fall among (top_k of them, or
TOP_P_CANDIDATES for a row asking top-p without top-k), and the draw applies the cut as it
reads the logits (the triton backend's one pass), so the (batch, vocab) logits are neither
upcast nor copied masked.
"""

import torch

from minivllm.engine.backend import TRITON, Backend

# How many of its highest logits a row asking top-p without top-k ranks first. Should they hold
# less than top_p of its mass, the cut lies further down and the row is ranked again over the
# whole vocabulary (exact, at a sort's cost); at Qwen3's vocabulary 1024 tokens are under 1%.
TOP_P_CANDIDATES = 1024


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor | None,
    top_ks: torch.Tensor | None = None,
    top_ps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: Backend = TRITON,
    *,
    min_ps: torch.Tensor | None = None,
    top_k_max: int | None = None,
    top_p_without_top_k: bool | None = None,
) -> torch.Tensor:
    """Pick one token per row.

    logits: (batch, vocab), fp32 or the model's bf16/fp16 (the triton draw reads them as they
    are; only the few ranked candidates, a top-p row's sum over the vocabulary without top-k, and
    the torch backend's draw upcast). temperatures: fp32 (batch,), 0 means greedy
    (argmax); None means every row is greedy. top_ks: int64 (batch,), 0 keeps every token, at most
    vocab; top_ps: fp32 (batch,) in (0, 1], 1.0 keeps every token; min_ps: fp32 (batch,) in [0, 1],
    0.0 keeps every token. A None filter tensor means no row uses that filter. All tensors live on
    logits' device, contiguous.

    The filters act as transformers' warpers in their order: top-k, then top-p over the top-k
    survivors' renormalized probabilities at the row's temperature, then min-p (keep a token
    whose probability is at least min_p times the highest). Tokens are ranked by their logits,
    which no temperature reorders: logits scaled first by a huge temperature could tie below
    float32's resolution, and top_k=1 would then keep whichever tied token ranked first.

    top_k_max (the largest of top_ks) and top_p_without_top_k (whether some row has top_p < 1
    with top_k 0) are host facts that size the candidate set; None reads them from the tensors,
    a host read of device memory. Given both, nothing here reads device memory on the host,
    except that rows asking top-p without top-k whose TOP_P_CANDIDATES highest logits hold less
    than top_p of their mass are found with one host read and ranked over the whole vocabulary.

    The TRITON backend draws in one pass over the logits (kernels.sample_tokens) with a seed
    drawn on the host, so `generator` is a CPU one; TORCH draws noise on the logits' device with
    reference.sample_ref, so `generator` lives there (default, either way: torch's global one;
    minivllm/engine/backend.py). Returns int64 (batch,).
    """
    if temperatures is None:
        return logits.argmax(dim=-1)
    if top_ks is not None or top_ps is not None or min_ps is not None:
        if top_k_max is None:
            top_k_max = 0 if top_ks is None else int(top_ks.max())
        if top_p_without_top_k is None:
            top_p_without_top_k = top_ps is not None and bool(((top_ps < 1) & (top_ks == 0 if top_ks is not None else True)).any())
        # Filtering keeps each row's argmax, so greedy rows are unchanged by it.
        width = max(top_k_max, TOP_P_CANDIDATES if top_p_without_top_k else 1)
        cut, short = _cuts(logits, temperatures, top_ks, top_ps, min_ps, min(width, logits.shape[-1]), top_p_without_top_k)
        if top_p_without_top_k and bool(short.any()):
            rows = short.nonzero().squeeze(1)
            cut[rows] = _cuts(logits[rows], temperatures[rows], None, top_ps[rows], None if min_ps is None else min_ps[rows], logits.shape[-1], True)[0]
        return backend.draw(logits, temperatures, generator, cut)
    return backend.draw(logits, temperatures, generator, None)


def _cuts(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None, min_ps: torch.Tensor | None, width: int,
    top_p_without_top_k: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cut, short), both (batch,): `logits` (batch, vocab), in any float dtype, keep the tokens
    whose logit, as fp32, is at least the row's fp32 cut (-inf: every token), ranking only the
    `width` highest logits, which must cover every row's top_k; top_p_without_top_k says whether
    some row's top-p mass is over the whole vocabulary (a pass over it), not its top-k
    survivors'. `short` (bool) marks rows whose top-p cut lies beyond those `width`, rows asking
    top-p without top-k whose candidates hold less than top_p of the mass; their cut is wrong
    until ranked again with width = vocab. Ties at the cut are all kept."""
    # Ranked in the logits' own dtype, whose values fp32 holds exactly: the cut is one of them.
    values = logits.topk(width, dim=-1).values.float()  # (batch, width), descending
    rank = torch.arange(width, device=logits.device)
    keep = torch.ones_like(values, dtype=torch.bool)
    cuts_here = torch.zeros_like(temperatures, dtype=torch.bool)  # rows some candidate filter applies to
    short = torch.zeros_like(cuts_here)
    temps = temperatures.clamp_min(1e-6)[:, None]
    with_k = torch.zeros_like(cuts_here) if top_ks is None else top_ks > 0
    if top_ks is not None:
        keep &= (rank < top_ks[:, None]) | ~with_k[:, None]
        cuts_here |= with_k
    if top_ps is not None:
        scaled = values / temps
        # Normalized over the top-k survivors, or over the whole vocabulary for a row without top-k.
        norm = scaled.masked_fill(~keep, float("-inf")).logsumexp(dim=-1)
        if top_p_without_top_k:
            norm = torch.where(with_k, norm, (logits.float() / temps).logsumexp(dim=-1))
        probs = (scaled - norm[:, None]).exp().masked_fill(~keep, 0)
        mass = probs.cumsum(dim=-1)
        on = top_ps < 1
        # top-p keeps the smallest prefix whose mass reaches p: a token goes once the mass before it
        # does. Rows with p = 1 skip it: rounding could take the mass before a last token to 1.
        keep &= (mass - probs < top_ps[:, None]) | ~on[:, None]
        cuts_here |= on
        short = on & ~with_k & (mass[:, -1] < top_ps) & (width < logits.shape[-1])
    # keep is a prefix of the ranking, never empty: rank 0 passes top_k >= 1 and top-p's mass 0 < p.
    cut = torch.where(cuts_here, values.gather(1, keep.sum(dim=-1, keepdim=True) - 1).squeeze(1), float("-inf"))
    if min_ps is not None:
        # p_i >= min_p * p_max  <=>  logit_i >= max logit + T * ln(min_p): no softmax needed.
        floor = values[:, 0] + temps[:, 0] * min_ps.clamp_min(torch.finfo(torch.float32).tiny).log()
        cut = torch.maximum(cut, torch.where(min_ps > 0, floor, float("-inf")))
    return cut, short
