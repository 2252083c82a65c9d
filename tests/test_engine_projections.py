"""The engine's projections (minivllm/engine/linear.py): the skinny_linear kernel, with the norm
or the gate fused in, where the device's table has `linear` entries; the unfused layers
elsewhere. Both give the same tokens."""

import json

import pytest
import torch

from minivllm.engine import linear
from minivllm.kernels.skinny_linear import FORMS
from minivllm.kernels.tuning_table import ENV_DIR, clear_cache, device_slug
from minivllm.testing.random_checkpoint import write_random_qwen3
from tests.engine_cases import GREEDY, PROMPT_LENS, engine, prompts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_qwen3(tmp_path_factory.mktemp("projections"), with_tokenizer=False)


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """write(entries): the device's table in a directory the kernels read instead of the committed one."""
    monkeypatch.setenv(ENV_DIR, str(tmp_path))

    def write(entries):
        prov = dict(gpu="test", compute_capability=None)
        (tmp_path / f"{device_slug(torch.device(_device()))}.json").write_text(json.dumps(dict(provenance=prov, runs=[prov], entries=entries)))
        clear_cache()

    yield write
    clear_cache()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_the_engine_takes_the_kernel_where_its_table_says(checkpoint, tables, monkeypatch):
    """A table whose entry for each form (nearest to every shape) names a tile: decode steps of 4
    rows run every projection through skinny_linear, each in its form, while the prefill's longer
    steps keep cuBLAS; the greedy tokens are those of the unfused layers. Entries whose winner was
    cuBLAS run no kernel, and a form without an entry keeps the unfused steps."""
    calls = []
    real = linear.skinny_linear

    def counted(x, weight, **kwargs):
        calls.append((x.shape[0], "norm" if kwargs.get("norm_weight") is not None else "gated" if kwargs.get("gated") else "plain"))
        return real(x, weight, **kwargs)

    monkeypatch.setattr(linear, "skinny_linear", counted)
    batch = prompts(PROMPT_LENS)
    outputs, kernel_calls = {}, {}
    for name, config, forms in (("cublas", {"cublas": True}, FORMS), ("kernel", {"tile": [16, 32, 4, 2]}, FORMS), ("gated only", {"tile": [16, 32, 4, 2]}, ["gated_linear"])):
        tables([dict(kernel=form, dtype="float32", head_dim=0, page=0, bucket=[1, 1, 1], config=config, run=0) for form in forms])
        calls.clear()
        out = engine(checkpoint, "triton").generate(batch, GREEDY, use_tqdm=False)
        outputs[name], kernel_calls[name] = [o["token_ids"] for o in out], list(calls)
    assert outputs["kernel"] == outputs["cublas"] == outputs["gated only"]
    assert kernel_calls["cublas"] == [] and {form for _, form in kernel_calls["gated only"]} == {"gated"}
    calls = kernel_calls["kernel"]
    assert {rows for rows, _ in calls} <= set(range(1, 17)) and {form for _, form in calls} == {"norm", "plain", "gated"}
    # Each projection of a 4-row decode step, in every layer: on a GPU at the graph's capture.
    layers = 2  # the random checkpoint's
    assert sum(1 for rows, _ in calls if rows == 4) >= 4 * layers


def test_a_one_row_tile_serves_one_row_only(tables):
    """The nearest entry to 2 rows may be a one-row tile narrower than the 16 columns a dot of
    several rows needs: cuBLAS runs there instead. Past MAX_ROWS, cuBLAS always."""
    weight = torch.empty(64, 32, device=_device())
    tables([dict(kernel="linear", dtype="float32", head_dim=0, page=0, bucket=[1, 64, 32], config={"tile": [8, 32, 4, 2]}, run=0)])
    assert linear.skinny_tile("linear", 1, weight) == (8, 32, 4, 2)
    assert linear.skinny_tile("linear", 2, weight) is None and linear.skinny_tile("linear", 17, weight) is None
    assert linear.skinny_tile("norm_linear", 1, weight) is None  # each form has entries of its own
