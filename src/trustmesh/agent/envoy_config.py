"""The Envoy configuration that puts this agent's ext_authz in front of a workload
(DESIGN §9 "Claims at the gateway"), as data: ``trustmesh envoy config --cluster C``
prints it as YAML (API v3), and ``trustmesh demo`` runs its mesh with it. With an SDS
socket it adds mutual TLS with the X.509-SVID and trust bundle a ``trustmesh sidecar``
serves, so the agent (``--trust-xfcc``) can decide from the client certificate.
docs/agent-surfaces.md explains every part.

What the configuration guarantees, and why:

* **Nothing in ``x-trustmesh-*`` comes from the caller.** A ``header_mutation`` filter,
  first in the chain, removes every request header whose name starts with
  ``x-trustmesh-`` before ext_authz runs; the agent's answer then adds the identity,
  the decision id and the gateway claims (``allowed_upstream_headers``). A claim the
  identity does not carry therefore reaches the upstream from nobody.
* **The client certificate details are Envoy's own.** With mTLS the listener requires a
  client certificate that chains to ``ROOTCA`` (and names a SPIFFE ID), and
  ``forward_client_cert_details: SANITIZE_SET`` replaces any ``x-forwarded-client-cert``
  the caller sent with one element describing the verified peer (``URI`` and ``Cert``);
  without mTLS, ``SANITIZE`` drops the header.
* **A rotated SVID is presented within a bound.** Envoy takes a new SVID from SDS for
  new connections only, and keeps a busy upstream connection open indefinitely: the
  egress cluster's connections therefore live at most ``max_connection_duration``
  (then drained: no request is cut), so the certificate a peer sees is never older
  than that past a rotation — and never expired, while the bound stays below the time
  between a renewal and the expiry (under 45 % of the X.509-SVID lifetime).
* **The agent is who it says.** With an ``https`` agent, Envoy verifies the agent's
  certificate against ``--agent-ca-file`` (default: the system CA bundle) and requires
  it to name the agent's host, so nobody on the path can answer the checks.
* **Several agents, one answer.** ``--agent`` may be given once per agent replica of
  the cluster (DESIGN §10: each its own credential, sharing nothing but the control
  plane): they are the endpoints of one Envoy cluster, taken in turn. A check that
  fails at one of them (refused or reset connection, a 5xx answer) is retried once
  per other agent, at an agent not yet tried (``previous_hosts``), and an agent that
  fails twice in a row is left out for a few seconds (outlier detection), so losing
  one agent costs the callers nothing.
* **The agent knows where a request came from.** The check carries
  ``x-trustmesh-source``: the address of the downstream connection's peer
  (``%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%``, never taken from
  ``X-Forwarded-For``), recorded as the decision's ``request.source``; a client's own
  header of that name was removed first, like every ``x-trustmesh-*``.
* **Fail closed.** An agent that cannot be reached, or answers 5xx, denies (503);
  with several, only when none of them answers.
* **One reading of the path.** ``normalize_path``, ``merge_slashes`` and encoded
  slashes refused, so the agent and the upstream see the same path (DESIGN §3)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from trustmesh.agent.envoy import (
    CLAIM_HEADER_PREFIX,
    DECISION_ID_HEADER,
    NAMESPACE_HEADER,
    PREFIX,
    SOURCE_HEADER,
    SPIFFE_ID_HEADER,
    TRACEPARENT_HEADER,
)
from trustmesh.agent.envoy_defaults import DEFAULT_MAX_CONNECTION_DURATION, SYSTEM_CA_FILE
from trustmesh.agent.xfcc import HEADER as XFCC_HEADER
from trustmesh.common.addresses import parse_listen
from trustmesh.spiffeid import normalize_trust_domain

AGENT_CLUSTER = "trustmesh_agent"
UPSTREAM_CLUSTER = "upstream"
SDS_CLUSTER = "trustmesh_sds"
SVID_SECRET = "default"  # noqa: S105 (an SDS resource name, not a secret)
BUNDLE_SECRET = "ROOTCA"  # noqa: S105 (an SDS resource name)
_TYPE = "type.googleapis.com/envoy.extensions."
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
MAX_AGENTS = 16
# an agent that failed this many checks in a row is left out for EJECTION_TIME
CONSECUTIVE_FAILURES = 2
EJECTION_TIME = "5s"
_SECONDS = re.compile(r"(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,9})?s")


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(
    name: str, host: str, port: int, timeout: str = "1s", more: Sequence[tuple[str, int]] = ()
) -> dict[str, Any]:
    """A cluster of ``host:port`` (and ``more`` endpoints): STATIC for addresses, DNS
    names resolved by Envoy (LOGICAL_DNS for one endpoint, STRICT_DNS for several)."""
    endpoints = [(host, port), *more]
    if all(_is_address(h) for h, _ in endpoints):
        kind = "STATIC"
    else:
        kind = "LOGICAL_DNS" if len(endpoints) == 1 else "STRICT_DNS"
    return {
        "name": name,
        "type": kind,
        "connect_timeout": timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in endpoints]}
            ],
        },
    }


def _sds(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
        },
    }


def _http_options(http2: bool, max_connection_duration: str | None = None) -> dict[str, Any]:
    """A cluster's ``typed_extension_protocol_options``: HTTP/2 or HTTP/1.1, and how long
    one of its connections may live."""
    options: dict[str, Any] = {
        "@type": _TYPE + "upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {
            "http2_protocol_options" if http2 else "http_protocol_options": {}
        },
    }
    if max_connection_duration is not None:
        options["common_http_protocol_options"] = {
            "max_connection_duration": max_connection_duration
        }
    return {HTTP_OPTIONS: options}


def _sds_cluster(socket: str) -> dict[str, Any]:
    """The sidecar's SDS socket, spoken to over HTTP/2 (gRPC)."""
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http_options(http2=True),
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket}}}}]}
            ],
        },
    }


