"""The manifest kinds and their field tables (DESIGN §3).

Each kind is one :class:`KindSpec` entry in :data:`KINDS`: a declarative ``spec``
checker built from field tables, an optional ``finalize`` hook for defaults that
depend on ``metadata`` and a ``build`` function from the canonical body to the typed
spec. Adding a kind (GlobalRole, RoleBinding, PolicyTest) means adding a table, a
dataclass and an entry here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from trustmesh.common.addresses import check_fetch_url
from trustmesh.common.errors import SpiffeIdError
from trustmesh.request.canonical import DEFAULT_CLUSTER_DOMAIN
from trustmesh.spiffeid import normalize_trust_domain, parse_spiffe_id

from ._anomaly import ANOMALY_POLICY_SPEC, DETECTOR_NAMES, AnomalyPolicySpec, build_anomaly_policy
from ._errors import Sink
from ._jwks import JWKS
from ._schema import (
    Checker,
    Field,
    choice,
    duration,
    exclusive,
    list_of,
    map_of,
    obj,
    refused,
    string,
    string_map,
)
from ._templates import DNS_LABEL as _DNS_LABEL
from ._templates import DNS_SUBDOMAIN as _DNS_SUBDOMAIN

API_VERSION = "trustmesh.io/v1alpha1"

# --- value rules -------------------------------------------------------------------


def dns_label(value: str) -> None:
    """RFC 1123 label as Kubernetes uses it for names and namespaces."""
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label: use at most 63 lowercase letters, digits "
            "and '-', starting and ending with a letter or digit"
        )


def dns_subdomain(value: str) -> None:
    """RFC 1123 subdomain as Kubernetes uses it for service-account names."""
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 subdomain: use at most 253 lowercase letters, "
            "digits, '-' and '.', each part starting and ending with a letter or digit"
        )


def fetch_url(what: str) -> Callable[[str], None]:
    """https (http only to loopback), no credentials, query or fragment."""

    def validate(value: str) -> None:
        if any(c.isspace() for c in value):
            raise ValueError(f"{what} {value!r} must not contain whitespace")
        check_fetch_url(value, what)
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port out of range
        if parts.query or parts.fragment or value.endswith(("?", "#")):
            raise ValueError(f"{what} {value!r} must not have a query or fragment")

    return validate


KNOWN_CLAIMS = ("workload_id", "project", "environment", "tier")
RESERVED_CLAIMS = frozenset(
    [
        "iss",
        "sub",
        "aud",
        "exp",
        "nbf",
        "iat",
        "jti",
        "cluster",
        "namespace",
        "service_account",
        "kid",
        "typ",
        "alg",
    ]
)
_CLAIM_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")


def claim_key(key: str) -> None:
    if key in RESERVED_CLAIMS:
        raise ValueError(f"{key!r} is a reserved token claim and cannot be set as a workload claim")
    if not _CLAIM_KEY.match(key):
        raise ValueError(
            f"claim name {key!r} must match {_CLAIM_KEY.pattern} (lowercase, at most 63 characters)"
        )


def spiffe_id(value: str) -> None:
    parse_spiffe_id(value)


# --- metadata ----------------------------------------------------------------------

METADATA = obj(
    Field("name", string(dns_label), required=True),
    Field("labels", string_map()),
    Field("annotations", string_map()),
)

# --- Cluster -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    issuer: str
    jwks: dict[str, Any] | None
    jwks_uri: str | None
    audience: str
    labels: dict[str, str]
    # The cluster's DNS domain (kubelet --cluster-domain): hosts
    # <svc>.<ns>.svc.<clusterDomain> are matched as <svc>.<ns>.svc (DESIGN §3).
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    # Key sources tried in order (DESIGN §10): JWKS URLs, or OIDC discovery URLs (a path
    # ending in /.well-known/openid-configuration). Empty: jwks, jwksUri or discovery.
    jwks_uris: tuple[str, ...] = ()

    @property
    def key_sources(self) -> tuple[str, ...]:
        """The URLs the keys are fetched from, in order: ``jwksUris``, else ``jwksUri``,
        else the issuer's discovery document; none for inline ``jwks``."""
        if self.jwks is not None:
            return ()
        if self.jwks_uris:
            return self.jwks_uris
        if self.jwks_uri is not None:
            return (self.jwks_uri,)
        return (self.issuer.rstrip("/") + DISCOVERY_SUFFIX,)


