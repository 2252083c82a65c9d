"""transformers' own PyTorch Qwen3, loaded as the reference the engine is checked and compared against.

From 5.25, `from_pretrained` defaults to `use_kernels=True` and swaps layers for Hugging Face Hub
kernels where any exist for the device (downloading them on a networked GPU host). A reference
that runs someone else's kernels checks nothing, so every load here turns that off and verifies
it. transformers is a test dependency (the `test` extra); the engine never imports this module.
"""

from __future__ import annotations

import os

import torch


def load_transformers_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False, **kwargs)` on
    `device`, in eval mode. Raises RuntimeError if the model still reports Hub kernels in use."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False, **kwargs)
    if getattr(model, "use_kernels", False):
        raise RuntimeError(f"transformers loaded {path} with Hub kernels although use_kernels=False was passed")
    return model.to(device).eval()
