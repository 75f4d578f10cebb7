"""The orders service of the demo's mesh act: the upstream behind orders' Envoy, on
loopback, reachable only through that Envoy in the demo. It answers every request with
what reached it, as JSON: the method and path, the SPIFFE ID the agent vouched for
(``x-trustmesh-spiffe-id``), the serial and validity of the client certificate Envoy
forwarded (``x-forwarded-client-cert``, read with the agent's own XFCC parser), and the
gateway claims (``x-trustmesh-claim-*``). So the demo shows what an upstream sees: who
called, with which certificate, and the claims it may use without asking anyone."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509

from trustmesh.agent.envoy import CLAIM_HEADER_PREFIX, SPIFFE_ID_HEADER
from trustmesh.agent.xfcc import HEADER as XFCC_HEADER
from trustmesh.agent.xfcc import XfccHeader, client_certificate
from trustmesh.common.errors import TrustmeshError


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def client_certificate_seen(xfcc: str | None) -> dict[str, Any]:
    """The serial, URI and validity of the certificate an XFCC header names; empty when
    there is none (or it does not parse: the demo reports a call without a serial)."""
    if not xfcc:
        return {}
    try:
        forwarded = client_certificate(XfccHeader((xfcc.encode("latin-1"),)))
        leaf = x509.load_der_x509_certificate(forwarded.leaf)
    except (TrustmeshError, ValueError, UnicodeEncodeError):
        return {}
    return {
        "serial": serial_hex(leaf.serial_number),
        "uri": forwarded.uri,
        "not_before": leaf.not_valid_before_utc.timestamp(),
        "not_after": leaf.not_valid_after_utc.timestamp(),
    }


def what_reached(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """The answer: what this request brought (``headers`` by lowercase name)."""
    return {
        "method": method,
        "path": path,
        "spiffe_id": headers.get(SPIFFE_ID_HEADER),
        "client_certificate": client_certificate_seen(headers.get(XFCC_HEADER)),
        "claims": {
            name.removeprefix(CLAIM_HEADER_PREFIX): value
            for name, value in sorted(headers.items())
            if name.startswith(CLAIM_HEADER_PREFIX)
        },
    }


class OrdersHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Envoy pools its connections to us

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(min(length, 64 * 1024))
        headers = {name.lower(): value for name, value in self.headers.items()}
        body = json.dumps(what_reached(self.command, self.path, headers)).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the demo reports what matters; no access log on its terminal


@contextmanager
def serve_orders() -> Iterator[int]:
    """The orders service on an ephemeral loopback port; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), OrdersHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-orders", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
