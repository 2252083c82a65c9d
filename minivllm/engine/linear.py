"""The model's projections with the step before each: cuBLAS through F.linear, or for a few rows
the skinny_linear kernel (minivllm/kernels/skinny_linear.py) with that step fused in, where the
device's tuning table says the kernel beats cuBLAS at the shape.

Three forms, one per place in a Qwen3 layer:
- norm_linear: residual add + RMSNorm, then the qkv or gate_up projection;
- linear: the o projection;
- gated_linear: SiLU-and-mul, then the down projection.
Each returns what the unfused steps return, rounded the same way. Each form is a kernel of its
own in the tuning table (skinny_linear.FORMS), keyed by (rows, N, K) buckets, because the tuner times each the
way it runs, the fused kernel against the unfused steps: a step fused in costs the kernel as
much as it saves at 16 rows (at 4 to 16 rows the H100's engine ran 1.6 to 1.9 times slower per
decode step when plain-projection timings chose the fused kernel). A device without entries,
more rows than the kernel takes, a bias, or the torch backend all take the unfused steps (the
backend's own rms_norm and silu_and_mul, then F.linear). Under a CUDA graph the choice is made
once, at capture."""

import torch
import torch.nn.functional as F

from minivllm.kernels.skinny_linear import MAX_ROWS, skinny_linear
from minivllm.kernels.tuning_table import bucket, lookup


def skinny_tile(form: str, rows: int, weight: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The tile the device's table gives skinny_linear in `form` (of skinny_linear.FORMS) for `rows` rows of this
    (N, K) weight, or None where the unfused steps run (no entry, the entry's winner was them, or
    its tile is a one-row tile narrower than the 16 columns the dot of several rows needs)."""
    if not 1 <= rows <= MAX_ROWS:
        return None
    config, _ = lookup(form, weight.device, weight.dtype, 0, 0, (bucket(rows), weight.shape[0], weight.shape[1]))
    if not config or "tile" not in config or rows > 1 and config["tile"][0] < 16:
        return None
    return tuple(config["tile"])


class Projections:
    """The three forms over one backend (minivllm/engine/backend.py): its rms_norm and
    silu_and_mul, and its linear_tile, which says where the kernel runs (never, for the torch
    backend)."""

    def __init__(self, backend):
        self.backend = backend

    def _tile(self, form: str, rows: int, layer: torch.nn.Linear):
        return self.backend.linear_tile(form, rows, layer.weight) if layer.bias is None else None

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, layer: torch.nn.Linear):
        """(layer(RMSNorm(x + residual)), x + residual); with residual None, (layer(RMSNorm(x)), x).
        x, residual: (rows, K); norm_weight (K,); layer.weight (N, K)."""
        tile = self._tile("norm_linear", x.shape[0], layer)
        if tile is not None:
            out = skinny_linear(x, layer.weight, residual=residual, norm_weight=norm_weight, eps=eps, tile=tile)
            return out if residual is not None else (out, x)
        if residual is None:
            return F.linear(self.backend.rms_norm(x, norm_weight, eps), layer.weight, layer.bias), x
        normed, residual = self.backend.rms_norm(x, norm_weight, eps, residual)
        return F.linear(normed, layer.weight, layer.bias), residual

    def linear(self, x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
        """layer(x); x (rows, K)."""
        tile = self._tile("linear", x.shape[0], layer)
        return skinny_linear(x, layer.weight, tile=tile) if tile is not None else F.linear(x, layer.weight, layer.bias)

    def gated_linear(self, x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
        """layer(silu(gate) * up) for x (rows, 2K), gate columns first."""
        tile = self._tile("gated_linear", x.shape[0], layer)
        if tile is not None:
            return skinny_linear(x, layer.weight, gated=True, tile=tile)
        return F.linear(self.backend.silu_and_mul(x), layer.weight, layer.bias)
