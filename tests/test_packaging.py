"""The package installs and imports beside current transformers and Hugging Face's `kernels`.

transformers 5.25 made HF's `kernels` distribution (import name `kernels`) a hard dependency; a
top-level package of ours by that name shadowed it from the repo root and overwrote it in
site-packages. These guards keep every name we ship under `minivllm`.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# HF's kernels where installed. A kernels/ directory without an __init__.py, such as the
# __pycache__ that git leaves behind in a checkout from before the move, is a namespace package
# (no origin), not HF's.
HF_KERNELS = importlib.util.find_spec("kernels")
HF_KERNELS = HF_KERNELS if HF_KERNELS is not None and HF_KERNELS.origin is not None else None


@pytest.mark.slow
def test_the_wheel_ships_one_top_level_name(tmp_path):
    """`pip wheel --no-deps .`: every file but the dist-info lies under minivllm/, and the
    tuning tables come with it."""
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the source it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".benchmarks"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)]
    done = subprocess.run(build, capture_output=True, text=True)
    if done.returncode != 0 and "setuptools" in done.stderr:
        # No package index (the GPU machines): build with the installed setuptools instead.
        done = subprocess.run([*build, "--no-build-isolation"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("minivllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert tops == {"minivllm"}
    assert any(re.fullmatch(r"minivllm/kernels/configs/nvidia-h100[\w-]*\.json", n) for n in names)
    assert "minivllm/testing/random_checkpoint.py" in names


def import_in_order(*statements: str) -> str:
    """Run the statements in one fresh interpreter from the repo root (where a top-level
    kernels/ directory would shadow HF's) and return what the last one printed."""
    code = "; ".join(statements)
    env = os.environ | {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.strip()


KERNELS_ORIGIN = "import kernels; print(kernels.__file__)"


@pytest.mark.parametrize("order", ["minivllm first", "transformers first"])
def test_hf_kernels_is_importable_beside_minivllm(order):
    """minivllm with its kernels, then transformers' Qwen3 (which reaches HF's `kernels` through
    its hub integration), then `kernels` itself; and the same in the opposite order. `kernels` is
    HF's (or absent where transformers does not need it), never ours."""
    ours = "import minivllm.kernels, minivllm.engine"
    theirs = "from transformers import Qwen3ForCausalLM"
    steps = [ours, theirs] if order == "minivllm first" else [theirs, ours]
    if HF_KERNELS is None:
        # Absent, or at most an empty namespace directory: no module of ours answers to the name.
        assert import_in_order(*steps, "import importlib.util as u; print(getattr(u.find_spec('kernels'), 'origin', None))") == "None"
        return
    origin = Path(import_in_order(*steps, KERNELS_ORIGIN))
    assert origin == Path(HF_KERNELS.origin) and origin.parent != ROOT / "kernels" and "minivllm" not in origin.parts


def test_hf_kernels_in_site_packages_is_not_ours():
    """Where HF's `kernels` is installed, it is theirs: what it exports, not our kernel names."""
    if HF_KERNELS is None:
        pytest.skip("HF's kernels is not installed (transformers < 5.25)")
    exported = import_in_order("import kernels; print(sorted(dir(kernels)))")
    assert "flash_attn_varlen" not in exported and "get_kernel" in exported


def test_every_transformers_model_load_goes_through_the_reference_loader():
    """transformers ≥ 5.25 swaps layers for Hub kernels unless told not to; the one loader that
    tells it (minivllm.testing.transformers_reference) is the only from_pretrained of a model."""
    allowed = ROOT / "minivllm" / "testing" / "transformers_reference.py"
    loads = re.compile(r"(AutoModel\w*|\w+ForCausalLM)\.from_pretrained\(")
    # The repo's own files, tracked or new, not what a venv or a build left in ignored folders.
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT, check=True, capture_output=True, text=True)
    paths = [ROOT / name for name in listed.stdout.split()]
    assert ROOT / "main.py" in paths
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in paths
        if path != allowed and path.is_file()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if loads.search(line)
    ]
    assert offenders == []


def test_the_reference_loader_turns_hub_kernels_off(monkeypatch, tmp_path):
    """load_transformers_model asks for use_kernels=False and refuses a model that still reports
    Hub kernels (what transformers >= 5.25 would otherwise swap in by default)."""
    transformers = pytest.importorskip("transformers")
    from minivllm.testing.transformers_reference import load_transformers_model

    seen = {}

    class Loaded(torch.nn.Module):
        use_kernels = False

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return Loaded()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert isinstance(load_transformers_model(tmp_path), Loaded) and seen["use_kernels"] is False
    Loaded.use_kernels = True
    with pytest.raises(RuntimeError, match="Hub kernels"):
        load_transformers_model(tmp_path)
