"""Running code with the kernels compiled, from tests whose own process interprets them: Triton
compiles for a GPU target without the GPU, but not kernels imported for its interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPILED = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` (dedented) as a script in the repository root with the kernels compiled."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=COMPILED, capture_output=True, text=True, timeout=1200)
