"""The two decision surfaces (``agent/hot.py``), over real sockets, through the server's
fast paths and as plain ASGI: an agent built as ``trustmesh agent`` builds it, served
by the same bounded uvicorn server (``common/serving.py``), asked over loopback. Both
answer exactly as the Starlette routes they replace did — paths, methods, status codes,
JSON errors, the body bound, the server's limits — and every decision is in the spool
before its answer."""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from agent_support import FakeClock, app_of, local_agent
from test_decide import Federation

from tls_support import make_tls
from trustmesh.agent.hot import MAX_AUTHORIZE_BODY, HotSurfaces
from trustmesh.agent.spool import segment_name
from trustmesh.common.limits import HttpLimits
from trustmesh.common.serving import BackgroundServer, FastRoute
from trustmesh.common.tls import ServerTls

ORDERS = {"host": "orders.shop.svc", "path": "/api/orders/42", "method": "GET"}


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    federation = Federation(tmp_path, FakeClock(), staleness_bound=300)
    yield federation
    federation.agent.spool.close()


@pytest.fixture(params=["asgi", "fast"])
def served(federation: Federation, request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    """The agent's app served as ``trustmesh agent`` serves it: through the server's
    fast paths (``fast``), and as plain ASGI (as any request the fast paths decline)."""
    limits = HttpLimits(header_timeout=1.0, body_timeout=1.0)
    app = app_of(federation.agent)
    fast = app if request.param == "fast" else None
    with BackgroundServer(app, limits=limits, fast=fast) as server:
        yield server


@pytest.fixture
def http(served: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        yield client


def spooled_lines(federation: Federation) -> int:
    path = federation.agent.config.data_dir / "audit-spool" / segment_name(1)
    return path.read_bytes().count(b"\n")


def exchange(served: BackgroundServer, raw: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes
    (or ``wait`` seconds pass)."""
    with socket.create_connection((served.host, served.port), timeout=wait) as sock:
        sock.sendall(raw)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def parsed(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


# -- /v1/authorize ------------------------------------------------------------------------


def test_authorize_answers_the_decision_with_the_identity(
    federation: Federation, http: httpx.Client
) -> None:
    token = federation.svid()
    allowed = http.post("/v1/authorize", json={"token": token, "request": ORDERS})
    denied = http.post(
        "/v1/authorize", json={"token": token, "request": {**ORDERS, "method": "DELETE"}}
    )
    assert allowed.status_code == denied.status_code == 200
    assert allowed.headers["content-type"] == "application/json"
    body = allowed.json()
    assert body["allowed"] is True and body["authenticated"] is True
    assert body["identity"]["workload_id"] == "payments" and body["identity"]["claims"]
    assert body["policy_revision"] == 7 and body["bindings"] == ["shop-reads"]
    assert denied.json()["allowed"] is False and denied.json()["denied"] is False


def test_authorize_answers_a_bad_token_401_with_its_challenge(http: httpx.Client) -> None:
    answer = http.post("/v1/authorize", json={"token": "not.a.jwt", "request": ORDERS})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert answer.json()["authenticated"] is False and answer.json()["error"] == "invalid_token"


@pytest.mark.parametrize(
    ("content", "headers", "status", "description"),
    [
        (b"{}", {"content-type": "text/plain"}, 400, "Content-Type must be application/json"),
        (b"{", {}, 400, "request body is not valid JSON"),
        (b"[1]", {}, 400, "request body must be a JSON object"),
        (b'{"request": {}}', {}, 400, "body needs a string field token"),
        (b'{"token": ""}', {}, 400, "body needs a string field token"),
        (b"\xff\xfe{", {}, 400, "request body is not valid JSON"),
        (b" " * (MAX_AUTHORIZE_BODY + 1), {}, 413, "request body is larger than 65536 bytes"),
    ],
)
def test_authorize_refuses_bad_bodies_with_a_json_error(
    http: httpx.Client, content: bytes, headers: dict[str, str], status: int, description: str
) -> None:
    answer = http.post(
        "/v1/authorize", content=content, headers={"content-type": "application/json", **headers}
    )
    assert answer.status_code == status
    assert answer.json()["error_description"] == description
    assert answer.json()["error"] == "invalid_request"
    assert answer.headers["cache-control"] == "no-store"


def test_a_body_orjson_refuses_is_read_as_the_stdlib_reads_it(http: httpx.Client) -> None:
    """NaN, integers beyond 64 bits: JSON the stdlib took before takes the same path
    (here to the token check), not a 400."""
    request = orjson.dumps(ORDERS)
    content = b'{"token": "not.a.jwt", "n": NaN, "big": 123456789012345678901234567890, '
    content += b'"request": ' + request + b"}"
    answer = http.post(
        "/v1/authorize", content=content, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 401 and answer.json()["reason"] == "malformed"


def test_a_request_the_canonicalisation_refuses_is_a_400_naming_the_field(
    federation: Federation, http: httpx.Client
) -> None:
    answer = http.post(
        "/v1/authorize",
        json={"token": federation.svid(), "request": {**ORDERS, "path": "/api/../admin"}},
    )
    assert answer.status_code == 400 and "request.path" in answer.json()["error_description"]


def test_only_post_and_only_the_exact_paths_are_the_decision_surfaces(
    http: httpx.Client,
) -> None:
    wrong_method = http.get("/v1/authorize")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {
        "error": "method_not_allowed",
        "error_description": "GET is not allowed on /v1/authorize",
    }
    for path in ("/v1/authorize/", "/ext_authz", "/v1/authorize/x"):
        answer = http.post(path, json={})
        assert answer.status_code == 404, path
        assert answer.json()["error"] == "not_found"
    assert http.get("/healthz").json() == {"ok": True}  # the rest: the Starlette app


@pytest.mark.parametrize("fast", [False, True])
def test_no_bundle_yet_is_a_503(tmp_path: Path, fast: bool) -> None:
    agent = local_agent(tmp_path / "agent")
    app = app_of(agent)
    try:
        with BackgroundServer(app, fast=app if fast else None) as server:
            answer = httpx.post(
                server.url + "/v1/authorize", json={"token": "x", "request": ORDERS}
            )
            check = httpx.get(server.url + "/ext_authz/api", headers={"host": "a.svc"})
    finally:
        agent.spool.close()
    assert answer.status_code == 503 and answer.json()["error"] == "not_ready"
    assert answer.headers["retry-after"] == "1"
    assert check.status_code == 503 and check.json()["error"] == "not_ready"


def test_every_decision_is_spooled_before_its_answer_arrives(
    federation: Federation, http: httpx.Client
) -> None:
    token = federation.svid()
    for round_ in range(1, 6):
        request = ORDERS if round_ % 2 else {**ORDERS, "method": "PUT"}
        assert http.post("/v1/authorize", json={"token": token, "request": request}).is_success
        assert spooled_lines(federation) == 2 * round_ - 1
        assert http.request(
            request["method"],
            "/ext_authz/api/orders/42",
            headers={"host": "orders.shop.svc", "authorization": f"Bearer {token}"},
        ).status_code == (200 if round_ % 2 else 403)
        assert spooled_lines(federation) == 2 * round_


def test_a_client_that_leaves_mid_body_gets_no_decision(
    federation: Federation, served: BackgroundServer, http: httpx.Client
) -> None:
    body = orjson.dumps({"token": federation.svid(), "request": ORDERS})
    head = (
        b"POST /v1/authorize HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection((served.host, served.port)) as sock:
        sock.sendall(head + body[:20])
    assert http.post("/v1/authorize", json={"token": "x.y.z", "request": ORDERS}).status_code == 401
    assert spooled_lines(federation) == 1  # only the second question's refusal


def test_the_server_bounds_hold_on_the_decision_surfaces(served: BackgroundServer) -> None:
    """Head size and field count (431), a body that never comes (408): the bounded
    server's answers, JSON, before the surface sees the request."""
    big = b"POST /v1/authorize HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    status, _, body = parsed(exchange(served, big))
    assert status == 431 and body["error"] == "headers_too_large"
    many = b"GET /ext_authz/api HTTP/1.1\r\nHost: a\r\n" + b"X-A: 1\r\n" * 200 + b"\r\n"
    status, _, body = parsed(exchange(served, many))
    assert status == 431 and "more than 128 header fields" in body["error_description"]
    slow = b"POST /v1/authorize HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    slow += b"Content-Length: 100\r\n\r\n{"
    status, _, body = parsed(exchange(served, slow))
    assert status == 408 and body["error"] == "request_timeout"


# -- ext_authz -----------------------------------------------------------------------------


def test_ext_authz_allows_with_the_identity_headers(
    federation: Federation, http: httpx.Client
) -> None:
    token = federation.svid()
    traceparent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    answer = http.get(
        "/ext_authz/api/orders/42",
        headers={
            "host": "orders.shop.svc",
            "authorization": f"Bearer {token}",
            "traceparent": traceparent,
        },
    )
    assert answer.status_code == 200
    assert answer.json()["allowed"] is True
    assert answer.headers["x-trustmesh-spiffe-id"].startswith("spiffe://corp.example/")
    assert answer.headers["x-trustmesh-decision-id"] == answer.json()["decision_id"]
    assert answer.headers["traceparent"].startswith("00-" + "1" * 32 + "-")
    assert answer.headers["cache-control"] == "no-store"


def test_ext_authz_checks_any_method_and_head_without_a_body(
    federation: Federation, http: httpx.Client
) -> None:
    token = federation.svid()
    headers = {"host": "orders.shop.svc", "authorization": f"Bearer {token}"}
    assert http.request("PURGE", "/ext_authz/api/orders/42", headers=headers).status_code == 403
    head = http.head("/ext_authz/api/orders/42", headers=headers)
    assert head.status_code == 403 and head.content == b""  # the role allows GET only
    assert http.get("/ext_authz/api/orders/42", headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "challenge", "error"),
    [
        (None, 'Bearer realm="trustmesh"', "missing_token"),
        ("Basic abc", 'Bearer realm="trustmesh"', "missing_token"),
        ("Bearer not.a.jwt", 'Bearer realm="trustmesh", error="invalid_token"', "invalid_token"),
    ],
)
def test_ext_authz_answers_no_or_a_bad_token_401(
    http: httpx.Client, authorization: str | None, challenge: str, error: str
) -> None:
    headers = {"host": "orders.shop.svc"}
    if authorization is not None:
        headers["authorization"] = authorization
    answer = http.get("/ext_authz/api/orders/42", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == challenge
    assert answer.json()["error"] == error


def test_ext_authz_refuses_what_the_canonicalisation_refuses_403(
    federation: Federation, served: BackgroundServer
) -> None:
    token = federation.svid().encode()
    for target, hosts in (
        (b"/ext_authz/api/%2e%2e/admin", [b"orders.shop.svc"]),
        (b"/ext_authz/api//orders", [b"orders.shop.svc"]),
        (b"/ext_authz/api/orders", [b"orders.shop.svc", b"other.svc"]),
    ):
        raw = b"GET " + target + b" HTTP/1.1\r\n"
        raw += b"".join(b"Host: " + host + b"\r\n" for host in hosts)
        raw += b"Authorization: Bearer " + token + b"\r\nConnection: close\r\n\r\n"
        status, headers, body = parsed(exchange(served, raw))
        assert status == 403, target
        assert body["error"] == "invalid_request" and body["allowed"] is False
        assert headers["cache-control"] == "no-store"


def test_both_surfaces_decide_alike(federation: Federation, http: httpx.Client) -> None:
    token = federation.svid()
    for method, allowed in (("GET", True), ("DELETE", False)):
        request = {**ORDERS, "method": method}
        native = http.post("/v1/authorize", json={"token": token, "request": request}).json()
        envoy = http.request(
            method,
            "/ext_authz" + ORDERS["path"],
            headers={"host": ORDERS["host"], "authorization": f"Bearer {token}"},
        )
        assert native["allowed"] is allowed and (envoy.status_code == 200) is allowed


# -- what the fast paths hand to the ASGI path, and what they keep -------------------------


def test_pipelined_questions_are_answered_in_order(
    federation: Federation, served: BackgroundServer
) -> None:
    token = federation.svid().encode()
    check = b"GET /ext_authz/api/orders/%d HTTP/1.1\r\nHost: orders.shop.svc\r\n"
    check += b"Authorization: Bearer " + token + b"\r\n\r\n"
    body = orjson.dumps({"token": token.decode(), "request": {**ORDERS, "method": "PUT"}})
    native = b"POST /v1/authorize HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    native += b"Content-Length: %d\r\n\r\n" % len(body) + body
    raw = check % 1 + native + check % 2 + b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
    raw += b"Connection: close\r\n\r\n"
    received = exchange(served, raw)
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
    assert statuses == [200, 200, 200, 200]
    assert received.index(b'"allowed":false') < received.rindex(b'"allowed":true')
    assert received.endswith(b'{"ok":true}')
    assert spooled_lines(federation) == 3


def test_expect_continue_and_chunked_bodies_are_answered_alike(
    federation: Federation, served: BackgroundServer
) -> None:
    body = orjson.dumps({"token": federation.svid(), "request": ORDERS})
    head = b"POST /v1/authorize HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    with socket.create_connection((served.host, served.port), timeout=10) as sock:
        sock.sendall(head + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, answer = parsed(sock.recv(65536))
    assert status == 200 and answer["allowed"] is True
    chunked = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunked += b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    status, _, answer = parsed(exchange(served, chunked))
    assert status == 200 and answer["allowed"] is True
    too_big = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    too_big += (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 3 + b"0\r\n\r\n"
    status, _, answer = parsed(exchange(served, too_big))
    assert (
        status == 413 and answer["error_description"] == "request body is larger than 65536 bytes"
    )
    assert spooled_lines(federation) == 2


def test_http_1_0_and_connection_close_end_the_connection(
    federation: Federation, served: BackgroundServer
) -> None:
    token = federation.svid().encode()
    for version, extra in ((b"HTTP/1.0", b""), (b"HTTP/1.1", b"Connection: close\r\n")):
        raw = b"GET /ext_authz/api/orders/1 " + version + b"\r\nHost: orders.shop.svc\r\n"
        raw += b"Authorization: Bearer " + token + b"\r\n" + extra + b"\r\n"
        status, headers, _ = parsed(exchange(served, raw))  # returns once the server closes
        assert status == 200 and headers["connection"] == "close"


def test_an_unknown_key_is_learnt_before_the_answer(
    federation: Federation, served: BackgroundServer, http: httpx.Client
) -> None:
    """A token signed by a key the agent has not seen: the answer waits for the key-set
    refresh (it cannot be given at once) and is the decision with the new key."""
    from test_decide import ISSUER, TRUST_DOMAIN, signing_key

    rotated, rotated_jwk = signing_key()

    async def refresh() -> bool:
        federation.decider.authn.configure(
            issuer=ISSUER, trust_domain=TRUST_DOMAIN, jwks={"keys": [rotated_jwk]}
        )
        return True

    federation.decider.refresh_keys = refresh
    answer = http.post(
        "/v1/authorize", json={"token": federation.svid(key=rotated), "request": ORDERS}
    )
    assert answer.status_code == 200 and answer.json()["allowed"] is True
    check = http.get(
        "/ext_authz/api/orders/42",
        headers={
            "host": "orders.shop.svc",
            "authorization": f"Bearer {federation.svid(key=rotated)}",
        },
    )
    assert check.status_code == 200
    assert spooled_lines(federation) == 2


@pytest.mark.parametrize("fast", [False, True])
def test_a_connection_over_capacity_is_answered_503_on_the_decision_surfaces(
    federation: Federation, fast: bool
) -> None:
    app = app_of(federation.agent)
    limits = HttpLimits(max_connections=1)
    raw = b"GET /ext_authz/api/orders/1 HTTP/1.1\r\nHost: orders.shop.svc\r\n"
    raw += b"Authorization: Bearer " + federation.svid().encode() + b"\r\n\r\n"
    with (
        BackgroundServer(app, limits=limits, fast=app if fast else None) as server,
        socket.create_connection((server.host, server.port)) as first,
    ):
        first.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert first.recv(1000).startswith(b"HTTP/1.1 200")
        status, headers, body = parsed(exchange(server, raw))
    assert status == 503 and body["error"] == "temporarily_unavailable"
    assert headers["retry-after"] == "1"
    assert not (federation.agent.config.data_dir / "audit-spool" / segment_name(1)).read_bytes()


# -- over HTTPS: the TLS layer under the same protocol, the fast paths kept ----------------


class Claimed:
    """The agent's fast paths as the server is handed them, noting each request they
    claim: shows which requests were answered without ASGI."""

    def __init__(self, paths: HotSurfaces) -> None:
        self.paths = paths
        self.claimed: list[str] = []

    def route(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> FastRoute | None:
        route = self.paths.route(method, path, headers)
        if route is not None:
            self.claimed.append(f"{method} {path}")
        return route


def test_decisions_over_https_take_the_fast_paths_and_answer_alike(
    federation: Federation, tmp_path: Path
) -> None:
    tls = make_tls(tmp_path / "tls")
    app = app_of(federation.agent)
    claimed = Claimed(app)
    trusting = ssl.create_default_context(cafile=str(tls.ca))
    token = federation.svid()
    check_headers = {"host": "orders.shop.svc", "authorization": f"Bearer {token}"}
    with (
        BackgroundServer(app, fast=claimed, tls=ServerTls(tls.cert, tls.key)) as server,
        httpx.Client(base_url=server.url, verify=trusting, timeout=10) as https,
    ):
        assert server.url.startswith("https://")
        for method, allowed in (("GET", True), ("DELETE", False)):  # one connection, kept
            native = https.post(
                "/v1/authorize", json={"token": token, "request": {**ORDERS, "method": method}}
            )
            assert native.status_code == 200 and native.json()["allowed"] is allowed
            envoy = https.request(method, "/ext_authz" + ORDERS["path"], headers=check_headers)
            assert envoy.status_code == (200 if allowed else 403)
        assert https.get("/healthz").json() == {"ok": True}  # the Starlette app, over TLS
        # pipelined on one TLS connection: answered in order, the last through ASGI
        body = orjson.dumps({"token": token, "request": ORDERS})
        raw = b"POST /v1/authorize HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        raw += b"Content-Length: %d\r\n\r\n" % len(body) + body
        raw += b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        with (
            socket.create_connection((server.host, server.port), timeout=10) as plain,
            trusting.wrap_socket(plain, server_hostname=server.host) as secure,
        ):
            secure.sendall(raw)
            received = b""
            while chunk := secure.recv(65536):
                received += chunk
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
    assert statuses == [200, 200] and b'"allowed":true' in received
    assert received.endswith(b'{"ok":true}')
    path = "GET " + "/ext_authz" + ORDERS["path"]
    assert claimed.claimed == [
        "POST /v1/authorize",
        path,
        "POST /v1/authorize",
        path.replace("GET", "DELETE"),
        "POST /v1/authorize",
    ]
    assert spooled_lines(federation) == 5
