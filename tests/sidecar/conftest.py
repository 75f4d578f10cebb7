"""One control plane and one simulated cluster for the sidecar tests, with a Workload
whose X.509-SVIDs live ``TTL`` seconds, and a sidecar (Workload API, SDS, credential
folder) per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sidecar_support import TTL, Sidecar, short_dir, start_sidecar, write_token

from helpers import (
    Federation,
    Server,
    cluster_yaml,
    serve_cluster,
    start_server,
    unique,
    workload_yaml,
)
from trustmesh.sim import SimulatedCluster


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("sidecar-cp") / "data")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def origin() -> Iterator[SimulatedCluster]:
    with serve_cluster("sc-origin") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def federation(server: Server, origin: SimulatedCluster) -> Federation:
    """Clusters east (the simulated one) and west, and the Workload shop/payments in east."""
    origin_name, target_name, workload = unique("east-"), unique("west-"), unique("pay-")
    server.apply(
        "---\n".join(
            [
                cluster_yaml(origin_name, origin.issuer),
                cluster_yaml(target_name, f"http://127.0.0.1:9/{target_name}"),
                workload_yaml(
                    workload, origin_name, "shop", "payments", f"  maxTokenTTL: {TTL}s\n"
                ),
            ]
        )
    )
    return Federation(server, origin, origin_name, target_name, workload)


@pytest.fixture(scope="module")
def sidecar(federation: Federation) -> Iterator[Sidecar]:
    with short_dir() as directory:
        token = write_token(directory / "sa.token", federation.origin, "shop", "payments")
        sidecar = start_sidecar(
            [federation.server.url], token, directory, sds=True, credential_dir=True
        )
        yield sidecar
        assert sidecar.stop() == 0, sidecar.log()
