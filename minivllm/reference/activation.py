"""The gated MLP's activation: SiLU of the gate times the up projection."""

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (rows, 2 * width), the fused gate_up projection, gate first. Returns silu(gate) * up,
    (rows, width), in x's dtype (the SiLU rounded to it before the product)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
