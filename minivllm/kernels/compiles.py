"""How many Triton kernels this process has compiled since watching began.

A launch whose argument values make Triton build a new variant (a new constexpr, or an int that
turns divisible by 16 or equal to 1) compiles it on the spot, which takes tenths of a second. An
engine step or a timed benchmark that compiles pays that time for work that is not its own:
counting the compiles lets the step records and the reports say so. Triton calls its
post-compile hook for every kernel it builds into its in-memory cache (also when its disk cache
supplies the binary); the interpreter compiles nothing, so there the count stays 0.
"""

import triton

_count = 0
_watching = False


def _counting_hook(previous):
    def hook(*args, **kwargs):
        global _count
        _count += 1
        return previous(*args, **kwargs) if previous is not None else None

    return hook


def watch_compiles() -> None:
    """Count Triton compiles from now on. Idempotent; a post-compile hook already installed keeps
    being called after the count."""
    global _watching
    if _watching:
        return
    runtime = triton.knobs.runtime
    runtime.jit_post_compile_hook = _counting_hook(runtime.jit_post_compile_hook)
    _watching = True


def compiles_so_far() -> int:
    """Triton compiles counted since watch_compiles() was first called (0 before)."""
    return _count
