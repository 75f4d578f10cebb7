"""The console's sessions as the server enforces them, over real HTTP: no session is a
401; a change made with the session cookie needs the CSRF token and the console's own
origin (403 otherwise); only people sign in (the bootstrap token and cluster
credentials cannot); a removed person's or a rotated credential's session ends at once;
the cookie is HttpOnly, SameSite=Strict, and over HTTPS Secure with the __Host- prefix;
the security headers are on every console answer; signing in and out are audit
events naming the session by a hash prefix (never the cookie or the credential), a
live credential refused is one too, and a flood of credentials that are not valid is
folded like refused exchanges. Expiry (idle 30 min, absolute 8 h) is checked on the
session store with an injected clock, against a real database."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from console_support import Console

from helpers import Server, cluster_yaml, start_server, unique
from tls_support import make_tls
from trustmesh.audit.log import AuditLog
from trustmesh.identity.sealing import MasterKey
from trustmesh.server.credentials import PERSON, CredentialStore
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.routes.console import CSP
from trustmesh.server.sessions import ABSOLUTE, IDLE, SessionStore
from trustmesh.storage import open_database

KEEP = "---\napiVersion: trustmesh.io/v1alpha1\nkind: Nope\n"  # any body: refused as 400


@contextmanager
def signed_in(console: Console, token: str) -> Iterator[tuple[httpx.Client, str]]:
    """A client holding a session cookie (as a browser would) and the session's CSRF."""
    with httpx.Client(base_url=console.server.url, timeout=10) as client:
        answer = client.post("/console/session", json={"credential": token})
        assert answer.status_code == 200, answer.text
        yield client, str(answer.json()["csrf"])


def test_without_a_session_every_read_is_a_401_in_json(console: Console) -> None:
    with httpx.Client(base_url=console.server.url, timeout=10) as client:
        for path in ("/console/session", "/console/events", "/v1/overview", "/v1/clusters"):
            answer = client.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json()["error"] == "invalid_token"
        client.cookies.set("trustmesh_session", "forged-session-id")
        assert client.get("/v1/overview").status_code == 401
        assert client.post("/console/session/end").status_code == 401


def test_a_change_with_the_cookie_needs_the_csrf_token_and_our_origin(console: Console) -> None:
    body = {"files": [{"path": "x.yaml", "content": KEEP}]}
    with signed_in(console, console.tokens["admin"]) as (client, csrf):
        for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": ""}):
            answer = client.post("/v1/apply", json=body, headers=headers)
            assert answer.status_code == 403, headers
            assert answer.json()["error"] == "csrf_failed"
        evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        answer = client.post("/v1/apply", json=body, headers=evil)
        assert answer.status_code == 403
        assert answer.json()["error"] == "csrf_failed"
        # with both, from our own origin, the change reaches the route (which refuses
        # the manifest on its merits: 400, not 403)
        own = {"X-CSRF-Token": csrf, "Origin": console.server.url}
        answer = client.post("/v1/apply", json=body, headers=own)
        assert answer.status_code == 400, answer.text
        # reads need no token; signing out does
        assert client.get("/v1/overview").status_code == 200
        assert client.post("/console/session/end").status_code == 403
        assert client.get("/console/session").status_code == 200
        assert (
            client.post("/console/session/end", headers={"X-CSRF-Token": csrf}).status_code == 200
        )
        assert client.get("/console/session").status_code == 401


def test_roles_hold_through_the_cookie_as_through_the_credential(console: Console) -> None:
    with signed_in(console, console.tokens["auditor"]) as (client, csrf):
        name = unique("by-auditor-")
        answer = client.post(
            "/v1/apply",
            json={"files": [{"path": "c.yaml", "content": cluster_yaml(name, "http://x/")}]},
            headers={"X-CSRF-Token": csrf},
        )
        assert answer.status_code == 403
        assert "auditor role" in answer.json()["error_description"]


def test_a_sign_in_from_another_origin_is_refused(console: Console) -> None:
    answer = httpx.post(
        console.server.url + "/console/session",
        json={"credential": console.tokens["auditor"]},
        headers={"Origin": "http://evil.example"},
        timeout=10,
    )
    assert answer.status_code == 403
    assert "set-cookie" not in answer.headers


def test_cluster_credentials_and_the_bootstrap_token_cannot_sign_in(console: Console) -> None:
    cluster = unique("signin-")
    console.server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    credential = console.server.credential(cluster)
    answer = httpx.post(
        console.server.url + "/console/session", json={"credential": credential}, timeout=10
    )
    assert answer.status_code == 403
    assert "people only" in answer.json()["error_description"]
    assert "set-cookie" not in answer.headers
    bootstrap = (console.server.data_dir / "admin.token").read_text().strip()
    answer = httpx.post(
        console.server.url + "/console/session", json={"credential": bootstrap}, timeout=10
    )
    assert answer.status_code == 401  # an admin person exists: the bootstrap is refused
    assert "set-cookie" not in answer.headers


