"""argparse types for the places a tool will write, checked when the command line is parsed: a
path that cannot be written is refused before any work, not after it (a whole Slurm array, a
tuning run), and never as a raw traceback."""

import argparse
import os
from pathlib import Path


def writable_dir(path: Path) -> str | None:
    """Why `path` cannot be made (with its parents) and written into, or None: the nearest of it
    and its parents that exists must be a directory this process may write."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory" + (f", so {path} cannot be created" if existing != path else "")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_dir(text: str) -> Path:
    """A directory to create if missing and write into (--plot DIR, --out DIR)."""
    problem = writable_dir(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def output_file(text: str) -> Path:
    """A file to write (or replace), in a directory created if missing (--json FILE)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory, not a file")
    problem = writable_dir(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return path
