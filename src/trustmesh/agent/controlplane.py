"""The agent's one client of the control plane (as SPIRE keeps every agent → server call
in ``pkg/agent/client``): configuration and the SPIFFE bundle (with the bundles of the
federated trust domains), the cluster's policy bundle, the revocation list, audit
batches, and the report of the CA roots it holds.

Every call goes through one failover round (``common/failover.py``): the URLs are
tried starting with the one that answered last; a connection error, a timeout, a 5xx
or a 429 moves on to the next. What a round can end in is one of the control-plane
errors of ``common/errors.py``:

* :class:`~trustmesh.common.errors.Unreachable` — no URL answered;
* :class:`~trustmesh.common.errors.CredentialRejected` — 401/403, or a credential of
  another cluster (asking another replica would not help);
* :class:`~trustmesh.common.errors.ResyncNeeded` — the control plane does not know the
  revocation revision we resume from (a restored database);
* :class:`~trustmesh.common.errors.AuditRejected` — an audit batch refused with another
  4xx (a bug: resending will not help).

Retrying after a failed round, and how long to wait, is up to the loop that called."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from trustmesh.common.clock import Clock
from trustmesh.common.errors import AuditRejected, CredentialRejected, ResyncNeeded
from trustmesh.common.failover import Failover, TryNext
from trustmesh.revocation import Revocation

DEFAULT_TIMEOUT = 3.0
LONG_POLL_MARGIN = 10.0  # beyond the server's wait, for the answer to arrive


@dataclass(frozen=True)
class ControlPlaneState:
    """What the agent needs to verify tokens: the control plane's identity and the
    SPIFFE bundle of the trust domain, and where and when it came from."""

    cluster: str
    trust_domain: str
    issuer: str
    jwks: dict[str, Any]
    sequence: int
    refresh_hint: float
    server: str
    received_at: float
    federated: dict[str, Any] = field(default_factory=dict)
    """The federated trust domains' bundles as ``GET /v1/federation/bundles`` answers
    them: trust domain -> ``{"bundle": SPIFFE bundle, "use_until": epoch seconds}``."""
    service_account_audience: str | None = None
    """The Cluster's ``audience`` (the ``aud`` its SA tokens must carry); None from a
    control plane that does not say it."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ControlPlaneState:
        """A saved state (one saved before federation or the SA-token audience existed
        has no ``federated`` or ``service_account_audience``)."""
        return cls(
            **{k: data[k] for k in cls.__dataclass_fields__ if k != "federated" and k in data},
            federated=dict(data.get("federated") or {}),
        )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        raise TryNext(f"{response.request.url.path} did not answer JSON") from None
    if not isinstance(document, dict):
        raise TryNext(f"{response.request.url.path} did not answer a JSON object")
    return document


def _refused(base: str, response: httpx.Response, what: str) -> CredentialRejected:
    try:
        reason = response.json().get("error_description", "")
    except (ValueError, AttributeError):
        reason = ""
    return CredentialRejected(
        f"{base} refused the agent credential{what}: {reason or f'HTTP {response.status_code}'}"
    )


