"""Redundant key sources of a member cluster (DESIGN §10), through real control-plane
processes and real simulated clusters whose servers are stopped to make the outages:

* a Cluster's ``jwksUris`` are tried in order: with the first source down, the second
  (a JWKS mirror, or the issuer's discovery document) serves the keys;
* the last good key set is kept in the database, so a control plane started afresh
  (a new process on the same database) while every source is down verifies the
  cluster's tokens from it, and says so in ``/readyz`` (admin detail) and metrics;
* past ``--cluster-keys-max-age`` the stored set is not used (503 ``temporarily_unavailable``, a
  ``cluster.keys_expired`` event), until a source answers again.

Both engines: the stored set lives in SQLite or PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import (
    TRUST_DOMAIN,
    Server,
    cluster_yaml,
    start_server,
    unique,
    workload_yaml,
)
from trustmesh.sim import SimulatedCluster
from trustmesh.sim.cluster import DISCOVERY_PATH, JWKS_PATH


@dataclass
class Sources:
    """One cluster's signing key served from two places: ``issuer`` (its own discovery
    document and JWKS, the issuer of its tokens) and ``mirror`` (the same JWKS on
    another port, as a second apiserver or a static copy would serve it)."""

    issuer: SimulatedCluster
    mirror: SimulatedCluster
    keys_dir: Path

    @property
    def discovery_url(self) -> str:
        return self.issuer.issuer + DISCOVERY_PATH

    @property
    def mirror_url(self) -> str:
        return self.mirror.issuer + JWKS_PATH

    def token(self) -> str:
        return self.issuer.mint("shop", "payments", ttl=300)


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Sources]:
    keys_dir = tmp_path / "cluster-keys"
    issuer = SimulatedCluster("keys", data_dir=keys_dir).serve(path=f"/{unique('iss-')}")
    issuer_url = issuer.issuer
    mirror = SimulatedCluster("keys", data_dir=keys_dir).serve()
    issuer.set_issuer(issuer_url)  # the mirror wrote its own URL to the shared data dir
    yield Sources(issuer, mirror, keys_dir)
    issuer.stop()
    mirror.stop()


def register(server: Server, sources: list[str], issuer: str) -> tuple[str, str]:
    """A Cluster with ``jwksUris`` = ``sources`` and a workload for shop/payments;
    returns its name and the audience to exchange for (a second cluster)."""
    name, target = unique("keyed-"), unique("target-")
    listed = "[" + ", ".join(f'"{url}"' for url in sources) + "]"
    server.apply(
        "---\n".join(
            [
                cluster_yaml(name, issuer, jwksUris=listed),
                cluster_yaml(target, f"http://127.0.0.1:9/{target}"),
                workload_yaml(unique("wl-"), name, "shop", "payments"),
            ]
        )
    )
    return name, f"spiffe://{TRUST_DOMAIN}/cluster/{target}"


def readyz_detail(server: Server) -> dict[str, object]:
    answer = server.admin.get("/readyz")
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


def metric(server: Server, name: str, cluster: str) -> float | None:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    prefix = f'{name}{{cluster="{cluster}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def test_with_the_first_source_down_the_second_serves_the_keys(
    tmp_path: Path, sources: Sources
) -> None:
    server = start_server(tmp_path / "data")
    try:
        sources.mirror.stop()  # the first source listed: its port is closed
        name, audience = register(
            server, [sources.mirror_url, sources.discovery_url], sources.issuer.issuer
        )
        answer = server.exchange(sources.token(), audience)
        assert answer.status_code == 200, answer.text
        log = server.process.stderr()
        assert f"fetching keys of cluster {name} from source 1 of 2 failed" in log
        assert f"fetched keys of cluster {name} from source 2 of 2" in log
        assert metric(server, "trustmesh_cluster_keys_stored", name) == 0.0
        assert name not in readyz_detail(server)["stored_cluster_keys"]  # type: ignore[operator]

        # The other way round: the issuer's discovery document listed first and down, a
        # JWKS mirror (on a new port) second and up. Changed sources: fetched anew.
        sources.issuer.stop()
        mirror = SimulatedCluster("keys", data_dir=sources.keys_dir).serve()
        try:
            listed = f'["{sources.discovery_url}", "{mirror.issuer + JWKS_PATH}"]'
            server.apply(cluster_yaml(name, sources.issuer.issuer, jwksUris=listed))
            answer = server.exchange(sources.token(), audience)
            assert answer.status_code == 200, answer.text
            log = server.process.stderr()
            assert log.count(f"fetched keys of cluster {name} from source 2 of 2") == 2
        finally:
            mirror.stop()
    finally:
        assert server.stop() == 0


def test_a_fresh_control_plane_verifies_with_the_stored_set_while_every_source_is_down(
    db_url: str | None, tmp_path: Path, sources: Sources
) -> None:
    data_dir = tmp_path / "data"
    first = start_server(data_dir, db_url)
    name, audience = register(
        first, [sources.discovery_url, sources.mirror_url], sources.issuer.issuer
    )
    answer = first.exchange(sources.token(), audience)
    assert answer.status_code == 200, answer.text
    first.process.kill()  # a crash: SIGKILL

    sources.issuer.stop()
    sources.mirror.stop()
    # A new process on the same database, with nothing in memory, no source answering.
    second = start_server(data_dir, db_url)
    try:
        answer = second.exchange(sources.token(), audience)
        assert answer.status_code == 200, answer.text
        log = second.process.stderr()
        assert f"fetching keys of cluster {name} from source 2 of 2 failed" in log
        assert "verifying with its last good key set from the database" in log

        detail = readyz_detail(second)
        stored = detail["stored_cluster_keys"]
        assert isinstance(stored, dict) and set(stored) >= {name}
        assert set(stored[name]) == {"since", "fetched_at", "age_seconds", "expired"}
        assert stored[name]["age_seconds"] >= 0 and stored[name]["expired"] is False
        public = httpx.get(second.url + "/readyz", timeout=10).json()
        assert "stored_cluster_keys" not in public  # the detail is the admin's only
        assert metric(second, "trustmesh_cluster_keys_stored", name) == 1.0
        age = metric(second, "trustmesh_cluster_keys_age_seconds", name)
        assert age is not None and age >= 0
    finally:
        assert second.stop() == 0

    # The stored set is older than a third process allows: refused, and recorded.
    time.sleep(1.5)
    third = start_server(data_dir, db_url, "--cluster-keys-max-age", "1")
    try:
        answer = third.exchange(sources.token(), audience)
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["error"] == "temporarily_unavailable"
        assert body["error_description"].startswith(f"the keys of cluster {name} are too old")
        assert "--cluster-keys-max-age" in body["error_description"]
        events = third.audit_events_until(
            "cluster.keys_expired", lambda found: any(e.get("cluster") == name for e in found)
        )
        expired = [e for e in events if e.get("cluster") == name]
        assert len(expired) == 1
        assert expired[0]["detail"]["max_age"] == 1
        assert expired[0]["detail"]["fetched_from"] == sources.discovery_url
        assert readyz_detail(third)["stored_cluster_keys"][name]["expired"] is True  # type: ignore[index]

        # A source answers again: the cluster's tokens verify with fresh keys.
        port = int(sources.mirror_url.split(":")[2].split("/")[0])
        back = SimulatedCluster("keys", data_dir=sources.keys_dir).serve(port=port)
        try:
            time.sleep(1.1)  # --cluster-jwks-min-refresh (1 s) since the last attempt
            answer = third.exchange(sources.token(), audience)
            assert answer.status_code == 200, answer.text
            assert metric(third, "trustmesh_cluster_keys_stored", name) == 0.0
        finally:
            back.stop()
    finally:
        assert third.stop() == 0
