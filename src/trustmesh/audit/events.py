"""The one audit event schema (DESIGN §6): building events and checking them.

An event is a JSON object; the log hashes its canonical bytes
(:func:`trustmesh.audit.canonical.canonical_bytes`). Members, absent when they do
not apply (never ``null``):

``event_id``   a UUIDv7 (time-ordered, RFC 9562), unique across the log
``type``       one of :data:`EVENT_TYPES` (``admin.*`` for administrative actions)
``time``       RFC 3339 UTC with milliseconds (``2026-11-29T05:20:00.123Z``)
``source``     who wrote it: ``{"kind": "control-plane", "id": REPLICA}`` or
               ``{"kind": "agent", "id": SPOOL_ID, "agent": AGENT_ID, "seq": N}``;
               agents number their events 1, 2, 3… per spool, and the control plane
               deduplicates by (``id``, ``seq``) and reports gaps. An agent sends its
               spool's id; the control plane keeps the event under the source the
               sending credential owns (:func:`bind_source`): ``id`` becomes
               ``CLUSTER/AGENT/SPOOL_ID``, ``agent`` the credential's agent and
               ``spool`` the id the agent sent, so no credential can write into, or
               collide with, another agent's source
``cluster``    the cluster where it happened (the agent's; the token's origin cluster
               for exchanges)
``actor``      who acted: a SPIFFE ID, ``user:NAME`` (a person), ``cluster:NAME``,
               ``admin:NAME`` (the server's own operations) or ``system``
``identity``   provenance of the credential: ``spiffe_id``, ``workload``,
               ``origin_cluster``, ``sa_issuer``, ``sa_subject``, ``jti``, ``kid``,
               ``token_sha256`` (SHA-256 hex of the presented token: never the token),
               ``template`` (the WorkloadTemplate that gave the identity, if one did);
               for a client certificate forwarded by Envoy (XFCC), ``credential:
               "x509-svid"``, ``x509_serial`` (hex) and ``x509_sha256`` (of its DER:
               never the certificate); no ``credential``: a bearer JWT-SVID
``request``    what was asked: ``surface`` plus the action/resource attributes
``decision``   ``allowed``, ``reason``, ``policy_revision``, ``bindings``, ``roles``,
               ``decision_id``
``trace_id``   W3C trace id (32 hex), ``span_id`` (16 hex)
``detail``     type-specific facts (policy revision and diff summary, revocation kind
               and value, new kid, error code…)

Nothing here touches a database or the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from trustmesh.audit.canonical import canonical_bytes, parse_time
from trustmesh.common.errors import CanonicalError, EventError

TOKEN_ISSUED = "token.issued"  # noqa: S105 (an event type, not a secret)
TOKEN_EXCHANGE_FAILED = "token.exchange_failed"  # noqa: S105
SVID_ISSUED = "svid.issued"
"""An X.509-SVID signed (DESIGN §9): serial, SPIFFE ID, validity, the root that signed
it, workload and origin cluster; never a private key or the SA token (its SHA-256
only). A refused X.509-SVID request is a ``token.exchange_failed`` with ``request.surface``
``x509-svid``: one kind of refusal, folded under one quota whichever endpoint was asked."""
AUTHZ_DECISION = "authz.decision"
ADMISSION_REVIEWED = "admission.reviewed"
"""A Kubernetes AdmissionReview answered by an agent (DESIGN §9): the review's uid,
namespace, kind, operation and pod name, the service account, whether it was allowed
and patched and why; never the pod spec (its env values may hold secrets)."""
POLICY_PUBLISHED = "policy.published"
POLICY_REJECTED = "policy.rejected"
REVOCATION_CREATED = "revocation.created"
KEY_ROTATED = "key.rotated"
FEDERATION_BUNDLE_UPDATED = "federation.bundle_updated"
"""A federated trust domain's bundle changed (DESIGN §9): trust domain, endpoint, the new
and previous ``spiffe_sequence``, the counts of JWT-SVID keys and X.509 roots."""
FEDERATION_BUNDLE_DROPPED = "federation.bundle_dropped"
"""A federated trust domain's last good bundle passed its ``maxStale`` and was dropped:
its identities are refused from then on."""
CLUSTER_KEYS_EXPIRED = "cluster.keys_expired"
"""No key source of a cluster answers and its last good key set passed
``--cluster-keys-max-age`` (DESIGN §10): its tokens are refused until a source answers.
Written once per key set, by the replica that found it first."""
WORKLOAD_RETIRED = "workload.retired"
"""A Workload with ``spec.retireAfterUnused`` went unused that long (DESIGN §11): no
credential and no decision. It gets no credential from then on and what it was issued is
revoked, until an apply of its manifest restores it (``workload.restored``)."""
WORKLOAD_RESTORED = "workload.restored"
ACCESS_REQUESTED = "access.requested"
"""A person asked for a role for a subject, on some clusters, for a while (DESIGN §11,
``server/access.py``): id, role, subject, clusters, namespaces, duration, reason."""
ACCESS_APPROVED = "access.approved"
"""An approver approved an access request: RoleBinding ``access-ID`` was published in
the same transaction (``policy_revision``), in force until ``expires_at``."""
ACCESS_DENIED = "access.denied"
ACCESS_EXPIRED = "access.expired"
"""An approved access request passed its ``expires_at`` (agents stopped matching its
binding then, by themselves); written once, by the replica that found it first."""
ANOMALY_DETECTED = "anomaly.detected"
"""A detector found an anomaly (DESIGN §11, ``server/analytics.py``), actor ``system``:
the finding's ``id``, ``detector``, ``key``, ``subject``, ``summary``, ``evidence`` (the
audit indexes it rests on), ``severity``, ``window``, ``details`` and, for a detector that
quarantines, the suspension it began (``quarantined``)."""
AUDIT_GAP = "audit.gap_detected"
REFUSALS_FOLDED = "audit.refusals_folded"
ORIGIN_STARTED = "audit.origin_started"
USER_LOGIN = "user.login"
"""A person's login token for a cluster was issued (``POST /v1/login``): the cluster,
the token's ``jti`` and expiry in ``detail``, never the token; the person is the actor."""
"""A restore that accepted loss started a new log origin (DESIGN §10, ``trustmesh restore
--accept-loss``): the first entry signed by the new log key names the old origin and
its verifier key, the old origin's last checkpoint the restored entries are consistent
with, the published checkpoint they fall short of, and the entries lost between."""