DISCOVERY_SUFFIX = "/.well-known/openid-configuration"  # OIDC Discovery 1.0 §4
MAX_JWKS_URIS = 8


def cluster_domain(value: str) -> None:
    """A DNS domain as kubelet's ``--cluster-domain`` takes it, without trailing dot."""
    dns_subdomain(value)


CLUSTER_SPEC = obj(
    Field("issuer", string(fetch_url("issuer")), required=True),
    Field("jwks", JWKS),
    Field("jwksUri", string(fetch_url("jwksUri"))),
    Field(
        "jwksUris",
        list_of(
            string(fetch_url("jwksUris")),
            min_items=1,
            max_items=MAX_JWKS_URIS,
            distinct=True,
        ),
    ),
    Field("audience", string(), default=lambda: "trustmesh"),
    Field("labels", string_map(), default=dict),
    # No default in the canonical body: Clusters applied before the field existed
    # keep their content hash; the typed spec supplies cluster.local.
    Field("clusterDomain", string(cluster_domain)),
    rules=(
        exclusive(
            "jwks",
            "jwksUri",
            "jwksUris",
            hint="; give one of jwks, jwksUri or jwksUris (jwksUris may list the jwksUri "
            "first, then other sources), or none to use OIDC discovery",
        ),
    ),
)


def _build_cluster(spec: dict[str, Any]) -> ClusterSpec:
    return ClusterSpec(
        issuer=spec["issuer"],
        jwks=copy.deepcopy(spec.get("jwks")),
        jwks_uri=spec.get("jwksUri"),
        audience=spec["audience"],
        labels=dict(spec["labels"]),
        cluster_domain=spec.get("clusterDomain") or DEFAULT_CLUSTER_DOMAIN,
        jwks_uris=tuple(spec.get("jwksUris") or ()),
    )


# --- Workload ----------------------------------------------------------------------

POD_LABELS_REFUSED = (
    "pod-label selectors need pod attestation, which this version does not have; "
    "select by namespace and serviceAccount"
)


@dataclass(frozen=True)
class WorkloadSelector:
    cluster: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class WorkloadSpec:
    selector: WorkloadSelector
    spiffe_id: str | None
    claims: dict[str, str]
    max_token_ttl: int | None
    retire_after_unused: int | None = None  # seconds; DESIGN §11, server/retirement.py


MAX_RETIRE_AFTER_UNUSED = 3650 * 86400

WORKLOAD_SPEC = obj(
    Field(
        "selector",
        obj(
            Field("cluster", string(dns_label), required=True),
            Field("namespace", string(dns_label), required=True),
            Field("serviceAccount", string(dns_subdomain), required=True),
            # A projected service-account token does not carry pod labels.
            refused("podLabels", POD_LABELS_REFUSED),
        ),
        required=True,
    ),
    Field("spiffeId", string(spiffe_id)),
    Field("claims", map_of(string(max_length=253), claim_key), default=dict),
    Field("maxTokenTTL", duration(1, 3600)),
    Field("retireAfterUnused", duration(1, MAX_RETIRE_AFTER_UNUSED)),
)


def _finalize_workload(spec: dict[str, Any], name: str) -> None:
    """``claims.workload_id`` defaults to ``metadata.name``."""
    claims = spec["claims"]
    claims.setdefault("workload_id", name)
    spec["claims"] = dict(sorted(claims.items()))


def _build_workload(spec: dict[str, Any]) -> WorkloadSpec:
    selector = spec["selector"]
    return WorkloadSpec(
        selector=WorkloadSelector(
            cluster=selector["cluster"],
            namespace=selector["namespace"],
            service_account=selector["serviceAccount"],
        ),
        spiffe_id=spec.get("spiffeId"),
        claims=dict(spec["claims"]),
        max_token_ttl=spec.get("maxTokenTTL"),
        retire_after_unused=spec.get("retireAfterUnused"),
    )


# --- FederatedTrustDomain ------------------------------------------------------------

PROFILE_HTTPS_WEB = "https_web"
DEFAULT_MAX_STALE = 7 * 86400
MAX_CA_BUNDLE_CHARS = 64 * 1024
MAX_CA_BUNDLE_CERTIFICATES = 16


