"""``trustmesh audit …`` as users run it, against a real control plane: the log verifies
online and offline, a record altered in the database is named, proofs and checkpoints
verify -- also with an independent RFC 9162 implementation (pymerkle) and a by-hand
C2SP signed-note check -- and queries, traces and sources read back what happened."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from helpers import Federation, Server, register_federation, start_server, trustmesh_cmd
from trustmesh.audit import events as ev
from trustmesh.audit.note import verifier_key
from trustmesh.sim import SimulatedCluster
from trustmesh.storage.db import open_database

pymerkle: Any = pytest.importorskip("pymerkle", reason="pip install pymerkle for the cross-check")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd(*args),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRUSTMESH_CONFIG": "/nonexistent", "COLUMNS": "200", **(env or {})},
    )


def cli_env(server: Server) -> dict[str, str]:
    return {"TRUSTMESH_SERVER": server.url, "TRUSTMESH_TOKEN": server.admin_token}


def one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


def trace_id() -> str:
    return secrets.token_hex(16)


def exchange_traced(fed: Federation, trace: str) -> str:
    response = httpx.post(
        fed.server.url + "/oauth2/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": fed.sa_token(),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": fed.audience,
        },
        headers={"traceparent": f"00-{trace}-{secrets.token_hex(8)}-01"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def decision_event(
    fed: Federation, spool: str, seq: int, allowed: bool, trace: str | None = None
) -> dict[str, Any]:
    spiffe_id = f"spiffe://corp.example/cluster/{fed.origin_name}/ns/shop/sa/payments"
    return ev.new_event(
        ev.AUTHZ_DECISION,
        source={"kind": "agent", "id": spool, "agent": "agent-1", "seq": seq},
        cluster=fed.target_name,
        actor=spiffe_id,
        identity={"spiffe_id": spiffe_id, "origin_cluster": fed.origin_name},
        request={"surface": "envoy", "method": "GET", "host": "api.test", "path": "/orders"},
        decision={
            "allowed": allowed,
            "reason": "binding shop-read" if allowed else "no binding allows it",
            "policy_revision": 1,
        },
        trace_id=trace,
        span_id=secrets.token_hex(8) if trace else None,
    )


def ship(fed: Federation, credential: str, events: list[dict[str, Any]]) -> None:
    response = httpx.post(
        fed.server.url + "/v1/audit/events",
        json={"events": events},
        headers={"Authorization": f"Bearer {credential}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def entries(server: Server, size: int) -> list[bytes]:
    leaves: list[bytes] = []
    while len(leaves) < size:
        page = server.admin.get(
            "/v1/audit/entries", params={"start": len(leaves), "end": min(len(leaves) + 1000, size)}
        ).json()["entries"]
        assert [e["index"] for e in page] == list(range(len(leaves), len(leaves) + len(page)))
        leaves.extend(base64.b64decode(e["leaf"]) for e in page)
    return leaves


def log_size(server: Server) -> int:
    """The number of entries, read page by page."""
    start = 0
    while True:
        page = server.admin.get(
            "/v1/audit/entries", params={"start": start, "end": start + 1000}
        ).json()["entries"]
        if not page:
            return start
        start = page[-1]["index"] + 1


def wait_for_checkpoint(server: Server, size: int) -> str:
    """The latest signed note once it covers ``size`` entries (signed every 0.5 s)."""
    deadline = time.monotonic() + 15
    while True:
        note = server.admin.get("/v1/audit/checkpoint").text
        if int(note.split("\n")[1]) >= size or time.monotonic() > deadline:
            return note
        time.sleep(0.1)


# -- an independent reading of the C2SP signed note and of RFC 9162 ------------------------
def check_note_by_hand(note: str, vkey: str) -> tuple[str, int, bytes]:
    """Verify a checkpoint per c2sp.org/signed-note and tlog-checkpoint, using only
    ``cryptography``: the key hash is SHA-256(name || 0x0A || 0x01 || pubkey)[:4]."""
    name, key_hash, material = vkey.split("+", 2)
    raw = base64.b64decode(material)
    assert raw[0] == 0x01 and len(raw) == 33  # Ed25519
    expected_hash = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    assert key_hash == expected_hash.hex()
    text, _, signatures = note.rpartition("\n\n")
    text += "\n"
    signed = [line for line in signatures.splitlines() if line.startswith(f"\u2014 {name} ")]
    assert len(signed) == 1, signatures
    blob = base64.b64decode(signed[0].split(" ")[2])
    assert blob[:4] == expected_hash
    Ed25519PublicKey.from_public_bytes(raw[1:]).verify(blob[4:], text.encode())
    origin, size, root = text.splitlines()[:3]
    assert origin == name
    return origin, int(size), base64.b64decode(root)


def mth(leaves: list[bytes], start: int, end: int) -> bytes:
    """MTH(D[start:end]) computed by pymerkle."""
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    for leaf in leaves[start:end]:
        tree.append_entry(leaf)
    root: bytes = tree.get_root()
    return root


def largest_power_of_two_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_path(m: int, start: int, end: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[start:end]), RFC 9162 §2.1.3.1, written out from the RFC's text."""
    n = end - start
    if n == 1:
        return []
    k = largest_power_of_two_below(n)
    if m < k:
        return [*rfc_path(m, start, start + k, leaves), mth(leaves, start + k, end)]
    return [*rfc_path(m - k, start + k, end, leaves), mth(leaves, start, start + k)]


