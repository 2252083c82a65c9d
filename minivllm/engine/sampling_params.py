"""What a request asks of generation: how to sample and when to stop."""

import dataclasses
from dataclasses import dataclass

import torch

from minivllm.values import check_int, is_real

# The largest float32: the device takes the sampling parameters as float32, and a larger number
# would reach it as inf.
FLOAT32_MAX = torch.finfo(torch.float32).max

# What an unset sampling field becomes when the checkpoint's generation_config.json does not set it either.
LIBRARY_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


# Frozen: a field set after the checks would reach the device unchecked; dataclasses.replace checks anew.
@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0, top_p 1.0 and min_p 0.0 switch those filters off. With
    ignore_eos a sequence runs to max_tokens even past the end-of-sequence token.

    None (the default of temperature, top_k, top_p and min_p) leaves the field unset: the LLM
    takes it from the checkpoint's generation_config.json when that sets it, else from
    LIBRARY_DEFAULTS (resolve), as transformers and vLLM do; a value given here always wins."""

    temperature: float | None = None
    max_tokens: int = 64
    ignore_eos: bool = False
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        if self.temperature is not None and (not is_real(self.temperature) or not 0 <= self.temperature <= FLOAT32_MAX):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy) that float32 holds (at most {FLOAT32_MAX:.4g}), got {self.temperature!r}")
        check_int("max_tokens", self.max_tokens, 1)
        if not isinstance(self.ignore_eos, bool):
            # A string such as "no" is truthy: taking it as True would silently do the opposite.
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 0, " (0 is off)")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] (1 is off), got {self.top_p!r}")
        if self.min_p is not None and (not is_real(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be a number in [0, 1] (0 is off), got {self.min_p!r}")

    def resolve(self, defaults: dict) -> "SamplingParams":
        """These parameters with every unset sampling field taken from `defaults` (the checkpoint's
        generation defaults: some of LIBRARY_DEFAULTS' keys, already checked), else from
        LIBRARY_DEFAULTS; the result has no None left."""
        unset = {name: defaults.get(name, value) for name, value in LIBRARY_DEFAULTS.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self
