"""The vLLM-style engine (scheduler, KV block manager, Qwen3) that runs the kernels end to end."""

from minivllm.engine.llm import LLM
from minivllm.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