CONSOLE_SIGNED_IN = "admin.console_signed_in"
"""A person signed in to the web console (DESIGN §12, ``server/sessions.py``); actor the
person: ``session`` (16 hex digits of the session id's SHA-256, what the database keys
the session by; never the id, the cookie or the credential), ``role``,
``credential_id``, ``expires_at`` (the session's absolute end)."""
CONSOLE_SIGNED_OUT = "admin.console_signed_out"
"""A person signed out of the web console: ``session``, ``credential_id``,
``signed_in_at``. A session that ends by itself (idle, absolute end, credential
revoked) writes nothing."""
CONSOLE_SIGNIN_REFUSED = "admin.console_signin_refused"
"""A live credential that may not open a console session (the bootstrap ``admin.token``,
a cluster's credential, a secret a rotation replaced); actor that principal: ``reason``
(``not_a_person``, ``secret_replaced``), ``kind``, ``credential_id``. A credential that is
not valid at all is a ``token.exchange_failed`` (``request.surface: console``), folded
like refused exchanges."""
ADMIN_TYPES = frozenset({CONSOLE_SIGNED_IN, CONSOLE_SIGNED_OUT, CONSOLE_SIGNIN_REFUSED})
"""The ``admin.*`` types named here (``admin.*`` is open: any ``admin.<verb>`` is valid)."""