def test_removing_the_person_or_rotating_their_credential_ends_the_session(
    console: Console,
) -> None:
    name = unique("leaver-")
    token = console.add_person(name, "auditor")
    with signed_in(console, token) as (client, _):
        assert client.get("/console/session").json()["person"] == name
        removed = console.server.admin.post(f"/v1/people/{name}/remove", json={"reason": "left"})
        assert removed.status_code == 200, removed.text
        assert client.get("/console/session").status_code == 401
        assert client.get("/v1/overview").status_code == 401

    name = unique("rotated-")
    token = console.add_person(name, "approver")
    with signed_in(console, token) as (client, _):
        people = console.server.admin.get("/v1/credentials").json()["credentials"]
        (credential,) = [c["id"] for c in people if c["person"] == name]
        rotated = console.server.admin.post(f"/v1/credentials/{credential}/rotate", json={})
        assert rotated.status_code == 200, rotated.text
        assert client.get("/console/session").status_code == 401
        # the replaced secret still works for programs during its overlap, but opens no
        # new session; the new one does
        answer = client.post("/console/session", json={"credential": token})
        assert answer.status_code == 401
        assert "rotation" in answer.json()["error_description"]
        assert (
            client.post(
                "/console/session", json={"credential": rotated.json()["token"]}
            ).status_code
            == 200
        )


def test_cookie_flags_and_security_headers_over_http(console: Console) -> None:
    answer = httpx.post(
        console.server.url + "/console/session",
        json={"credential": console.tokens["auditor"]},
        timeout=10,
    )
    assert answer.status_code == 200
    cookie = answer.headers["set-cookie"]
    parts = [p.strip().lower() for p in cookie.split(";")]
    assert parts[0].startswith("trustmesh_session=")
    assert {"httponly", "samesite=strict", "path=/"} <= set(parts)
    assert "secure" not in parts  # plain HTTP on loopback (a Secure cookie would not stick)
    assert console.tokens["auditor"] not in cookie
    for headers in (answer.headers, httpx.get(console.server.url + "/console/").headers):
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
    page = httpx.get(console.server.url + "/console/").text
    assert "<script>" not in page and "style=" not in page  # nothing inline (CSP)
    api = httpx.get(
        console.server.url + "/v1/overview", cookies={"trustmesh_session": "x"}, timeout=10
    )
    assert api.headers["cache-control"] == "no-store"
    assert httpx.get(console.server.url + "/console/../admin.token").status_code == 404


