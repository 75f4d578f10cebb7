"""Access requests, from request to expiry (DESIGN §11 "Access requests"): the one
owner of the ``access_requests`` table.

* **Request.** Any named person (admin, approver or auditor; not a cluster credential,
  and not the bootstrap ``admin.token``, which is for the first start only) asks for a
  GlobalRole of the current policy for one subject — ``workload`` (a Workload, or a
  template-derived identity ``TEMPLATE/CLUSTER/NAMESPACE/SERVICE-ACCOUNT`` as the
  registry gives it today), ``spiffeId`` (one SPIFFE ID, no pattern) or ``user`` (an
  existing person) — on named clusters, optionally in named namespaces, for a duration
  no longer than the role's ``maxAccessDuration`` (default 8 h), with a reason.
  Bounded: 50 clusters, 50 namespaces, a reason of 1000 printable characters, 20
  pending requests per requester. ``access.requested``.
* **Approve or deny.** Only a person with the approver role who is neither the
  requester nor the person who would gain the access (``user`` subject), and only a
  pending request (409 otherwise; two approvers at once: one wins, the conditional
  update refuses the other). An approval publishes RoleBinding ``access-ID``
  (``expiresAt`` = approval time + duration) through the same gate as any apply
  (:meth:`Changes.publish_access`), in the transaction that marks the request approved
  and stages ``access.approved``: a PolicyTest that fails refuses the approval (422
  naming the tests, ``policy.rejected``) and the request stays pending. The same
  publish drops the access bindings already past their ``expiresAt`` (they match
  nothing anyway). A denial needs a reason (``access.denied``).
* **Expiry.** Agents stop matching the binding at its ``expiresAt`` by themselves:
  nothing is published then. A loop of every replica (:meth:`AccessRequests.expire_due`)
  marks approved requests past their expiry ``expired`` and records ``access.expired``;
  the conditional update makes exactly one replica do it.

The time from request to approval is the histogram
``trustmesh_access_request_fulfillment_seconds`` of the replica that approved."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select, update

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import Conflict, Forbidden, InvalidRequest, NotFound
from trustmesh.manifests import (
    API_VERSION,
    Document,
    GlobalRoleSpec,
    RoleBindingSpec,
    document_from_body,
)
from trustmesh.policy.catalog import PolicyCatalog
from trustmesh.server.changes import Changes
from trustmesh.server.credentials import (
    ACTIVE,
    APPROVER,
    PERSON,
    CredentialStore,
    Principal,
    check_person,
)
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.retirement import SYSTEM, human_duration
from trustmesh.server.snapshots import Snapshots
from trustmesh.spiffeid import is_spiffe_id_pattern, parse_spiffe_id
from trustmesh.storage import Database
from trustmesh.storage.schema import access_requests

log = logging.getLogger("trustmesh.server")

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
STATES = (PENDING, APPROVED, DENIED, EXPIRED)
SUBJECT_KINDS = ("workload", "spiffeId", "user")
BINDING_PREFIX = "access-"
MAX_CLUSTERS = 50
MAX_NAMESPACES = 50
MAX_REASON = 1000
MAX_PENDING_PER_REQUESTER = 20
MAX_LISTED = 1000
ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # lowercase: it names a RoleBinding
ID_LENGTH = 10
REQUEST_ID = re.compile(r"^[a-z0-9]{1,32}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # role, cluster, namespace names
_WORKLOAD = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[a-z0-9]([-a-z0-9.]*[a-z0-9])?){0,3}$")


def max_access_duration(role_body: dict[str, Any]) -> int:
    """A stored GlobalRole's ``spec.maxAccessDuration`` in seconds (its default when
    unset), as the manifest parser reads it."""
    spec = document_from_body(role_body).spec
    assert isinstance(spec, GlobalRoleSpec)
    return spec.max_access_duration


def rfc3339(moment: float) -> str:
    """Whole seconds, UTC, ``Z``: a RoleBinding's ``expiresAt``."""
    return datetime.fromtimestamp(int(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(value: str) -> str:
    return repr(value[:64])


@dataclass(frozen=True)
class AccessRequest:
    id: str
    requester: str
    role: str
    subject_kind: str
    subject_value: str
    clusters: list[str]
    namespaces: list[str] | None
    duration: int
    reason: str
    state: str
    created_at: float
    decided_by: str | None
    decided_at: float | None
    decision_reason: str | None
    expires_at: float | None
    policy_revision: int | None

    @property
    def binding(self) -> str:
        return BINDING_PREFIX + self.id

    def shown_state(self, now: float) -> str:
        """``expired`` as soon as an approval passes its expiry, before the loop records it."""
        if self.state == APPROVED and self.expires_at is not None and self.expires_at <= now:
            return EXPIRED
        return self.state

    def detail(self) -> dict[str, Any]:
        """What the ``access.*`` events record."""
        return {
            "id": self.id,
            "requester": f"user:{self.requester}",
            "role": self.role,
            "subject": {self.subject_kind: self.subject_value},
            "clusters": self.clusters,
            "namespaces": self.namespaces,
            "duration": self.duration,
            "reason": self.reason[:MAX_REASON],
        }

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "requester": f"user:{self.requester}",
            "role": self.role,
            "subject": {self.subject_kind: self.subject_value},
            "clusters": self.clusters,
            "namespaces": self.namespaces,
            "duration": self.duration,
            "reason": self.reason,
            "state": self.shown_state(now),
            "createdAt": self.created_at,
            "decidedBy": f"user:{self.decided_by}" if self.decided_by else None,
            "decidedAt": self.decided_at,
            "decisionReason": self.decision_reason,
            "expiresAt": self.expires_at,
            "expiresIn": (
                max(0.0, round(self.expires_at - now, 3))
                if self.state == APPROVED and self.expires_at is not None
                else None
            ),
            "policyRevision": self.policy_revision,
            "binding": self.binding if self.state in (APPROVED, EXPIRED) else None,
        }


def _request(row: Any) -> AccessRequest:
    return AccessRequest(
        id=row.id,
        requester=row.requester,
        role=row.role,
        subject_kind=row.subject_kind,
        subject_value=row.subject_value,
        clusters=json.loads(row.clusters),
        namespaces=None if row.namespaces is None else json.loads(row.namespaces),
        duration=row.duration,
        reason=row.reason,
        state=row.state,
        created_at=row.created_at,
        decided_by=row.decided_by,
        decided_at=row.decided_at,
        decision_reason=row.decision_reason,
        expires_at=row.expires_at,
        policy_revision=row.policy_revision,
    )


def check_reason(value: Any, what: str = "reason") -> str:
    """Required, at most 1000 printable characters (no control characters, no newlines)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{what} is required: say why (at most {MAX_REASON} characters)")
    if len(value) > MAX_REASON:
        raise InvalidRequest(f"{what} is {len(value)} characters; at most {MAX_REASON}")
    if not value.isprintable():
        raise InvalidRequest(f"{what} must be printable text on one line (no control characters)")
    return value.strip()


def _names(value: Any, what: str, limit: int) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"{what} must be a non-empty list of names")
    if len(value) > limit:
        raise InvalidRequest(f"{what}: {len(value)} given; at most {limit}")
    out: list[str] = []
    for name in value:
        if not isinstance(name, str) or len(name) > 63 or not _NAME.fullmatch(name):
            shown = _printable(name) if isinstance(name, str) else "that"
            raise InvalidRequest(f"{what}: {shown} is not a valid name")
        if name in out:
            raise InvalidRequest(f"{what}: {name} is given twice")
        out.append(name)
    return out


def check_duration(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("duration must be a whole number of seconds")
    if value <= 0:
        raise InvalidRequest(f"duration must be more than 0 seconds, not {value}")
    return value


class AccessRequests:
    def __init__(
        self,
        db: Database,
        snapshots: Snapshots,
        catalog: PolicyCatalog,
        changes: Changes,
        credentials: CredentialStore,
        recorder: AuditRecorder,
        clock: Clock,
        observe_fulfillment: Callable[[float], None] | None = None,
    ) -> None:
        self.db = db
        self.snapshots = snapshots
        self.catalog = catalog
        self.changes = changes
        self.credentials = credentials
        self.recorder = recorder
        self.clock = clock
        self.observe_fulfillment = observe_fulfillment  # seconds -> None (a histogram's)

    # -- reading ------------------------------------------------------------------------------
    def get(self, request_id: str) -> AccessRequest:
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            raise NotFound(f"no access request {_printable(str(request_id))}")
        with self.db.engine.connect() as conn:
            return self._get(conn, request_id)

    @staticmethod
    def _get(conn: Connection, request_id: str) -> AccessRequest:
        row = conn.execute(
            select(access_requests).where(access_requests.c.id == request_id)
        ).first()
        if row is None:
            raise NotFound(f"no access request {request_id} (trustmesh access list)")
        return _request(row)

    def listing(
        self, state: str | None = None, limit: int = MAX_LISTED, after: str | None = None
    ) -> tuple[list[AccessRequest], str | None]:
        """The newest first, ``limit`` (1 to 1000) at a time after the request ``after``
        (the last of the previous page), and the id to pass as ``after`` for the next page
        (None on the last); ``state`` as shown (an approval past its expiry is ``expired``)."""
        if state is not None and state not in STATES:
            raise InvalidRequest(f"unknown state {_printable(state)} (states: {', '.join(STATES)})")
        if not 1 <= limit <= MAX_LISTED:
            raise InvalidRequest(f"limit must be 1 to {MAX_LISTED}, not {limit}")
        now = self.clock()
        query = select(access_requests).order_by(
            access_requests.c.created_at.desc(), access_requests.c.id
        )
        if state in (PENDING, DENIED):
            query = query.where(access_requests.c.state == state)
        elif state == APPROVED:
            query = query.where(
                access_requests.c.state == APPROVED, access_requests.c.expires_at > now
            )
        elif state == EXPIRED:
            query = query.where(
                (access_requests.c.state == EXPIRED)
                | ((access_requests.c.state == APPROVED) & (access_requests.c.expires_at <= now))
            )
        with self.db.engine.connect() as conn:
            if after is not None:
                if not REQUEST_ID.fullmatch(after):
                    raise InvalidRequest(f"after: {_printable(after)} is not an access request id")
                mark = conn.execute(
                    select(access_requests.c.created_at).where(access_requests.c.id == after)
                ).scalar()
                if mark is None:
                    raise InvalidRequest(f"after: no access request {after} (a page's next)")
                query = query.where(
                    (access_requests.c.created_at < mark)
                    | ((access_requests.c.created_at == mark) & (access_requests.c.id > after))
                )
            found = [_request(row) for row in conn.execute(query.limit(limit + 1))]
        more = len(found) > limit
        return found[:limit], found[limit - 1].id if more else None

    # -- the rules ----------------------------------------------------------------------------
    def _role(self, role: Any) -> tuple[dict[str, Any], int]:
        """The current policy's GlobalRole ``role`` and its revision; NotFound naming it."""
        if not isinstance(role, str) or not role:
            raise InvalidRequest("role is required (a GlobalRole of the current policy)")
        version = self.catalog.current()
        for body in version.documents:
            if body.get("kind") == "GlobalRole" and body["metadata"]["name"] == role:
                return body, version.revision
        raise NotFound(
            f"role {_printable(role)} does not exist in the current policy (revision "
            f"{version.revision}); trustmesh policy show lists its GlobalRoles"
        )

    def _subject(self, subject: Any) -> tuple[str, str]:
        if not isinstance(subject, dict) or len(subject) != 1:
            raise InvalidRequest(
                'subject must be one of {"workload": W}, {"spiffeId": S} or {"user": U}'
            )
        ((kind, value),) = subject.items()
        if kind not in SUBJECT_KINDS:
            raise InvalidRequest(
                f"unknown subject kind {_printable(str(kind))} (kinds: {', '.join(SUBJECT_KINDS)})"
            )
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"subject {kind} must be a non-empty string")
        if kind == "workload":
            if len(value) > 1024 or not _WORKLOAD.fullmatch(value):
                raise InvalidRequest(f"workload {_printable(value)} is not a workload name")
            if self.snapshots.registry.identity_named(value) is None:
                raise NotFound(
                    f"workload {_printable(value)} is not registered (no Workload of that "
                    "name, nor a template-derived TEMPLATE/CLUSTER/NAMESPACE/SERVICE-ACCOUNT)"
                )
        elif kind == "spiffeId":
            if len(value) > 2048 or is_spiffe_id_pattern(value):
                raise InvalidRequest("subject spiffeId must be one SPIFFE ID, not a pattern")
            parse_spiffe_id(value)  # SpiffeIdError (400) naming the problem
        else:
            check_person(value)
            record = self.credentials.person_credential(value)  # NotFound naming it
            if record.state(self.clock()) != ACTIVE:
                raise InvalidRequest(f"person {value} is {record.state(self.clock())}")
        return kind, value

    def _clusters(self, value: Any) -> list[str]:
        clusters = _names(value, "clusters", MAX_CLUSTERS)
        known = self.snapshots.registry.clusters
        unknown = [c for c in clusters if c not in known]
        if unknown:
            raise NotFound(f"cluster {unknown[0]} is not registered (trustmesh get clusters)")
        return clusters

    @staticmethod
    def _within_max(role: str, body: dict[str, Any], duration: int) -> None:
        limit = max_access_duration(body)
        if duration > limit:
            raise InvalidRequest(
                f"duration {human_duration(duration)} ({duration} s) is over role {role}'s "
                f"maxAccessDuration {human_duration(limit)} ({limit} s)"
            )

    @staticmethod
    def _person(principal: Principal, what: str) -> str:
        if principal.kind != PERSON or principal.person is None:
            raise Forbidden(
                f"{what} is for named people (trustmesh user add); {principal.name} is "
                + (
                    "a cluster credential"
                    if principal.role is None
                    else "the bootstrap admin.token, for the first start only"
                )
            )
        return principal.person

    # -- request --------------------------------------------------------------------------------
    def request(
        self,
        principal: Principal,
        role: Any,
        subject: Any,
        clusters: Any,
        namespaces: Any,
        duration: Any,
        reason: Any,
    ) -> AccessRequest:
        requester = self._person(principal, "requesting access")
        body, _ = self._role(role)
        kind, value = self._subject(subject)
        cluster_names = self._clusters(clusters)
        namespace_names = (
            None if namespaces is None else _names(namespaces, "namespaces", MAX_NAMESPACES)
        )
        seconds = check_duration(duration)
        self._within_max(str(role), body, seconds)
        why = check_reason(reason)
        now = self.clock()
        request_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        with self.db.engine.begin() as conn:
            pending = conn.execute(
                select(func.count())
                .select_from(access_requests)
                .where(access_requests.c.requester == requester, access_requests.c.state == PENDING)
            ).scalar_one()
            if pending >= MAX_PENDING_PER_REQUESTER:
                raise Conflict(
                    f"user:{requester} has {pending} pending access requests (at most "
                    f"{MAX_PENDING_PER_REQUESTER}); wait for a decision"
                )
            conn.execute(
                access_requests.insert().values(
                    id=request_id,
                    requester=requester,
                    role=str(role),
                    subject_kind=kind,
                    subject_value=value,
                    clusters=json.dumps(cluster_names),
                    namespaces=None if namespace_names is None else json.dumps(namespace_names),
                    duration=seconds,
                    reason=why,
                    state=PENDING,
                    created_at=now,
                    expired_recorded=0,
                )
            )
            created = self._get(conn, request_id)
            self.recorder.stage(conn, ev.ACCESS_REQUESTED, principal.name, created.detail())
        self.recorder.drain()
        return created

    # -- decisions ------------------------------------------------------------------------------
    def _decider(self, principal: Principal, found: AccessRequest, verb: str) -> str:
        decider = self._person(principal, f"{verb} an access request")
        if principal.role != APPROVER:
            raise Forbidden(
                f"only a person with the approver role may {verb} an access request; "
                f"{principal.name} has the {principal.role} role"
            )
        if decider == found.requester:
            raise Forbidden(
                f"user:{decider} requested access request {found.id}; another approver must "
                f"{verb} it"
            )
        if found.subject_kind == "user" and found.subject_value == decider:
            raise Forbidden(
                f"access request {found.id} would give user:{decider} the access; another "
                f"approver must {verb} it"
            )
        if found.state != PENDING:
            raise Conflict(
                f"access request {found.id} is {found.shown_state(self.clock())}, not pending; "
                "only a pending request can be decided"
            )
        return decider

    def _decide_in(
        self,
        conn: Connection,
        found: AccessRequest,
        state: str,
        decider: str,
        reason: str | None,
        now: float,
        expires_at: float | None = None,
        revision: int | None = None,
    ) -> AccessRequest:
        changed = conn.execute(
            update(access_requests)
            .where(access_requests.c.id == found.id, access_requests.c.state == PENDING)
            .values(
                state=state,
                decided_by=decider,
                decided_at=now,
                decision_reason=reason,
                expires_at=expires_at,
                policy_revision=revision,
            )
        ).rowcount
        if changed != 1:
            raise Conflict(f"access request {found.id} was decided meanwhile")
        return self._get(conn, found.id)

    def approve(self, principal: Principal, request_id: str, reason: Any = None) -> AccessRequest:
        """Publish ``access-ID`` through the gate and mark the request approved, in one
        transaction (``access.approved`` with it); the request stays pending if the gate
        refuses (PolicyError, PolicyTestFailed)."""
        found = self.get(request_id)
        decider = self._decider(principal, found, "approve")
        why = None if reason is None or reason == "" else check_reason(reason)
        body, _ = self._role(found.role)
        self._within_max(found.role, body, found.duration)
        now = self.clock()
        expires_at = float(int(now + found.duration))  # whole seconds, never longer
        binding = self._binding(found, expires_at, decider)
        approved: list[AccessRequest] = []

        def then(conn: Connection, revision: int) -> None:
            done = self._decide_in(conn, found, APPROVED, decider, why, now, expires_at, revision)
            detail = {
                **done.detail(),
                "expires_at": ev.now_time(expires_at),
                "policy_revision": revision,
                "binding": done.binding,
                "decision_reason": why,
            }
            self.recorder.stage(conn, ev.ACCESS_APPROVED, principal.name, detail)
            approved.append(done)

        message = f"access request {found.id} approved by user:{decider}"
        self.changes.publish_access(
            binding, lambda d: self._expired_binding(d, now), principal.name, message,
            f"access:{found.id}", then,
        )  # fmt: skip
        if self.observe_fulfillment is not None:
            self.observe_fulfillment(max(0.0, now - found.created_at))
        log.info("access request %s approved by %s", found.id, decider)
        return approved[0]

    def deny(self, principal: Principal, request_id: str, reason: Any) -> AccessRequest:
        found = self.get(request_id)
        decider = self._decider(principal, found, "deny")
        why = check_reason(reason)
        now = self.clock()
        with self.db.engine.begin() as conn:
            done = self._decide_in(conn, found, DENIED, decider, why, now)
            self.recorder.stage(
                conn, ev.ACCESS_DENIED, principal.name, {**done.detail(), "decision_reason": why}
            )
        self.recorder.drain()
        return done

    @staticmethod
    def _binding(found: AccessRequest, expires_at: float, approver: str) -> Document:
        spec: dict[str, Any] = {
            "role": found.role,
            "subjects": [{found.subject_kind: found.subject_value}],
            "clusters": {"names": found.clusters},
            "expiresAt": rfc3339(expires_at),
        }
        if found.namespaces is not None:
            spec["namespaces"] = found.namespaces
        return document_from_body(
            {
                "apiVersion": API_VERSION,
                "kind": "RoleBinding",
                "metadata": {
                    "name": found.binding,
                    "annotations": {
                        "trustmesh.io/access-request": found.id,
                        "trustmesh.io/requested-by": f"user:{found.requester}",
                        "trustmesh.io/approved-by": f"user:{approver}",
                    },
                },
                "spec": spec,
            }
        )

    @staticmethod
    def _expired_binding(document: Document, now: float) -> bool:
        """An access binding past its ``expiresAt``: dropped at the next approval."""
        if document.kind != "RoleBinding" or not document.name.startswith(BINDING_PREFIX):
            return False
        assert isinstance(document.spec, RoleBindingSpec)
        expiry = document.spec.expires_at
        return expiry is not None and expiry <= now

    # -- expiry ---------------------------------------------------------------------------------
    def expire_due(self) -> list[str]:
        """Mark approved requests past their expiry ``expired`` and record
        ``access.expired``, each once across replicas (a conditional update); their ids."""
        now = self.clock()
        with self.db.engine.connect() as conn:
            due = list(
                conn.execute(
                    select(access_requests.c.id).where(
                        access_requests.c.state == APPROVED,
                        access_requests.c.expires_at <= now,
                        access_requests.c.expired_recorded == 0,
                    )
                ).scalars()
            )
        expired = []
        for request_id in due:
            with self.db.engine.begin() as conn:
                changed = conn.execute(
                    update(access_requests)
                    .where(
                        access_requests.c.id == request_id,
                        access_requests.c.state == APPROVED,
                        access_requests.c.expired_recorded == 0,
                    )
                    .values(state=EXPIRED, expired_recorded=1)
                ).rowcount
                if changed != 1:
                    continue  # another replica recorded it
                done = self._get(conn, request_id)
                detail = {
                    **done.detail(),
                    "expires_at": ev.now_time(done.expires_at),
                    "policy_revision": done.policy_revision,
                    "binding": done.binding,
                    "approved_by": f"user:{done.decided_by}",
                }
                self.recorder.stage(conn, ev.ACCESS_EXPIRED, SYSTEM, detail)
            expired.append(request_id)
        if expired:
            self.recorder.drain()
        return expired
