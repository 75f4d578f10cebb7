"""Child processes of a benchmark: start, wait for the ready line, read CPU time, stop.

Output goes to files rather than pipes, so a chatty child can never block on a full
pipe in the middle of a measurement, and its stderr is at hand when it fails."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Child", "cpu_seconds", "descendants", "start", "stop", "stop_all", "tree_cpu_seconds"]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def tail(self, limit: int = 2000) -> str:
        """The end of the child's stderr (then stdout), for error messages."""
        for path in (self.stderr, self.stdout):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                continue
            if text:
                return text[-limit:]
        return "(no output)"

    def wait_ready(self, prefix: str, timeout: float = 60.0) -> str:
        """Block until the child prints a complete line starting with ``prefix``;
        returns that line. Fails if the child exits or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.stdout.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines(keepends=True):
                if line.startswith(prefix) and line.endswith("\n"):
                    return line.strip()
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} exited with {code} before it was ready: {self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} printed no ready line within {timeout:.0f} s")
            time.sleep(0.02)


def start(name: str, argv: list[str], log_dir: Path) -> Child:
    """Start ``argv`` with stdout and stderr in ``log_dir/NAME.{out,err}``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Child(name, proc, out_path, err_path)


def stop(child: Child | None, timeout: float = 10.0) -> int | None:
    """SIGTERM (the servers drain and exit cleanly), then SIGKILL if it does not end
    within ``timeout``. Always reaps the process. -> its exit code."""
    if child is None:
        return None
    proc = child.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def stop_all(children: Sequence[Child]) -> None:
    """Stop every child: SIGTERM to all at once, so they drain in parallel, then each
    reaped (SIGKILL past the timeout), last started first."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    for child in reversed(children):
        stop(child)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from
    ``/proc/PID/stat``; None where there is no procfs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (from ``/proc/PID/task/*/children``);
    empty where there is no procfs."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                text = Path(f"/proc/{parent}/task/{task}/children").read_text(encoding="ascii")
            except OSError:
                continue
            children = [int(child) for child in text.split()]
            found += children
            pending += children
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and of every live process below it (e.g. an agent's
    supervisor and its workers); None where there is no procfs."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(child) or 0.0 for child in descendants(pid))
