"""How far the control plane trusts a member cluster (issue 10, finding 9), through a
real control plane and real simulated clusters: service-account tokens valid for
longer than ``--max-sa-token-lifetime`` are refused; a cluster's last keys serve for
at most ``--cluster-keys-max-age`` while its issuer is down; a discovery document may
point ``jwks_uri`` only at the issuer's own origin unless the Cluster lists it; and a
caller is never told why a cluster's keys could not be fetched (the log is)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    serve_cluster,
    start_server,
    unique,
    workload_yaml,
)
from trustmesh.common.serving import BackgroundServer
from trustmesh.sim import SimulatedCluster
from trustmesh.sim.cluster import JWKS_PATH


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A control plane with small bounds: SA tokens of at most 600 s, cluster keys
    kept at most 2 s after their last fetch."""
    data_dir = tmp_path_factory.mktemp("trust") / "data"
    started = start_server(
        data_dir, None, "--max-sa-token-lifetime", "600", "--cluster-keys-max-age", "2"
    )
    yield started
    assert started.stop() == 0


def register(server: Server, cluster: SimulatedCluster, **spec: str) -> str:
    """Register ``cluster`` (under a new name) with a workload for shop/payments; the
    audience to exchange for is that of a second registered cluster."""
    name, target = unique("origin-"), unique("target-")
    server.apply(
        "---\n".join(
            [
                cluster_yaml(name, cluster.issuer, **spec),
                cluster_yaml(target, f"http://127.0.0.1:9/{target}"),
                workload_yaml(unique("wl-"), name, "shop", "payments"),
            ]
        )
    )
    return f"spiffe://{TRUST_DOMAIN}/cluster/{target}"


def test_sa_tokens_valid_for_longer_than_the_maximum_are_refused(
    server: Server, sim_cluster: SimulatedCluster
) -> None:
    audience = register(server, sim_cluster)
    ok = server.exchange(sim_cluster.mint("shop", "payments", ttl=600), audience)
    assert ok.status_code == 200, ok.text
    # A token issued long ago that is still valid: exp - iat counts, not exp - now.
    old = sim_cluster.mint("shop", "payments", ttl=3600, now=time.time() - 3500)
    for token in (sim_cluster.mint("shop", "payments", ttl=601), old):
        refused = server.exchange(token, audience)
        assert refused.status_code == 400, refused.text
        body = refused.json()
        assert body["error"] == "invalid_grant"
        assert "longer than the 600 s this control plane accepts" in body["error_description"]
        assert "--max-sa-token-lifetime" in body["error_description"]


def test_the_default_maximum_is_24_hours(tmp_path: Path, sim_cluster: SimulatedCluster) -> None:
    server = start_server(tmp_path / "data")
    try:
        audience = register(server, sim_cluster)
        assert server.exchange(sim_cluster.mint("shop", "payments", ttl=86400), audience).is_success
        refused = server.exchange(sim_cluster.mint("shop", "payments", ttl=86401), audience)
        assert refused.status_code == 400 and "86400 s" in refused.json()["error_description"]
    finally:
        assert server.stop() == 0


def test_keys_of_an_unreachable_cluster_serve_for_at_most_the_max_age(server: Server) -> None:
    """A real cluster that stops: its last keys keep serving (within 2 s here), then
    the exchange answers 503 saying its keys are too old."""
    cluster = serve_cluster("stops")
    audience = register(server, cluster)
    assert server.exchange(cluster.mint("shop", "payments", ttl=300), audience).is_success
    cluster.stop()
    time.sleep(2.5)
    answer = server.exchange(cluster.mint("shop", "payments", ttl=300), audience)
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["error"] == "temporarily_unavailable"
    assert "are too old" in body["error_description"]
    assert "--cluster-keys-max-age" in body["error_description"]


def test_why_keys_cannot_be_fetched_is_not_told_to_the_caller(server: Server) -> None:
    ghost = SimulatedCluster("ghost")
    ghost.set_issuer(f"http://127.0.0.1:9/{unique('ghost-')}")  # nothing listens there
    audience = register(server, ghost)
    answer = server.exchange(ghost.mint("shop", "payments", ttl=300), audience)
    assert answer.status_code == 503, answer.text
    description = answer.json()["error_description"]
    assert description.startswith("the keys of cluster ") and description.endswith(
        " cannot be fetched"
    )
    for detail in ("127.0.0.1", "Connect", "connection", "http"):
        assert detail not in description
    assert "fetching keys of cluster" in server.process.stderr()  # the operator sees why


@pytest.fixture
def split_cluster(tmp_path: Path) -> Iterator[tuple[SimulatedCluster, str]]:
    """One cluster's key on two origins: ``keys`` serves its JWKS on one port; the
    issuer, on another, answers a discovery document whose ``jwks_uri`` names that
    JWKS. Yields a signer whose tokens name the issuer, and the JWKS URL."""
    keys = SimulatedCluster("split", data_dir=tmp_path / "split").serve()
    jwks_url = keys.issuer + JWKS_PATH

    async def discovery(request: Request) -> Response:
        issuer = str(request.base_url).rstrip("/") + "/split"
        return JSONResponse({"issuer": issuer, "jwks_uri": jwks_url})

    app = Starlette(routes=[Route("/split/.well-known/openid-configuration", discovery)])
    with BackgroundServer(app) as background:
        signer = SimulatedCluster("split", data_dir=tmp_path / "split")  # the same key
        signer.set_issuer(background.url + "/split")
        yield signer, jwks_url
    keys.stop()


def test_discovery_may_point_only_at_the_issuers_origin_unless_listed(
    server: Server, split_cluster: tuple[SimulatedCluster, str]
) -> None:
    signer, jwks_url = split_cluster
    name, target = unique("split-"), unique("target-")
    server.apply(
        "---\n".join(
            [
                cluster_yaml(name, signer.issuer),
                cluster_yaml(target, f"http://127.0.0.1:9/{target}"),
                workload_yaml(unique("wl-"), name, "shop", "payments"),
            ]
        )
    )
    audience = f"spiffe://{TRUST_DOMAIN}/cluster/{target}"
    answer = server.exchange(signer.mint("shop", "payments", ttl=300), audience)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error_description"].endswith("cannot be fetched")
    assert "outside the issuer's origin" in server.process.stderr()

    # Listed as the Cluster's jwksUri, the same URL is trusted.
    server.apply(cluster_yaml(name, signer.issuer, jwksUri=f'"{jwks_url}"'))
    answer = server.exchange(signer.mint("shop", "payments", ttl=300), audience)
    assert answer.status_code == 200, answer.text
