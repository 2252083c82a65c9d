"""Merging flash-decoding's splits: each split of a row wrote its partial output and log-sum-exp
(base 2); the row's output is the partials weighted by exp2(lse - max lse).

Two ways, chosen by the decode config's `merge` (the device's tuning table decides):
- `kernel`: a second launch, one program per (sequence, head), after every split is done;
- `last`: no second launch. Each (sequence, kv head) has an arrival counter; a split program
  stores its partials, then counts itself in, and the one that arrives last merges the whole
  GQA group's heads and sets the counter back to 0 for the next launch (or CUDA graph replay).
  This saves the launch where a step is short (small batches, short contexts), at the price of
  one program merging a group's heads alone.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def merge_split_row(
    O, O_PART, LSE_PART, row, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CACHE: tl.constexpr,
):
    """Write to O (one head's output row) the merge of the num_splits partials that start at
    partial slot `row`: LSE_PART fp32 (slots,), O_PART fp32 (slots, BLOCK_D), BLOCK_S slots at a
    time with a running maximum (one pass when BLOCK_S covers them all). CACHE is the loads' cache
    modifier: '.cg' reads through L2 only, where other programs of the same launch wrote them."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.full([], -1.0e30, tl.float32)  # every split empty (lse -inf) leaves the weights 0 and the row 0
    w_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse = tl.load(LSE_PART + row + s0 + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=CACHE)
        part = tl.load(O_PART + (row + s0 + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0,
                       cache_modifier=CACHE)
        m_new = tl.maximum(m, tl.max(lse, 0))
        rescale = tl.math.exp2(m - m_new)
        w = tl.math.exp2(lse - m_new)
        acc = acc * rescale + tl.sum(part * w[:, None], 0)
        w_sum = w_sum * rescale + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(O + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


@triton.jit
def merge_when_last(
    O, O_PART, LSE_PART, COUNT, seq, kv_head, group, stride_ob, stride_oh, part_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Called by every split program of (seq, kv_head) once its partials are stored: the last
    of the launch's splits (grid axis 2) to arrive merges the group's heads."""
    # The barrier orders every thread's partial stores before the one arrival; the atomic's
    # release then publishes them to the program that arrives last, whose acquire sees them all.
    tl.debug_barrier()
    counter = COUNT + seq * tl.num_programs(1) + kv_head
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(2) - 1:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        for g in range(group):
            head = kv_head * group + g
            merge_split_row(O + seq.to(tl.int64) * stride_ob + head * stride_oh, O_PART, LSE_PART,
                            (seq * tl.num_programs(1) * group + head).to(tl.int64) * part_stride, part_stride,
                            HEAD_DIM, BLOCK_D, BLOCK_S, ".cg")


@triton.jit
def _merge_splits(
    O, O_PART, LSE_PART, stride_ob, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    merge_split_row(O + seq.to(tl.int64) * stride_ob + head * stride_oh, O_PART, LSE_PART,
                    (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits, num_splits, HEAD_DIM, BLOCK_D, BLOCK_S, "")


def launch_merge(out: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor, head_dim: int, block_d: int) -> None:
    """The `kernel` merge: out (batch, num_heads, head_dim) from o_part fp32 (batch, num_heads,
    slots, block_d) and lse_part fp32 (batch, num_heads, slots)."""
    batch, num_heads, slots = lse_part.shape
    _merge_splits[(batch, num_heads)](
        O=out, O_PART=o_part, LSE_PART=lse_part, stride_ob=out.stride(0), stride_oh=out.stride(1), num_splits=slots,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(slots),
    )


# Per device, the arrival counters of the `last` merge, and every buffer ever handed out: a
# CUDA graph captured over an older, smaller one still addresses it.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_KEPT: list[torch.Tensor] = []


def arrival_counters(device: torch.device, rows: int) -> torch.Tensor:
    """int32 zeros, at least `rows` of them, for the `last` merge's (sequence, kv head) rows.
    They are zero between launches (the last arrival resets its own), so one buffer serves
    every launch on the device's stream; launches on concurrent streams need their own."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < rows:
        have = torch.zeros(max(rows, 1024, 2 * (have.numel() if have is not None else 0)), dtype=torch.int32, device=device)
        _KEPT.append(have)
        _COUNTERS[device] = have
    return have
