"""The token endpoint's own paths, on a real control plane process (SQLite and
PostgreSQL) over real HTTP: the group commit of ``token.issued`` events (many
concurrent exchanges all audited; no token before the commit that holds its event; a
commit that fails answers 503 to everyone waiting on it and issues nothing), the cache
of verified service-account tokens (never a way around suspension, a changed registry,
a withdrawn key or expiry), and the raw ASGI route's answers to bad requests."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import psycopg
import pytest

from helpers import (
    EXCHANGE_GRANT,
    JWT_TYPE,
    Federation,
    Server,
    cluster_yaml,
    register_federation,
    serve_cluster,
    start_server,
    unique,
    workload_yaml,
)
from trustmesh.audit.checkpoint import verify_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.log import SEQUENCER_LOCK_ID
from trustmesh.sim import SimulatedCluster

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def server(tmp_path: Path, db_url: str | None) -> Iterator[Server]:
    """A control plane of its own: these tests lock and break its database."""
    started = start_server(tmp_path / "data", db_url)
    yield started
    assert started.stop() == 0, started.process.stderr()


def form(fed: Federation, token: str | None = None) -> dict[str, str]:
    return {
        "grant_type": EXCHANGE_GRANT,
        "subject_token": token if token is not None else fed.sa_token(),
        "subject_token_type": JWT_TYPE,
        "audience": fed.audience,
    }


def exchange_all(fed: Federation, tokens: list[str], timeout: float = 60) -> list[httpx.Response]:
    """Every token exchanged at once, one connection each."""

    def one(token: str) -> httpx.Response:
        return httpx.post(fed.server.url + "/oauth2/token", data=form(fed, token), timeout=timeout)

    with ThreadPoolExecutor(len(tokens)) as pool:
        return list(pool.map(one, tokens))


def issued_events(server: Server) -> list[dict[str, Any]]:
    """Every ``token.issued`` event in the log, in log order."""
    found: list[dict[str, Any]] = []
    params = {"type": "token.issued", "limit": "1000"}
    while True:
        response = server.admin.get("/v1/audit/query", params=params)
        assert response.status_code == 200, response.text
        found.extend(e["event"] for e in response.json()["entries"])
        after = response.json()["next"]
        if after is None:
            return found
        params["after"] = str(after)


def claims_of(token: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==")))


def assert_each_token_audited(server: Server, responses: list[httpx.Response]) -> None:
    """Each issued token has its own ``token.issued`` event: its jti, its hash."""
    events = {e["identity"]["jti"]: e for e in issued_events(server)}
    for response in responses:
        token = response.json()["access_token"]
        event = events[claims_of(token)["jti"]]
        assert event["detail"]["issued_token_sha256"] == hashlib.sha256(token.encode()).hexdigest()


def assert_log_consistent(server: Server) -> None:
    """Indices 0..n-1 without a hole, and a checkpoint over all of them that verifies."""
    entries: list[dict[str, Any]] = []
    while True:
        page = server.admin.get(
            "/v1/audit/entries", params={"start": len(entries), "end": len(entries) + 1000}
        )
        if page.status_code != 200 or not page.json()["entries"]:
            break
        entries.extend(page.json()["entries"])
    assert [e["index"] for e in entries] == list(range(len(entries)))
    tree = MerkleLog()
    for entry in entries:
        tree.append(base64.b64decode(entry["leaf"]))
    key = server.admin.get("/v1/audit/key").text.strip()
    deadline = time.monotonic() + 10
    while True:
        checkpoint = verify_checkpoint(server.admin.get("/v1/audit/checkpoint").text, key)
        if checkpoint.size >= len(entries) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert checkpoint.size == len(entries)
    assert tree.root(checkpoint.size) == checkpoint.root_hash


def psycopg_url(db: str) -> str:
    return db.replace("postgresql+psycopg://", "postgresql://")


# -- the group commit -----------------------------------------------------------------------


def test_concurrent_exchanges_are_each_audited_with_their_own_event(
    server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(server, sim_cluster)
    tokens = [fed.sa_token() for _ in range(48)]
    responses = exchange_all(fed, tokens) + exchange_all(fed, tokens[:24])
    assert [r.status_code for r in responses] == [200] * 72, responses[0].text
    assert len({claims_of(r.json()["access_token"])["jti"] for r in responses}) == 72
    assert len(issued_events(server)) == 72
    assert_each_token_audited(server, responses)
    assert_log_consistent(server)


class SequencerHeld:
    """Holds the audit log's one-writer lock from outside the server: on SQLite the
    database's write lock (the server's busy timeout is 10 s), on PostgreSQL the
    sequencer's advisory lock."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None

    def __enter__(self) -> SequencerHeld:
        if self.server.db is None:
            self._sqlite = sqlite3.connect(
                self.server.data_dir / "trustmesh.db", isolation_level=None
            )
            self._sqlite.execute("BEGIN IMMEDIATE")
        else:
            self._pg = psycopg.connect(psycopg_url(self.server.db), autocommit=True)
            self._pg.execute("SELECT pg_advisory_lock(%s)", (SEQUENCER_LOCK_ID,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sqlite is not None:
            self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
        if self._pg is not None:
            self._pg.execute("SELECT pg_advisory_unlock(%s)", (SEQUENCER_LOCK_ID,))
            self._pg.close()


def test_no_token_leaves_before_the_commit_that_holds_its_event(
    server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(server, sim_cluster)
    assert fed.server.exchange(fed.sa_token(), fed.audience).status_code == 200  # keys fetched
    tokens = [fed.sa_token() for _ in range(12)]
    answered: list[httpx.Response] = []
    with SequencerHeld(server):
        threads = [
            threading.Thread(
                target=lambda t=token: answered.append(
                    httpx.post(server.url + "/oauth2/token", data=form(fed, t), timeout=60)
                )
            )
            for token in tokens
        ]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        # the exchanges are done but for their audit event, which cannot be committed
        # while the log is held: no caller has a token yet
        assert answered == []
        assert all(thread.is_alive() for thread in threads)
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answered] == [200] * len(tokens)
    assert_each_token_audited(server, answered)
    assert_log_consistent(server)


def refuse_commits(server: Server) -> None:
    """Make every commit that adds audit entries fail at COMMIT (a deferred constraint),
    as a database that cannot take the write would: the statements succeed, the commit
    does not."""
    if server.db is None:
        with sqlite3.connect(server.data_dir / "trustmesh.db") as conn:
            conn.executescript(
                """
                CREATE TABLE test_guard_parent (id INTEGER PRIMARY KEY);
                CREATE TABLE test_guard (
                    ref INTEGER REFERENCES test_guard_parent(id) DEFERRABLE INITIALLY DEFERRED
                );
                CREATE TRIGGER test_refuse_commit AFTER INSERT ON audit_entries
                BEGIN INSERT INTO test_guard (ref) VALUES (1); END;
                """
            )
        return
    with psycopg.connect(psycopg_url(server.db), autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION test_refuse_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'the test refuses this commit'; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER test_refuse_commit AFTER INSERT ON audit_entries "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_refuse_commit()"
        )


def accept_commits(server: Server) -> None:
    if server.db is None:
        with sqlite3.connect(server.data_dir / "trustmesh.db") as conn:
            conn.executescript(
                "DROP TRIGGER test_refuse_commit; DROP TABLE test_guard; "
                "DROP TABLE test_guard_parent;"
            )
        return
    with psycopg.connect(psycopg_url(server.db), autocommit=True) as conn:
        conn.execute("DROP TRIGGER test_refuse_commit ON audit_entries")
        conn.execute("DROP FUNCTION test_refuse_commit()")


def entry_count(server: Server) -> int:
    return int(server.admin.get("/readyz").json()["audit_size"])


def test_a_failed_commit_answers_503_to_every_waiting_exchange_and_issues_nothing(
    server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(server, sim_cluster)
    assert fed.server.exchange(fed.sa_token(), fed.audience).status_code == 200
    assert_log_consistent(server)
    before = len(issued_events(server))
    size = entry_count(server)

    refuse_commits(server)
    try:
        refused = exchange_all(fed, [fed.sa_token() for _ in range(24)])
    finally:
        accept_commits(server)
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json() == {
            "error": "temporarily_unavailable",
            "error_description": "the audit log cannot be written; "
            "no token is issued without its audit record",
        }
        assert "access_token" not in response.text
    assert len(issued_events(server)) == before
    assert entry_count(server) == size  # nothing half-written, in the database or the tree
    metrics = httpx.get(server.url + "/metrics").text
    assert 'trustmesh_token_exchanges_total{result="audit_unavailable"} 24.0' in metrics

    # the database takes writes again: so does the log, from where it stood
    answered = exchange_all(fed, [fed.sa_token() for _ in range(8)])
    assert [r.status_code for r in answered] == [200] * 8
    assert_each_token_audited(server, answered)
    assert len(issued_events(server)) == before + 8
    assert_log_consistent(server)


# -- the verified SA-token cache ------------------------------------------------------------


def cache_hits(server: Server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("trustmesh_sa_token_cache_hits "):
            return float(line.split()[1])
    raise AssertionError("no trustmesh_sa_token_cache_hits metric")


def exchange_error(fed: Federation, token: str) -> tuple[int, str, str]:
    response = fed.server.exchange(token, fed.audience)
    body = response.json()
    return response.status_code, body.get("error", ""), body.get("error_description", "")


def test_a_cached_token_is_refused_once_its_subject_is_suspended(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    fed = register_federation(server, sim_cluster)
    token = fed.sa_token()
    hits = cache_hits(server)
    assert fed.server.exchange(token, fed.audience).status_code == 200
    assert fed.server.exchange(token, fed.audience).status_code == 200
    assert cache_hits(server) == hits + 1  # the second exchange verified nothing again

    suspended = server.admin.post(
        "/v1/suspensions", json={"kind": "workload", "value": fed.workload, "reason": "test"}
    )
    assert suspended.status_code == 201, suspended.text
    status, error, description = exchange_error(fed, token)
    assert (status, error) == (400, "invalid_grant")
    assert f"workload {fed.workload} is suspended" in description
    resumed = server.admin.post(
        "/v1/suspensions/resume", json={"kind": "workload", "value": fed.workload}
    )
    assert resumed.status_code == 200, resumed.text
    assert fed.server.exchange(token, fed.audience).status_code == 200


def test_a_cached_token_follows_registry_changes(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    server = shared_server
    fed = register_federation(server, sim_cluster)
    token = fed.sa_token()
    assert fed.server.exchange(token, fed.audience).status_code == 200
    hits = cache_hits(server)
    assert fed.server.exchange(token, fed.audience).status_code == 200
    assert cache_hits(server) == hits + 1

    # the cluster now expects another audience: the token (aud trustmesh) no longer fits
    server.apply(cluster_yaml(fed.origin_name, sim_cluster.issuer, audience="elsewhere"))
    status, error, description = exchange_error(fed, token)
    assert (status, error) == (400, "invalid_grant")
    assert "audience" in description
    server.apply(cluster_yaml(fed.origin_name, sim_cluster.issuer, audience="trustmesh"))
    assert fed.server.exchange(token, fed.audience).status_code == 200

    # its service account moves to another workload: the token names the new one
    moved = unique("wl-")
    server.apply(
        workload_yaml(fed.workload, fed.origin_name, "shop", "orders")
        + "---\n"
        + workload_yaml(moved, fed.origin_name, "shop", "payments")
    )
    answer = fed.server.exchange(token, fed.audience)
    assert answer.status_code == 200, answer.text
    events = [e for e in issued_events(server) if e["identity"]["workload"] == moved]
    assert [e["identity"]["jti"] for e in events] == [
        claims_of(answer.json()["access_token"])["jti"]
    ]


def test_a_cached_token_is_refused_once_its_key_is_withdrawn(shared_server: Server) -> None:
    server = shared_server
    with serve_cluster("inline") as cluster:
        origin, target, workload = unique("origin-"), unique("target-"), unique("wl-")
        server.apply(
            "---\n".join(
                [
                    cluster_yaml(origin, cluster.issuer, jwks=json.dumps(cluster.jwks())),
                    cluster_yaml(target, f"http://127.0.0.1:9/{target}"),
                    workload_yaml(workload, origin, "shop", "payments"),
                ]
            )
        )
        fed = Federation(server, cluster, origin, target, workload)
        token = fed.sa_token()
        assert fed.server.exchange(token, fed.audience).status_code == 200
        hits = cache_hits(server)
        assert fed.server.exchange(token, fed.audience).status_code == 200
        assert cache_hits(server) == hits + 1

        old_kid = cluster.signing_kid
        cluster.rotate_key()
        cluster.drop_key(old_kid)
        server.apply(cluster_yaml(origin, cluster.issuer, jwks=json.dumps(cluster.jwks())))
        status, error, description = exchange_error(fed, token)
        assert (status, error) == (400, "invalid_grant")
        assert "key" in description
        assert fed.server.exchange(fed.sa_token(), fed.audience).status_code == 200


def test_a_cached_token_is_refused_once_it_expires(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    now = time.time()
    # valid (with the 30 s leeway) for 4 more seconds
    token = sim_cluster.mint("shop", "payments", now=now - 600, ttl=600 - 26)
    assert fed.server.exchange(token, fed.audience).status_code == 200
    assert fed.server.exchange(token, fed.audience).status_code == 200
    time.sleep(max(0.0, now + 5 - time.time()))
    status, error, description = exchange_error(fed, token)
    assert (status, error) == (400, "invalid_grant")
    assert "expired" in description


# -- the raw route's answers ---------------------------------------------------------------


def raw_http(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; read one response (Content-Length framed)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk
            body += chunk
    return int(lines[0].split()[1]), headers, body


def request(url: str, head: str, body: bytes = b"") -> bytes:
    """``head``: the request line's method and the header lines after Host."""
    method, _, rest = head.partition("\n")
    lines = [f"{method} /oauth2/token HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
    lines += [line for line in rest.split("\n") if line]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post(url: str, body: bytes, content_type: str | None = FORM) -> bytes:
    head = "POST\n" + (f"Content-Type: {content_type}\n" if content_type else "")
    return request(url, head + f"Content-Length: {len(body)}", body)


NOT_A_FORM = "request body is not a valid form-encoded parameter list"


def test_bad_requests_get_the_same_json_answers_as_every_endpoint(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    url = shared_server.url
    big = b"a=" + b"x" * (64 * 1024)
    chunked = b"".join(
        f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for piece in (big[i : i + 8192] for i in range(0, len(big), 8192))
    )
    cases: list[tuple[str, bytes, int, str, str]] = [
        (
            "another method",
            request(url, "GET"),
            405,
            "method_not_allowed",
            "GET is not allowed on /oauth2/token",
        ),
        (
            "json",
            post(url, b"{}", "application/json"),
            400,
            "invalid_request",
            f"Content-Type must be {FORM}",
        ),
        (
            "no content type",
            post(url, b"grant_type=x", None),
            400,
            "invalid_request",
            f"Content-Type must be {FORM}",
        ),
        (
            "declared too large",
            request(url, f"POST\nContent-Type: {FORM}\nContent-Length: 70000"),
            413,
            "invalid_request",
            "request body is larger than 65536 bytes",
        ),
        (
            "streamed too large",
            request(
                url,
                f"POST\nContent-Type: {FORM}\nTransfer-Encoding: chunked",
                chunked + b"0\r\n\r\n",
            ),
            413,
            "invalid_request",
            "request body is larger than 65536 bytes",
        ),
        ("not UTF-8", post(url, b"\xff\xfe=\x00"), 400, "invalid_request", NOT_A_FORM),
        ("a field without =", post(url, b"grant_type"), 400, "invalid_request", NOT_A_FORM),
        ("an empty field", post(url, b"a=1&&b=2"), 400, "invalid_request", NOT_A_FORM),
        (
            "41 fields",
            post(url, b"&".join([b"a=1"] * 41)),
            400,
            "invalid_request",
            NOT_A_FORM,
        ),
        (
            "empty",
            post(url, b""),
            400,
            "invalid_request",
            "missing required parameter grant_type",
        ),
        (
            "repeated",
            post(url, b"grant_type=a&grant_type=b"),
            400,
            "invalid_request",
            "parameter grant_type must not be repeated (RFC 6749 §3.2)",
        ),
        (
            "no subject token",
            post(url, b"grant_type=" + EXCHANGE_GRANT.replace(":", "%3A").encode()),
            400,
            "invalid_request",
            "missing required parameter subject_token",
        ),
    ]
    for name, raw, status, error, description in cases:
        got_status, headers, body = raw_http(url, raw)
        assert got_status == status, (name, got_status, body)
        assert headers["content-type"] == "application/json", name
        assert headers["cache-control"] == "no-store", name
        assert json.loads(body) == {"error": error, "error_description": description}, name

    # a caller that leaves before its body arrived costs nothing and changes nothing
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 10) as sock:
        sock.sendall(request(url, f"POST\nContent-Type: {FORM}\nContent-Length: 99", b"grant"))
    answer = httpx.post(url + "/oauth2/token", data=form(fed))
    assert answer.status_code == 200, answer.text
    assert answer.headers["pragma"] == "no-cache" and answer.headers["cache-control"] == "no-store"
    assert answer.headers["traceparent"].startswith("00-")
    claims = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == [fed.audience]
