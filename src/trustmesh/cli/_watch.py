"""``trustmesh token exchange --watch --out FILE``: keep a fresh federated token in a
file, for a sidecar whose neighbour reads it (as kubelet does for projected
service-account tokens).

A :class:`trustmesh.client.TokenSource` with its background refresher does the work;
every new token replaces ``FILE`` atomically (a 0600 temporary file in the same
directory, fsync, rename, fsync of the directory), so a reader sees the old token or
the new one, never a partial write. One line per refresh or failure goes to stderr.
SIGINT or SIGTERM stop it cleanly (exit 0); if the first exchange fails it exits
non-zero with one line.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from trustmesh.cli._common import fail, resolve_ca_file
from trustmesh.client import Lease, TokenSource, TokenUnavailable
from trustmesh.common.files import write_atomically
from trustmesh.common.terminal import printable


def _say(line: str) -> None:
    sys.stderr.write(printable(line) + "\n")
    sys.stderr.flush()


class _PrintableFormatter(logging.Formatter):
    """The SDK's messages carry the control plane's answers: one printable line each."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def watch_exchange(
    servers: list[str],
    subject_token_file: Path,
    audiences: list[str],
    out: Path,
    lifetime: int | None,
    *,
    stop: threading.Event | None = None,
) -> None:
    """Exchange ``subject_token_file`` (re-read each time) for a token for
    ``audiences`` at ``servers`` (tried in order), write it to ``out`` and keep it
    fresh until SIGINT/SIGTERM (or until ``stop`` is set, when given).

    Raises CliError (via ``fail``) when the first token cannot be obtained or written."""
    if str(subject_token_file) == "-":
        fail("--watch re-reads the subject token before every refresh: give a file, not '-'")
    out = out.expanduser()
    written = threading.Event()
    write_error: list[str] = []

    def on_refresh(lease: Lease) -> None:
        try:
            write_atomically(out, lease.token)
        except OSError as exc:
            message = f"cannot write {out}: {exc.strerror or exc}"
            if not written.is_set():
                write_error.append(message)
            else:
                _say(f"error: {message}")
            return
        written.set()
        _say(f"token refreshed, expires in {lease.lifetime} s")

    stopping = stop or threading.Event()
    previous_handlers: dict[signal.Signals, object] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    # After the first token, failures are logged by the SDK: one stderr line each.
    logger = logging.getLogger("trustmesh.client")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(message)s"))
    previous_propagate, previous_level = logger.propagate, logger.level
    quiet = logging.NullHandler()  # the first failure is reported by fail(), once
    logger.addHandler(quiet)
    logger.propagate = False
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous_handlers[sig] = signal.signal(sig, on_signal)
        try:
            source = TokenSource(
                servers,
                subject_token_file,
                audiences,
                lifetime,
                on_refresh=on_refresh,
                ca_file=resolve_ca_file(),
            )
        except (ValueError, TypeError) as exc:
            fail(str(exc))
        with source:
            try:
                source.refresh()
            except TokenUnavailable as exc:
                fail(f"cannot get a token: {exc}")
            if write_error:
                fail(write_error[0])
            logger.removeHandler(quiet)
            logger.addHandler(handler)
            logger.setLevel(logging.WARNING)
            source.start()
            while not stopping.wait(1.0):
                pass
    finally:
        for sig, previous in previous_handlers.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        logger.removeHandler(quiet)
        logger.removeHandler(handler)
        logger.propagate = previous_propagate
        logger.setLevel(previous_level)
