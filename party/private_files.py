"""Files only their owner may read: private keys, dealt share files, client tokens.

A private file is 0600 from its first byte: it is created under a fresh temporary name in
its own folder with ``os.open(..., O_CREAT | O_EXCL, 0o600)`` (the umask can only narrow
that), written, fsync-ed, and renamed over the target, so readers see either the old file
or the whole new one, never a partial or looser one. Its folder, when it holds nothing
else, is made 0700 with ``make_private_dir``. Nothing here calls chmod on a file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) with the folder itself 0700; tighten it if it exists looser."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 & ~DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def open_private(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object writing ``path`` atomically, mode 0600 from creation.

    The data goes to a temporary file beside ``path``; on a clean exit it is flushed,
    fsync-ed and renamed to ``path`` (replacing any previous file); on an exception it
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the first byte."""
    with open_private(path) as f:
        f.write(data)
