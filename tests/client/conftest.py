"""Fixtures for the SDK tests: one control plane (SQLite; the SDK does not care which
engine is behind it) with a registered simulated cluster, a fake clock for the
refresh decisions and a switchable network for outages (HTTP stays real while up)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from client_support import Network

from helpers import Federation, Server, register_federation, start_server
from trustmesh.sim import SimulatedCluster


@pytest.fixture(scope="session")
def client_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("client-cp") / "data")
    yield server
    assert server.stop() == 0, server.process.stderr()


@pytest.fixture(scope="session")
def client_fed(client_server: Server, origin_cluster: SimulatedCluster) -> Federation:
    return register_federation(client_server, origin_cluster)


@pytest.fixture
def sa_file(client_fed: Federation, tmp_path: Path) -> Path:
    """A projected service-account token file, as kubelet writes it."""
    path = tmp_path / "sa.token"
    path.write_text(client_fed.sa_token())
    return path


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    yield net
    net.close()