EVENT_TYPES = frozenset(
    {
        TOKEN_ISSUED,
        TOKEN_EXCHANGE_FAILED,
        SVID_ISSUED,
        AUTHZ_DECISION,
        ADMISSION_REVIEWED,
        POLICY_PUBLISHED,
        POLICY_REJECTED,
        REVOCATION_CREATED,
        KEY_ROTATED,
        FEDERATION_BUNDLE_UPDATED,
        FEDERATION_BUNDLE_DROPPED,
        CLUSTER_KEYS_EXPIRED,
        WORKLOAD_RETIRED,
        WORKLOAD_RESTORED,
        ACCESS_REQUESTED,
        ACCESS_APPROVED,
        ACCESS_DENIED,
        ACCESS_EXPIRED,
        ANOMALY_DETECTED,
        AUDIT_GAP,
        REFUSALS_FOLDED,
        ORIGIN_STARTED,
        USER_LOGIN,
    }
)
ADMIN_PREFIX = "admin."
AGENT_TYPES = frozenset({AUTHZ_DECISION, ADMISSION_REVIEWED, REFUSALS_FOLDED})
"""What an agent may write; everything else comes from the control plane itself."""
FOLDED_BY = {"control-plane": TOKEN_EXCHANGE_FAILED, "agent": AUTHZ_DECISION}
"""What a writer's ``audit.refusals_folded`` summaries stand for: the control plane folds
refused exchanges, an agent refusals of unauthenticated questions."""
MAX_SAMPLES = 8

MAX_EVENT_BYTES = 16 * 1024
TOP_LEVEL = frozenset(
    {
        "event_id",
        "type",
        "time",
        "source",
        "cluster",
        "actor",
        "identity",
        "request",
        "decision",
        "trace_id",
        "span_id",
        "detail",
    }
)
IDENTITY_FIELDS = frozenset(
    {
        "spiffe_id",
        "workload",
        "origin_cluster",
        "sa_issuer",
        "sa_subject",
        "jti",
        "kid",
        "token_sha256",
        "credential",
        "x509_serial",
        "x509_sha256",
        "template",
    }
)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ADMIN_TYPE = re.compile(r"admin\.[a-z][a-z0-9_.]{0,62}")
AGENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""An agent instance's id, as a cluster credential names it (no ``/``)."""
SPOOL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""The id an agent's spool gives its events (no ``/``)."""
MAX_SOURCE_ID = 512


