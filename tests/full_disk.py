"""A Python child whose file writes fail past a size, as on a full disk: for testing that a writer
leaves the old file whole when its write fails half way."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_on_full_disk(setup: str, write: str, free_bytes: int) -> subprocess.CompletedProcess:
    """Run `setup` (imports, data), then `write` with RLIMIT_FSIZE at `free_bytes`, so a write past
    that many bytes of a file fails with EFBIG (SIGXFSZ ignored), in a child started in the repo root."""
    limit = f"import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nresource.setrlimit(resource.RLIMIT_FSIZE, ({free_bytes}, {free_bytes}))\n"
    return subprocess.run([sys.executable, "-c", f"{setup}\n{limit}{write}"], capture_output=True, text=True, cwd=ROOT)
