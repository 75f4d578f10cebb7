"""``POST /v1/login``: a person's token for one cluster's API server (issue 14 item 5;
``identity/login.py`` has the token's shape and the agents' verifier).

Any person may log in (admin, approver or auditor: what they may do at the cluster is
the policy's ``user`` bindings' business, decided by the cluster's agent); the
bootstrap ``admin.token`` may not (it is nobody in particular: 403), nor may a cluster
credential. The cluster must be registered (404 naming it). The lifetime is
``ttl`` seconds, default 900, between 60 and 3600. The token leaves only once its
``user.login`` audit event (cluster, jti, expiry — never the token) is stored."""

from __future__ import annotations

import secrets
from typing import Any

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.common.errors import Forbidden, InvalidRequest, NotFound, Unavailable
from trustmesh.identity.login import (
    DEFAULT_LOGIN_TTL,
    MAX_LOGIN_TTL,
    MIN_LOGIN_TTL,
    mint_login_token,
)
from trustmesh.server.credentials import PERSON, Principal
from trustmesh.server.recorder import AuditRecorder, admin_event
from trustmesh.server.snapshots import Snapshots
from trustmesh.spiffeid import cluster_audience


def check_login(document: dict[str, Any]) -> tuple[str, int]:
    """(cluster, ttl) of a login request; InvalidRequest naming the member."""
    cluster = document.get("cluster")
    if not isinstance(cluster, str) or not cluster or len(cluster) > 253:
        raise InvalidRequest("cluster must be a cluster name")
    ttl = document.get("ttl", DEFAULT_LOGIN_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise InvalidRequest("ttl must be a whole number of seconds")
    if not MIN_LOGIN_TTL <= ttl <= MAX_LOGIN_TTL:
        raise InvalidRequest(
            f"ttl must be between {MIN_LOGIN_TTL} and {MAX_LOGIN_TTL} seconds, got {ttl}"
        )
    return cluster, ttl


class Logins:
    def __init__(
        self,
        snapshots: Snapshots,
        recorder: AuditRecorder,
        clock: Clock,
        issuer: str,
        trust_domain: str,
    ) -> None:
        self.snapshots = snapshots
        self.recorder = recorder
        self.clock = clock
        self.issuer = issuer
        self.trust_domain = trust_domain

    async def login(self, principal: Principal, cluster: str, ttl: int) -> dict[str, Any]:
        """The person's token for ``cluster`` (module docstring)."""
        if principal.kind != PERSON or principal.person is None:
            raise Forbidden(
                f"login is for people (trustmesh user add); {principal.name} is "
                + (
                    "a cluster credential"
                    if principal.cluster is not None
                    else "the bootstrap admin.token, which names nobody at a cluster"
                )
            )
        if cluster not in self.snapshots.registry.clusters:
            raise NotFound(f"cluster {cluster[:100]} is not registered")
        now = int(self.clock())
        username = principal.name  # user:NAME
        claims = {
            "iss": self.issuer,
            "sub": username,
            "aud": [cluster_audience(self.trust_domain, cluster)],
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(16),
        }
        token = mint_login_token(self.snapshots.keyset.active, claims)
        detail = {"cluster": cluster, "jti": claims["jti"], "expires_at": ev.now_time(now + ttl)}
        try:
            await self.recorder.record(
                admin_event(self.recorder.source, ev.USER_LOGIN, username, detail, cluster)
            )
        except Exception:
            raise Unavailable(
                "the audit log cannot be written; no login token is issued without its record"
            ) from None
        return {
            "token": token,
            "expiresAt": now + ttl,
            "cluster": cluster,
            "username": username,
        }
