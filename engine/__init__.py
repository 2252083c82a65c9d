"""The vLLM-style engine (scheduler, KV block manager, Qwen3) that runs the kernels end to end."""
