"""Group syncs (pqmail.syncfs): syncfs + flush on real descriptors, and errors as OSError."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pqmail import syncfs

pytestmark = pytest.mark.skipif(not syncfs.available(), reason="no syncfs(2) here")


def test_sync_and_flush_takes_a_descriptor_per_file_system(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data\n")
        syncfs.sync_and_flush([fd])
        syncfs.syncfs(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"data\n"


def test_a_bad_descriptor_is_an_oserror() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as e:
        syncfs.sync_and_flush([w])
    assert e.value.errno == errno.EBADF
