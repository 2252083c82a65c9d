"""Whether Triton runs the kernels compiled or in its CPU interpreter.

`@triton.jit` picks its mode when a kernel module is imported (TRITON_INTERPRET at decoration
time), so the choice has to be made before the first `minivllm.kernels` import. Nothing here
runs at import: an entry point (main.py, the conftest, a tool's main) calls
`interpret_without_gpu()` first, and a library user either does the same or sets
TRITON_INTERPRET=1 themselves.
"""

import os
import sys

KERNEL_PACKAGE = "minivllm.kernels"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpret_without_gpu() -> bool:
    """Set TRITON_INTERPRET=1 when torch sees no CUDA device, so the kernels run on CPU tensors.

    An explicit TRITON_INTERPRET in the environment wins. Returns whether the kernels will be
    interpreted. Raises RuntimeError when a kernel module was already imported in the other mode:
    its kernels would launch compiled on CPU tensors (or interpreted on a GPU) and fail later,
    far from the cause."""
    if "TRITON_INTERPRET" in os.environ:
        return interpreting()
    import torch

    if torch.cuda.is_available():
        return False
    loaded = sorted(m for m in sys.modules if m.startswith(KERNEL_PACKAGE + "."))
    if loaded:
        raise RuntimeError(f"{loaded[0]} was imported compiled before interpret_without_gpu(); call it before the first minivllm.kernels import")
    os.environ["TRITON_INTERPRET"] = "1"
    return True
