"""The sidecar's one client of the control plane (as ``agent/controlplane.py`` is the
agent's): ``POST /v1/x509-svid`` (DESIGN §9) and the trust domain's public documents,
``/.well-known/openid-configuration`` and ``/.well-known/spiffe-bundle`` (DESIGN §2),
with the federated trust domains' bundles (``/v1/federation/bundles``, public: no
credential; a control plane without it answers 404, read as none).
JWT-SVIDs come through the SDK's token source (``client/_tokens.py``) on the same HTTP
client.

Every call is one failover round (``common/failover.py``): a connection error, a
timeout, a 5xx, a 408 or a 429 moves on to the next URL; a refusal ends the round
(:class:`~trustmesh.common.errors.IssuanceRefused`), since another replica would answer
the same. Answers are read with a size bound before any parsing."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from trustmesh.common.answers import read_bounded
from trustmesh.common.errors import IssuanceRefused
from trustmesh.common.failover import Failover, TryNext

X509_SVID_PATH = "/v1/x509-svid"
DISCOVERY_PATH = "/.well-known/openid-configuration"
BUNDLE_PATH = "/.well-known/spiffe-bundle"
FEDERATED_PATH = "/v1/federation/bundles"
DEFAULT_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
MAX_ANSWER_BYTES = 256 * 1024
MAX_FEDERATED_BYTES = 4 * 1024 * 1024  # several partners' bundles of up to 256 KiB
_RETRYABLE = frozenset({408, 429})


@dataclass(frozen=True)
class TrustDomainState:
    """Who the control plane is and the JWT keys of its trust domain."""

    issuer: str
    trust_domain: str
    """Without the scheme: ``corp.example``."""
    jwks: dict[str, Any]
    """Only the JWT-SVID keys that carry a ``kid`` (what SPIFFE clients expect)."""
    refresh_hint: float
    server: str
    federated: dict[str, Any] = field(default_factory=dict)
    """The federated trust domains' bundles, as ``/v1/federation/bundles`` answers them
    (read with ``identity/spiffe_bundle.read_federated``)."""


def jwt_keys(bundle: dict[str, Any]) -> dict[str, Any]:
    """The JWT bundle in a SPIFFE bundle (SPIFFE Trust Domain and Bundle §4.2.2): keys
    with ``use: jwt-svid`` and a ``kid``; ``x509-svid`` keys stay out."""
    keys = bundle.get("keys")
    if not isinstance(keys, list):
        return {"keys": []}
    return {
        "keys": [
            key
            for key in keys
            if isinstance(key, dict)
            and key.get("use") == "jwt-svid"
            and isinstance(key.get("kid"), str)
            and key["kid"]
        ]
    }


async def _read_json(response: httpx.Response, limit: int = MAX_ANSWER_BYTES) -> Any:
    """The body of a streamed response as JSON, refused past ``limit`` bytes."""
    body = await read_bounded(response, limit)
    if body is None:
        raise TryNext(f"the answer is larger than {limit} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _retry_elsewhere(path: str, response: httpx.Response) -> None:
    status = response.status_code
    if status >= 500 or status in _RETRYABLE:
        raise TryNext(f"{path} answered HTTP {status}")


class SidecarClient:
    """One sidecar's calls to one control plane (several URLs)."""

    def __init__(
        self,
        servers: Sequence[str],
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """``verify``: how the control plane's certificate is checked
        (``common/tls.client_verify``: ``--ca-file``)."""
        self.failover = Failover(servers)
        self.http = httpx.AsyncClient(timeout=timeout, trust_env=False, verify=verify)

    @property
    def servers(self) -> list[str]:
        return self.failover.urls

    async def aclose(self) -> None:
        await self.http.aclose()

    async def issue_x509_svid(
        self, subject_token: str, csr: str, holding: Sequence[str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """``POST /v1/x509-svid``: the URL that answered and its answer (a JSON object,
        not yet checked: see ``sidecar/x509.py``). ``holding``: the SHA-256 fingerprints
        of the roots we hold (``bundle_sha256``, the evidence a CA rotation waits for);
        None before we hold any, so that we are not waited for."""
        request: dict[str, Any] = {"subject_token": subject_token, "csr": csr}
        if holding is not None:
            request["bundle_sha256"] = list(holding)
        body = orjson.dumps(request)

        async def attempt(base: str) -> tuple[str, dict[str, Any]]:
            async with self.http.stream(
                "POST",
                base + X509_SVID_PATH,
                content=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                _retry_elsewhere(X509_SVID_PATH, response)
                answer = await _read_json(response)
            if response.status_code != 200:
                error = description = ""
                if isinstance(answer, dict):
                    error = str(answer.get("error") or "")[:60]
                    description = str(answer.get("error_description") or "")[:300]
                raise IssuanceRefused(
                    base, response.status_code, error or "http_error", description
                )
            if not isinstance(answer, dict):
                raise TryNext(f"{X509_SVID_PATH} did not answer a JSON object")
            return base, answer

        return await self.failover.run(attempt)

    async def fetch_trust_domain(self) -> TrustDomainState:
        """The issuer, the trust domain and its JWT keys, from one control plane."""

        async def get_object(
            base: str, path: str, limit: int = MAX_ANSWER_BYTES
        ) -> dict[str, Any] | None:
            async with self.http.stream("GET", base + path) as response:
                _retry_elsewhere(path, response)
                if response.status_code == 404 and path == FEDERATED_PATH:
                    return None
                if response.status_code != 200:
                    raise TryNext(f"{path} answered HTTP {response.status_code}")
                document = await _read_json(response, limit)
            if not isinstance(document, dict):
                raise TryNext(f"{path} did not answer a JSON object")
            return document

        async def attempt(base: str) -> TrustDomainState:
            discovery = await get_object(base, DISCOVERY_PATH) or {}
            bundle = await get_object(base, BUNDLE_PATH) or {}
            federated = await get_object(base, FEDERATED_PATH, MAX_FEDERATED_BYTES) or {}
            issuer, domain = discovery.get("issuer"), discovery.get("trust_domain")
            if not isinstance(issuer, str) or not isinstance(domain, str):
                raise TryNext(f"{DISCOVERY_PATH} names no issuer or trust domain")
            hint = bundle.get("spiffe_refresh_hint", 60)
            if isinstance(hint, bool) or not isinstance(hint, int | float):
                hint = 60
            return TrustDomainState(
                issuer=issuer,
                trust_domain=domain.removeprefix("spiffe://"),
                jwks=jwt_keys(bundle),
                refresh_hint=float(hint),
                server=base,
                federated=federated.get("trust_domains") or {},
            )

        return await self.failover.run(attempt)
