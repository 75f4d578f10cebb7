"""The last good key set of each cluster in the database (DESIGN §10), on SQLite and
PostgreSQL: migration 9 on a version 8 database, a newer set replaces an older one
and never the reverse, a set fetched for other key sources replaces any, and the
expiry of a set is recorded once (``cluster.keys_expired``) whichever replica finds
it first; and a replica's key cache takes the stored set only when no source
answers and the set is newer than its own and fetched for the same sources."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, inspect, select, text

from trustmesh.audit import events as ev
from trustmesh.audit.log import AuditLog
from trustmesh.common.errors import ClusterKeysUnavailable
from trustmesh.identity.kubernetes_sa import ClusterKeyCache, StoredKeySet
from trustmesh.identity.sealing import MasterKey
from trustmesh.manifests import ClusterSpec
from trustmesh.server.cluster_keys import ClusterKeyStore
from trustmesh.server.recorder import AuditRecorder
from trustmesh.sim import SimulatedCluster
from trustmesh.sim.cluster import JWKS_PATH
from trustmesh.storage import open_database
from trustmesh.storage.migrations import LATEST, current_version, migrate
from trustmesh.storage.schema import audit_entries, schema_migrations

JWKS_A = {"keys": [{"kty": "EC", "kid": "a", "crv": "P-256", "x": "x", "y": "y"}]}
JWKS_B = {"keys": [{"kty": "EC", "kid": "b", "crv": "P-256", "x": "x", "y": "y"}]}


def open_store(db_url: str | None, data_dir: Path, replica: str) -> ClusterKeyStore:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = AuditLog(open_database(db_url, data_dir), MasterKey(b"m" * 32), "example.org", replica)
    log.open()
    return ClusterKeyStore(log.db, AuditRecorder(log))


def expiry_events(store: ClusterKeyStore) -> list[dict[str, Any]]:
    with store.db.engine.connect() as conn:
        leaves = conn.execute(
            select(audit_entries.c.leaf)
            .where(audit_entries.c.type == ev.CLUSTER_KEYS_EXPIRED)
            .order_by(audit_entries.c.idx)
        ).scalars()
        return [json.loads(leaf) for leaf in leaves]


def test_migration_9_adds_cluster_keys_to_a_version_8_database(
    db_url: str | None, tmp_path: Path
) -> None:
    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:  # the database as version 8 left it
            conn.execute(text("DROP TABLE template_identities"))
            conn.execute(text("DROP TABLE cluster_keys"))
            conn.execute(delete(schema_migrations).where(schema_migrations.c.version >= 9))
        assert current_version(db.engine) == 8
        assert migrate(db.engine) == LATEST
        assert "cluster_keys" in inspect(db.engine).get_table_names()
    finally:
        db.dispose()


def test_the_newest_set_is_kept_and_a_changed_source_replaces_it(
    db_url: str | None, tmp_path: Path
) -> None:
    store = open_store(db_url, tmp_path / "data", "r1")
    try:
        assert store.load("east") is None
        store.save("east", StoredKeySet("s1", JWKS_A, 100.0, "https://a.example/jwks"))
        assert store.load("east") == StoredKeySet("s1", JWKS_A, 100.0, "https://a.example/jwks")
        # Another replica's older fetch, finishing later, does not put an older set back.
        store.save("east", StoredKeySet("s1", JWKS_B, 90.0, "https://b.example/jwks"))
        assert store.load("east") == StoredKeySet("s1", JWKS_A, 100.0, "https://a.example/jwks")
        store.save("east", StoredKeySet("s1", JWKS_B, 110.0, "https://b.example/jwks"))
        assert store.load("east") == StoredKeySet("s1", JWKS_B, 110.0, "https://b.example/jwks")
        # The Cluster's key sources changed: the set fetched for them replaces any.
        store.save("east", StoredKeySet("s2", JWKS_A, 50.0, "https://c.example/jwks"))
        assert store.load("east") == StoredKeySet("s2", JWKS_A, 50.0, "https://c.example/jwks")
        assert store.load("west") is None
    finally:
        store.db.dispose()


def test_the_expiry_of_a_set_is_recorded_once_across_replicas(
    db_url: str | None, tmp_path: Path
) -> None:
    first = open_store(db_url, tmp_path / "one", "r1")
    # A second replica on the same database (SQLite: the same file).
    second = open_store(
        db_url or f"sqlite:///{tmp_path / 'one' / 'trustmesh.db'}", tmp_path / "two", "r2"
    )
    try:
        kept = StoredKeySet("s1", JWKS_A, 100.0, "https://a.example/jwks")
        first.save("east", kept)
        first.expired("east", kept, 60.0, 200.0)
        second.expired("east", kept, 60.0, 201.0)
        first.expired("east", kept, 60.0, 202.0)
        events = expiry_events(first)
        assert len(events) == 1
        assert events[0]["cluster"] == "east" and events[0]["actor"] == "system"
        assert events[0]["detail"] == {
            "fetched_at": ev.now_time(100.0),
            "fetched_from": "https://a.example/jwks",
            "max_age": 60,
            "keys": 1,
        }
        # A newer set fetched later can expire in its turn.
        newer = StoredKeySet("s1", JWKS_A, 300.0, "https://a.example/jwks")
        second.save("east", newer)
        second.expired("east", newer, 60.0, 400.0)
        assert len(expiry_events(first)) == 2
    finally:
        first.db.dispose()
        second.db.dispose()


def test_a_replica_takes_a_newer_stored_set_when_no_source_answers(
    db_url: str | None, tmp_path: Path
) -> None:
    """Two replicas' key caches over one database, on a clock the test moves: a replica
    with nothing in memory takes the stored set; one whose own keys are older than
    the stored set (another replica fetched since) takes the newer set; a set stored
    for other key sources is never taken."""
    store_a = open_store(db_url, tmp_path / "a", "ra")
    store_b = open_store(
        db_url or f"sqlite:///{tmp_path / 'a' / 'trustmesh.db'}", tmp_path / "b", "rb"
    )
    cluster = SimulatedCluster("c", data_dir=tmp_path / "cluster")
    now = [1_000_000.0]

    def clock() -> float:
        return now[0]

    async def scenario() -> None:
        cluster.serve(path="/iss")
        port = int(cluster.issuer.split(":")[2].split("/")[0])
        spec = ClusterSpec(
            issuer=cluster.issuer, jwks=None, jwks_uri=None, audience="trustmesh", labels={}
        )
        kid = cluster.signing_kid
        async with httpx.AsyncClient() as client:
            a, b = (
                ClusterKeyCache(
                    client, clock=clock, min_refresh_interval=0.0, max_keys_age=1000.0, store=s
                )
                for s in (store_a, store_b)
            )
            assert (await a.keys_for("c", spec, kid)).kids() == [kid]  # fetched, stored
            cluster.stop()
            now[0] += 100
            assert (await b.keys_for("c", spec, kid)).kids() == [kid]  # from the database
            assert set(b.stored_in_use()) == {"c"}
            assert b.stored_in_use()["c"].fetched_at == 1_000_000.0

            cluster.serve(port=port, path="/iss")
            now[0] += 3600  # past the keys' max-age: fetched again, by a only
            await a.keys_for("c", spec, kid)
            assert a.fetches == 2 and a.stored_in_use() == {}
            cluster.stop()
            now[0] += 500  # b's own set is 4200 s old; the stored one 500 s
            assert (await b.keys_for("c", spec, kid)).kids() == [kid]
            assert b.stored_in_use()["c"].fetched_at == 1_003_700.0

            # Other key sources: the stored set is not theirs.
            other = ClusterSpec(
                issuer=cluster.issuer,
                jwks=None,
                jwks_uri=None,
                audience="trustmesh",
                labels={},
                jwks_uris=(cluster.issuer + JWKS_PATH,),
            )
            fresh = ClusterKeyCache(client, clock=clock, min_refresh_interval=0.0, store=store_b)
            with pytest.raises(ClusterKeysUnavailable, match="cannot be fetched"):
                await fresh.keys_for("c", other, kid)

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()
        store_a.db.dispose()
        store_b.db.dispose()
