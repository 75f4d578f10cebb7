"""The files and directories trustmesh keeps its state in: data directories (the
control plane's, an agent's, a simulated cluster's), keys, credentials, the SQLite
database, state the agent reloads after a crash.

The rules, so that another local user cannot read a secret, plant one, or make us
write through a link:

* A **data directory** must be a directory (not a symlink to one) owned by the user
  trustmesh runs as and writable by no one else; it is created 0700 and tightened to
  0700 (:func:`private_directory`).
* A file trustmesh writes is never opened through a symlink: it is written to a new
  file beside the target (created 0600 with ``O_EXCL``), fsynced, then renamed over the
  target — a rename replaces a symlink, it never writes through it — and the directory
  is fsynced (:func:`write_atomically`). Readers see the old content or the new.
* A file that must be created **once** (the master key: two replicas starting at once
  on one data dir must not each make one) is written beside the target and then
  hard-linked into place, which fails if anything — a file, a symlink — is already
  there; the loser reads the winner's (:func:`create_exclusively`).
* A **secret trustmesh wrote** is read only if it is a regular file (not a symlink),
  owned by us and open to no one else (:func:`read_private_file`); a secret an
  operator **mounts** (a Kubernetes Secret: a symlink into ``..data``) may be a symlink
  and readable by others, but never writable by others (:func:`read_mounted_file`).
* A state file another program creates (the SQLite database and its WAL and shared
  memory, which SQLite creates with the database's mode) is created 0600 first
  (:func:`private_file`).

Every refusal is a :class:`ConfigError` whose one line says what to fix."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from trustmesh.common.errors import ConfigError

# Opening a FIFO for reading would block until a writer comes: never wait on one.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_MAX_SECRET_BYTES = 1024 * 1024


def fsync_directory(path: Path) -> None:
    """Make a rename, creation or deletion in ``path`` durable. Not every filesystem
    lets a directory be fsynced; there the rename is as durable as it can be."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def private_directory(path: Path, what: str = "data dir") -> None:
    """Create ``path`` (mode 0700, parents as needed) or check the existing one: a
    directory, not a symlink, owned by the running user and writable by no one else.
    It is then tightened to 0700. ConfigError (one line) otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        pass  # a symlink or a file: said below
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"cannot use {what} {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"{what} {path} is a symlink: give the directory itself "
            "(trustmesh never writes through a symlink)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # the directory opened, not what the name pointed to a moment ago
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"{what} {path} is owned by uid {st.st_uid}, not by the user running "
                f"trustmesh (uid {os.geteuid()}): chown it or run trustmesh as its owner"
            )
        if st.st_mode & 0o022:
            raise ConfigError(
                f"{what} {path} is writable by group or others (mode {_mode(st)}): chmod 700 {path}"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) atomically and durably, with
    permissions ``mode`` (0600 unless said otherwise). The parent directory must exist.
    A symlink at ``path`` is replaced, never written through."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    directory = path.parent
    temp = _write_temporary(path, raw, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(directory)


def _write_temporary(path: Path, raw: bytes, mode: int) -> str:
    """A new file beside ``path`` (``O_EXCL``, 0600 by mkstemp, then ``mode``) holding
    ``raw``, fsynced; its name."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # mkstemp creates 0600; the umask does not apply to fchmod
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return temp


def create_exclusively(path: Path, data: bytes | str, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data``, complete or not at all, only if nothing is
    there yet (not even a dangling symlink). Returns whether this call created it; when
    it returns False someone else did (read theirs)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    temp = _write_temporary(path, raw, mode)
    try:
        try:
            os.link(temp, path, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return _create_in_place(path, raw, mode)  # a filesystem without hard links
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    fsync_directory(path.parent)
    return True


def _create_in_place(path: Path, raw: bytes, mode: int) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        return False
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return True


def _read_regular(fd: int, path: Path, what: str) -> bytes:
    chunks = []
    size = 0
    while chunk := os.read(fd, 65536):
        size += len(chunk)
        if size > _MAX_SECRET_BYTES:
            raise ConfigError(f"{what} {path} is larger than {_MAX_SECRET_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def read_private_file(path: Path, what: str) -> bytes:
    """A secret trustmesh wrote itself: refused (ConfigError) unless it is a regular
    file, not a symlink, owned by the running user, and neither readable nor writable
    by group or others. FileNotFoundError when it is not there."""
    try:
        fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{what} {path} is a symlink: trustmesh reads its own secrets only from "
                "regular files (mount an outside secret with its own setting instead)"
            ) from None
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = _owned_regular_file(fd, what, path)
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{what} {path} is open to group or others (mode {_mode(st)}): "
                f"chmod 600 {path}, and consider it exposed"
            )
        return _read_regular(fd, path, what)
    finally:
        os.close(fd)


def read_mounted_file(path: Path, what: str) -> bytes:
    """A secret an operator gives (a Kubernetes Secret mount, whose files are symlinks
    into ``..data``): read, never written. Symlinks are followed and others may read
    it, but it is refused (ConfigError) when others may write it or it is not a
    regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o002:
            raise ConfigError(
                f"{what} {path} is writable by others (mode {_mode(st)}): anyone could "
                "replace it; make it writable by its owner only"
            )
        return _read_regular(fd, path, what)
    finally:
        os.close(fd)


def private_file(path: Path, what: str) -> None:
    """A state file another program writes (SQLite: the database, whose mode its WAL
    and shared-memory files copy): created empty with mode 0600 if it is missing;
    otherwise refused (ConfigError) when it is a symlink, not a regular file or not
    ours, and tightened to 0600 when it is open to others."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        fd = None
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror}") from None
    if fd is not None:
        os.close(fd)
        fsync_directory(path.parent)
        return
    tighten_private_file(path, what)


def tighten_private_file(path: Path, what: str) -> None:
    """An existing state file: refused when it is a symlink, not a regular file or
    not ours; made 0600 when it is open to others. Nothing happens when it is missing."""
    try:
        fd = os.open(path, _READ_FLAGS | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{what} {path} is a symlink: trustmesh never writes through one"
            ) from None
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        st = _owned_regular_file(fd, what, path)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _owned_regular_file(fd: int, what: str, path: Path) -> os.stat_result:
    """The status of open file ``fd``: a regular file owned by the user running
    trustmesh, or ConfigError naming ``what`` and ``path``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{what} {path} is owned by uid {st.st_uid}, not by the user running "
            f"trustmesh (uid {os.geteuid()})"
        )
    return st
