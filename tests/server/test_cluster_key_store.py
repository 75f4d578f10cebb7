"""The last good key set of each cluster in the database (DESIGN §10), on SQLite and
PostgreSQL: migration 9 on a version 8 database, a newer set replaces an older one
and never the reverse, a set fetched for other key sources replaces any, and the
expiry of a set is recorded once (``cluster.keys_expired``) whichever replica finds
it first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import delete, inspect, select, text

from trustmesh.audit import events as ev
from trustmesh.audit.log import AuditLog
from trustmesh.identity.kubernetes_sa import StoredKeySet
from trustmesh.identity.sealing import MasterKey
from trustmesh.server.cluster_keys import ClusterKeyStore
from trustmesh.server.recorder import AuditRecorder
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
        with db.engine.begin() as conn:
            conn.execute(text("DROP TABLE cluster_keys"))
            conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 9))
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
