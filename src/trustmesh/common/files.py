"""Files that must never be seen half-written: state the agent reloads after a crash,
credentials, keys. One way to write them: a new file beside the target (created with
the final mode, so a secret is never briefly readable by others), written and
fsynced, then renamed over the target, then the directory fsynced so the rename itself
survives a power loss. Readers see the old content or the new, never a mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make a rename, creation or deletion in ``path`` durable. Not every filesystem
    lets a directory be fsynced; there the rename is as durable as it can be."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) atomically and durably, with
    permissions ``mode`` (0600 unless said otherwise). The parent directory must exist."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory = path.parent
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # mkstemp creates 0600; the umask does not apply to fchmod
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(directory)
