"""Storage on both engines: migrations, revision counters, the schema in use."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from sqlalchemy import Connection, delete, insert, inspect, select, text, update

from helpers import new_postgres_database
from trustmesh.common.errors import DatabaseUrlError
from trustmesh.storage import meta as meta_store
from trustmesh.storage import open_database
from trustmesh.storage.db import engine_url
from trustmesh.storage.migrations import LATEST, current_version, migrate
from trustmesh.storage.schema import agent_status, schema_migrations


def test_migrations_create_schema_and_are_idempotent(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    try:
        assert current_version(db.engine) == LATEST
        tables = set(inspect(db.engine).get_table_names())
        assert {
            "meta",
            "signing_keys",
            "registry_objects",
            "credentials",
            "schema_migrations",
        } <= tables
        assert migrate(db.engine) == LATEST  # a second run changes nothing
        assert current_version(db.engine) == LATEST
    finally:
        db.dispose()


def test_database_newer_than_code_is_refused(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    with db.engine.begin() as conn:
        conn.execute(
            insert(schema_migrations).values(
                version=LATEST + 1, description="future", applied_at=0.0
            )
        )
    with pytest.raises(RuntimeError, match="newer than this trustmesh"):
        migrate(db.engine)
    db.dispose()


def test_revision_counters_are_distinct_under_concurrency(
    db_url: str | None, tmp_path: Path
) -> None:
    db = open_database(db_url, tmp_path)
    seen: list[int] = []
    lock = threading.Lock()

    def bump_many() -> None:
        for _ in range(10):
            with db.engine.begin() as conn:
                value = meta_store.bump(conn, meta_store.REGISTRY_REVISION)
            with lock:
                seen.append(value)

    threads = [threading.Thread(target=bump_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 41))
    with db.engine.connect() as conn:
        assert meta_store.revisions(conn)[meta_store.REGISTRY_REVISION] == 40
    db.dispose()


def test_meta_insert_if_absent_keeps_first_value(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    with db.engine.begin() as conn:
        assert meta_store.insert_if_absent(conn, "trust_domain", "a.example") == "a.example"
        assert meta_store.insert_if_absent(conn, "trust_domain", "b.example") == "a.example"
    db.dispose()


def test_engine_url_selection(tmp_path: Path) -> None:
    assert engine_url(None, tmp_path).startswith("sqlite:///")
    assert engine_url("postgresql://u@h/db", tmp_path) == "postgresql+psycopg://u@h/db"
    assert engine_url("postgres://u@h/db", tmp_path) == "postgresql+psycopg://u@h/db"
    with pytest.raises(DatabaseUrlError, match="mysql"):
        engine_url("mysql://u@h/db", tmp_path)


def _undo_migration_10(conn: Connection) -> None:
    """The database as version 9 left it: no template identities."""
    _undo_migration_11(conn)
    conn.execute(text("DROP TABLE template_identities"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 10))


def _undo_migration_8(conn: Connection) -> None:
    """The database as version 7 left it: no federated bundles, no federation counter."""
    _undo_migration_9(conn)
    conn.execute(text("DROP TABLE federated_bundles"))
    conn.execute(text("DELETE FROM meta WHERE name = 'federation_revision'"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 8))


def _undo_migration_11(conn: Connection) -> None:
    """The database as version 10 left it: no pending service accounts, no last use."""
    _undo_migration_12(conn)
    conn.execute(text("DROP TABLE pending_accounts"))
    conn.execute(text("DROP TABLE identity_usage"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 11))


def _undo_migration_19(conn: Connection) -> None:
    """The database as version 18 left it: agents' reports without a revocation revision."""
    conn.execute(text("ALTER TABLE agent_status DROP COLUMN revocation_revision"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 19))


def _undo_migration_18(conn: Connection) -> None:
    """The database as version 17 left it: the audit entries' one-column indexes."""
    _undo_migration_19(conn)
    for column in ("type", "time", "subject", "cluster"):
        conn.execute(text(f"DROP INDEX ix_audit_entries_{column}_idx"))
        conn.execute(text(f"CREATE INDEX ix_audit_entries_{column} ON audit_entries ({column})"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 18))


def _undo_migration_17(conn: Connection) -> None:
    """The database as version 16 left it: no console sessions."""
    _undo_migration_18(conn)
    conn.execute(text("DROP TABLE console_sessions"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 17))


