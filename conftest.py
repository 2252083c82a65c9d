"""Device selection, the Triton interpreter on CPU, hypothesis profiles and markers.

Importing `kernels` sets TRITON_INTERPRET without a GPU, before anything imports
triton: the one place that decides it.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import kernels  # noqa: F401  (sets up the interpreter; nothing above imports triton)

HAS_CUDA = torch.cuda.is_available()

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