def rfc_subproof(m: int, start: int, end: int, complete: bool, leaves: list[bytes]) -> list[bytes]:
    """SUBPROOF(m, D[start:end], b), RFC 9162 §2.1.4.1."""
    n = end - start
    if m == n:
        return [] if complete else [mth(leaves, start, end)]
    k = largest_power_of_two_below(n)
    if m <= k:
        return [*rfc_subproof(m, start, start + k, complete, leaves), mth(leaves, start + k, end)]
    return [*rfc_subproof(m - k, start + k, end, False, leaves), mth(leaves, start, start + k)]


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def busy(shared_server: Server, sim_cluster: SimulatedCluster) -> Iterator[dict[str, Any]]:
    """A federation with issuances (one traced), a refused exchange, agent decisions
    (the same trace, and a skipped sequence number), and an admin action."""
    fed = register_federation(shared_server, sim_cluster)
    trace = trace_id()
    exchange_traced(fed, trace)
    for _ in range(3):
        fed.svid()
    shared_server.exchange("not-a-token", fed.audience)
    credential = shared_server.admin.post(
        f"/v1/clusters/{fed.target_name}/credentials", json={"agent": "agent-1"}
    ).json()["token"]
    spool = uuid.uuid4().hex
    ship(
        fed,
        credential,
        [
            decision_event(fed, spool, 1, True, trace),
            decision_event(fed, spool, 2, False),
            decision_event(fed, spool, 5, True),
        ],
    )
    source = f"{fed.target_name}/agent-1/{spool}"  # the credential's own source
    yield {
        "fed": fed,
        "trace": trace,
        "spool": spool,
        "source": source,
        "env": cli_env(shared_server),
    }