def token_sha256(token: str) -> str:
    """What an event may hold of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


_second_prefix: tuple[int, str] = (-1, "")


def now_time(moment: float | None = None) -> str:
    """Epoch seconds (default: now) as the event time format, milliseconds truncated.
    The date and time of day are formatted once per second, not once per event."""
    global _second_prefix
    seconds = time.time() if moment is None else moment
    whole = int(seconds // 1)
    cached = _second_prefix
    if cached[0] != whole:
        stamp = datetime.fromtimestamp(whole, UTC)
        cached = _second_prefix = (whole, stamp.strftime("%Y-%m-%dT%H:%M:%S."))
    millis = min(999, int((seconds - whole) * 1000))
    return f"{cached[1]}{millis:03d}Z"


_id_lock = threading.Lock()
_random_pool = b""
_random_at = 0


def new_event_id(now: float | None = None) -> str:
    """A UUIDv7 (RFC 9562 §5.7): 48 bits of Unix milliseconds, then 74 random bits.
    Ids that grow with time keep the log's unique index on them appending at its end
    instead of touching pages all over it (SQLite appends ~35 % faster at 120k entries
    than with random UUIDv4s). The random bits come from ``os.urandom`` 4 KiB at a time:
    under load one ``getrandom`` call per event costs more than formatting the event."""
    global _random_pool, _random_at
    millis = int((time.time() if now is None else now) * 1000) & 0xFFFF_FFFF_FFFF
    with _id_lock:
        if _random_at + 10 > len(_random_pool):
            _random_pool, _random_at = os.urandom(4096), 0
        bits = int.from_bytes(_random_pool[_random_at : _random_at + 10], "big")
        _random_at += 10
    value = (
        millis << 80
        | 0x7 << 76  # version 7
        | ((bits >> 62) & 0xFFF) << 64  # rand_a
        | 0b10 << 62  # variant
        | (bits & ((1 << 62) - 1))  # rand_b
    )
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def new_event(
    type_: str,
    *,
    source: Mapping[str, Any],
    cluster: str | None = None,
    actor: str | None = None,
    identity: Mapping[str, Any] | None = None,
    request: Mapping[str, Any] | None = None,
    decision: Mapping[str, Any] | None = None,
    trace_id: str | None = None,
    span_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
    at: float | None = None,
) -> dict[str, Any]:
    """A new event with a fresh id and the current time; ``None`` members are left out
    (also inside ``identity``, ``request``, ``decision`` and ``detail``)."""
    event: dict[str, Any] = {
        "event_id": new_event_id(at),
        "type": type_,
        "time": now_time(at),
        "source": dict(source),
    }
    for name, value in (("cluster", cluster), ("actor", actor)):
        if value is not None:
            event[name] = value
    for name, part in (
        ("identity", identity),
        ("request", request),
        ("decision", decision),
        ("detail", detail),
    ):
        if part:
            cleaned = {k: v for k, v in part.items() if v is not None}
            if cleaned:
                event[name] = cleaned
    if trace_id is not None:
        event["trace_id"] = trace_id
    if span_id is not None:
        event["span_id"] = span_id
    return event


def _need_str(event: Mapping[str, Any], name: str, where: str, limit: int = 512) -> str:
    value = event.get(name)
    if not isinstance(value, str) or not value:
        raise EventError(f"{where}.{name} must be a non-empty string")
    if len(value) > limit:
        raise EventError(f"{where}.{name} is longer than {limit} characters")
    return value


def _count(value: Any, where: str, least: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= 2**53 - 1:
        raise EventError(f"{where} must be an integer of at least {least}")
    return value


def _check_tally(tally: dict[str, Any], count: int, where: str) -> None:
    """The facts of a run of folded refusals: first and last time, and per facet the
    counts by value, plus ``others`` (values not listed) and ``absent`` (refusals
    without that fact), which add up to ``count`` exactly."""
    try:
        first = parse_time(_need_str(tally, "first", where, 24))
        last = parse_time(_need_str(tally, "last", where, 24))
    except CanonicalError as exc:
        raise EventError(f"{where}: {exc}") from None
    if last < first:
        raise EventError(f"{where}.last is before {where}.first")
    facets = tally.get("by")
    if not isinstance(facets, dict) or not facets:
        raise EventError(f"{where}.by must be an object of facets")
    for facet, counts in facets.items():
        at = f"{where}.by.{facet}"
        if not isinstance(counts, dict) or set(counts) - {"values", "others", "absent"}:
            raise EventError(f"{at} must be an object of values, others and absent")
        values = counts.get("values", {})
        if not isinstance(values, dict):
            raise EventError(f"{at}.values must be an object")
        total = sum(_count(n, f"{at}.values[{v!r}]", 1) for v, n in values.items())
        total += _count(counts.get("others", 0), f"{at}.others")
        total += _count(counts.get("absent", 0), f"{at}.absent")
        if total != count:
            raise EventError(f"{at} counts {total} refusals, not {count}")
    samples = tally.get("sample_token_sha256", [])
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES:
        raise EventError(f"{where}.sample_token_sha256 must be a list of at most {MAX_SAMPLES}")
    for sample in samples:
        if not (isinstance(sample, str) and _SHA256.fullmatch(sample)):
            raise EventError(f"{where}.sample_token_sha256 holds SHA-256 hex digests only")


def _check_refusals_folded(event: dict[str, Any]) -> None:
    """``audit.refusals_folded``: how many refusals a summary stands for, exactly. The
    control plane folds refused exchanges, an agent refusals of unauthenticated
    questions; ``folded`` were over the writer's quota, ``dropped`` could not be
    written when they were due (an earlier summary, or an individual refusal, that
    failed) and are counted here instead."""
    detail = event.get("detail")
    if not isinstance(detail, dict):
        raise EventError("event.detail of audit.refusals_folded must be an object")
    expected = FOLDED_BY[event["source"]["kind"]]
    if detail.get("folded_type") != expected:
        raise EventError(f"event.detail.folded_type must be {expected} for this source")
    folded = _count(detail.get("folded"), "event.detail.folded")
    if folded:
        _check_tally(detail, folded, "event.detail")
    elif set(detail) & {"first", "last", "by", "sample_token_sha256"}:
        raise EventError("event.detail holds facts of folded refusals but folded is 0")
    dropped = detail.get("dropped")
    if dropped is not None:
        if not isinstance(dropped, dict):
            raise EventError("event.detail.dropped must be an object")
        count = _count(dropped.get("count"), "event.detail.dropped.count", 1)
        _check_tally(dropped, count, "event.detail.dropped")
    elif not folded:
        raise EventError("an audit.refusals_folded event must fold or count something")


def check_event(event: Any) -> bytes:
    """Check ``event`` against the schema and return its canonical bytes (the leaf).

    Raises :class:`EventError` naming the first problem. Objects are ``dict``s (what
    JSON parsers and :func:`new_event` give): the ``Mapping`` ABC check costs more than
    the rest of a member's checks."""
    if not isinstance(event, dict):
        raise EventError("an event must be a JSON object")
    unknown = sorted(set(event) - TOP_LEVEL)
    if unknown:
        raise EventError(f"unknown member {unknown[0]!r}")
    if not _UUID.fullmatch(_need_str(event, "event_id", "event", 36)):
        raise EventError("event.event_id must be a UUID (8-4-4-4-12 lowercase hex)")
    kind = _need_str(event, "type", "event", 64)
    if kind not in EVENT_TYPES and not _ADMIN_TYPE.fullmatch(kind):
        raise EventError(f"event.type {kind!r} is not an audit event type")
    try:
        parse_time(_need_str(event, "time", "event", 24))
    except CanonicalError as exc:
        raise EventError(f"event.time: {exc}") from None
    source = event.get("source")
    if not isinstance(source, dict):
        raise EventError("event.source must be an object")
    if source.get("kind") not in ("agent", "control-plane"):
        raise EventError("event.source.kind must be agent or control-plane")
    _need_str(source, "id", "event.source", MAX_SOURCE_ID)
    if source.get("kind") == "agent":
        seq = source.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= 2**53 - 1:
            raise EventError("event.source.seq must be a positive integer")
    for name in ("cluster", "actor"):
        if name in event:
            _need_str(event, name, "event")
    for name in ("identity", "request", "decision", "detail"):
        if name in event and not isinstance(event[name], dict):
            raise EventError(f"event.{name} must be an object")
    if kind == REFUSALS_FOLDED:
        _check_refusals_folded(event)
    identity = event.get("identity") or {}
    extra = sorted(set(identity) - IDENTITY_FIELDS)
    if extra:
        raise EventError(f"event.identity has unknown member {extra[0]!r}")
    for name in ("token_sha256", "x509_sha256"):
        digest = identity.get(name)
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise EventError(f"event.identity.{name} must be 64 lowercase hex digits")
    if "trace_id" in event and not (
        isinstance(event["trace_id"], str) and _TRACE_ID.fullmatch(event["trace_id"])
    ):
        raise EventError("event.trace_id must be 32 lowercase hex digits")
    if "span_id" in event and not (
        isinstance(event["span_id"], str) and _SPAN_ID.fullmatch(event["span_id"])
    ):
        raise EventError("event.span_id must be 16 lowercase hex digits")
    try:
        leaf = canonical_bytes(event)
    except CanonicalError as exc:
        raise EventError(str(exc)) from None
    if len(leaf) > MAX_EVENT_BYTES:
        raise EventError(f"event is {len(leaf)} bytes; the limit is {MAX_EVENT_BYTES}")
    return leaf


