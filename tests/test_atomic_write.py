"""minivllm.atomic_write: a write that fails half way (here a full disk) leaves the old file whole
and no temporary file behind; the new file has a plain write's permissions."""

import os

from minivllm.atomic_write import write_atomic
from tests.full_disk import write_on_full_disk


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    target = tmp_path / "table.json"
    target.write_text("old\n")
    for writer, whole in (("write_atomic(target, 'x' * 100_000)", True), ("target.write_text('x' * 100_000)", False)):
        setup = f"from pathlib import Path\nfrom minivllm.atomic_write import write_atomic\ntarget = Path({str(target)!r})"
        proc = write_on_full_disk(setup, writer, 4096)
        assert proc.returncode != 0 and "File too large" in proc.stderr
        # The plain write is the control: it truncates, which is what write_atomic must not do.
        assert (target.read_text() == "old\n") is whole
        assert [p.name for p in tmp_path.iterdir()] == ["table.json"]
        target.write_text("old\n")


def test_write_atomic_replaces_text_or_bytes_with_a_plain_writes_permissions(tmp_path):
    target, plain = tmp_path / "out.png", tmp_path / "plain"
    target.write_text("old")
    write_atomic(target, b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    write_atomic(target, "µs\n")
    assert target.read_text(encoding="utf-8") == "µs\n"
    plain.write_text("")
    assert os.stat(target).st_mode == os.stat(plain).st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "plain"]
