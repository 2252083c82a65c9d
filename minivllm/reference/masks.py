"""Attention masks."""

import torch


def causal_mask(len_q, len_k, device=None):
    """Bottom-right aligned causal mask (flash-attn >= 2.1), bool (len_q, len_k).

    The queries are the last len_q of len_k positions, so query i sees key j iff
    j <= i + len_k - len_q. When len_q > len_k the first rows see no key.
    """
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    return j <= i + (len_k - len_q)