def _undo_migration_16(conn: Connection) -> None:
    """The database as version 15 left it: no analytics state or anomalies."""
    _undo_migration_17(conn)
    for table in ("anomalies", "analytics_state"):
        conn.execute(text(f"DROP TABLE {table}"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 16))


def _undo_migration_15(conn: Connection) -> None:
    """The database as version 14 left it: revocations without their publish time."""
    _undo_migration_16(conn)
    conn.execute(text("ALTER TABLE revocations DROP COLUMN published_at"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 15))


def _undo_migration_14(conn: Connection) -> None:
    """The database as version 13 left it: no push delivery outbox."""
    _undo_migration_15(conn)
    conn.execute(text("DROP TABLE anomaly_deliveries"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 14))


def _undo_migration_13(conn: Connection) -> None:
    """The database as version 12 left it: no access requests."""
    _undo_migration_14(conn)
    conn.execute(text("DROP TABLE access_requests"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 13))


def _undo_migration_12(conn: Connection) -> None:
    """The database as version 11 left it: credentials without a person or a role."""
    _undo_migration_13(conn)
    inspector = inspect(conn)
    if inspector.has_table("credentials") and "person" in {
        c["name"] for c in inspector.get_columns("credentials")
    }:
        conn.execute(text("DROP INDEX uq_credentials_person"))
        conn.execute(text("ALTER TABLE credentials DROP COLUMN person"))
        conn.execute(text("ALTER TABLE credentials DROP COLUMN role"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 12))


def _undo_migration_9(conn: Connection) -> None:
    """The database as version 8 left it: no stored cluster key sets."""
    _undo_migration_10(conn)
    conn.execute(text("DROP TABLE cluster_keys"))
    conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 9))


def _undo_migration_7(conn: Connection) -> None:
    """The database as version 6 left it: no CA roots, no holders, no CA counter."""
    _undo_migration_8(conn)
    conn.execute(text("DROP TABLE ca_roots"))
    conn.execute(text("DROP TABLE root_holders"))
    conn.execute(text("DELETE FROM meta WHERE name = 'ca_revision'"))


def test_migration_7_adds_the_x509_ca_to_a_version_6_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 6 database gets the CA tables and counter; a control plane's CA then
    creates its active and prepared roots in it."""
    from trustmesh.identity.sealing import MasterKey
    from trustmesh.identity.x509ca import CaManager

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_7(conn)
            conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 7))
        assert current_version(db.engine) == 6
        assert migrate(db.engine) == LATEST
        assert {"ca_roots", "root_holders"} <= set(inspect(db.engine).get_table_names())
        with db.engine.connect() as conn:
            assert meta_store.revisions(conn)[meta_store.CA_REVISION] == 0
        ca = CaManager(db, MasterKey.load_or_create(tmp_path / "master.key"), "corp.example")
        ca.ensure_roots()
        assert sorted(r.state for r in ca.list_roots()) == ["active", "prepared"]
        assert ca.load().revision == 1
    finally:
        db.dispose()


def test_migration_8_adds_federated_bundles_to_a_version_7_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 7 database gets the federated bundles' table and counter, which the
    federation store then reads and writes."""
    from trustmesh.registry.federation import FederationStore

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_8(conn)
        assert current_version(db.engine) == 7
        assert migrate(db.engine) == LATEST
        assert "federated_bundles" in inspect(db.engine).get_table_names()
        store = FederationStore(db)
        assert store.load().revision == 0 and store.load().records == {}
        taken = store.claim("partner.example", "https://p.example/b", 100.0, 30.0)
        assert taken is not None and taken.bundle is None and taken.next_refresh_at == 130.0
        assert store.claim("partner.example", "https://p.example/b", 101.0, 30.0) is None
    finally:
        db.dispose()