def _tls_context(trust_domain: str | None, peer: str | None = None) -> dict[str, Any]:
    """The SVID (``default``) and the bundle (``ROOTCA``) from SDS; the peer must name a
    SPIFFE ID (of ``trust_domain`` when given; exactly ``peer`` when given)."""
    if peer is not None:
        matcher = {"exact": peer}
    else:
        matcher = {"prefix": f"spiffe://{trust_domain}/" if trust_domain else "spiffe://"}
    return {
        "tls_certificate_sds_secret_configs": [_sds(SVID_SECRET)],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": matcher}]
            },
            "validation_context_sds_secret_config": _sds(BUNDLE_SECRET),
        },
    }


def _retry(others: int) -> dict[str, Any]:
    """A failed check (no answer, or a 5xx) retried at each agent not yet tried."""
    return {
        "retry_on": "5xx",
        "num_retries": others,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": _TYPE + "retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 3 * (others + 1),
    }


def _ext_authz(
    agent: tuple[str, str, int], mtls: bool, timeout: str, others: int = 0
) -> dict[str, Any]:
    """The ext_authz filter asking the agent cluster (``others``: how many more agents
    it has besides ``agent``; a failed check is retried at them)."""
    scheme, host, port = agent
    allowed = [{"exact": "authorization"}, {"exact": TRACEPARENT_HEADER}]
    if mtls:
        allowed.append({"exact": XFCC_HEADER})
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": _TYPE + "filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "allowed_headers": {"patterns": allowed},
            "http_service": {
                "server_uri": {
                    "uri": f"{scheme}://{host}:{port}",
                    "cluster": AGENT_CLUSTER,
                    "timeout": timeout,
                },
                "path_prefix": PREFIX,
                "authorization_request": {
                    "headers_to_add": [
                        {
                            "key": NAMESPACE_HEADER,
                            "value": "%METADATA(ROUTE:trustmesh:namespace)%",
                        },
                        {  # the client's address: the connection's peer, never XFF
                            "key": SOURCE_HEADER,
                            "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%",
                        },
                    ]
                },
                "authorization_response": {
                    "allowed_upstream_headers": {
                        "patterns": [
                            {"exact": SPIFFE_ID_HEADER},
                            {"exact": DECISION_ID_HEADER},
                            {"exact": TRACEPARENT_HEADER},
                            {"prefix": CLAIM_HEADER_PREFIX},
                        ]
                    },
                    "allowed_client_headers": {
                        "patterns": [
                            {"exact": "www-authenticate"},
                            {"exact": DECISION_ID_HEADER},
                            {"exact": "content-type"},
                        ]
                    },
                },
                **({"retry_policy": _retry(others)} if others else {}),
            },
        },
    }


