"""Versioned schema migrations.

Each migration is a numbered function run once, in order, inside one transaction
together with its row in ``schema_migrations``. On PostgreSQL a transaction-scoped
advisory lock serialises replicas that start at the same moment; SQLite serialises
writers by itself. Append new migrations; never edit an applied one."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, Table, inspect, select, text, update

from trustmesh.storage import meta as meta_store
from trustmesh.storage import schema

Migration = tuple[int, str, Callable[[Connection], None]]

_MIGRATION_LOCK_ID = 0x7472_7573_746D  # "trustm"


def _v1_initial(conn: Connection) -> None:
    for table in (
        schema.meta,
        schema.signing_keys,
        schema.registry_objects,
        schema.credentials,
    ):
        table.create(conn, checkfirst=True)
    for counter in ("registry_revision", "keys_revision"):
        conn.execute(schema.meta.insert().values(name=counter, value="0"))


def _v2_policy(conn: Connection) -> None:
    schema.policy_versions.create(conn, checkfirst=True)
    schema.agent_status.create(conn, checkfirst=True)
    conn.execute(schema.meta.insert().values(name="policy_revision", value="0"))


def _v3_revocations(conn: Connection) -> None:
    schema.revocations.create(conn, checkfirst=True)
    conn.execute(schema.meta.insert().values(name="revocation_revision", value="0"))


def _v4_ssf_deliveries(conn: Connection) -> None:
    schema.ssf_deliveries.create(conn, checkfirst=True)


def _v5_audit(conn: Connection) -> None:
    for table in (
        schema.audit_entries,
        schema.audit_checkpoints,
        schema.audit_sources,
        schema.audit_gaps,
        schema.audit_outbox,
    ):
        table.create(conn, checkfirst=True)


def _add_missing_columns(conn: Connection, table: Table) -> None:
    """``ALTER TABLE … ADD COLUMN`` for each (nullable) column of ``table`` that the
    stored table lacks; a database created at this version already has them all."""
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    for column in table.columns:
        if column.name in present:
            continue
        assert column.nullable, f"{table.name}.{column.name} must be nullable to be added"
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _v6_credentials_and_suspensions(conn: Connection) -> None:
    _add_missing_columns(conn, schema.credentials)
    _add_missing_columns(conn, schema.policy_versions)
    indexes = {i["name"] for i in inspect(conn).get_indexes("credentials")}
    for index in schema.credentials.indexes:
        if index.name not in indexes:
            index.create(conn)
    # Cluster credentials issued before agents had ids: each is its own agent instance.
    conn.execute(
        update(schema.credentials)
        .where(schema.credentials.c.kind == "cluster", schema.credentials.c.agent.is_(None))
        .values(agent=schema.credentials.c.id)
    )
    schema.suspensions.create(conn, checkfirst=True)
    meta_store.insert_if_absent(conn, meta_store.SUSPENSION_REVISION, "0")
    if conn.dialect.name == "postgresql":  # SQLite does not bound VARCHAR
        length = schema.SOURCE_KEY_LENGTH
        for table in ("audit_entries", "audit_sources", "audit_gaps"):
            conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN source TYPE VARCHAR({length})"))
    _set_apart_unbound_sources(conn)


UNBOUND = "unbound:"  # audit/events.py UNBOUND: the storage layer imports no domain


def _set_apart_unbound_sources(conn: Connection) -> None:
    """From now on an agent's events are kept under ``CLUSTER/AGENT/SPOOL``, bound to its
    credential (``audit/events.py``, ``bind_source``). Before, the first sender of any
    source id owned it, and no agent's spool id has a ``/``: an agent source with one
    was chosen to squat a key of that form. Such sources are renamed ``unbound:…`` (as
    ``source_key`` derives them from their records), so none can block the agent the key
    belongs to. Longest first: a rename never meets a name still to be renamed."""
    entries = schema.audit_entries
    keys: set[str] = set(
        conn.execute(
            select(entries.c.source)
            .where(entries.c.seq.is_not(None), entries.c.source.like("%/%"))
            .distinct()
        ).scalars()
    )
    for table in (schema.audit_sources, schema.audit_gaps):
        keys.update(
            conn.execute(select(table.c.source).where(table.c.source.like("%/%"))).scalars()
        )
    for key in sorted(keys, key=len, reverse=True):
        conn.execute(
            update(entries)
            .where(entries.c.source == key, entries.c.seq.is_not(None))
            .values(source=UNBOUND + key)
        )
        for table in (schema.audit_sources, schema.audit_gaps):
            conn.execute(update(table).where(table.c.source == key).values(source=UNBOUND + key))


def _v7_x509_ca(conn: Connection) -> None:
    schema.ca_roots.create(conn, checkfirst=True)
    schema.root_holders.create(conn, checkfirst=True)
    meta_store.insert_if_absent(conn, meta_store.CA_REVISION, "0")


def _v8_federation(conn: Connection) -> None:
    schema.federated_bundles.create(conn, checkfirst=True)
    meta_store.insert_if_absent(conn, meta_store.FEDERATION_REVISION, "0")


def _v9_keys_cluster_keys(conn: Connection) -> None:
    schema.cluster_keys.create(conn, checkfirst=True)


def _v10_template_identities(conn: Connection) -> None:
    schema.template_identities.create(conn, checkfirst=True)


def _v11_onboarding_and_usage(conn: Connection) -> None:
    schema.pending_accounts.create(conn, checkfirst=True)
    schema.identity_usage.create(conn, checkfirst=True)


def _v12_people(conn: Connection) -> None:
    _add_missing_columns(conn, schema.credentials)
    indexes = {i["name"] for i in inspect(conn).get_indexes("credentials")}
    for index in schema.credentials.indexes:
        if index.name not in indexes:
            index.create(conn)


def _v13_access_requests(conn: Connection) -> None:
    schema.access_requests.create(conn, checkfirst=True)


def _v14_anomaly_deliveries(conn: Connection) -> None:
    schema.anomaly_deliveries.create(conn, checkfirst=True)


def _v15_revocation_publish_time(conn: Connection) -> None:
    _add_missing_columns(conn, schema.revocations)


def _v16_analytics(conn: Connection) -> None:
    """Security analytics: the runner's state and findings (their push deliveries are
    version 14's outbox). The runner starts at the log's end (an upgrade does not replay
    the whole log)."""
    for table in (schema.analytics_state, schema.anomalies):
        table.create(conn, checkfirst=True)
    state = schema.analytics_state
    if conn.execute(state.select().where(state.c.name == "runner")).first() is not None:
        return  # run again over tables a partial downgrade left: the runner keeps its place
    end = conn.execute(text("SELECT MAX(idx) FROM audit_entries")).scalar()
    conn.execute(
        schema.analytics_state.insert().values(
            name="runner",
            holder=None,
            lease_until=0.0,
            cursor=-1 if end is None else int(end),
            snapshots="{}",
            updated_at=time.time(),
        )
    )


def _v17_console_sessions(conn: Connection) -> None:
    schema.console_sessions.create(conn, checkfirst=True)


def _v18_audit_query_indexes(conn: Connection) -> None:
    """The audit log's filter columns indexed together with the entry's index, so that a
    filtered page in log order (the console's audit explorer, ``audit query``) reads one
    range of an index instead of sorting every match. A large log takes a few seconds per
    million entries to index, once."""
    present = {i["name"] for i in inspect(conn).get_indexes("audit_entries")}
    for column in schema.AUDIT_ENTRIES_V5_INDEXES:
        if f"ix_audit_entries_{column}" in present:
            conn.execute(text(f"DROP INDEX ix_audit_entries_{column}"))
    for index in schema.audit_entries.indexes:
        if index.name not in present:
            index.create(conn)


def _v19_agent_revocation_revision(conn: Connection) -> None:
    """Agents report the revocation revision they hold; rows from before say nothing
    (NULL: unknown, never "in sync")."""
    _add_missing_columns(conn, schema.agent_status)


MIGRATIONS: list[Migration] = [
    (1, "initial schema: meta, signing keys, registry, credentials", _v1_initial),
    (2, "policy versions and agent status", _v2_policy),
    (3, "revocations", _v3_revocations),
    (4, "shared signals (RFC 8936) delivery state", _v4_ssf_deliveries),
    (5, "audit log: entries, checkpoints, sources, gaps, outbox", _v5_audit),
    (
        6,
        "credential life cycle (agent, expiry, last use, rotation, revocation), suspensions, "
        "claimed authors, audit source keys of 512 characters",
        _v6_credentials_and_suspensions,
    ),
    (7, "X.509 CA roots and the roots each agent and sidecar holds", _v7_x509_ca),
    (8, "the SPIFFE bundles of federated trust domains", _v8_federation),
    (9, "keys: the last good key set of each cluster", _v9_keys_cluster_keys),
    (10, "identities WorkloadTemplates gave, as first issued", _v10_template_identities),
    (
        11,
        "life cycle: service accounts refused for want of a Workload, identities' last use",
        _v11_onboarding_and_usage,
    ),
    (12, "people: named credentials with a role", _v12_people),
    (
        13,
        "access requests: a role for a subject, for a while, decided by an approver",
        _v13_access_requests,
    ),
    (14, "push delivery of anomaly findings (RFC 8935): the outbox", _v14_anomaly_deliveries),
    (15, "metrics: when each revocation was recorded, unrounded", _v15_revocation_publish_time),
    (16, "security analytics: runner state and findings", _v16_analytics),
    (17, "console sessions: signed-in people's browsers", _v17_console_sessions),
    (18, "audit entries: filter columns indexed with the entry index", _v18_audit_query_indexes),
    (19, "agent status: the revocation revision each agent holds", _v19_agent_revocation_revision),
]

LATEST = MIGRATIONS[-1][0]


def migrate(engine: Engine, target: int | None = None) -> int:
    """Bring the schema to the latest version (or to ``target``, which a restore uses to
    load a backup of an older schema before migrating it); returns that version."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
        schema.schema_migrations.create(conn, checkfirst=True)
        applied = set(conn.execute(select(schema.schema_migrations.c.version)).scalars())
        newer = max(applied, default=0)
        if newer > LATEST:
            raise RuntimeError(
                f"database schema version {newer} is newer than this trustmesh ({LATEST}); "
                "upgrade trustmesh"
            )
        for version, description, apply in MIGRATIONS:
            if version in applied or (target is not None and version > target):
                continue
            apply(conn)
            conn.execute(
                schema.schema_migrations.insert().values(
                    version=version, description=description, applied_at=time.time()
                )
            )
    return LATEST if target is None else min(target, LATEST)


def current_version(engine: Engine) -> int:
    if not inspect(engine).has_table("schema_migrations"):
        return 0
    with engine.connect() as conn:
        versions = conn.execute(select(schema.schema_migrations.c.version)).scalars()
        return max(versions, default=0)