def test_verify_passes_online_and_offline(busy: dict[str, Any], shared_server: Server) -> None:
    env = busy["env"]
    result = run("audit", "verify", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every entry and checkpoint verifies" in result.stdout

    report = json.loads(run("audit", "verify", "-o", "json", env=env).stdout)
    assert report["ok"] and report["problems"] == [] and report["size"] >= 10
    assert report["checkpoints_verified"] == report["checkpoints"] >= 1
    assert report["key_source"] == "from the server"

    # offline: the tables themselves, the key derived with the master key
    offline = ["audit", "verify", "--data-dir", str(shared_server.data_dir)]
    if shared_server.db:
        offline += ["--db", shared_server.db]
    result = run(*offline, "-o", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["key_source"] == "derived from the sealed signing key"
    assert report["key"] == shared_server.admin.get("/v1/audit/key").text.strip()
    assert report["mode"].startswith("offline")

    pinned = run(*offline, "--key", report["key"])
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr


def test_a_key_that_is_not_the_logs_is_refused(busy: dict[str, Any], tmp_path: Path) -> None:
    origin = busy["fed"].server.admin.get("/v1/audit/key").text.split("+")[0]
    impostor = verifier_key(origin, Ed25519PrivateKey.generate().public_key())
    one_line_error(
        run("audit", "verify", "--key", impostor, env=busy["env"]),
        "the latest checkpoint does not verify",
    )
    key_file = tmp_path / "log.vkey"
    key_file.write_text(impostor + "\n")
    one_line_error(
        run("audit", "checkpoint", "--key", str(key_file), env=busy["env"]),
        "another key",
    )
    one_line_error(
        run("audit", "verify", "--key", "nonsense", env=busy["env"]), "--key is not a verifier key"
    )


def test_checkpoints_and_proofs_agree_with_an_independent_implementation(
    busy: dict[str, Any], shared_server: Server
) -> None:
    vkey = shared_server.admin.get("/v1/audit/key").text.strip()
    note = wait_for_checkpoint(shared_server, log_size(shared_server))
    origin, size, signed_root = check_note_by_hand(note, vkey)
    leaves = entries(shared_server, size)

    # the signed root is pymerkle's root over the exact leaf bytes served
    theirs = pymerkle.InmemoryTree(algorithm="sha256")
    for leaf in leaves:
        theirs.append_entry(leaf)
    assert theirs.get_root(size) == signed_root

    # every stored checkpoint is signed and is pymerkle's root at its size
    stored = shared_server.admin.get("/v1/audit/checkpoints").json()["checkpoints"]
    covered = [c for c in stored if c["size"] <= size]
    for item in covered:
        _, at, root = check_note_by_hand(item["note"], vkey)
        assert at == item["size"] and (at == 0 or theirs.get_root(at) == root)

    # inclusion proofs: the RFC path, pymerkle's path, and pymerkle's verifier agree
    for index in sorted({0, size // 3, size // 2, size - 1}):
        body = shared_server.admin.get(
            "/v1/audit/proof/inclusion", params={"index": index, "size": size}
        ).json()
        served = [base64.b64decode(h) for h in body["hashes"]]
        assert served == rfc_path(index, 0, size, leaves)
        their_proof = theirs.prove_inclusion(index + 1, size)
        their_path = [bytes.fromhex(h) for h in their_proof.serialize()["path"]]
        leaf_hash = hashlib.sha256(b"\x00" + leaves[index]).digest()
        assert their_path == [leaf_hash, *served]
        pymerkle.verify_inclusion(leaf_hash, signed_root, their_proof)

    # consistency proofs between signed checkpoints: the RFC proof, and pymerkle's own
    # proof verified between the two signed roots
    first = next(c for c in covered if c["size"] > 0)
    _, first_size, first_root = check_note_by_hand(first["note"], vkey)
    middle = max(1, size // 2)
    for old, old_root in ((first_size, first_root), (middle, theirs.get_root(middle))):
        if old == size:
            continue
        body = shared_server.admin.get(
            "/v1/audit/proof/consistency", params={"first": old, "second": size}
        ).json()
        served = [base64.b64decode(h) for h in body["hashes"]]
        assert served == rfc_subproof(old, 0, size, True, leaves)
        pymerkle.verify_consistency(old_root, signed_root, theirs.prove_consistency(old, size))
    assert origin == vkey.split("+")[0]


def test_proof_commands_verify_and_refuse_bad_input(
    busy: dict[str, Any], shared_server: Server
) -> None:
    env = busy["env"]
    size = int(wait_for_checkpoint(shared_server, log_size(shared_server)).split("\n")[1])
    included = run("audit", "proof", "--index", str(size - 1), "-o", "json", env=env)
    assert included.returncode == 0, included.stderr
    body = json.loads(included.stdout)
    assert body["verified"] and body["index"] == size - 1 and body["size"] >= size
    earlier = run("audit", "proof", "--index", "0", "--size", "1", env=env)
    assert earlier.returncode == 0, earlier.stderr
    assert "verified: entry 0 is in the log of 1 entries" in earlier.stdout

    checkpoint = json.loads(run("audit", "checkpoint", "-o", "json", env=env).stdout)
    assert checkpoint["size"] >= size and checkpoint["note"].startswith(checkpoint["origin"])
    sizes = [
        c["size"] for c in shared_server.admin.get("/v1/audit/checkpoints").json()["checkpoints"]
    ]
    first = next(s for s in sizes if s > 0)
    consistent = run("audit", "proof", "--first", str(first), env=env)
    assert consistent.returncode == 0, consistent.stderr
    assert f"extends the signed log at size {first}" in consistent.stdout

    for args, fragment in [
        (["--index", str(10**9)], "is not in a tree of"),
        (["--index", "0", "--size", str(10**9)], "beyond the latest signed checkpoint"),
        ([], "give --index I"),
        (["--index", "1", "--first", "1"], "give --index I"),
        (["--first", "3", "--second", "2"], "larger than --second"),
        (["--size", "3", "--first", "1"], "--size goes with --index"),
        (["--index", "-1"], "--index must be at least 0"),
    ]:
        one_line_error(run("audit", "proof", *args, env=env), fragment)


def test_query_filters_and_json(busy: dict[str, Any]) -> None:
    env, fed = busy["env"], busy["fed"]
    spiffe_id = f"spiffe://corp.example/cluster/{fed.origin_name}/ns/shop/sa/payments"

    def query(*args: str) -> list[dict[str, Any]]:
        result = run("audit", "query", *args, "--limit", "1000", "-o", "json", env=env)
        assert result.returncode == 0, result.stderr
        found: list[dict[str, Any]] = json.loads(result.stdout)["entries"]
        return found

    issued = query("--type", "token.issued", "--identity", spiffe_id)
    assert len(issued) == 4
    assert {e["event"]["identity"]["spiffe_id"] for e in issued} == {spiffe_id}
    denied = query("--cluster", fed.target_name, "--decision", "deny")
    assert [e["event"]["decision"]["allowed"] for e in denied] == [False]
    assert len(query("--cluster", fed.target_name, "--decision", "allow")) == 2
    assert len(query("--source", busy["source"])) == 3
    traced = query("--trace-id", busy["trace"].upper())
    assert {e["event"]["type"] for e in traced} == {ev.TOKEN_ISSUED, ev.AUTHZ_DECISION}
    assert len(query("--subject", spiffe_id, "--since", "10m", "--type", "token.issued")) == 4
    assert query("--subject", spiffe_id, "--until", "2000-01-01") == []

    # paging: --limit and the cursor
    page = json.loads(
        run("audit", "query", "--identity", spiffe_id, "--limit", "2", "-o", "json", env=env).stdout
    )
    assert len(page["entries"]) == 2 and page["next"] == page["entries"][-1]["index"]
    rest = json.loads(
        run(
            "audit",
            "query",
            "--identity",
            spiffe_id,
            "--after",
            str(page["next"]),
            "-o",
            "json",
            env=env,
        ).stdout
    )
    assert rest["entries"][0]["index"] > page["next"]

    table = run("audit", "query", "--cluster", fed.target_name, env=env)
    assert (
        table.returncode == 0 and "authz.decision" in table.stdout and "no binding" in table.stdout
    )

    for args, fragment in [
        (["--decision", "maybe"], "--decision must be allow or deny"),
        (["--since", "yesterday"], "--since 'yesterday' is not a time"),
        (["--trace-id", "abc"], "is not 32 hex digits"),
        (["--limit", "0"], "--limit must be between"),
    ]:
        one_line_error(run("audit", "query", *args, env=env), fragment)


def test_trace_shows_issuance_decision_and_access(busy: dict[str, Any]) -> None:
    env, fed, trace = busy["env"], busy["fed"], busy["trace"]
    result = run("audit", "trace", trace, env=env)
    assert result.returncode == 0, result.stderr
    path = (
        f"issuance from {fed.origin_name} → decision in {fed.target_name}: allow → "
        "access GET api.test/orders (envoy)"
    )
    assert path in result.stdout
    assert "binding shop-read (policy revision 1)" in result.stdout
    body = json.loads(run("audit", "trace", trace, "-o", "json", env=env).stdout)
    assert body["path"] == path.split(" → ")
    assert [e["event"]["type"] for e in body["entries"]] == [ev.TOKEN_ISSUED, ev.AUTHZ_DECISION]
    one_line_error(run("audit", "trace", trace_id(), env=env), "no audit event carries trace id")
    one_line_error(run("audit", "trace", "xyz", env=env), "is not 32 hex digits")


def test_sources_show_sequence_state_and_gaps(busy: dict[str, Any]) -> None:
    env, spool = busy["env"], busy["spool"]
    listed = json.loads(run("audit", "sources", "-o", "json", env=env).stdout)
    mine = next(s for s in listed if s["source"] == busy["source"])
    assert mine["next_seq"] == 6 and mine["gaps"] == [[3, 4]]
    table = run("audit", "sources", env=env)
    assert table.returncode == 0 and spool[:8] in table.stdout and "3-4" in table.stdout


def test_commands_without_server_or_credential_are_one_line(tmp_path: Path) -> None:
    one_line_error(run("audit", "verify", env={"TRUSTMESH_SERVER": ""}), "no control plane given")
    one_line_error(
        run(
            "audit",
            "checkpoint",
            env={"TRUSTMESH_SERVER": "http://127.0.0.1:9", "TRUSTMESH_TOKEN": ""},
        ),
        "no credential given",
    )
    one_line_error(
        run(
            "audit",
            "sources",
            env={"TRUSTMESH_SERVER": "http://127.0.0.1:9", "TRUSTMESH_TOKEN": "x"},
        ),
        "cannot reach",
    )
    one_line_error(run("audit", "verify", "--data-dir", str(tmp_path)), "no database at")
    one_line_error(run("audit", "verify", "--db", f"sqlite:///{tmp_path}/x.db"), "no database at")
    one_line_error(run("audit", "verify", "--db", "mysql://x/y"), "is not supported")


# -- offline: what trustmesh.audit.offline refuses ------------------------------------------
def test_offline_verify_refuses_a_database_without_a_log(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "trustmesh.db") as other:
        other.execute("CREATE TABLE notes (text TEXT)")
    other.close()
    one_line_error(run("audit", "verify", "--data-dir", str(tmp_path)), "holds no audit log")

    # the schema, but no server ever started on it: no sealed signing key to derive from
    empty = tmp_path / "empty"
    empty.mkdir()
    open_database(None, empty).dispose()
    one_line_error(
        run("audit", "verify", "--data-dir", str(empty)),
        "the database holds no audit signing key (meta audit_signing_key); pass --key",
    )


def test_offline_verify_needs_the_master_key_that_sealed_the_log_key(
    shared_server: Server, tmp_path: Path
) -> None:
    database = shared_server.db or f"sqlite:///{shared_server.data_dir / 'trustmesh.db'}"
    offline = ("audit", "verify", "--db", database)
    one_line_error(
        run(*offline, env={"TRUSTMESH_MASTER_KEY_FILE": ""}),
        "the log's signing key is sealed with the master key: pass --data-dir",
    )
    missing = tmp_path / "missing.key"
    one_line_error(
        run(*offline, env={"TRUSTMESH_MASTER_KEY_FILE": str(missing)}),
        f"no master key at {missing}",
    )
    another = tmp_path / "another.key"
    another.write_text(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="))
    one_line_error(
        run(*offline, env={"TRUSTMESH_MASTER_KEY_FILE": str(another)}),
        f"cannot open the audit signing key with {another}",
    )
    master = str(shared_server.data_dir / "master.key")
    result = run(*offline, "-o", "json", env={"TRUSTMESH_MASTER_KEY_FILE": master})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["key_source"] == "derived from the sealed signing key"


# -- tampering with the database ---------------------------------------------------------
def verify_problems(
    *args: str, env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    result = run("audit", "verify", *args, "-o", "json", env=env)
    line = one_line_error(result, "audit log verification failed")
    return json.loads(result.stdout)["problems"], line


def test_records_altered_in_the_database_are_named(
    tmp_path: Path, sim_cluster: SimulatedCluster
) -> None:
    server = start_server(tmp_path / "data")
    try:
        fed = register_federation(server, sim_cluster)
        for _ in range(12):
            fed.svid()
        size = log_size(server)
        wait_for_checkpoint(server, size)
        env = cli_env(server)
        offline = ("--data-dir", str(server.data_dir))
        assert run("audit", "verify", env=env).returncode == 0
        assert run("audit", "verify", *offline).returncode == 0

        db = sqlite3.connect(server.data_dir / "trustmesh.db")
        issued = [
            i for (i,) in db.execute("SELECT idx FROM audit_entries WHERE type = 'token.issued'")
        ]
        index = issued[len(issued) // 2]
        leaf, stored_hash = db.execute(
            "SELECT leaf, leaf_hash FROM audit_entries WHERE idx = ?", (index,)
        ).fetchone()
        assert '"expires_in":300' in leaf
        forged = leaf.replace('"expires_in":300', '"expires_in":3600')

        # 1. the leaf alone: offline names the index from the stored hash; online, the
        #    server's inclusion proofs narrow the failing range down to it
        with db:
            db.execute("UPDATE audit_entries SET leaf = ? WHERE idx = ?", (forged, index))
        problems, line = verify_problems(*offline)
        assert [(p["kind"], p["index"]) for p in problems] == [("altered", index)]
        assert "leaf bytes were changed" in problems[0]["message"]
        assert f"index {index} (altered)" in line
        problems, line = verify_problems(env=env)
        assert [(p["kind"], p["index"]) for p in problems] == [("altered", index)]
        assert f"index {index} (altered)" in line

        # 2. leaf and leaf hash together: offline can only name the range between the
        #    checkpoints around it
        new_hash = hashlib.sha256(b"\x00" + forged.encode()).digest()
        with db:
            db.execute("UPDATE audit_entries SET leaf_hash = ? WHERE idx = ?", (new_hash, index))
        problems, line = verify_problems(*offline)
        assert [p["kind"] for p in problems] == ["rewritten"]
        start, end = problems[0]["index"], problems[0]["end"]
        assert start <= index < end <= size
        assert f"indices [{start}, {end}) (rewritten)" in line or f"index {start}" in line
        problems, _ = verify_problems(env=env)
        assert [(p["kind"], p["index"]) for p in problems] == [("altered", index)]
        human = run("audit", "verify", *offline)
        assert "rewritten" in human.stdout and "Traceback" not in human.stderr

        with db:
            db.execute(
                "UPDATE audit_entries SET leaf = ?, leaf_hash = ? WHERE idx = ?",
                (leaf, stored_hash, index),
            )
        assert run("audit", "verify", *offline).returncode == 0

        # a query column (a copy kept for audit query) that no longer matches its record
        with db:
            db.execute("UPDATE audit_entries SET decision = 'allow' WHERE idx = ?", (index,))
        problems, line = verify_problems(*offline)
        assert [(p["kind"], p["index"]) for p in problems] == [("column_mismatch", index)]
        assert "decision: stored 'allow', record None" in problems[0]["message"]
        with db:
            db.execute("UPDATE audit_entries SET decision = NULL WHERE idx = ?", (index,))
        assert run("audit", "verify", *offline).returncode == 0

        # 3. a dropped entry, and a dropped tail
        row = db.execute("SELECT * FROM audit_entries WHERE idx = ?", (index,)).fetchone()
        with db:
            db.execute("DELETE FROM audit_entries WHERE idx = ?", (index,))
        problems, line = verify_problems(*offline)
        assert ("missing", index) in [(p["kind"], p["index"]) for p in problems]
        assert f"index {index} (missing)" in line
        problems, _ = verify_problems(env=env)
        assert ("missing", index) in [(p["kind"], p["index"]) for p in problems]
        placeholders = ", ".join("?" * len(row))
        with db:
            db.execute(f"INSERT INTO audit_entries VALUES ({placeholders})", row)  # noqa: S608
            last = db.execute("SELECT * FROM audit_entries WHERE idx = ?", (size - 1,)).fetchone()
            db.execute("DELETE FROM audit_entries WHERE idx = ?", (size - 1,))
        problems, _ = verify_problems(*offline)
        assert [(p["kind"], p["index"], p["end"]) for p in problems] == [
            ("truncated", size - 1, size)
        ]
        with db:
            db.execute(f"INSERT INTO audit_entries VALUES ({placeholders})", last)  # noqa: S608
        assert run("audit", "verify", *offline).returncode == 0

        # 4. the stored verifier key is not trusted offline: the sealed key decides
        with db:
            db.execute(
                "UPDATE meta SET value = 'x+00000000+AA==' WHERE name = 'audit_verifier_key'"
            )
        warned = run("audit", "verify", *offline)
        assert warned.returncode == 0 and "warning: meta audit_verifier_key" in warned.stderr
        db.close()
    finally:
        assert server.stop() == 0, server.process.stderr()


# -- the pure helpers, without a server ---------------------------------------------------
def test_time_bounds_accept_rfc3339_dates_and_ages() -> None:
    from datetime import UTC, datetime

    from trustmesh.cli.audit.query import _time_bound

    now = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
    assert _time_bound("15m", "--since", now) == "2026-11-29T11:45:00.000Z"
    assert _time_bound("7d", "--since", now) == "2026-11-22T12:00:00.000Z"
    assert _time_bound("2026-11-29", "--since") == "2026-11-29T00:00:00.000Z"
    assert _time_bound("2026-11-29T05:20:00Z", "--since") == "2026-11-29T05:20:00.000Z"
    assert _time_bound("2026-11-29T07:20:00.5+02:00", "--until") == "2026-11-29T05:20:00.500Z"


def test_requests_are_described_in_one_phrase() -> None:
    from trustmesh.cli.audit.query import _describe_request

    assert (
        _describe_request({"surface": "ext_authz", "method": "GET", "host": "a.test", "path": "/x"})
        == "GET a.test/x (ext_authz)"
    )
    assert (
        _describe_request(
            {
                "surface": "subjectaccessreview",
                "verb": "get",
                "apiGroup": "apps",
                "resource": "deployments",
                "name": "web",
                "namespace": "shop",
            }
        )
        == "get apps/deployments/web in shop (subjectaccessreview)"
    )
    assert _describe_request({"verb": "get", "nonResourceURL": "/healthz"}) == "get /healthz"
    assert (
        _describe_request({"surface": "tokenreview", "audiences": ["k8s"]})
        == "authenticate for k8s (tokenreview)"
    )
    assert _describe_request({"surface": "token", "audience": ["spiffe://x/y"]}) == (
        "token for spiffe://x/y"
    )
