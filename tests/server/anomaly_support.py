"""What the escalation tests share (issue 15; docs/analytics.md, docs/ssf.md "Push
delivery"): receivers that are a Starlette app on loopback verifying every SET with
PyJWT from the control plane's JWKS alone, fetched over HTTP; the EventReceiver
manifest that points a control plane at them; and reading findings, their
``anomaly.detected`` events and the audit entries their evidence names."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from helpers import Server, eventually
from trustmesh.oauth.rfc8417 import ANOMALY_EVENT

WAIT = 60.0
TOKEN = "push-test-bearer-0f3c9d2a7b"  # what the /good receiver requires


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """``helpers.eventually`` with the awaited thing named first."""
    return eventually(check, what, timeout)


@dataclass
class Receivers:
    """What the receivers saw: per path, the verified claims of each SET accepted and
    every request's status; ``issuer``/``jwks_uri`` are the control plane's."""

    issuer: str = ""
    jwks_uri: str = ""
    accepted: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    answered: dict[str, list[int]] = field(default_factory=dict)
    headers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def anomaly(self, path: str, anomaly_id: str) -> dict[str, Any] | None:
        """The anomaly event of the SET accepted at ``path`` for finding ``anomaly_id``."""
        for claims in list(self.accepted.get(path, [])):
            event: dict[str, Any] = claims["events"][ANOMALY_EVENT]
            if event.get("id") == anomaly_id:
                return event
        return None


def receiver_app(seen: Receivers) -> Starlette:
    """``/good`` (needs the bearer token), ``/flaky`` (503 twice, then as ``/good``
    without a token), ``/refuse`` (400 with an RFC 8935 error)."""
    lock = threading.Lock()

    def verify(signed: str, audience: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(signed)
        if header.get("typ") != "secevent+jwt":
            raise jwt.InvalidTokenError(f"typ {header.get('typ')!r}")
        jwks = httpx.get(seen.jwks_uri, timeout=10).json()  # the JWKS alone, over HTTP
        keys = {k["kid"]: k for k in jwks["keys"]}
        jwk = jwt.PyJWK(keys[header["kid"]])
        claims: dict[str, Any] = jwt.decode(
            signed,
            jwk.key,
            algorithms=[jwk.algorithm_name],
            audience=audience,
            issuer=seen.issuer,
            options={"require": ["iss", "iat", "jti", "aud"]},
        )
        return claims

    async def receive(request: Request) -> Response:
        path = request.url.path
        body = (await request.body()).decode()
        with lock:
            seen.headers.setdefault(path, []).append(dict(request.headers))
            earlier = seen.answered.setdefault(path, [])
            if path == "/refuse":
                earlier.append(400)
                error = {"err": "invalid_audience", "description": "not for this SIEM"}
                return JSONResponse(error, status_code=400)
            if path == "/flaky" and len(earlier) < 2:
                earlier.append(503)
                return Response("busy", status_code=503)
            if path == "/good" and request.headers.get("authorization") != f"Bearer {TOKEN}":
                earlier.append(401)
                return Response(status_code=401)
        if request.headers.get("content-type") != "application/secevent+jwt":
            return JSONResponse({"err": "invalid_request", "description": "type"}, 400)
        try:
            claims = verify(body, f"urn:test:{path.strip('/')}")
        except (jwt.InvalidTokenError, KeyError) as exc:
            return JSONResponse({"err": "invalid_key", "description": str(exc)}, 400)
        with lock:
            seen.answered[path].append(202)
            seen.accepted.setdefault(path, []).append(claims)
        return Response(status_code=202)

    return Starlette(
        routes=[Route(p, receive, methods=["POST"]) for p in ("/good", "/flaky", "/refuse")]
    )


@contextmanager
def running_receivers() -> Iterator[Receivers]:
    """The receivers' app served by uvicorn on a loopback port, on a thread."""
    seen = Receivers()
    config = uvicorn.Config(
        receiver_app(seen), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the receivers to listen", lambda: server.started, 10)
    seen.port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield seen
    finally:
        server.should_exit = True
        thread.join(10)


def receiver_yaml(
    name: str, endpoint: str, *, events: list[str] | None = None, token_file: str | None = None
) -> str:
    lines = [
        "apiVersion: trustmesh.io/v1alpha1",
        "kind: EventReceiver",
        f"metadata: {{name: {name}}}",
        "spec:",
        f'  endpoint: "{endpoint}"',
        f"  audience: urn:test:{name}",
    ]
    if events:
        lines.append(f"  events: [{', '.join(events)}]")
    if token_file:
        lines.append(f"  authorizationTokenFile: {token_file}")
    return "\n".join(lines) + "\n"


def trust_server(receivers: Receivers, server: Server) -> None:
    """Point the receivers' verification at ``server``'s issuer and JWKS (its SSF
    configuration, over HTTP)."""
    metadata = httpx.get(server.url + "/.well-known/ssf-configuration", timeout=10).json()
    receivers.issuer, receivers.jwks_uri = metadata["issuer"], metadata["jwks_uri"]


def good_receiver(receivers: Receivers, server: Server, directory: Path) -> str:
    """The EventReceiver manifest ``good`` (every detector, ``/good``, its bearer token
    in a file under ``directory``), the receivers trusting ``server``."""
    trust_server(receivers, server)
    token_file = directory / "siem.token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    return receiver_yaml("good", receivers.url("/good"), token_file=str(token_file))


# -- findings and their evidence ---------------------------------------------------------
def anomalies(server: Server, detector: str) -> list[dict[str, Any]]:
    """``/v1/anomalies?detector=``: the detector's findings, newest first."""
    answer = server.admin.get("/v1/anomalies", params={"detector": detector})
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def entry(server: Server, index: int) -> dict[str, Any]:
    """The event of the audit entry at ``index``, read back through /v1/audit/query."""
    answer = server.admin.get("/v1/audit/query", params={"after": index - 1, "limit": 1})
    assert answer.status_code == 200, answer.text
    (found,) = answer.json()["entries"]
    assert found["index"] == index
    event: dict[str, Any] = found["event"]
    return event


def detected(server: Server, anomaly_id: str) -> dict[str, Any]:
    """The detail of the ``anomaly.detected`` event of finding ``anomaly_id`` (the one)."""
    answer = server.admin.get("/v1/audit/query", params={"type": "anomaly.detected", "limit": 1000})
    assert answer.status_code == 200, answer.text
    details = [e["event"]["detail"] for e in answer.json()["entries"]]
    (mine,) = [d for d in details if d["id"] == anomaly_id]
    assert isinstance(mine, dict)
    return mine


def counted(server: Server, detector: str) -> str:
    """The ``trustmesh_anomalies_total`` sample of ``detector`` on ``/metrics``."""
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    prefix = f'trustmesh_anomalies_total{{detector="{detector}"}} '
    (line,) = [x for x in metrics.splitlines() if x.startswith(prefix)]
    return line[len(prefix) :]