def bind_source(event: Mapping[str, Any], cluster: str, agent: str) -> dict[str, Any]:
    """An agent's event as the log keeps it, under the source of the credential that
    sent it: ``source.id`` = ``CLUSTER/AGENT/SPOOL_ID`` (the spool id the agent sent
    must match :data:`SPOOL_ID`; it is kept as ``source.spool``), ``source.agent`` = the
    credential's agent. Resending an event through the same agent's credential binds it
    to the same bytes, so deduplication by (source, seq) still holds. Raises
    EventError."""
    source = event.get("source")
    if not isinstance(source, dict) or source.get("kind") != "agent":
        raise EventError("event.source.kind must be agent")
    spool = source.get("id")
    if not isinstance(spool, str) or not SPOOL_ID.fullmatch(spool):
        raise EventError("event.source.id must be the spool's id: 1-64 letters, digits, '_' or '-'")
    if not AGENT_ID.fullmatch(agent) or not cluster or "/" in cluster:
        raise EventError("event.source: no agent credential to bind it to")
    bound = {**source, "id": f"{cluster}/{agent}/{spool}", "agent": agent, "spool": spool}
    return {**event, "source": bound}


def subject_of(event: Mapping[str, Any]) -> str | None:
    """The identity an event is about (for queries): the SPIFFE ID, else the actor."""
    identity = event.get("identity")
    if isinstance(identity, dict) and isinstance(identity.get("spiffe_id"), str):
        return str(identity["spiffe_id"])
    actor = event.get("actor")
    return actor if isinstance(actor, str) else None


