"""The agent's durable audit spool (DESIGN §6): decisions are written here before they
are answered, and shipped to the control plane from here.

Layout of ``DATA_DIR/audit-spool/``:

``source``
    the spool's random id, created with the spool. Events carry it as
    ``source.id`` with their sequence number ``source.seq`` (1, 2, 3…); the control
    plane deduplicates by (id, seq). Deleting the directory starts a new source, so a
    sequence number is never reused under one id.
``segment-<first seq, 20 digits>.jsonl``
    append-only files of newline-terminated JSON events, one per line, in seq order
    with no holes inside a segment. A new segment starts once the current one would
    pass ``segment_bytes``; a segment whose events are all acknowledged is deleted.
``cursor``
    the highest seq the control plane acknowledged (written to a temporary file,
    fsynced, renamed over the old one: a crash leaves the old or the new value).
``lock``
    held (``flock``, exclusive) by the one process that has the spool open, for as
    long as it does; the kernel lets go when the process dies, even by ``kill -9``.
    Two writers would number their events alike and the control plane would refuse
    the second of each pair (same source and seq, other content), so a second agent
    given the same data dir (two agent replicas on one volume) is refused at start:
    every agent needs a data dir of its own (``--workers`` agents share one, each
    worker with a spool of its own).

Durability. :meth:`AuditSpool.append` writes the line with one ``os.write`` on an
``O_APPEND`` descriptor before it returns, so once the agent has answered, the event
is in the kernel's page cache and survives the agent being killed (``kill -9``). A
background thread fsyncs every ``fsync_interval`` seconds (0: every append fsyncs
before returning), so a power loss loses at most that interval. Only fsynced events
are handed to the shipper: whatever the control plane may hold is on local disk
first, so after a power loss the spool never hands out a sequence number again that
the control plane has already seen with other content.

Recovery (:meth:`AuditSpool.open`): a torn last line (the process died mid-write, or
the machine lost power) is truncated away, numbering continues after the last
complete line (or after the cursor, whichever is higher), and everything after the
cursor is shipped again; resending what the control plane already holds is harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from trustmesh.common.errors import SpoolError
from trustmesh.common.files import fsync_directory, write_atomically

log = logging.getLogger("trustmesh.agent.audit")

SPOOL_DIR = "audit-spool"
SOURCE_FILE = "source"
CURSOR_FILE = "cursor"
LOCK_FILE = "lock"
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
DEFAULT_FSYNC_INTERVAL = 0.1
MAX_LINE_BYTES = 15 * 1024
"""Lines above this are refused: the control plane takes events of at most 16 KiB
(canonical form, which is as long as orjson's); 1 KiB of margin."""

_SEGMENT = re.compile(r"segment-(\d{20})\.jsonl")
_READ_CHUNK = 256 * 1024


class LineTooLong(ValueError):
    """An event whose JSON line is longer than the spool accepts."""


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:020d}.jsonl"


