"""Masked softmax attention on dense, head-first tensors: the core every reference shares."""

import torch


def dense_attention(q, k, v, mask, softmax_scale):
    """softmax(q @ k^T * scale, masked) @ v, computed in q.dtype.

    q: (..., H, Lq, D); k, v: (..., Hkv, Lk, D), same leading dims and dtype as q,
    H % Hkv == 0. mask: bool (..., Lq, Lk), True where the query may see the key;
    shared by all heads. Returns (..., H, Lq, D) in q.dtype. A query row that sees
    no key at all (including Lk == 0) outputs exactly 0.
    """
    num_heads, num_kv_heads = q.shape[-3], k.shape[-3]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    # Query head h reads kv head h // group. Stacking each kv head's group of query rows into
    # one (G*Lq, D) matrix makes every product a plain batched matmul against that kv head's K
    # or V: broadcasting K over the group instead would make matmul copy K and V G times.
    group = num_heads // num_kv_heads
    len_q = q.shape[-2]
    q = q.unflatten(-3, (num_kv_heads, group)).flatten(-3, -2)  # (..., Hkv, G*Lq, D)
    mask = mask[..., None, None, :, :]  # (..., 1, 1, Lq, Lk), shared by every head

    scores = (q @ k.transpose(-1, -2)).unflatten(-2, (group, len_q)) * softmax_scale  # (..., Hkv, G, Lq, Lk)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    # An all -inf row softmaxes to NaN; such a row has no keys, so its output is 0.
    probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return (probs.flatten(-3, -2) @ v).unflatten(-2, (group, len_q)).flatten(-4, -3)  # (..., H, Lq, D)
