"""What a request asks of generation: how to sample and when to stop."""

from dataclasses import dataclass

import torch

from minivllm.values import check_int, is_real

# The largest float32: the device takes the sampling parameters as float32, and a larger number
# would reach it as inf.
FLOAT32_MAX = torch.finfo(torch.float32).max


# Frozen: a field set after the checks would reach the device unchecked; dataclasses.replace checks anew.
@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off. With ignore_eos
    a sequence runs to max_tokens even past the end-of-sequence token."""

    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not is_real(self.temperature) or not 0 <= self.temperature <= FLOAT32_MAX:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy) that float32 holds (at most {FLOAT32_MAX:.4g}), got {self.temperature!r}")
        check_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.ignore_eos, bool):
            # A string such as "no" is truthy: taking it as True would silently do the opposite.
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        check_int("top_k", self.top_k, 0, " (0 is off)")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1 is off), got {self.top_p!r}")
