"""The vLLM-style engine (scheduler, KV block manager, Qwen3) that runs the kernels end to end."""

from engine.llm import LLM
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