def seq_of_line(line: bytes) -> int:
    """The ``source.seq`` of one spooled line; ValueError when the line is damaged."""
    try:
        seq = orjson.loads(line)["source"]["seq"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a spooled event: {exc}") from None
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("source.seq is not an integer")
    return seq


def _numbered(line: bytes, seq: int) -> bool:
    try:
        return seq_of_line(line) == seq
    except ValueError:
        return False


@dataclass(frozen=True)
class Position:
    """Where the next line to ship starts: a segment (by its first seq), a byte offset
    in it, and the seq of the line there."""

    segment: int
    offset: int
    seq: int


@dataclass(frozen=True)
class Batch:
    """Complete, fsynced lines ``first_seq..last_seq`` (``data``: the lines as they are
    in the segment, each ending in a newline) and the position after them."""

    data: bytes
    size: int
    first_seq: int
    last_seq: int
    end: Position

    def body(self) -> bytes:
        """The ingest request body, ``{"events":[...]}``, without re-encoding: the
        newlines between the lines become the array's commas (a JSON line holds no
        raw newline)."""
        return b'{"events":[' + self.data[:-1].replace(b"\n", b",") + b"]}"


class AuditSpool:
    """Append-only, crash-safe event log on local disk. One writer (the agent's event
    loop calls :meth:`append`), one reader (the shipper calls :meth:`read_batch` and
    :meth:`acknowledge`), one background fsync thread."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if fsync_interval < 0:
            raise ValueError("the fsync interval cannot be negative")
        self.directory = directory
        self.fsync_interval = fsync_interval
        self.segment_bytes = segment_bytes
        self.source_id = ""
        self.appended = 0  # events appended by this process (a metric)
        self._lock = threading.Lock()  # segments, fds and the synced mark (vs. the fsync thread)
        self._segments: list[int] = []  # first seqs, ascending; the last one is written
        self._fd = -1
        self._lock_fd = -1  # holds the spool's flock while it is open
        self._retired: list[int] = []  # fds of finished segments, for the fsync thread
        self._dir_dirty = False
        self._segment_size = 0
        self._torn = False  # a failed write may have left a partial line to cut off
        self._next_seq = 1
        self._written_seq = 0
        self._synced_seq = 0
        self._acked_seq = 0
        self._position = Position(1, 0, 1)
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False

    # -- opening and recovery ---------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> AuditSpool:
        """Open (or create) the spool in ``directory`` and recover it; starts the fsync
        thread when ``fsync_interval`` > 0. Raises SpoolError with one clear line."""
        spool = cls(directory, fsync_interval=fsync_interval, segment_bytes=segment_bytes)
        try:
            spool._recover()
        except OSError as exc:
            spool._close_fds()
            raise SpoolError(f"cannot open the audit spool {directory}: {exc}") from None
        except SpoolError:
            spool._close_fds()
            raise
        if fsync_interval > 0:
            spool._flusher = threading.Thread(
                target=spool._flush_loop, name="audit-spool-fsync", daemon=True
            )
            spool._flusher.start()
        return spool

    def _recover(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._take_lock()
        segments = self._list_segments()
        self.source_id = self._load_or_create_source(bool(segments))
        self._acked_seq = self._read_cursor()
        if not segments:
            self._start_segment(self._acked_seq + 1)
            self._next_seq = self._acked_seq + 1
        else:
            self._segments = segments
            last_seq = self._repair_last_segment()
            next_seq = max(last_seq, self._acked_seq) + 1
            if next_seq != last_seq + 1 or self._segment_size >= self.segment_bytes:
                # keep "seq = first seq + line number" true inside every segment
                self._drop_empty_last_segment()
                self._start_segment(next_seq)
            else:
                self._open_last_segment()
            self._next_seq = next_seq
        self._written_seq = self._synced_seq = self._next_seq - 1
        self._position = self._locate(self._acked_seq + 1)
        self._delete_acknowledged_segments()

    def _take_lock(self) -> None:
        """This process's exclusive hold on the spool (SpoolError if another has it)."""
        path = self.directory / LOCK_FILE
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolError(
                f"the audit spool {self.directory} is in use by another agent process: "
                "every agent needs a --data-dir of its own"
            ) from None

    def _list_segments(self) -> list[int]:
        found = []
        for name in os.listdir(self.directory):
            match = _SEGMENT.fullmatch(name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def _load_or_create_source(self, has_segments: bool) -> str:
        path = self.directory / SOURCE_FILE
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        if value:
            return value
        if has_segments or (self.directory / CURSOR_FILE).exists():
            raise SpoolError(
                f"the audit spool {self.directory} has events but no {SOURCE_FILE} file; "
                "move the directory away to start a new spool"
            )
        value = secrets.token_hex(16)
        write_atomically(path, value.encode() + b"\n")  # fsyncs the directory too
        return value

    def _read_cursor(self) -> int:
        try:
            text = (self.directory / CURSOR_FILE).read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            raise SpoolError(f"the audit spool cursor {self.directory / CURSOR_FILE} is damaged")
        return int(text)

    def _segment_path(self, first_seq: int) -> Path:
        return self.directory / segment_name(first_seq)

    def _repair_last_segment(self) -> int:
        """Cut a torn tail off the last segment; the seq of its last complete line (or
        the seq before its first when it holds none)."""
        first = self._segments[-1]
        path = self._segment_path(first)
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        last_seq = first - 1
        while keep > 0:
            start = data.rfind(b"\n", 0, keep - 1) + 1
            try:
                last_seq = seq_of_line(data[start : keep - 1])
                break
            except ValueError:
                keep = start  # a damaged complete line (power loss): drop it too
        if keep < len(data):
            log.warning(
                "audit spool: cut %d bytes of an incomplete write off %s",
                len(data) - keep,
                path.name,
            )
            with open(path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
        self._segment_size = keep
        return last_seq

    def _drop_empty_last_segment(self) -> None:
        if self._segment_size == 0:
            self._segment_path(self._segments.pop()).unlink()

    def _open_last_segment(self) -> None:
        path = self._segment_path(self._segments[-1])
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _start_segment(self, first_seq: int) -> None:
        path = self._segment_path(first_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._segments.append(first_seq)
        self._segment_size = 0
        fsync_directory(self.directory)

    def _locate(self, seq: int) -> Position:
        """The position of the line numbered ``seq`` (or where it will be written)."""
        candidates = [first for first in self._segments if first <= seq]
        if not candidates:
            first = self._segments[0]
            return Position(first, 0, first)
        return self._scan(candidates[-1], 0, seq)

    def _scan(self, segment: int, offset: int, seq: int) -> Position:
        """From ``offset`` in ``segment``, the first line numbered ``seq`` or higher;
        lines skipped on the way past ``seq`` are damaged (said loudly: they become a
        gap the control plane reports)."""
        with open(self._segment_path(segment), "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        at = 0
        skipped = 0
        while True:
            end = data.find(b"\n", at)
            if end < 0:
                break
            try:
                line_seq = seq_of_line(data[at:end])
            except ValueError:
                line_seq = -1
            if line_seq >= seq:
                if skipped:
                    log.error(
                        "audit spool: skipped %d damaged line(s) in %s",
                        skipped,
                        segment_name(segment),
                    )
                return Position(segment, offset + at, line_seq)
            if line_seq < 0:
                skipped += 1
            at = end + 1
        return Position(segment, offset + at, max(seq, segment))

    # -- writing ------------------------------------------------------------------------

    def append(self, event: dict[str, Any]) -> int:
        """Number ``event`` (sets ``event["source"]["seq"]``), write it, return its seq.

        The line is in the file (page cache) when this returns; with an fsync interval
        of 0 it is also on disk. Raises LineTooLong or orjson.JSONEncodeError (nothing
        written, no seq used) for an event that cannot be spooled as it is, and
        SpoolError when the disk refuses the write."""
        if self._closed:
            raise SpoolError("the audit spool is closed")
        seq = self._next_seq
        event["source"]["seq"] = seq
        line = orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)
        if len(line) > MAX_LINE_BYTES:
            raise LineTooLong(f"the event is {len(line)} bytes; the spool takes {MAX_LINE_BYTES}")
        try:
            if self._torn:
                os.ftruncate(self._fd, self._segment_size)
                self._torn = False
            if self._segment_size and self._segment_size + len(line) > self.segment_bytes:
                self._rotate(seq)
            self._write_line(line)
        except OSError as exc:
            raise SpoolError(f"cannot write to the audit spool: {exc.strerror or exc}") from None
        self._segment_size += len(line)
        self._next_seq = seq + 1
        self._written_seq = seq
        self.appended += 1
        if self.fsync_interval == 0:
            self.sync()
        return seq

    def _write_line(self, line: bytes) -> None:
        written = os.write(self._fd, line)
        while written < len(line):  # a short write (disk nearly full): finish or undo it
            try:
                more = os.write(self._fd, line[written:])
            except OSError:
                self._undo_partial_line()
                raise
            if more == 0:
                self._undo_partial_line()
                raise OSError(28, "no space left on device")
            written += more

    def _undo_partial_line(self) -> None:
        try:
            os.ftruncate(self._fd, self._segment_size)
        except OSError:
            self._torn = True  # retried before the next write

    def _rotate(self, first_seq: int) -> None:
        path = self._segment_path(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._lock:
            old, self._fd = self._fd, fd
            self._segments.append(first_seq)
            self._dir_dirty = True
            if self.fsync_interval > 0:
                self._retired.append(old)
                old = -1
        self._segment_size = 0
        if old >= 0:  # fsync per event: nothing is pending on the old segment
            os.close(old)

    # -- fsync ---------------------------------------------------------------------------

    def sync(self) -> None:
        """Make every line written so far durable, and mark it shippable."""
        with self._lock:
            target = self._written_seq
            fd = self._fd
            retired, self._retired = self._retired, []
            dir_dirty, self._dir_dirty = self._dir_dirty, False
        if target == self._synced_seq and not retired and not dir_dirty:
            return
        for old in retired:
            os.fdatasync(old)
            os.close(old)
        if fd >= 0:
            os.fdatasync(fd)
        if dir_dirty:
            fsync_directory(self.directory)
        with self._lock:
            self._synced_seq = max(self._synced_seq, target)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval):
            try:
                self.sync()
            except OSError as exc:  # keep trying: the next interval may succeed
                log.error("audit spool: fsync failed: %s", exc)

    # -- reading and acknowledging (the shipper) --------------------------------------

    @property
    def written_seq(self) -> int:
        return self._written_seq

    @property
    def synced_seq(self) -> int:
        return self._synced_seq

    @property
    def acked_seq(self) -> int:
        return self._acked_seq

    @property
    def backlog(self) -> int:
        """Events written but not yet acknowledged by the control plane."""
        return max(0, self._written_seq - self._acked_seq)

    def segments(self) -> list[Path]:
        with self._lock:
            return [self._segment_path(first) for first in self._segments]

    def read_batch(self, max_events: int = 1000, max_bytes: int = 4 * 1024 * 1024) -> Batch | None:
        """The next fsynced, unacknowledged lines (at most ``max_events`` and
        ``max_bytes``), or None when there are none. Does not move the position:
        :meth:`acknowledge` does, once the control plane has them."""
        while True:
            position = self._position
            with self._lock:
                synced = self._synced_seq
                later = [first for first in self._segments if first > position.segment]
            if position.seq > synced:
                return None
            room = min(max_events, synced - position.seq + 1)
            data, count = self._read_lines(position, room, max_bytes)
            if count:
                batch = self._checked_batch(position, data, count)
                if batch is not None:
                    return batch
                self._position = self._scan(position.segment, position.offset, position.seq)
                continue
            if not later:
                return None
            # this segment is read to its end: go on with the next one
            self._position = Position(later[0], 0, max(later[0], position.seq))

    def _read_lines(self, position: Position, room: int, max_bytes: int) -> tuple[bytes, int]:
        """Up to ``room`` complete lines from ``position``, at most ``max_bytes`` in all
        (always at least one), as they are in the file, and how many. The lines are
        found by C-level searches, never one by one in Python: this runs on the event
        loop that answers decisions."""
        chunks: list[bytes] = []
        count = size = 0
        with open(self._segment_path(position.segment), "rb") as handle:
            handle.seek(position.offset)
            while count < room and size < max_bytes:
                chunk = handle.read(min(_READ_CHUNK, max_bytes - size))
                if not chunk:
                    break
                found = chunk.count(b"\n")
                if count + found >= room:  # cut after the line that fills the room
                    cut = -1
                    for _ in range(room - count):
                        cut = chunk.index(b"\n", cut + 1)
                    chunk = chunk[: cut + 1]
                chunks.append(chunk)
                count, size = count + min(found, room - count), size + len(chunk)
            data = b"".join(chunks)
            end = data.rfind(b"\n") + 1
            if end == 0:  # not one complete line within max_bytes: the first line alone
                handle.seek(position.offset)
                data = handle.readline()
                return (data, 1) if data.endswith(b"\n") else (b"", 0)
        return data[:end], count  # without the incomplete line after the last complete one

    def _checked_batch(self, position: Position, data: bytes, count: int) -> Batch | None:
        """Lines inside a segment are numbered consecutively: check the first and the
        last line say so (two parses per batch). When they do not (a damaged segment),
        keep the well-numbered prefix, or None when the first line is already wrong."""
        last_seq = position.seq + count - 1
        first = data[: data.index(b"\n")]
        last = data[data.rfind(b"\n", 0, len(data) - 1) + 1 : -1]
        if _numbered(first, position.seq) and _numbered(last, last_seq):
            end = Position(position.segment, position.offset + len(data), last_seq + 1)
            return Batch(data, count, position.seq, last_seq, end)
        log.error(
            "audit spool: %s is not numbered as expected after seq %d",
            segment_name(position.segment),
            position.seq - 1,
        )
        good = 0
        size = 0
        for line in data[:-1].split(b"\n"):
            if not _numbered(line, position.seq + good):
                break
            good += 1
            size += len(line) + 1
        if not good:
            return None
        last_seq = position.seq + good - 1
        end = Position(position.segment, position.offset + size, last_seq + 1)
        return Batch(data[:size], good, position.seq, last_seq, end)

    def acknowledge(self, batch: Batch) -> None:
        """The control plane holds ``batch``: move the cursor (fsynced) and the read
        position past it, delete segments that hold nothing unacknowledged."""
        if batch.size:
            write_atomically(self.directory / CURSOR_FILE, f"{batch.last_seq}\n".encode())
            self._acked_seq = max(self._acked_seq, batch.last_seq)
        self._position = batch.end
        self._delete_acknowledged_segments()

    def _delete_acknowledged_segments(self) -> None:
        with self._lock:
            done = [first for first in self._segments[:-1] if first < self._position.segment]
            self._segments = [first for first in self._segments if first not in done]
        for first in done:
            with contextlib.suppress(FileNotFoundError):
                self._segment_path(first).unlink()

    # -- stopping -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the fsync thread, fsync what is written, close the files."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            self.sync()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in [*self._retired, self._fd, self._lock_fd]:  # the lock last
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._retired = []
        self._fd = self._lock_fd = -1

    def status(self) -> dict[str, Any]:
        return {
            "source": self.source_id,
            "written_seq": self._written_seq,
            "synced_seq": self._synced_seq,
            "acknowledged_seq": self._acked_seq,
            "backlog": self.backlog,
            "segments": len(self._segments),
        }