def decision_of(event: Mapping[str, Any]) -> str | None:
    """``allow`` / ``deny`` for events that carry a decision, else ``None``."""
    decision = event.get("decision")
    if isinstance(decision, dict) and isinstance(decision.get("allowed"), bool):
        return "allow" if decision["allowed"] else "deny"
    return None


UNBOUND = "unbound:"
"""Prefix of the source of an agent event logged before sources were bound to
credentials (migration 6) whose id has a ``/``: no agent's spool id has one, so such an
id was chosen to squat a key of the ``CLUSTER/AGENT/SPOOL`` form; the prefix keeps it
out of that namespace."""


def source_key(event: Mapping[str, Any]) -> tuple[str, int | None]:
    """(source, seq) as the log stores them: an agent's source (``CLUSTER/AGENT/SPOOL``,
    :func:`bind_source`; a bare spool id before migration 6) with its sequence number,
    or ``control-plane/REPLICA`` without one."""
    source = event["source"]
    if source["kind"] == "agent":
        key = str(source["id"])
        if "spool" not in source and "/" in key:
            key = UNBOUND + key
        return key, int(source["seq"])
    return "control-plane/" + str(source["id"]), None


QUERY_COLUMNS = (
    "event_id",
    "type",
    "time",
    "cluster",
    "subject",
    "trace_id",
    "decision",
    "source",
    "seq",
)


def query_columns(event: Mapping[str, Any]) -> dict[str, Any]:
    """The copies of an event's fields the log keeps in columns for queries. Derived
    here only, so the writer and ``trustmesh audit verify`` agree on them."""
    source, seq = source_key(event)
    return {
        "event_id": event["event_id"],
        "type": event["type"],
        "time": event["time"],
        "cluster": event.get("cluster"),
        "subject": subject_of(event),
        "trace_id": event.get("trace_id"),
        "decision": decision_of(event),
        "source": source,
        "seq": seq,
    }
