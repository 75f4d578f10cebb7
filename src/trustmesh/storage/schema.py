"""The one schema, used unchanged on SQLite and PostgreSQL.

Times are float seconds since the epoch (UTC); JSON documents are stored as text so
both engines hold byte-identical values."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# Small named values: trust domain, revision counters, the master-key check value.
meta = Table(
    "meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Applied migrations (see migrations.py).
schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)

# JWT-SVID signing keys and their life cycle: prepared -> active -> retired -> removed.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("private_key", Text, nullable=False),  # AES-256-GCM sealed PKCS#8, see identity/keys.py
    Column("created_at", Float, nullable=False),
    Column("activated_at", Float),
    Column("retired_at", Float),
    Column("remove_after", Float),
    Column("removed_at", Float),
)

# Registry objects (Cluster, Workload): the canonical manifest body as JSON.
registry_objects = Table(
    "registry_objects",
    metadata,
    Column("kind", String(32), primary_key=True),
    Column("name", String(253), primary_key=True),
    Column("body", Text, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(200), nullable=False),
)

# Bearer credentials: the admin credential and per-cluster agent credentials.
# Only a SHA-256 of the secret is stored.
credentials = Table(
    "credentials",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),  # "admin" | "cluster"
    Column("cluster", String(253)),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("revoked_at", Float),
    UniqueConstraint("secret_hash", name="uq_credentials_secret_hash"),
)

# Policy versions: each is the complete set of policy documents at that revision.
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("content_hash", String(64), nullable=False),
    Column("author", String(200), nullable=False),
    Column("message", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("source", String(64), nullable=False),  # "apply" | "rollback:<rev>"
    Column("documents", Text, nullable=False),  # JSON list of manifest bodies
    Column("diff", Text, nullable=False),  # JSON list of {kind, name, action, before, after}
)

# What each agent last reported it enforces (for drift).
agent_status = Table(
    "agent_status",
    metadata,
    Column("cluster", String(253), primary_key=True),
    Column("agent_id", String(64), primary_key=True),
    Column("policy_revision", Integer, nullable=False),
    Column("registry_revision", Integer, nullable=False),
    Column("last_seen", Float, nullable=False),
)

# Revocations (DESIGN §5); rows past ``expires_at`` cover no valid token and are deleted.
revocations = Table(
    "revocations",
    metadata,
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("value", String(512), nullable=False),
    Column("revoked_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", String(200), nullable=False),
)

# OpenID Shared Signals poll delivery (RFC 8936): what each receiver (a credential id)
# did with the SET of each revocation revision. No row = still to be delivered;
# "acked" = acknowledged; "error" = reported in ``setErrs`` (not delivered again).
# Rows whose revocation has left ``revocations`` are deleted (server/ssf.py).
ssf_deliveries = Table(
    "ssf_deliveries",
    metadata,
    Column("receiver", String(32), primary_key=True),
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("state", String(16), nullable=False),  # "acked" | "error"
    Column("err", String(64)),
    Column("description", Text),
    Column("recorded_at", Float, nullable=False),
)