def test_migration_10_adds_template_identities_to_a_version_9_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 9 database gets the table of template-derived identities, which the
    observation store then writes once per identity and lists."""
    from trustmesh.registry.observed import TemplateObservations

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_10(conn)
        assert current_version(db.engine) == 9
        assert migrate(db.engine) == LATEST
        store = TemplateObservations(db)
        store.record("teams", "east", "team-a", "api", "spiffe://corp.example/x", 10.0)
        # another replica (a fresh store) records the same identity: one row, the first
        TemplateObservations(db).record(
            "teams", "east", "team-a", "api", "spiffe://corp.example/x", 20.0
        )
        (seen,) = store.list()
        assert (seen.template, seen.namespace, seen.first_issued_at) == ("teams", "team-a", 10.0)
    finally:
        db.dispose()


def test_migration_15_keeps_when_revocations_are_published(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 14 database's revocations have no publish time: they are still served
    (published_at None, agents do not time them); one recorded after the upgrade has it."""
    from trustmesh.revocation.store import RevocationStore

    db = open_database(db_url, tmp_path)
    try:
        store = RevocationStore(db)
        with db.engine.begin() as conn:
            _undo_migration_15(conn)
            conn.execute(
                text(
                    "INSERT INTO revocations (revision, kind, value, revoked_at, expires_at, "
                    "reason, actor) VALUES (1, 'jti', 'old', 100, 4000000000, 'r', 'admin')"
                )
            )
        assert current_version(db.engine) == 14
        assert migrate(db.engine) == LATEST
        _, (old,) = store.since(0, now=200.0)
        assert (old.value, old.published_at) == ("old", None)
        with db.engine.begin() as conn:
            meta_store.put(conn, meta_store.REVOCATION_REVISION, "1")
        new, created = store.revoke("jti", "new", "r", "admin", now=300.25)
        assert created and new.published_at == 300.25
        _, found = store.since(1, now=301.0)
        assert [(e.value, e.published_at) for e in found] == [("new", 300.25)]
    finally:
        db.dispose()


def test_migration_12_adds_people_to_a_version_11_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 11 database (credentials without person and role) is upgraded in place:
    the bootstrap admin credential it holds keeps working, as ``user:bootstrap``, and a
    person can be added, once per name."""
    from trustmesh.common.errors import Conflict
    from trustmesh.server.credentials import ADMIN, PERSON, CredentialStore

    db = open_database(db_url, tmp_path)
    try:
        store = CredentialStore(db, lambda: 2.0)
        _, bootstrap = store.create(ADMIN, created_by="first start")
        with db.engine.begin() as conn:
            _undo_migration_12(conn)
        assert current_version(db.engine) == 11
        assert migrate(db.engine) == LATEST
        inspector = inspect(db.engine)
        assert {"person", "role"} <= {c["name"] for c in inspector.get_columns("credentials")}
        assert "uq_credentials_person" in {i["name"] for i in inspector.get_indexes("credentials")}
        principal = store.authenticate(bootstrap)
        assert principal is not None and principal.name == "user:bootstrap"
        assert principal.role == "admin"
        _, secret = store.create(PERSON, created_by="user:bootstrap", person="ann", role="auditor")
        person = store.authenticate(secret)
        assert person is not None and (person.name, person.role) == ("user:ann", "auditor")
        with pytest.raises(Conflict, match="exists already"):
            store.create(PERSON, created_by="user:bootstrap", person="ann", role="admin")
        assert migrate(db.engine) == LATEST  # and again: nothing to do
    finally:
        db.dispose()


def test_migration_13_adds_access_requests_to_a_version_12_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 12 database gets the access requests' table: a request is stored and
    read back, and its expiry is recorded once however many replicas try."""
    import json

    from trustmesh.storage.schema import access_requests

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_13(conn)
        assert current_version(db.engine) == 12
        assert "access_requests" not in inspect(db.engine).get_table_names()
        assert migrate(db.engine) == LATEST
        with db.engine.begin() as conn:
            conn.execute(
                access_requests.insert().values(
                    id="abc", requester="ann", role="reader", subject_kind="workload",
                    subject_value="web", clusters=json.dumps(["east"]), duration=60,
                    reason="incident 7", state="approved", created_at=1.0, expires_at=61.0,
                )
            )  # fmt: skip
        with db.engine.connect() as conn:
            row = conn.execute(select(access_requests)).one()
        assert (row.expired_recorded, json.loads(row.clusters)) == (0, ["east"])
        recorded = []
        for _ in range(2):  # two replicas finding it due: one conditional update wins
            with db.engine.begin() as conn:
                recorded.append(
                    conn.execute(
                        update(access_requests)
                        .where(access_requests.c.expired_recorded == 0)
                        .values(state="expired", expired_recorded=1)
                    ).rowcount
                )
        assert recorded == [1, 0]
        assert migrate(db.engine) == LATEST  # and again: nothing to do
    finally:
        db.dispose()