class ControlPlaneClient:
    """One agent's calls to one control plane (several URLs, one credential)."""

    def __init__(
        self,
        servers: Sequence[str],
        credential: str,
        cluster: str,
        clock: Clock,
        timeout: float = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``verify``: how the control plane's certificate is checked
        (``common/tls.client_verify``: ``--ca-file``)."""
        self.failover = Failover(servers)
        self.cluster = cluster
        self.clock = clock
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            headers={"Authorization": f"Bearer {credential}"},
            trust_env=False,
            verify=verify,
        )

    @property
    def servers(self) -> list[str]:
        return self.failover.urls

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def _check(base: str, response: httpx.Response, what: str = "") -> None:
        """401/403 end the round (CredentialRejected); 5xx and 429 try the next URL."""
        status = response.status_code
        if status in (401, 403):
            raise _refused(base, response, what)
        if status >= 500 or status == 429:
            raise TryNext(f"HTTP {status}")

    async def fetch_state(self) -> ControlPlaneState:
        """``GET /v1/agent/config`` and ``GET /.well-known/spiffe-bundle`` from one
        control plane; refuses a credential that belongs to another cluster."""

        async def attempt(base: str) -> ControlPlaneState:
            config_answer = await self._http.get(base + "/v1/agent/config")
            self._check(base, config_answer)
            if config_answer.status_code != 200:
                raise TryNext(f"/v1/agent/config answered HTTP {config_answer.status_code}")
            config = _json_object(config_answer)
            bundle_answer = await self._http.get(base + "/.well-known/spiffe-bundle")
            self._check(base, bundle_answer)
            if bundle_answer.status_code != 200:
                raise TryNext(f"the SPIFFE bundle answered HTTP {bundle_answer.status_code}")
            bundle = _json_object(bundle_answer)
            federated = await self._federated(base)
            if config.get("cluster") != self.cluster:
                raise CredentialRejected(
                    f"the credential belongs to cluster {config.get('cluster')!r}, not {self.cluster!r}"
                )
            audience = config.get("service_account_audience")
            try:
                return ControlPlaneState(
                    cluster=self.cluster,
                    trust_domain=str(config["trust_domain"]),
                    issuer=str(config["issuer"]),
                    jwks={"keys": bundle.get("keys", [])},
                    sequence=int(bundle.get("spiffe_sequence", 0)),
                    refresh_hint=float(bundle.get("spiffe_refresh_hint", 60)),
                    server=base,
                    received_at=self.clock(),
                    federated=federated,
                    service_account_audience=audience if isinstance(audience, str) else None,
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise TryNext(f"malformed agent configuration: {exc}") from None

        return await self.failover.run(attempt)

    async def _federated(self, base: str) -> dict[str, Any]:
        """``GET /v1/federation/bundles`` (a control plane without it: none)."""
        answer = await self._http.get(base + "/v1/federation/bundles")
        if answer.status_code == 404:
            return {}
        self._check(base, answer)
        document = _json_object(answer) if answer.status_code == 200 else {}
        domains = document.get("trust_domains")
        if not isinstance(domains, dict):
            raise TryNext(f"/v1/federation/bundles: HTTP {answer.status_code}, no trust_domains")
        return domains

    async def fetch_bundle(self, after: str | None, wait: float, agent: str) -> str | None:
        """Long-poll ``GET /v1/agent/bundle`` for a policy bundle newer than ``after``
        (``POLICY.REGISTRY``); None when nothing changed within ``wait`` s (HTTP 304)."""
        params = {"wait": str(wait), "agent": agent}
        if after is not None:
            params["after"] = after

        async def attempt(base: str) -> str | None:
            response = await self._http.get(
                base + "/v1/agent/bundle",
                params=params,
                timeout=httpx.Timeout(wait + LONG_POLL_MARGIN),
            )
            if response.status_code == 304:
                return None
            self._check(base, response)
            if response.status_code != 200:
                raise TryNext(f"HTTP {response.status_code}")
            token = _json_object(response).get("bundle")
            if not isinstance(token, str):
                raise TryNext("the answer holds no bundle")
            return token

        return await self.failover.run(attempt)

    async def fetch_revocations(
        self, since: int, wait: float, held: int | None = None
    ) -> tuple[int, list[Revocation]]:
        """``GET /v1/revocations?since=R&wait=S``: the current revision and the entries
        after ``since`` (long poll: answers as soon as there are any, or after ``wait``).
        ``held``: the revision this agent's list is at, which the control plane records
        for its overview (``&held=H``)."""
        params = {"since": str(since), "wait": str(wait)}
        if held is not None:
            params["held"] = str(held)

        async def attempt(base: str) -> tuple[int, list[Revocation]]:
            response = await self._http.get(
                base + "/v1/revocations",
                params=params,
                timeout=httpx.Timeout(wait + LONG_POLL_MARGIN),
            )
            self._check(base, response)
            if response.status_code == 400 and since > 0:
                raise ResyncNeeded(response.text[:200])
            if response.status_code != 200:
                raise TryNext(f"HTTP {response.status_code}")
            document = _json_object(response)
            try:
                entries = [Revocation.from_json(e) for e in document["entries"]]
                return int(document["revision"]), entries
            except (KeyError, TypeError, ValueError) as exc:
                raise TryNext(f"malformed revocation list: {exc}") from None

        return await self.failover.run(attempt)

    async def report_roots(self, fingerprints: list[str]) -> None:
        """``POST /v1/agent/roots``: the CA roots this agent holds (``agent/roots.py``).
        A control plane without the endpoint (404) is not asked again this round."""

        async def attempt(base: str) -> None:
            response = await self._http.post(base + "/v1/agent/roots", json={"roots": fingerprints})
            self._check(base, response, " for its roots report")
            if response.status_code not in (200, 404):
                raise TryNext(f"HTTP {response.status_code}")

        await self.failover.run(attempt)

    async def ship_audit(self, body: bytes, timeout: float | None = None) -> dict[str, Any]:
        """``POST /v1/audit/events`` with a ``{"events": [...]}`` body until one control
        plane takes it; its answer (``accepted``, ``duplicates``, ``gaps``…)."""

        async def attempt(base: str) -> dict[str, Any]:
            response = await self._http.post(
                base + "/v1/audit/events",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            self._check(base, response, f" for an audit batch ({response.text[:300]})")
            if response.status_code != 200:
                raise AuditRejected(base, response.status_code, response.text[:2000])
            try:
                document = response.json()
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise AuditRejected(base, 200, "the answer is not a JSON object")
            return document

        return await self.failover.run(attempt)
