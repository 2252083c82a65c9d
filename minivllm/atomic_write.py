"""Writing a file so that a reader sees its old content or the whole new one, never a part.

A process killed mid-write (a Slurm time limit, a lost node, a full disk) would otherwise leave a
truncated file in place of a good one: a tuning table the kernels can no longer read, a merged
result a later job cannot load. Every output file of minivllm and its tools goes through
`write_atomic`.
"""

import os
import secrets
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path`: into a new file beside it, flushed to disk, then
    renamed over `path`. The temporary file is in the same directory so the rename stays on one
    file system, where it is atomic; it is removed when anything fails. The file gets the
    permissions a plain write would (0666 less the umask), not a temporary file's 0600."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # else a crash after the rename can leave the new name with no data on some file systems
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