def test_migration_17_adds_console_sessions(db_url: str | None, tmp_path: Path) -> None:
    """A version 16 database gets the console's sessions table, empty, and a session id's
    hash is its key (one row per session)."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import IntegrityError

    from trustmesh.storage.schema import console_sessions

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_17(conn)
        assert current_version(db.engine) == 16
        assert migrate(db.engine) == LATEST
        row = dict(
            id_sha256="a" * 64, credential_id="c1", credential_sha256="b" * 64,
            person="alice", csrf="x", created_at=1.0, last_seen=1.0, expires_at=2.0,
        )  # fmt: skip
        with db.engine.begin() as conn:
            assert conn.execute(select(func.count()).select_from(console_sessions)).scalar() == 0
            conn.execute(console_sessions.insert().values(**row))
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            conn.execute(console_sessions.insert().values(**row))
        assert migrate(db.engine) == LATEST  # and again: nothing to do
    finally:
        db.dispose()


def test_migration_16_starts_the_analytics_runner_at_the_end_of_the_log(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 15 database with an audit log gets the analytics tables, and the runner's
    cursor at the log's last entry: an upgrade does not replay the whole log; a finding
    is stored once per (detector, key, window start)."""
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from trustmesh.storage.schema import analytics_state, anomalies, audit_entries

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_16(conn)
            for idx in range(3):
                conn.execute(
                    audit_entries.insert().values(
                        idx=idx, leaf="{}", leaf_hash=bytes(32), event_id=f"e{idx}",
                        type="policy.published", time="2026-12-01T00:00:00.000Z",
                        source="control-plane/x", sequenced_at=1.0,
                    )
                )  # fmt: skip
        assert current_version(db.engine) == 15
        assert migrate(db.engine) == LATEST
        with db.engine.connect() as conn:
            state = conn.execute(select(analytics_state)).one()
        assert (state.name, state.cursor, state.holder, state.snapshots) == (
            "runner",
            2,
            None,
            "{}",
        )
        row = dict(
            detector="escalation", key="escalation:policy:1", window_start=5.0, window_end=5.0,
            subject="{}", summary="s", evidence="[2]", details="{}", severity="high",
            detected_at=6.0, state="open",
        )  # fmt: skip
        with db.engine.begin() as conn:
            conn.execute(anomalies.insert().values(id="a1", **row))
        with pytest.raises(IntegrityError), db.engine.begin() as conn:
            conn.execute(anomalies.insert().values(id="a2", **row))
        assert migrate(db.engine) == LATEST  # and again: nothing to do
    finally:
        db.dispose()


