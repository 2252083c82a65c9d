"""The tuner's chain timing (benchmarks/launch_chain.py), which decides a one-row projection
entry's "pdl": enough launches to rotate the weights through memory, both arms timed, and the
tuner's verdict from them. On a GPU that launches with PDL only."""

import pytest
import torch

from benchmarks import tune
from benchmarks.launch_chain import MAX_LAUNCHES, MIN_LAUNCHES, chain_launches, pdl_chain_us
from minivllm.kernels.skinny_linear import pdl_supported
from minivllm.reference.inputs import generator, randn


@pytest.fixture
def pdl_device(device):
    if not pdl_supported(device):
        pytest.skip("PDL needs a CUDA device of compute capability 9.0 or later")
    return device


def test_the_chain_rotates_weights_past_twice_the_l2(pdl_device):
    l2 = torch.cuda.get_device_properties(pdl_device).L2_cache_size
    assert chain_launches(1 << 20, pdl_device) == min(MAX_LAUNCHES, max(MIN_LAUNCHES, -(-2 * l2 // (1 << 20))))
    assert chain_launches(1 << 40, pdl_device) == MIN_LAUNCHES and chain_launches(1, pdl_device) == MAX_LAUNCHES


def test_both_arms_are_timed_and_the_verdict_follows_them(pdl_device):
    gen = generator(5, pdl_device)
    x, weight = randn((1, 256), torch.bfloat16, pdl_device, gen), randn((512, 256), torch.bfloat16, pdl_device, gen)
    plain_us, pdl_us = pdl_chain_us(x, weight, (8, 256, 4, 3), {})
    assert 0 < plain_us < 1e3 and 0 < pdl_us < 1e3
    b = tune.Bucket("norm_linear", "bf16", 0, 0, (1, 512, 256), dict(rows=1, n=512, k=256))
    keep, plain_us, pdl_us = tune.pdl_verdict(b, (8, 256, 4, 3), pdl_device)
    assert keep == (pdl_us <= tune.PDL_GAIN * plain_us)
