"""Next-token sampling at a temperature in one pass over the logits: the Gumbel-max trick.

argmax_i(logit_i / T + G_i), with G_i = -log(E_i) and E_i ~ Exp(1) independent, picks token i
with probability softmax(logits / T)_i, so no softmax, no normalisation and no noise tensor is
ever written: each program streams a slice of a row, draws its noise with Philox, and keeps a
running maximum. A second, tiny step picks the best slice of each row.

An optional per-row cut drops the tokens whose logit is below it inside the same pass, so a
filtered draw (top-k, top-p, min-p: engine/sampler.py) needs no masked copy of the logits.
"""

import torch
import triton
import triton.language as tl

from minivllm.kernels.checks import check_kernel_device, check_rank
from minivllm.kernels.launch import parallel_slots

BLOCK = 2048
PROGRAMS_PER_SM = 8


# The seed changes every step and the split count with the batch: specialising on them (a value
# divisible by 16 is a variant of its own) would compile a kernel in the middle of a serving step.
@triton.jit(do_not_specialize=["seed", "num_splits"])
def _gumbel_max(LOGITS, TEMPS, CUTS, BEST, BEST_IDX, vocab, stride_row, per_split, seed, num_splits,
                HAS_CUTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    temp = tl.load(TEMPS + row)
    inv_temp = 1.0 / tl.maximum(temp, 1e-6)
    cut = tl.load(CUTS + row) if HAS_CUTS else float("-inf")
    row_off = row.to(tl.int64) * stride_row
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    start = split * per_split
    for off in range(start, start + per_split, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < vocab
        logit = tl.load(LOGITS + row_off + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # One Philox call gives four uniforms: Philox's rounds, not the logits' bytes, bound this
        # loop, and tl.rand would drop three of the four. Counter c (row * vocab + off / 4 + i)
        # serves columns off + 4i .. off + 4i + 3, so counters never repeat across blocks or rows.
        u0, u1, u2, u3 = tl.rand4x(seed, row * vocab + off // 4 + tl.arange(0, BLOCK // 4))
        # join(a, b) stacks on a new last axis, so element [i, m, k] here is (u0, u2 | u1, u3)[k][m]:
        # flattened row-major, u[4i + j] = u_j[i].
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])
        # u in (0, 1): the uniforms are multiples of 2^-31 from 0; the half step keeps E > 0. E is
        # -log(1 - u), with its series where u is small so the largest noise keeps full precision.
        u = u + 2.3283064e-10
        e = tl.where(u < 1e-4, u * (1.0 + u * (0.5 + u / 3.0)), -tl.log(1.0 - u))
        key = tl.where(temp > 0, logit * inv_temp - tl.log(e), logit)
        key = tl.where(logit >= cut, key, float("-inf"))
        take = key > best
        best = tl.where(take, key, best)
        best_idx = tl.where(take, cols, best_idx)
    top = tl.max(best, axis=0)
    # Ties go to the lowest index, as torch.argmax does; a row of -inf keeps index `start`.
    idx = tl.min(tl.where(best == top, best_idx, vocab), axis=0)
    idx = tl.where(idx == vocab, start, idx)
    tl.store(BEST + row * num_splits + split, top)
    tl.store(BEST_IDX + row * num_splits + split, idx)


def sample_tokens(logits: torch.Tensor, temperatures: torch.Tensor, seed: int, cuts: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of `logits`: argmax where the row's temperature is 0, else a draw from
    softmax(logits / temperature), over the tokens whose logit is at least the row's cut when
    `cuts` is given.

    logits: fp32/bf16/fp16 (batch, vocab), last dim contiguous. temperatures: fp32 (batch,) >= 0,
    on the same device. seed: host int; the same seed and inputs give the same tokens. cuts: None
    (every token) or fp32 (batch,) on the same device, compared with each logit as fp32; -inf keeps
    every token, and a cut above a row's largest logit leaves nothing to draw (the row's token is
    then arbitrary), so a cut must keep at least the argmax. Returns int64 (batch,). Nothing is
    read back to the host.
    """
    check_rank("logits", logits, 2, "(batch, vocab)")
    check_rank("temperatures", temperatures, 1, "(batch,)")
    check_kernel_device(logits=logits, temperatures=temperatures)
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous in its last (vocab) dimension")
    batch, vocab = logits.shape
    for name, t in (("temperatures", temperatures), ("cuts", cuts)):
        if t is not None and (t.shape != (batch,) or t.dtype != torch.float32 or t.device != logits.device):
            raise ValueError(f"{name} must be fp32 ({batch},) on {logits.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if vocab < 1 or vocab >= 2**31 // max(batch, 1):
        raise ValueError(f"logits must have 1 <= batch * vocab < 2^31, got {batch} x {vocab}")
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2^31), got {seed!r}")
    if batch == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    # The kernel reads row r's temperature and cut at offset r: a strided view is copied, not misread.
    temperatures = temperatures.contiguous()
    cuts = None if cuts is None else cuts.contiguous()
    # Enough programs to fill the device even for one row, none thinner than a block.
    splits = max(1, min(triton.cdiv(vocab, BLOCK), parallel_slots(logits.device, PROGRAMS_PER_SM) // batch))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
    splits = triton.cdiv(vocab, per_split)
    best = torch.empty(batch, splits, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, splits, dtype=torch.int32, device=logits.device)
    _gumbel_max[(batch, splits)](
        LOGITS=logits, TEMPS=temperatures, CUTS=temperatures if cuts is None else cuts, BEST=best, BEST_IDX=best_idx,
        vocab=vocab, stride_row=logits.stride(0), per_split=per_split, seed=seed, num_splits=splits,
        HAS_CUTS=cuts is not None, BLOCK=BLOCK, num_warps=8,
    )
    return best_idx.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).long()
