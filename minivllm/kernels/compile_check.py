"""Compile a kernel launch ahead of time for a GPU we may not have, and say whether it fits.

Triton compiles for any target without a GPU present. A launch is recorded, not run
(`recording()`: the wrappers run their checks and heuristics, and each `kernel[grid](...)` they
reach is kept with its arguments), or planned (`Launch.from_kwargs`, as flash_attn_varlen's
prefill_plan hands its kwargs); `compile_for` compiles it for a target and reports the shared
memory it asks for against the target's opt-in limit per block, and which instruction families
its PTX uses (wgmma on Hopper, tcgen05 on Blackwell, TMA bulk tensor copies), so a Hopper-only
path reaching Blackwell shows. Results are cached per (launch, target) within a process.

Kernel modules must be imported compiled (TRITON_INTERPRET unset): interpreted kernels cannot
be compiled.
"""

import contextlib
import functools
import re
import sys
from dataclasses import dataclass
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from minivllm.interpreter import interpreting
from minivllm.kernels import checks

# The targets CI compiles for: the H100 and H200 (sm_90), the B200 and GB200 (sm_100).
TARGETS = ("sm_90", "sm_100")
# Opt-in shared memory per block, bytes (the CUDA C++ Programming Guide's table of technical
# specifications per compute capability): what a kernel may ask for at launch.
SHARED_OPTIN = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024}
# Streaming multiprocessors a split policy sizes its grid for (one common card of each
# capability); only the number of programs depends on it, never the compiled code.
SM_COUNT = {75: 40, 80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 103: 148, 120: 84}
# Launch options, not kernel arguments.
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# PTX instructions that mark each family: Ampere-style warp MMA, Hopper's warpgroup MMA,
# Blackwell's fifth-generation tensor cores, and TMA bulk tensor copies.
FAMILIES = {"mma": "mma.sync", "wgmma": "wgmma.mma_async", "tcgen05": "tcgen05.mma", "tma": "cp.async.bulk.tensor"}
TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
                 torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


def target_of(name: str) -> GPUTarget:
    """The GPUTarget of a target name, 'sm_' and the compute capability as major * 10 + minor
    ('sm_90', 'sm_100'); ValueError for anything else."""
    match = re.fullmatch(r"sm_(\d+)", name)
    if match is None or int(match[1]) not in SHARED_OPTIN:
        raise ValueError(f"target must be sm_ and a compute capability, one of {', '.join(f'sm_{c}' for c in SHARED_OPTIN)}; got {name!r}")
    return GPUTarget("cuda", int(match[1]), 32)


def device_target(device: torch.device) -> str:
    """The target name of a CUDA device: 'sm_90' for an H100."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{10 * major + minor}"


def shared_limit(capability: int) -> int:
    """Opt-in shared memory per block in bytes for a compute capability (major * 10 + minor)."""
    if capability not in SHARED_OPTIN:
        raise ValueError(f"no shared-memory limit known for compute capability {capability}; known: {sorted(SHARED_OPTIN)}")
    return SHARED_OPTIN[capability]


def _type_of(value) -> str:
    """Triton's signature type of one runtime argument."""
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{TRITON_DTYPES[value.base.dtype]}[{', '.join(map(str, value.block_shape))}]>"
    if isinstance(value, GluonTensorDescriptor):  # its shared-memory layout is part of the type
        return f"tensordesc<{TRITON_DTYPES[value.base.dtype]}[{','.join(map(str, value.block_shape))}],{value.layout!r}>"
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for an argument of type {type(value).__name__}")


def _divisible_by_16(value) -> bool:
    """What the JIT marks tt.divisibility=16: 16-byte aligned pointers and multiples of 16. The
    pipeliner and vectorizer rely on it, so shared memory is counted as the real launch asks."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the compiler sees it: the kernel, each argument's type (constexprs
    by value), and the launch options. Hashable, so equal launches compile once."""

    kernel: JITFunction
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, int], ...]
    aligned: tuple[int, ...] = ()  # argument positions Triton's JIT would specialize as divisible by 16

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @classmethod
    def from_kwargs(cls, kernel: JITFunction, args: tuple = (), kwargs: dict | None = None) -> "Launch":
        """The launch `kernel[grid](*args, **kwargs)` would make; a TensorDescriptor's block_shape must already be the tile's."""
        kwargs = dict(kwargs or {})
        options = tuple(sorted((k, kwargs.pop(k)) for k in OPTIONS if k in kwargs))
        # A Gluon kernel also takes num_warps as a constexpr parameter.
        values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs | dict(options)
        missing = [p.name for p in kernel.params if p.name not in values]
        if missing:
            raise ValueError(f"{kernel.fn.__name__}: no value for {', '.join(missing)}")
        # The JIT compiles an argument passed as None (an absent optional pointer) as a constexpr.
        fixed = [p for p in kernel.params if p.is_constexpr or values[p.name] is None]
        signature = tuple((p.name, "constexpr" if p in fixed else _type_of(values[p.name])) for p in kernel.params)
        constexprs = tuple((p.name, values[p.name]) for p in fixed)
        aligned = tuple(i for i, p in enumerate(kernel.params) if p not in fixed and not p.do_not_specialize and _divisible_by_16(values[p.name]))
        return cls(kernel, signature, constexprs, options, aligned)

    def describe(self) -> str:
        """The kernel and what selects its code: block sizes, flags and launch options."""
        shown = [f"{k}={v}" for k, v in self.constexprs if k not in ("INTERPRETER", "PRECISION", *OPTIONS)]
        return f"{self.name}({', '.join(shown + [f'{k}={v}' for k, v in self.options])})"


