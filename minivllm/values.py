"""Checks of plain Python values (counts, numbers, flags) shared by the engine, the kernels'
wrappers and the checkpoint writer. Each check_* raises ValueError naming the argument and what
was expected. Imports nothing, so any module can use it without loading torch or the kernels."""

import math


def is_int(value) -> bool:
    """A real int: bool is an int subclass, but True as a token count is a mistake, not a 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite int or float, bools excluded; inf and nan cannot be scaled or compared sensibly."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, minimum: int, note: str = "") -> int:
    """`value`, once it is an int (is_int) >= minimum; else ValueError naming `name`, with `note`
    after what was expected."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{note}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """A real bool: a string such as "no" would otherwise read as True."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