def test_over_https_the_cookie_is_secure_with_the_host_prefix(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    context = ssl.create_default_context(cafile=str(tls.ca))
    server = start_server(tmp_path / "cp", None, *tls.flags(), verify=context)
    try:
        assert server.url.startswith("https://")
        # the bootstrap token is live here (no admin person yet), and still no sign-in
        answer = server.admin.post("/console/session", json={"credential": server.admin_token})
        assert answer.status_code == 403
        assert "bootstrap" in answer.json()["error_description"]
        token = server.admin.post("/v1/people", json={"name": "tls-auditor", "role": "auditor"})
        with httpx.Client(base_url=server.url, verify=context, timeout=10) as client:
            answer = client.post("/console/session", json={"credential": token.json()["token"]})
            assert answer.status_code == 200, answer.text
            parts = [p.strip().lower() for p in answer.headers["set-cookie"].split(";")]
            assert parts[0].startswith("__host-trustmesh_session=")
            assert {"secure", "httponly", "samesite=strict", "path=/"} <= set(parts)
            assert not any(p.startswith("domain=") for p in parts)
            assert client.get("/console/session").json()["person"] == "tls-auditor"
    finally:
        assert server.stop() == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_end_when_idle_and_after_eight_hours(tmp_path: Path) -> None:
    clock = Clock()
    db = open_database(None, tmp_path)
    try:
        credentials = CredentialStore(db, clock)
        _, secret = credentials.create(PERSON, "test", person="ida", role="auditor")
        audit = AuditLog(db, MasterKey(b"m" * 32), "example.org", "r1")
        sessions = SessionStore(db, credentials, AuditRecorder(audit, clock), clock)
        session_id, session = sessions.begin(secret)
        assert session.person == "ida" and session.role == "auditor"
        assert session.ends_at(IDLE) == clock.now + IDLE

        clock.now += IDLE - 1  # used just before the idle timeout: it lives on
        assert sessions.resume(session_id) is not None
        clock.now += IDLE - 1
        assert sessions.resume(session_id) is not None
        clock.now += IDLE  # then idle for the whole timeout
        assert sessions.resume(session_id) is None
        assert sessions.resume(session_id) is None  # and its row is gone

        session_id, session = sessions.begin(secret)
        end = session.expires_at
        assert end == clock.now + ABSOLUTE
        while clock.now + IDLE / 2 < end:  # busy all day long
            clock.now += IDLE / 2
            assert sessions.resume(session_id) is not None
        clock.now = end
        assert sessions.resume(session_id) is None  # 8 h after sign-in, however busy
        # the stream's checks do not count as use
        session_id, _ = sessions.begin(secret)
        clock.now += IDLE / 2
        assert sessions.resume(session_id, touch=False) is not None
        clock.now += IDLE / 2 + 1
        assert sessions.resume(session_id) is None
    finally:
        db.dispose()


def events_of(server: Server, kind: str, wanted: int = 1) -> list[dict[str, object]]:
    """The log's events of ``kind`` (oldest first), once there are ``wanted`` of them
    (refusals are written without being awaited; a window's summary when it ends)."""
    deadline = time.monotonic() + 20
    while True:
        answer = server.admin.get("/v1/audit/query", params={"type": kind, "limit": "1000"})
        assert answer.status_code == 200, answer.text
        found = [entry["event"] for entry in answer.json()["entries"]]
        if len(found) >= wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_signing_in_and_out_are_audit_events_naming_the_session_by_a_hash(
    console: Console,
) -> None:
    server = console.server
    name = unique("audited-")
    token = console.add_person(name, "approver")
    with signed_in(console, token) as (client, csrf):
        cookie = client.cookies["trustmesh_session"]
        ref = hashlib.sha256(cookie.encode()).hexdigest()[:16]
        ended = client.post("/console/session/end", headers={"X-CSRF-Token": csrf})
        assert ended.status_code == 200
    signed_in_events = [
        e for e in events_of(server, "admin.console_signed_in") if e["actor"] == f"user:{name}"
    ]
    assert len(signed_in_events) == 1, signed_in_events
    (event,) = signed_in_events
    detail = event["detail"]
    assert isinstance(detail, dict)
    assert detail["session"] == ref and detail["role"] == "approver"
    out = [e for e in events_of(server, "admin.console_signed_out") if e["actor"] == f"user:{name}"]
    assert len(out) == 1 and out[0]["detail"]["session"] == ref  # type: ignore[index]
    for logged in (event, out[0]):
        text = json.dumps(logged)
        assert cookie not in text and token not in text and csrf not in text
        assert hashlib.sha256(cookie.encode()).hexdigest() not in text  # only a prefix
    # signing out a session that is gone writes nothing more
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.cookies.set("trustmesh_session", cookie)
        assert (
            client.post("/console/session/end", headers={"X-CSRF-Token": csrf}).status_code == 401
        )
    assert [
        e for e in events_of(server, "admin.console_signed_out") if e["actor"] == f"user:{name}"
    ] == out


def test_a_live_credential_refused_a_session_is_an_audit_event_of_its_holder(
    console: Console,
) -> None:
    server = console.server
    cluster = unique("refused-signin-")
    server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    credential = server.credential(cluster)
    answer = httpx.post(
        server.url + "/console/session", json={"credential": credential}, timeout=10
    )
    assert answer.status_code == 403

    name = unique("rotating-")
    token = console.add_person(name, "auditor")
    people = server.admin.get("/v1/credentials").json()["credentials"]
    (ident,) = [c["id"] for c in people if c["person"] == name]
    assert server.admin.post(f"/v1/credentials/{ident}/rotate", json={}).status_code == 200
    answer = httpx.post(server.url + "/console/session", json={"credential": token}, timeout=10)
    assert answer.status_code == 401  # the replaced secret, within its overlap

    refused = events_of(server, "admin.console_signin_refused")
    by_actor = {e["actor"]: e["detail"] for e in refused}
    assert by_actor[f"cluster:{cluster}"]["reason"] == "not_a_person"  # type: ignore[index]
    assert by_actor[f"user:{name}"] == {  # type: ignore[comparison-overlap]
        "reason": "secret_replaced",
        "kind": "person",
        "credential_id": ident,
    }
    assert credential not in json.dumps(refused) and token not in json.dumps(refused)


def test_sign_ins_with_credentials_that_are_not_valid_are_folded_like_refused_exchanges(
    tmp_path: Path,
) -> None:
    server = start_server(
        tmp_path / "cp",
        None,
        "--audit-refusal-window",
        "2",
        "--audit-refusal-per-source",
        "2",
        "--audit-refusal-quota",
        "3",
    )
    try:
        guesses = [f"tmu_guess{n}_{unique('x')}" for n in range(12)]
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for guess in guesses:
                answer = client.post("/console/session", json={"credential": guess})
                assert answer.status_code == 401, answer.text
        individual = [
            e
            for e in events_of(server, "token.exchange_failed", 2)
            if e["request"] == {"surface": "console"}
        ]
        assert len(individual) == 2  # the per-source quota, as for refused exchanges
        assert all(e["actor"] == "anonymous" for e in individual)
        summaries = events_of(server, "audit.refusals_folded")
        assert summaries, "the window's summary was not written"
        folded = sum(s["detail"]["folded"] for s in summaries)  # type: ignore[index,misc]
        assert folded == len(guesses) - 2
        by_surface = summaries[0]["detail"]["by"]["surface"]  # type: ignore[index]
        assert by_surface["values"] == {"console": folded}
        logged = json.dumps(individual + summaries)
        assert not any(guess in logged for guess in guesses)  # no credential, not even a hash
        assert not any(hashlib.sha256(g.encode()).hexdigest() in logged for g in guesses)
    finally:
        assert server.stop() == 0
