"""Device selection, the Triton interpreter on CPU, hypothesis profiles and markers.

Without a GPU the kernels run in Triton's interpreter: interpret_without_gpu() sets
TRITON_INTERPRET before any test module imports a kernel.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from minivllm.interpreter import interpret_without_gpu

HAS_CUDA = torch.cuda.is_available()
interpret_without_gpu()

# deadline=None: the first example of each shape JIT-compiles (or interprets) for seconds.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=25, **_COMMON)
settings.register_profile("gpu", max_examples=60, print_blob=True, **_COMMON)
# --hypothesis-profile, read later by hypothesis' own plugin, overrides this choice.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("gpu" if HAS_CUDA else "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device tests run on: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