def _strip_ours() -> dict[str, Any]:
    """Removes every ``x-trustmesh-*`` header the caller sent, before ext_authz."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": _TYPE + "filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": "x-trustmesh-"}}}
                ]
            },
        },
    }


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _TYPE + "filters.http.router.v3.Router"},
    }


def _manager(
    stat_prefix: str, route: dict[str, Any], filters: list[dict[str, Any]], mtls: bool
) -> dict[str, Any]:
    manager: dict[str, Any] = {
        "@type": _TYPE + "filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "forward_client_cert_details": "SANITIZE_SET" if mtls else "SANITIZE",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [*filters, _router()],
    }
    if mtls:
        manager["set_current_client_cert_details"] = {"uri": True, "cert": True}
    return manager


def _listener(
    name: str,
    listen: tuple[str, int],
    manager: dict[str, Any],
    transport: dict[str, Any] | None,
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
        ]
    }
    if transport is not None:
        chain = {"transport_socket": transport, **chain}
    return {"name": name, "address": _address(*listen), "filter_chains": [chain]}


def _agent_tls(hosts: Sequence[str], ca_file: str) -> dict[str, Any]:
    """TLS to https agents, verified: a certificate must chain to ``ca_file`` and name
    one of ``hosts`` (a DNS name, or an IP address SAN for an address). SNI names the
    host when there is one DNS name for them all."""
    matchers = [
        {"san_type": "IP_ADDRESS" if _is_address(h) else "DNS", "matcher": {"exact": h}}
        for h in dict.fromkeys(hosts)
    ]
    context: dict[str, Any] = {
        "@type": _TYPE + "transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "validation_context": {
                "trusted_ca": {"filename": ca_file},
                "match_typed_subject_alt_names": matchers,
            }
        },
    }
    names = set(hosts)
    if len(names) == 1 and not _is_address(hosts[0]):
        context["sni"] = hosts[0]
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _agent_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--agent {url!r} is not http(s)://HOST:PORT")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"--agent {url!r} has an invalid port") from None
    return parts.scheme, parts.hostname, port


def _agent_urls(agents: str | Sequence[str]) -> list[tuple[str, str, int]]:
    """The agents of the cluster, one scheme for all, none twice; ValueError naming
    the problem."""
    urls = [agents] if isinstance(agents, str) else list(agents)
    if not urls:
        raise ValueError("--agent: name at least one agent")
    if len(urls) > MAX_AGENTS:
        raise ValueError(f"--agent: at most {MAX_AGENTS} agents")
    parsed = [_agent_url(url) for url in urls]
    if len({scheme for scheme, _, _ in parsed}) > 1:
        raise ValueError("--agent: every agent must be http, or every agent https")
    seen: set[tuple[str, int]] = set()
    for _, host, port in parsed:
        if (host, port) in seen:
            raise ValueError(f"--agent {host}:{port} is given twice")
        seen.add((host, port))
    return parsed


def build_config(
    *,
    cluster: str,
    listen: str,
    agent: str | Sequence[str],
    upstream: str,
    admin: str,
    namespace: str | None = None,
    sds_socket: str | None = None,
    trust_domain: str | None = None,
    authz_timeout: str = "0.5s",
    egress_listen: str | None = None,
    egress_to: str | None = None,
    egress_peer: str | None = None,
    max_connection_duration: str = DEFAULT_MAX_CONNECTION_DURATION,
    agent_ca_file: str = SYSTEM_CA_FILE,
) -> dict[str, Any]:
    """The configuration as data (``trustmesh envoy config`` prints it as YAML); raises
    ValueError naming a bad flag. ``agent``: the cluster's agent, or its several agent
    replicas (one Envoy cluster, a failed check retried at another)."""
    mtls = sds_socket is not None
    if not _SECONDS.fullmatch(max_connection_duration) or not float(max_connection_duration[:-1]):
        raise ValueError(
            f"--max-connection-duration {max_connection_duration!r} is not a positive "
            "number of seconds such as 300s or 2.5s"
        )
    agents = _agent_urls(agent)
    agent_scheme, agent_host, agent_port = agents[0]
    if trust_domain is not None:
        trust_domain = normalize_trust_domain(trust_domain)
    if (egress_listen is None) != (egress_to is None):
        raise ValueError("--egress-listen and --egress-to go together")
    if egress_listen is not None and not mtls:
        raise ValueError("--egress-listen needs --sds-socket (the SVID it presents)")
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": UPSTREAM_CLUSTER}}
    if namespace:
        route["metadata"] = {"filter_metadata": {"trustmesh": {"namespace": namespace}}}
    ingress_tls = None
    if mtls:
        ingress_tls = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE + "transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": _tls_context(trust_domain),
            },
        }
    filters = [
        _strip_ours(),
        _ext_authz(agents[0], mtls, authz_timeout, others=len(agents) - 1),
    ]
    listeners = [
        _listener(
            "ingress",
            parse_listen(listen),
            _manager("ingress", route, filters, mtls),
            ingress_tls,
        )
    ]
    more = [(host, port) for _, host, port in agents[1:]]
    agent_cluster = _cluster(AGENT_CLUSTER, agent_host, agent_port, more=more)
    if more:  # an agent that keeps failing is left out a while
        agent_cluster["outlier_detection"] = {
            "consecutive_5xx": CONSECUTIVE_FAILURES,
            "interval": "1s",
            "base_ejection_time": EJECTION_TIME,
            "max_ejection_percent": 100,
        }
    if agent_scheme == "https":
        agent_cluster["transport_socket"] = _agent_tls([h for _, h, _ in agents], agent_ca_file)
    clusters = [agent_cluster, _cluster(UPSTREAM_CLUSTER, *parse_listen(upstream))]
    if egress_listen is not None and egress_to is not None:
        egress = _cluster("egress", *parse_listen(egress_to))
        egress["typed_extension_protocol_options"] = _http_options(
            http2=False, max_connection_duration=max_connection_duration
        )
        egress["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPE + "transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": _tls_context(trust_domain, egress_peer),
            },
        }
        clusters.append(egress)
        egress_route = {"match": {"prefix": "/"}, "route": {"cluster": "egress"}}
        listeners.append(
            _listener(
                "egress",
                parse_listen(egress_listen),
                _manager("egress", egress_route, [], mtls=False),
                None,
            )
        )
    if sds_socket is not None:
        clusters.append(_sds_cluster(sds_socket))
    return {
        # SDS needs the node to name itself
        "node": {"id": f"trustmesh-envoy.{cluster}", "cluster": cluster},
        "admin": {"address": _address(*parse_listen(admin))},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