@dataclass(frozen=True)
class Compiled:
    """What compiling a launch for a target gave: `error` is None when it compiled; `shared` the
    bytes of shared memory it asks for; `families` the instruction families its PTX uses."""

    launch: Launch
    target: str
    shared: int
    limit: int
    families: tuple[str, ...]
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.error is None and self.shared <= self.limit

    def verdict(self) -> str:
        """What happened, naming the kernel, its config and the target."""
        what = self.launch.describe()
        if self.error is not None:
            return f"{what} does not compile for {self.target}: {self.error}"
        if not self.fits:
            return f"{what} needs {self.shared} B of shared memory, over {self.target}'s {self.limit} B per block"
        return f"{what} compiles for {self.target}: {self.shared} B shared of {self.limit}, {'+'.join(self.families) or 'no MMA or TMA'}"


def compile_kernel(launch: Launch, target: str):
    """Triton's compiled kernel of `launch` for `target` (its `asm` holds the TTGIR, PTX and
    cubin); raises what the compiler raises."""
    attrs = {(i,): [["tt.divisibility", 16]] for i in launch.aligned}
    source_type = GluonASTSource if launch.kernel.is_gluon() else ASTSource
    source = source_type(launch.kernel, dict(launch.signature), dict(launch.constexprs), attrs)
    return triton.compile(source, target=target_of(target), options=dict(launch.options))


@functools.cache
def compile_for(launch: Launch, target: str) -> Compiled:
    """Compile `launch` for `target` (a name target_of takes). A compiler error is caught and reported
    in the result, its first line naming what failed, never raised: one bad config must not hide
    the others."""
    if interpreting():
        raise RuntimeError("the kernels were imported for Triton's interpreter; compile checks need them compiled (TRITON_INTERPRET unset)")
    gpu = target_of(target)
    limit = shared_limit(gpu.arch)
    try:
        kernel = compile_kernel(launch, target)
    except Exception as e:  # noqa: BLE001 - Triton raises many types; each is a verdict on this launch
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return Compiled(launch, target, 0, limit, (), f"{type(e).__name__}: {first}")
    ptx = kernel.asm.get("ptx", "")
    families = tuple(name for name, marker in FAMILIES.items() if marker in ptx)
    return Compiled(launch, target, kernel.metadata.shared, limit, families)


@contextlib.contextmanager
def recording(target: str):
    """Within: a `kernel[grid](...)` launch is recorded into the yielded list instead of run,
    CPU tensors pass the wrappers' device checks, and the device reports `target`'s compute
    capability and SM count, so each wrapper's heuristics choose what they would on that card."""
    capability = target_of(target).arch
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch.from_kwargs(self, args, kwargs))

    def slots(device, per_sm):
        return per_sm * SM_COUNT[capability]

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", record))
        stack.enter_context(mock.patch.object(checks, "interpreting", lambda: True))
        stack.enter_context(mock.patch("torch.cuda.get_device_capability", lambda device=None: divmod(capability, 10)))
        # Each wrapper module imported parallel_slots by name: patch it where it is looked up.
        for module in [m for name, m in sys.modules.items() if name.startswith("minivllm.kernels.") and hasattr(m, "parallel_slots")]:
            stack.enter_context(mock.patch.object(module, "parallel_slots", slots))
        yield launches


def misfit(run, target: str) -> Compiled | None:
    """Record the launches `run()` makes (nothing runs) and compile each for `target`: the first
    that does not compile or does not fit, or None when all do. What a tuner asks before timing."""
    with recording(target) as launches:
        run()
    return next((r for r in (compile_for(launch, target) for launch in launches) if not r.fits), None)