@dataclass(frozen=True)
class FederatedTrustDomainSpec:
    """A partner trust domain whose SPIFFE bundle the control plane polls (SPIFFE
    Federation §5.1: the trust domain, the endpoint URL and the profile; DESIGN §9)."""

    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    ca_bundle: str | None
    refresh_hint: int | None
    max_stale: int


def trust_domain_name(value: str) -> None:
    """A trust domain name as SPIFFE-ID §2.1 spells it, without the scheme."""
    if value.startswith("spiffe://"):
        raise ValueError(
            f"{value!r}: give the trust domain name alone, e.g. {value.removeprefix('spiffe://')!r}"
        )
    try:
        normalize_trust_domain(value)
    except SpiffeIdError as exc:
        raise ValueError(exc.description) from None
    if value.endswith("/"):
        raise ValueError(f"trust domain {value!r} must not end with '/'")


def profile(value: str) -> None:
    """SPIFFE Federation §5.2: only ``https_web`` (Web PKI, or ``caBundle``)."""
    if value == "https_spiffe":
        raise ValueError(
            "profile 'https_spiffe' is not supported; use 'https_web' (with caBundle for an "
            "endpoint behind a private CA)"
        )
    choice(PROFILE_HTTPS_WEB)(value)


def pem_certificates(value: str) -> None:
    """PEM certificates (at most 16) to trust for one endpoint's TLS; nothing else."""
    if "PRIVATE KEY" in value:
        raise ValueError("caBundle holds a private key; give only CA certificates (PEM)")
    try:
        certificates = x509.load_pem_x509_certificates(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ValueError("caBundle is not PEM certificates (-----BEGIN CERTIFICATE-----)") from None
    if len(certificates) > MAX_CA_BUNDLE_CERTIFICATES:
        raise ValueError(f"caBundle holds more than {MAX_CA_BUNDLE_CERTIFICATES} certificates")


FEDERATED_TRUST_DOMAIN_SPEC = obj(
    Field("trustDomain", string(trust_domain_name), required=True),
    Field("bundleEndpointURL", string(fetch_url("bundleEndpointURL")), required=True),
    Field("profile", string(profile), default=lambda: PROFILE_HTTPS_WEB),
    Field("caBundle", string(pem_certificates, max_length=MAX_CA_BUNDLE_CHARS)),
    Field("refreshHint", duration(5, 86400)),
    Field("maxStale", duration(5, 30 * 86400), default=lambda: DEFAULT_MAX_STALE),
)


def _build_federated_trust_domain(spec: dict[str, Any]) -> FederatedTrustDomainSpec:
    return FederatedTrustDomainSpec(
        trust_domain=spec["trustDomain"],
        bundle_endpoint_url=spec["bundleEndpointURL"],
        profile=spec["profile"],
        ca_bundle=spec.get("caBundle"),
        refresh_hint=spec.get("refreshHint"),
        max_stale=spec["maxStale"],
    )


# --- EventReceiver -----------------------------------------------------------------

MAX_AUDIENCE_CHARS = 2048
MAX_TOKEN_FILE_CHARS = 4096
NOT_IN_MANIFESTS = (
    "a token is never written in a manifest (manifests are stored and shown); put it in a "
    "file on the control plane's host and give its path as spec.authorizationTokenFile"
)


@dataclass(frozen=True)
class EventReceiverSpec:
    """Where findings are pushed as signed SETs (RFC 8935; ``server/push.py``)."""

    endpoint: str
    audience: str
    events: tuple[str, ...] | None
    """The detectors whose findings it receives; None: every detector."""
    authorization_token_file: str | None
    """A file on the control plane's host holding the bearer token (read at each
    attempt, so a rotated token is taken without a new apply)."""

    def wants(self, detector: str) -> bool:
        return self.events is None or detector in self.events


def push_endpoint(value: str) -> None:
    """https, or http only to a loopback address; no credentials, query or fragment."""
    fetch_url("endpoint")(value)


def token_file(value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path on the control plane's host")
    if "\x00" in value or any(c in value for c in "\n\r"):
        raise ValueError("the path must not contain NUL or line breaks")


def _finalize_event_receiver(spec: dict[str, Any], name: str) -> None:
    spec.setdefault("audience", spec.get("endpoint"))


EVENT_RECEIVER_SPEC = obj(
    Field("endpoint", string(push_endpoint, max_length=2048), required=True),
    Field("audience", string(max_length=MAX_AUDIENCE_CHARS)),
    Field("events", list_of(string(choice(*DETECTOR_NAMES)), min_items=1, distinct=True)),
    Field("authorizationTokenFile", string(token_file, max_length=MAX_TOKEN_FILE_CHARS)),
    refused("authorization", NOT_IN_MANIFESTS),
    refused("token", NOT_IN_MANIFESTS),
    refused("bearerToken", NOT_IN_MANIFESTS),
)


def _build_event_receiver(spec: dict[str, Any]) -> EventReceiverSpec:
    events = spec.get("events")
    return EventReceiverSpec(
        endpoint=spec["endpoint"],
        audience=spec.get("audience") or spec["endpoint"],
        events=tuple(events) if events else None,
        authorization_token_file=spec.get("authorizationTokenFile"),
    )


# --- the table ---------------------------------------------------------------------

from ._policy_kinds import (  # noqa: E402  (the policy kinds reuse the helpers above)
    CLUSTER_FIELDS,
    GLOBAL_ROLE_SPEC,
    POLICY_TEST_SPEC,
    ROLE_BINDING_SPEC,
    GlobalRoleSpec,
    PolicyTestSpec,
    RoleBindingSpec,
    build_global_role,
    build_policy_test,
    build_role_binding,
)
from ._schema import list_of  # noqa: E402
from ._templates import (  # noqa: E402
    WorkloadTemplateSpec,
    build_workload_template,
    claim_template,
    glob_value,
    spiffe_id_template,
)


def _scope_given(node: Any, result: dict[str, Any], path: str, sink: Sink) -> bool:
    if not result.get("names") and "selector" not in result:
        sink.add(node.line, path, "give names and/or a selector: the clusters the template covers")
        return False
    return True


WORKLOAD_TEMPLATE_SPEC = obj(
    Field("clusters", obj(*CLUSTER_FIELDS, rules=(_scope_given,)), required=True),
    Field("namespaces", list_of(string(glob_value), min_items=1), required=True),
    Field("serviceAccounts", list_of(string(glob_value), min_items=1), required=True),
    Field("spiffeIdTemplate", string(spiffe_id_template, max_length=2048)),
    Field("claims", map_of(string(claim_template, max_length=253), claim_key), default=dict),
    Field("maxTokenTTL", duration(1, 3600)),
)

Spec = (
    ClusterSpec
    | WorkloadSpec
    | WorkloadTemplateSpec
    | FederatedTrustDomainSpec
    | GlobalRoleSpec
    | RoleBindingSpec
    | PolicyTestSpec
    | EventReceiverSpec
    | AnomalyPolicySpec
)


def _no_finalize(spec: dict[str, Any], name: str) -> None:
    return None


@dataclass(frozen=True)
class KindSpec:
    kind: str
    spec: Checker
    build: Callable[[dict[str, Any]], Spec]
    finalize: Callable[[dict[str, Any], str], None] = _no_finalize


KINDS: dict[str, KindSpec] = {
    k.kind: k
    for k in (
        KindSpec("Cluster", CLUSTER_SPEC, _build_cluster),
        KindSpec("Workload", WORKLOAD_SPEC, _build_workload, _finalize_workload),
        KindSpec("WorkloadTemplate", WORKLOAD_TEMPLATE_SPEC, build_workload_template),
        KindSpec(
            "FederatedTrustDomain", FEDERATED_TRUST_DOMAIN_SPEC, _build_federated_trust_domain
        ),
        KindSpec(
            "EventReceiver",
            EVENT_RECEIVER_SPEC,
            _build_event_receiver,
            _finalize_event_receiver,
        ),
        KindSpec("GlobalRole", GLOBAL_ROLE_SPEC, build_global_role),
        KindSpec("RoleBinding", ROLE_BINDING_SPEC, build_role_binding),
        KindSpec("PolicyTest", POLICY_TEST_SPEC, build_policy_test),
        KindSpec("AnomalyPolicy", ANOMALY_POLICY_SPEC, build_anomaly_policy),
    )
}