def test_migration_6_upgrades_a_version_5_database(db_url: str | None, tmp_path: Path) -> None:
    """A database as version 5 left it (credentials without agent, expiry, last use or
    rotation; no suspensions; audit source keys of 128 characters) is upgraded in place,
    and a cluster credential issued before keeps working, as its own agent instance."""
    from sqlalchemy import Column, Float, MetaData, String, Table

    from trustmesh.server.credentials import CredentialStore

    db = open_database(db_url, tmp_path)
    old = MetaData()
    legacy = Table(
        "credentials",
        old,
        Column("id", String(32), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("cluster", String(253)),
        Column("secret_hash", String(64), nullable=False, unique=True),
        Column("created_at", Float, nullable=False),
        Column("created_by", String(200), nullable=False),
        Column("revoked_at", Float),
    )
    secret = "tmc_0123456789abcdef_legacy-secret"
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE credentials"))
        conn.execute(text("DROP TABLE suspensions"))
        conn.execute(text("ALTER TABLE policy_versions DROP COLUMN claimed_author"))
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_sources ALTER COLUMN source TYPE VARCHAR(128)"))
        conn.execute(delete(schema_migrations).where(schema_migrations.c.version >= 6))
        conn.execute(text("DELETE FROM meta WHERE name = 'suspension_revision'"))
        _undo_migration_7(conn)
        legacy.create(conn)
        conn.execute(
            legacy.insert().values(
                id="0123456789abcdef",
                kind="cluster",
                cluster="east",
                secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
                created_at=1.0,
                created_by="admin",
            )
        )
    assert current_version(db.engine) == 5
    try:
        assert migrate(db.engine) == LATEST
        inspector = inspect(db.engine)
        columns = {c["name"]: c for c in inspector.get_columns("credentials")}
        assert {"agent", "expires_at", "last_used_at", "previous_hash", "previous_until"} <= set(
            columns
        )
        assert "claimed_author" in {c["name"] for c in inspector.get_columns("policy_versions")}
        assert "ix_credentials_previous_hash" in {
            i["name"] for i in inspector.get_indexes("credentials")
        }
        assert "suspensions" in inspector.get_table_names()
        if db.dialect == "postgresql":
            source = next(
                c for c in inspector.get_columns("audit_sources") if c["name"] == "source"
            )
            assert source["type"].length == 512
        with db.engine.connect() as conn:
            assert meta_store.revisions(conn)[meta_store.SUSPENSION_REVISION] == 0
        principal = CredentialStore(db, lambda: 2.0).authenticate(secret)
        assert principal is not None
        assert (principal.cluster, principal.agent) == ("east", "0123456789abcdef")
        assert migrate(db.engine) == LATEST  # and again: nothing to do
    finally:
        db.dispose()


def test_sqlite_wal_checkpoints_are_left_to_their_owner_when_asked(tmp_path: Path) -> None:
    """The control plane opens SQLite with background WAL checkpoints: no commit copies
    the WAL into the database file; ``checkpoint_wal`` does, without the writer."""
    for background, autocheckpoint in ((False, 16384), (True, 0)):
        data_dir = tmp_path / f"background-{background}"
        data_dir.mkdir(mode=0o700)
        db = open_database(None, data_dir, background_wal_checkpoints=background)
        try:
            with db.engine.begin() as conn:
                assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == autocheckpoint
                for i in range(200):
                    meta_store.insert_if_absent(conn, f"test-{i}", "x" * 2000)
            busy, frames, copied = db.checkpoint_wal() or (None, None, None)
            assert busy == 0 and frames is not None and frames > 0 and copied == frames
            with db.engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT COUNT(*) FROM meta").scalar() >= 200
        finally:
            db.dispose()


def test_postgresql_has_no_wal_to_checkpoint(postgres_base_url: str, tmp_path: Path) -> None:
    db = open_database(
        new_postgres_database(postgres_base_url), tmp_path, background_wal_checkpoints=True
    )
    try:
        assert db.checkpoint_wal() is None
    finally:
        db.dispose()


def test_migration_11_adds_pending_accounts_and_identity_usage_to_a_version_10_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 10 database gets the two life-cycle tables, which the usage tracker then
    writes (an upsert on both engines) and reads."""
    from trustmesh.registry.index import build_registry
    from trustmesh.server.usage import Batch, UsageTracker

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_11(conn)
        assert current_version(db.engine) == 10
        assert migrate(db.engine) == LATEST
        tables = set(inspect(db.engine).get_table_names())
        assert {"pending_accounts", "identity_usage"} <= tables
        empty = build_registry("corp.example", 0, [])
        tracker = UsageTracker(db, lambda: 1000.0, lambda: empty, "corp.example")
        for at in (10.0, 20.0):
            tracker.refused("c1", "ns", "sa", at)
            tracker.credential("spiffe://corp.example/x", "x", "jwt-svid", at)
            tracker.write(tracker.take())
        tracker.credential("spiffe://corp.example/x", "x", "x509-svid", 15.0)  # older: kept
        tracker.write(tracker.take())
        (row,) = tracker.pending()
        assert (row.count, row.first_seen, row.last_seen) == (2, 10.0, 20.0)
        usage = tracker.usage(["spiffe://corp.example/x"])["spiffe://corp.example/x"]
        assert (usage.last_credential_at, usage.last_credential_kind) == (20.0, "jwt-svid")
        assert usage.last_decision_at is None
        assert len(Batch({}, {}, {})) == 0
    finally:
        db.dispose()


def test_migration_14_adds_the_push_outbox_to_a_version_13_database(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 13 database gets ``anomaly_deliveries``: a finding is queued once per
    EventReceiver that wants its detector, and a due row is claimed by one replica."""
    import json

    from trustmesh.server.push import RETENTION, claim_due, enqueue, prune
    from trustmesh.storage.schema import anomaly_deliveries, registry_objects

    def receiver(name: str, events: list[str] | None) -> dict[str, object]:
        spec: dict[str, object] = {"endpoint": f"https://{name}.example.com/e"}
        if events:
            spec["events"] = events
        body = {
            "apiVersion": "trustmesh.io/v1alpha1",
            "kind": "EventReceiver",
            "metadata": {"name": name},
            "spec": spec,
        }
        return {
            "kind": "EventReceiver", "name": name, "body": json.dumps(body), "generation": 1,
            "created_at": 1.0, "updated_at": 1.0, "updated_by": "admin",
        }  # fmt: skip

    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_14(conn)
        assert current_version(db.engine) == 13
        assert "anomaly_deliveries" not in inspect(db.engine).get_table_names()
        assert migrate(db.engine) == LATEST
        finding = {"detector": "escalation", "key": "escalation:web", "summary": "web"}
        with db.engine.begin() as conn:
            conn.execute(insert(registry_objects), [receiver("siem", None)])
            conn.execute(insert(registry_objects), [receiver("soar", ["new_edge"])])
            assert enqueue(conn, 7, finding, 100.0) == 1  # soar wants only new_edge
            assert enqueue(conn, 7, finding, 100.0) == 0  # queued once
        first = claim_due(db, "replica-a", 100.0, 10)
        assert [(r.receiver, r.finding_id, r.state) for r in first] == [("siem", "7", "pending")]
        assert json.loads(first[0].finding) == finding
        assert claim_due(db, "replica-b", 101.0, 10) == []  # held by replica-a
        assert [r.claimed_by for r in claim_due(db, "replica-b", 161.0, 10)] == ["replica-b"]
        with db.engine.begin() as conn:
            conn.execute(update(anomaly_deliveries).values(state="delivered", finished_at=200.0))
        assert prune(db, 200.0 + RETENTION) == 0  # kept 30 days as history
        assert prune(db, 201.0 + RETENTION) == 1
    finally:
        db.dispose()


def test_migration_18_indexes_the_audit_filters_with_the_entry_index(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 17 database's one-column audit indexes become (column, idx) indexes, and
    a filtered page in log order reads one index range (SQLite's plan: no sort)."""
    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_18(conn)
        names = {i["name"] for i in inspect(db.engine).get_indexes("audit_entries")}
        assert "ix_audit_entries_type" in names and "ix_audit_entries_type_idx" not in names
        assert migrate(db.engine) == LATEST
        indexes = {
            i["name"]: i["column_names"] for i in inspect(db.engine).get_indexes("audit_entries")
        }
        for column in ("type", "time", "subject", "cluster"):
            assert f"ix_audit_entries_{column}" not in indexes
            assert indexes[f"ix_audit_entries_{column}_idx"] == [column, "idx"]
        if db.dialect == "sqlite":
            with db.engine.connect() as conn:
                plan = " ".join(
                    str(row[3])
                    for row in conn.exec_driver_sql(
                        "EXPLAIN QUERY PLAN SELECT idx FROM audit_entries "
                        "WHERE type = 'authz.decision' AND idx < 100 ORDER BY idx DESC LIMIT 51"
                    )
                )
            assert "ix_audit_entries_type_idx" in plan and "TEMP B-TREE" not in plan
    finally:
        db.dispose()


def test_migration_19_leaves_the_revocation_revision_of_earlier_reports_unknown(
    db_url: str | None, tmp_path: Path
) -> None:
    """A version 18 database's agent reports hold no revocation revision: after the
    upgrade they read NULL (the overview's "unknown", never "in sync"), and a report
    can then record one."""
    db = open_database(db_url, tmp_path)
    try:
        with db.engine.begin() as conn:
            _undo_migration_19(conn)
            conn.execute(
                text(
                    "INSERT INTO agent_status (cluster, agent_id, policy_revision, "
                    "registry_revision, last_seen) VALUES ('east', 'a1', 3, 7, 100)"
                )
            )
        assert current_version(db.engine) == 18
        assert migrate(db.engine) == LATEST
        with db.engine.begin() as conn:
            row = conn.execute(
                select(agent_status.c.policy_revision, agent_status.c.revocation_revision)
            ).one()
            assert tuple(row) == (3, None)
            conn.execute(update(agent_status).values(revocation_revision=5))
            assert conn.execute(select(agent_status.c.revocation_revision)).scalar() == 5
    finally:
        db.dispose()
