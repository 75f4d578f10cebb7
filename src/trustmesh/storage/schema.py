"""The one schema, used unchanged on SQLite and PostgreSQL.

Times are float seconds since the epoch (UTC); JSON documents are stored as text so
both engines hold byte-identical values."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

# An audit source key: an agent's ``CLUSTER/AGENT/SPOOL`` (253 + 64 + 64 and two
# slashes) or ``control-plane/REPLICA``.
SOURCE_KEY_LENGTH = 512

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

# X.509 CA roots of the trust domain (DESIGN §9), with the life cycle of the signing
# keys: prepared -> active -> retired -> removed (identity/x509ca.py). ``id`` is the
# SHA-256 (hex) of the certificate's DER, the fingerprint holders report.
ca_roots = Table(
    "ca_roots",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("certificate", Text, nullable=False),  # PEM
    Column("private_key", Text, nullable=False),  # AES-256-GCM sealed PKCS#8, as signing_keys
    Column("not_after", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("activated_at", Float),
    Column("retired_at", Float),
    Column("remove_after", Float),
    Column("removed_at", Float),
)

# Which CA roots each agent and sidecar last said it holds (server/roots.py): the
# evidence a prepared root waits for before it becomes active. ``holder`` is an agent's
# id or a sidecar's pod uid; a row past ``forget_after`` no longer counts and is deleted.
root_holders = Table(
    "root_holders",
    metadata,
    Column("kind", String(16), primary_key=True),  # "agent" | "sidecar"
    Column("cluster", String(253), primary_key=True),
    Column("holder", String(128), primary_key=True),
    Column("roots", Text, nullable=False),  # JSON list of SHA-256 hex fingerprints
    Column("subject", String(512)),  # a sidecar's SPIFFE ID
    Column("reported_at", Float, nullable=False),
    Column("forget_after", Float, nullable=False),
)

# The SPIFFE bundle of each federated trust domain (DESIGN §9, registry/federation.py):
# the last good one as fetched from its bundle endpoint (canonical JSON of the keys we
# can use), when it was last fetched and changed, and the poll schedule. A replica
# takes a poll by moving ``next_refresh_at`` (compare-and-set), so replicas poll once.
federated_bundles = Table(
    "federated_bundles",
    metadata,
    Column("trust_domain", String(255), primary_key=True),
    Column("endpoint", Text, nullable=False),  # the URL the schedule is for
    Column("bundle", Text),  # null before the first good fetch, and once dropped
    Column("sequence", BigInteger),  # spiffe_sequence of the bundle (when it has one)
    Column("refresh_hint", Float),  # spiffe_refresh_hint of the bundle (when it has one)
    Column("fetched_at", Float),  # the last good fetch (the bundle answered and parsed)
    Column("changed_at", Float),  # the last fetch that changed the bundle
    Column("attempted_at", Float),
    Column("error", Text),  # why the last attempt failed; null after a success
    Column("failures", Integer, nullable=False),  # attempts failed in a row
    Column("next_refresh_at", Float, nullable=False),
    Column("dropped_at", Float),  # the bundle was older than maxStale and dropped
)

# The last good key set of each registered cluster (DESIGN §10), as fetched from one of
# its key sources, so a replica that starts while every source is down still verifies
# the cluster's tokens, for at most --cluster-keys-max-age after ``fetched_at``.
# ``source`` is a digest of the Cluster's key-source fields: a set fetched for other
# fields is not used. ``expired_at``: when a replica found the set too old with no
# source answering and recorded ``cluster.keys_expired`` (once per set).
cluster_keys = Table(
    "cluster_keys",
    metadata,
    Column("cluster", String(253), primary_key=True),
    Column("source", String(64), nullable=False),
    Column("jwks", Text, nullable=False),  # the JWKS as fetched, JSON
    Column("fetched_at", Float, nullable=False),
    Column("fetched_from", Text, nullable=False),  # the URL that answered it
    Column("expired_at", Float),
)

# Registry objects (Cluster, Workload, FederatedTrustDomain): the canonical manifest
# body as JSON.
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

# The identities WorkloadTemplates gave (DESIGN §11): one row per (template, cluster,
# namespace, service account), written when the identity is first issued a credential.
template_identities = Table(
    "template_identities",
    metadata,
    Column("template", String(253), primary_key=True),
    Column("cluster", String(63), primary_key=True),
    Column("namespace", String(63), primary_key=True),
    Column("service_account", String(253), primary_key=True),
    Column("spiffe_id", Text, nullable=False),
    Column("first_issued_at", Float, nullable=False),
)

# Bearer credentials: the admin credential and one credential per agent instance of a
# cluster (server/credentials.py). Only SHA-256 hashes of secrets are stored. A rotation
# keeps the row (its id, cluster and agent: the credential's identity) and moves the
# replaced secret's hash to ``previous_hash``, accepted until ``previous_until``.
credentials = Table(
    "credentials",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),  # "admin" (bootstrap) | "cluster" | "person"
    Column("cluster", String(253)),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("revoked_at", Float),
    Column("agent", String(64)),  # the agent instance a cluster credential is for
    Column("expires_at", Float),
    Column("last_used_at", Float),  # written at most once a minute per credential
    Column("rotated_at", Float),
    Column("previous_hash", String(64)),
    Column("previous_until", Float),
    Column("revoked_by", String(200)),
    Column("revoke_reason", Text),
    Column("person", String(64)),  # a person's credential: the person's name
    Column("role", String(16)),  # and role: "admin" | "approver" | "auditor"
    UniqueConstraint("secret_hash", name="uq_credentials_secret_hash"),
    Index("ix_credentials_previous_hash", "previous_hash"),
    # one unrevoked credential per person name (two concurrent `user add` cannot both win)
    Index(
        "uq_credentials_person",
        "person",
        unique=True,
        sqlite_where=text("revoked_at IS NULL"),
        postgresql_where=text("revoked_at IS NULL"),
    ),
)

# Suspensions (DESIGN §5): while a row exists, no credential of any kind is issued for
# the workload, SPIFFE ID or cluster it names. Counted by ``suspension_revision``.
suspensions = Table(
    "suspensions",
    metadata,
    Column("kind", String(16), primary_key=True),  # "workload" | "subject" | "cluster"
    Column("value", String(512), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

# Onboarding from refusals (DESIGN §11): service accounts whose verified SA token was
# refused with ``unauthorized_client`` (no Workload selects them), counted by replicas'
# coalesced flushes (server/usage.py). Bounded per cluster and in total; a row leaves
# when a Workload admits its service account or when it has not been seen for a while.
pending_accounts = Table(
    "pending_accounts",
    metadata,
    Column("cluster", String(253), primary_key=True),
    Column("namespace", String(63), primary_key=True),
    Column("service_account", String(253), primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

# When each identity last received a credential (exchange or X.509-SVID) and was last
# seen in an agent's decision (DESIGN §11), keyed by SPIFFE ID; ``workload`` names the
# Workload it was issued for, when there is one. Written in coalesced batches.
identity_usage = Table(
    "identity_usage",
    metadata,
    Column("spiffe_id", String(2048), primary_key=True),
    Column("workload", String(253)),
    Column("last_credential_at", Float),
    Column("last_credential_kind", String(16)),  # "jwt-svid" | "x509-svid"
    Column("last_decision_at", Float),
    Column("last_decision_cluster", String(253)),
    Index("ix_identity_usage_workload", "workload"),
)

# Access requests (DESIGN §11, ``server/access.py``): a person asks for a role for a
# subject, for a while; an approver's approval publishes RoleBinding ``access-ID``
# (expiring at ``expires_at``). ``expired_recorded`` is set by the one replica whose
# conditional update recorded ``access.expired``.
access_requests = Table(
    "access_requests",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("requester", String(64), nullable=False),  # a person's name
    Column("role", String(253), nullable=False),
    Column("subject_kind", String(16), nullable=False),  # "workload" | "spiffeId" | "user"
    Column("subject_value", String(2048), nullable=False),
    Column("clusters", Text, nullable=False),  # JSON list of cluster names
    Column("namespaces", Text),  # JSON list, or NULL: every namespace
    Column("duration", Integer, nullable=False),  # seconds, from the approval
    Column("reason", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending|approved|denied|expired
    Column("created_at", Float, nullable=False),
    Column("decided_by", String(64)),
    Column("decided_at", Float),
    Column("decision_reason", Text),
    Column("expires_at", Float),
    Column("policy_revision", Integer),  # the version the approval published
    Column("expired_recorded", Integer, nullable=False, server_default=text("0")),
    Index("ix_access_requests_state", "state", "expires_at"),
    Index("ix_access_requests_requester", "requester", "state"),
)

# Policy versions: each is the complete set of policy documents at that revision.
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("revision", Integer, primary_key=True, autoincrement=False),
    Column("content_hash", String(64), nullable=False),
    Column("author", String(200), nullable=False),  # the authenticated principal
    Column("message", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("source", String(64), nullable=False),  # "apply" | "rollback:<rev>"
    Column("documents", Text, nullable=False),  # JSON list of manifest bodies
    Column("diff", Text, nullable=False),  # JSON list of {kind, name, action, before, after}
    Column("claimed_author", String(200)),  # the author the caller named, if any
)

# What each agent last reported it enforces (for drift): the (policy, registry) revision
# of its bundle poll, and the revocation revision it holds (its revocation poll's
# ``held``; NULL for an agent that never said, migration 19).
agent_status = Table(
    "agent_status",
    metadata,
    Column("cluster", String(253), primary_key=True),
    Column("agent_id", String(64), primary_key=True),
    Column("policy_revision", Integer, nullable=False),
    Column("registry_revision", Integer, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("revocation_revision", Integer),
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
    Column("published_at", Float),  # when recorded, unrounded (migration 14; agents' lag)
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

# The audit log (DESIGN §6, server/audit.py). ``leaf`` is the exact canonical JSON that
# was hashed (UTF-8 text); ``leaf_hash`` its RFC 6962 leaf hash, kept so a replica
# rebuilds its tree without re-hashing. The other columns copy fields of the event for
# queries; the leaf is the record, they are never trusted by verification.
audit_entries = Table(
    "audit_entries",
    metadata,
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("leaf", Text, nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("type", String(64), nullable=False),
    Column("time", String(24), nullable=False),
    Column("cluster", String(253)),
    Column("subject", String(512)),
    Column("trace_id", String(32)),
    Column("decision", String(8)),
    Column("source", String(SOURCE_KEY_LENGTH), nullable=False),
    Column("seq", BigInteger),
    Column("sequenced_at", Float, nullable=False),
    UniqueConstraint("source", "seq", name="uq_audit_entries_source_seq"),
    UniqueConstraint("event_id", name="uq_audit_entries_event_id"),
    # Each filter column with the index after it (migration 18): a filtered page in log
    # order is one range of the index, read in order and cut at the page's end, and a
    # time range is sorted by index from the index alone (``AuditLog.query``).
    Index("ix_audit_entries_type_idx", "type", "idx"),
    Index("ix_audit_entries_time_idx", "time", "idx"),
    Index("ix_audit_entries_subject_idx", "subject", "idx"),
    Index("ix_audit_entries_trace_id", "trace_id"),
    Index("ix_audit_entries_cluster_idx", "cluster", "idx"),
)

AUDIT_ENTRIES_V5_INDEXES = ("type", "time", "subject", "cluster")
"""The columns that had a one-column index ``ix_audit_entries_<column>`` before version 18."""

# Signed checkpoints (C2SP tlog-checkpoint as a signed note), one per tree size signed.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("note", Text, nullable=False),
    Column("signed_at", Float, nullable=False),
)

# Per-source sequence state: the next sequence number expected from each agent spool.
audit_sources = Table(
    "audit_sources",
    metadata,
    Column("source", String(SOURCE_KEY_LENGTH), primary_key=True),
    Column("cluster", String(253), nullable=False),
    Column("agent", String(64), nullable=False),
    Column("next_seq", BigInteger, nullable=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

# Control-plane events written in the transaction of the change they record (an apply, a
# revocation, a rotation...), moved into the log right after by the sequencer.
audit_outbox = Table(
    "audit_outbox",
    metadata,
    Column("event_id", String(36), primary_key=True),
    Column("leaf", Text, nullable=False),
    Column("staged_at", Float, nullable=False),
)

# Sequence numbers an agent skipped: [first_seq, last_seq] never arrived before later ones.
audit_gaps = Table(
    "audit_gaps",
    metadata,
    Column("source", String(SOURCE_KEY_LENGTH), primary_key=True),
    Column("first_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("detected_at", Float, nullable=False),
)

# Security analytics (DESIGN §11, server/analytics.py). One row, ``name`` "runner": the
# replica holding the runner's lease (``holder``, until ``lease_until``), the last audit
# index the detectors read (``cursor``) and their state (``snapshots``: JSON, per
# detector), all written in the transaction that records what they found.
analytics_state = Table(
    "analytics_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64)),
    Column("lease_until", Float, nullable=False),
    Column("cursor", BigInteger, nullable=False),
    Column("snapshots", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Findings (``trustmesh get anomalies``): one per (detector, key, window start), so a
# replay or a second runner never reports one twice. JSON columns as text.
anomalies = Table(
    "anomalies",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("detector", String(32), nullable=False),
    Column("key", String(500), nullable=False),
    Column("window_start", Float, nullable=False),
    Column("window_end", Float, nullable=False),
    Column("subject", Text, nullable=False),
    Column("summary", Text, nullable=False),
    Column("evidence", Text, nullable=False),
    Column("details", Text, nullable=False),
    Column("severity", String(8), nullable=False),
    Column("detected_at", Float, nullable=False),
    Column("state", String(16), nullable=False),  # open | acknowledged | resolved
    Column("acknowledged_by", String(200)),
    Column("acknowledged_at", Float),
    Column("resolved_by", String(200)),
    Column("resolved_at", Float),
    Column("note", Text),
    Column("quarantined", Text),  # JSON: the suspension it began, or why it could not
    UniqueConstraint("detector", "key", "window_start", name="uq_anomalies_detector_key_window"),
    Index("ix_anomalies_state", "state"),
    Index("ix_anomalies_detected_at", "detected_at"),
)

# Push delivery of anomaly findings as signed SETs (RFC 8935, ``server/push.py``): the
# outbox, one row per (finding, EventReceiver). ``finding`` is the Finding JSON as it
# was enqueued (the SET is built from it and signed at each attempt). ``state`` is
# pending|delivered|failed; a pending row is due at ``next_attempt_at`` and is
# delivered by the one replica whose conditional update set ``claimed_by`` until
# ``claimed_until``.
anomaly_deliveries = Table(
    "anomaly_deliveries",
    metadata,
    # random, not a sequence: a restored backup (server/backup.py) copies rows as they
    # are, and a PostgreSQL sequence would not follow
    Column("id", String(32), primary_key=True),
    Column("finding_id", String(64), nullable=False),
    Column("receiver", String(253), nullable=False),  # the EventReceiver's name
    Column("jti", String(64), nullable=False),  # the SET's jti, stable across attempts
    Column("detector", String(32), nullable=False),
    Column("finding", Text, nullable=False),  # the Finding JSON
    Column("state", String(16), nullable=False),  # pending|delivered|failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("claimed_by", String(64)),
    Column("claimed_until", Float),
    Column("last_attempt_at", Float),
    Column("last_status", Integer),  # the receiver's last HTTP status, if it answered
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),  # delivered or failed for good
    UniqueConstraint("finding_id", "receiver", name="uq_anomaly_deliveries_finding_receiver"),
    UniqueConstraint("jti", name="uq_anomaly_deliveries_jti"),
    Index("ix_anomaly_deliveries_due", "state", "next_attempt_at"),
    Index("ix_anomaly_deliveries_receiver", "receiver", "state"),
)

# Console sessions (DESIGN §12, ``server/sessions.py``): a signed-in person's browser
# holds a random session id in an HttpOnly cookie; only its SHA-256 is stored. A session
# is bound to the person's credential as it was at sign-in (``credential_sha256``, the
# credential's ``secret_hash`` then): a rotation, revocation, expiry or removal ends it.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("credential_id", String(32), nullable=False),
    Column("credential_sha256", String(64), nullable=False),
    Column("person", String(64), nullable=False),
    Column("csrf", String(64), nullable=False),  # sent back in X-CSRF-Token on changes
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),  # written at most every SEEN_RESOLUTION
    Column("expires_at", Float, nullable=False),  # the absolute end (created_at + 8 h)
    Index("ix_console_sessions_credential", "credential_id"),
    Index("ix_console_sessions_expires_at", "expires_at"),
)
