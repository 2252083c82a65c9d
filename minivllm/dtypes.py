"""Element types by name, one spelling each way for the whole repo.

DTYPES holds torch's own names, which configs, checkpoints, tuning tables and benchmark results
write (dtype_name gives them back); SHORT_DTYPES holds the short ones the benchmark and tuner
command lines take (--dtype bf16). Both list what the kernels take, and nothing else.
"""

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`dtype`, a name of DTYPES or the torch dtype, as the torch dtype; ValueError for any other,
    which the kernels do not take."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (a name or the torch dtype): the kernels take no other; got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16', 'float16', 'float32': torch's name of `dtype`, the key of DTYPES."""
    return str(dtype).removeprefix("torch.")
