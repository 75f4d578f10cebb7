"""``trustmesh backup`` and ``trustmesh restore`` (DESIGN §10) with real servers: a backup
taken while the server issues tokens restores into the other engine (SQLite to
PostgreSQL and back) and a restored server serves what the old one did; damaged,
altered or foreign-keyed backups, non-empty targets and forks of the published log are
refused, and ``--accept-loss`` starts a new log origin that records what was lost."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import Engine, event, func, inspect, select

from helpers import (
    Federation,
    Server,
    database_for,
    issuing,
    register_federation,
    start_server,
    trustmesh_cmd,
)
from trustmesh.audit import events as ev
from trustmesh.audit import offline
from trustmesh.audit.checkpoint import verify_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.log import AuditLog, record_of
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.identity.sealing import MasterKey
from trustmesh.server.backup import write_backup
from trustmesh.sim import SimulatedCluster
from trustmesh.storage import open_database, schema
from trustmesh.storage.migrations import LATEST, current_version


def run(*args: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--token-file", str(token_file)] if token_file else []
    return subprocess.run(
        trustmesh_cmd(*args, *extra), capture_output=True, text=True, timeout=120, check=False
    )


def db_args(server_db: str | None) -> list[str]:
    return ["--db", server_db] if server_db else []


def take_backup(server: Server, out: Path) -> dict[str, Any]:
    result = run("backup", "--data-dir", str(server.data_dir), *db_args(server.db), "--out",
                 str(out), "-o", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def published_checkpoint(server: Server, path: Path) -> dict[str, Any]:
    token_file = server.data_dir / "admin.token"
    result = run("audit", "checkpoint", "--server", server.url, "-o", "json", token_file=token_file)
    assert result.returncode == 0, result.stderr
    path.write_text(result.stdout)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def restore_dir(tmp_path: Path, name: str, source: Server) -> Path:
    target = tmp_path / name
    target.mkdir(mode=0o700)
    shutil.copy(source.data_dir / "master.key", target / "master.key")
    return target


def verify_with_jwks(server: Server, token: str, audience: str) -> dict[str, Any]:
    discovery = httpx.get(server.url + "/.well-known/openid-configuration").json()
    jwks = httpx.get(discovery["jwks_uri"], timeout=10)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks.json()["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=[key.algorithm_name], audience=audience,
        options={"verify_iss": False},
    )  # fmt: skip
    return claims


def restored_server(data_dir: Path, db: str | None, old: Server) -> Server:
    server = start_server(data_dir, db) if (data_dir / "admin.token").exists() else None
    if server is not None:
        return server
    # The admin credential's secret is not in the backup (only its hash): the operator
    # keeps admin.token with the master key.
    shutil.copy(old.data_dir / "admin.token", data_dir / "admin.token")
    return start_server(data_dir, db)


@pytest.mark.parametrize(("source", "target"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
def test_online_backup_restores_into_the_other_engine(
    source: str,
    target: str,
    tmp_path: Path,
    sim_cluster: SimulatedCluster,
    request: pytest.FixtureRequest,
) -> None:
    old = start_server(tmp_path / "old", database_for(source, request))
    try:
        fed: Federation = register_federation(old, sim_cluster)
        before = fed.svid()
        with issuing(fed) as issued:  # the server keeps issuing while the backup reads
            summary = take_backup(old, tmp_path / "backup.tmbk")
    finally:
        assert old.stop() == 0
    assert issued, "no token was issued while the backup ran"
    assert (tmp_path / "backup.tmbk").stat().st_mode & 0o777 == 0o600

    target_db = database_for(target, request)
    data_dir = restore_dir(tmp_path, "restored", old)
    result = run("restore", "--in", str(tmp_path / "backup.tmbk"), "--data-dir", str(data_dir),
                 *db_args(target_db), "-o", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout)
    # one read transaction: the log's size is the one the header read beside the tables
    assert restored["audit_size"] == summary["audit_size"] >= 3
    assert restored["rows"] == summary["rows"]
    assert restored["checkpoints_verified"] >= 1

    offline = run("audit", "verify", "--data-dir", str(data_dir), *db_args(target_db), "-o",
                  "json")  # fmt: skip
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert json.loads(offline.stdout)["size"] == summary["audit_size"]

    new = restored_server(data_dir, target_db, old)
    try:
        # the registry, the admin credential and the signing keys came back
        clusters = new.admin.get("/v1/clusters")
        assert clusters.status_code == 200, clusters.text
        assert fed.origin_name in json.dumps(clusters.json())
        assert verify_with_jwks(new, before, fed.audience)["sub"].startswith("spiffe://")
        fed.server = new
        after = fed.svid()  # and it issues again, under the same keys
        assert jwt.get_unverified_header(after)["kid"] == jwt.get_unverified_header(before)["kid"]
    finally:
        assert new.stop() == 0


@pytest.fixture
def backed_up(tmp_path: Path, sim_cluster: SimulatedCluster) -> dict[str, Any]:
    """A SQLite server with some log, its backup, then more log and the checkpoint it
    published after the backup."""
    server = start_server(tmp_path / "old")
    try:
        fed = register_federation(server, sim_cluster)
        for _ in range(3):
            fed.svid()
        checkpoint_before = published_checkpoint(server, tmp_path / "before.json")
        summary = take_backup(server, tmp_path / "backup.tmbk")
        for _ in range(5):
            fed.svid()
        sizes = []
        for _ in range(100):  # the server signs at most every 0.5 s
            latest = published_checkpoint(server, tmp_path / "published.json")
            sizes.append(latest["size"])
            if latest["size"] > summary["audit_size"]:
                break
            time.sleep(0.2)
        assert latest["size"] > summary["audit_size"], sizes
    finally:
        assert server.stop() == 0
    return {
        "server": server,
        "fed": fed,
        "summary": summary,
        "before": checkpoint_before,
        "published": latest,
    }


def test_a_restore_that_would_fork_the_published_log_is_refused(
    backed_up: dict[str, Any], tmp_path: Path
) -> None:
    data_dir = restore_dir(tmp_path, "restored", backed_up["server"])
    result = run("restore", "--in", str(tmp_path / "backup.tmbk"), "--data-dir", str(data_dir),
                 "--published-checkpoint", str(tmp_path / "published.json"))  # fmt: skip
    assert result.returncode == 1
    assert "would fork the log" in result.stderr and "--accept-loss" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (data_dir / "trustmesh.db").exists()

    # the checkpoint published before the backup: no fork, the restore goes ahead
    result = run("restore", "--in", str(tmp_path / "backup.tmbk"), "--data-dir", str(data_dir),
                 "--published-checkpoint", str(tmp_path / "before.json"), "-o", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["fork_check"] == "passed" and document["new_origin"] is None
    assert document["published_checkpoint"]["consistent"] is True


def test_accept_loss_starts_a_new_origin_that_records_the_loss(
    backed_up: dict[str, Any], tmp_path: Path
) -> None:
    old: Server = backed_up["server"]
    published = backed_up["published"]
    backup_size = backed_up["summary"]["audit_size"]
    data_dir = restore_dir(tmp_path, "restored", old)
    result = run("restore", "--in", str(tmp_path / "backup.tmbk"), "--data-dir", str(data_dir),
                 "--published-checkpoint", str(tmp_path / "published.json"), "--accept-loss",
                 "-o", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["published_checkpoint"]["lost"] == published["size"] - backup_size
    assert document["origin_entry"] == backup_size
    new_origin = document["new_origin"]
    assert new_origin != published["origin"] and new_origin.startswith(published["origin"])

    new = restored_server(data_dir, None, old)
    try:
        token_file = data_dir / "admin.token"
        checkpoint = published_checkpoint(new, tmp_path / "new.json")
        assert checkpoint["origin"] == new_origin and checkpoint["key"] != published["key"]
        entry = new.admin.get(
            "/v1/audit/entries", params={"start": backup_size, "end": backup_size + 1}
        ).json()["entries"][0]["event"]
        assert entry["type"] == "audit.origin_started"
        assert entry["detail"]["lost_entries"] == published["size"] - backup_size
        assert entry["detail"]["lost_from_index"] == backup_size
        assert entry["detail"]["lost_to_index"] == published["size"]
        assert entry["detail"]["published_checkpoint"] == published["note"]
        # the new origin's log extends the old origin's checkpoint from before the backup
        before = backed_up["before"]
        proof = new.admin.get(
            "/v1/audit/proof/consistency",
            params={"first": before["size"], "second": checkpoint["size"]},
        )
        assert proof.status_code == 200, proof.text
        first = verify_checkpoint(before["note"], before["key"])
        entries = new.admin.get(
            "/v1/audit/entries", params={"start": 0, "end": checkpoint["size"]}
        ).json()["entries"]
        tree = MerkleLog()
        for item in entries:
            tree.append_leaf_hash(leaf_hash(base64.b64decode(item["leaf"])))
        assert tree.root(first.size) == first.root_hash
        verified = run("audit", "verify", "--server", new.url, "-o", "json", token_file=token_file)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        assert new.stop() == 0


def rewrite(path: Path, out: Path, change: Any) -> None:
    """The backup with ``change`` applied to its lines and a checksum to match."""
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    body = change(lines[:-1])
    trailer = json.loads(lines[-1])
    trailer["end"]["sha256"] = hashlib.sha256(b"".join(body)).hexdigest()
    out.write_bytes(gzip.compress(b"".join(body) + json.dumps(trailer).encode() + b"\n"))


def alter_leaf(body: list[bytes]) -> list[bytes]:
    """A change for :func:`rewrite`: one token.issued leaf of the audit log altered."""
    for i, line in enumerate(body):
        if b"token.issued" in line and line.startswith(b"["):
            body[i] = line.replace(b"token.issued", b"token.issueD", 1)
            return body
    raise AssertionError("no token.issued entry in the backup")


def test_damaged_altered_or_foreign_backups_are_refused(
    backed_up: dict[str, Any], tmp_path: Path
) -> None:
    old: Server = backed_up["server"]
    backup = tmp_path / "backup.tmbk"

    def refused(path: Path, data_dir: Path, *extra: str) -> str:
        result = run("restore", "--in", str(path), "--data-dir", str(data_dir), *extra)
        assert result.returncode == 1, result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (data_dir / "trustmesh.db").exists()
        return result.stderr

    data_dir = restore_dir(tmp_path, "restored", old)
    # a flipped byte inside the compressed stream, or a truncated file
    original = backup.read_bytes()
    # (a flipped bit may break the deflate stream, the gzip trailer or, now and then,
    # inflate to other lines: each a damaged backup, said so) — at several places
    for where in (len(original) // 4, len(original) // 2, 3 * len(original) // 4):
        raw = bytearray(original)
        raw[where] ^= 0x01
        (tmp_path / "flipped.tmbk").write_bytes(bytes(raw))
        assert "backup" in refused(tmp_path / "flipped.tmbk", data_dir)
    lines = gzip.decompress(backup.read_bytes()).splitlines(keepends=True)
    (tmp_path / "truncated.tmbk").write_bytes(gzip.compress(b"".join(lines[:-1])))
    assert "truncated" in refused(tmp_path / "truncated.tmbk", data_dir)

    # a leaf altered (the checksum recomputed to match): the audit log does not verify
    rewrite(backup, tmp_path / "altered.tmbk", alter_leaf)
    assert "audit log does not verify" in refused(tmp_path / "altered.tmbk", data_dir)

    # another master key: the sealed keys do not open
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / "master.key").write_text("A" * 43 + "\n")
    (other / "master.key").chmod(0o600)
    assert "master key" in refused(backup, other)
    empty = tmp_path / "nokey"
    assert "no master key" in refused(backup, empty)

    # a target that is not empty: the old server's own database
    result = run("restore", "--in", str(backup), "--data-dir", str(old.data_dir))
    assert result.returncode == 1 and "not empty" in result.stderr, result.stderr


def test_a_backup_that_changes_between_the_passes_restores_nothing(
    backed_up: dict[str, Any], tmp_path: Path
) -> None:
    """The first pass checks one file, the second loads another (a checksum is no MAC:
    this one is altered with a checksum to match). The restore refuses, leaves the
    target empty, and a retry from the real backup succeeds. The two files come through
    a FIFO, one per opening, as a file replaced between the passes would."""
    old: Server = backed_up["server"]
    backup = tmp_path / "backup.tmbk"

    rewrite(backup, tmp_path / "altered.tmbk", alter_leaf)
    fifo = tmp_path / "swapped.tmbk"
    os.mkfifo(fifo)

    data_dir = restore_dir(tmp_path, "restored", old)
    restore = subprocess.Popen(
        trustmesh_cmd("restore", "--in", str(fifo), "--data-dir", str(data_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def reading() -> bool:
        """The restore holds the FIFO open (between the passes it does not)."""
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{restore.pid}/fd").iterdir()]
        except OSError:
            return False
        return str(fifo) in links

    for source in (backup, tmp_path / "altered.tmbk"):
        with open(fifo, "wb") as pipe:  # waits for the restore to open it
            pipe.write(source.read_bytes())
        deadline = time.monotonic() + 60
        while reading() and time.monotonic() < deadline:  # one file per opening
            time.sleep(0.01)
    stdout, stderr = restore.communicate(timeout=120)
    result = subprocess.CompletedProcess(restore.args, restore.returncode, stdout, stderr)
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "changed while it was restored" in result.stderr
    database = data_dir / "trustmesh.db"
    if database.exists():
        engine = open_database(None, data_dir).engine
        try:
            with engine.connect() as conn:
                assert (
                    conn.execute(select(func.count()).select_from(schema.audit_entries)).scalar()
                    == 0
                )
        finally:
            engine.dispose()
    retried = run("restore", "--in", str(backup), "--data-dir", str(data_dir))
    assert retried.returncode == 0, retried.stderr


def test_a_backup_reads_every_table_at_one_moment(db_url: str | None, tmp_path: Path) -> None:
    """A row committed by another writer while the backup runs -- after it read its
    first table, before it reads the table the row goes to -- is not in the backup."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    database = open_database(db_url, data)
    fired: list[bool] = []

    def concurrent_writer(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "audit_checkpoints" in statement and not fired:  # read after meta, before suspensions
            fired.append(True)
            with database.engine.begin() as other:
                other.execute(
                    schema.suspensions.insert().values(
                        kind="workload", value="late", reason="r", actor="a", created_at=0.0
                    )
                )

    event.listen(Engine, "before_cursor_execute", concurrent_writer)
    try:
        summary = write_backup(data, db_url, tmp_path / "backup.tmbk")
    finally:
        event.remove(Engine, "before_cursor_execute", concurrent_writer)
        with database.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(schema.suspensions)).scalar()
        database.dispose()
    assert fired and stored == 1
    assert summary.rows["suspensions"] == 0


def test_a_backup_of_an_older_schema_is_restored_then_migrated(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir(mode=0o700)
    master = MasterKey.load_or_create(old / "master.key")
    database = open_database(None, old, schema_version=7)  # before federated trust domains
    try:
        log = AuditLog(database, master, "corp.example", "test")
        log.open()
        event = ev.new_event(
            ev.KEY_ROTATED, source={"kind": "control-plane", "id": "test"}, actor="admin"
        )
        log.append([record_of(event)])
        log.checkpoint_now()
    finally:
        database.dispose()
    result = run("backup", "--data-dir", str(old), "--out", str(tmp_path / "b.tmbk"), "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["schema_version"] == 7

    target = tmp_path / "new"
    target.mkdir(mode=0o700)
    shutil.copy(old / "master.key", target / "master.key")
    result = run("restore", "--in", str(tmp_path / "b.tmbk"), "--data-dir", str(target), "-o",
                 "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["audit_size"] == 1
    engine = offline.open_engine(target, None)
    try:
        assert current_version(engine) == LATEST
        assert "federated_bundles" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_bad_arguments_get_one_line(tmp_path: Path) -> None:
    cases = [
        (["backup", "--out", str(tmp_path / "b")], "pass --data-dir"),
        (["backup", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b")], "no database"),
        (["backup", "--db", "mysql://x/y", "--out", str(tmp_path / "b")], "not supported"),
        (
            [
                "restore",
                "--in",
                str(tmp_path / "none"),
                "--data-dir",
                str(tmp_path / "d"),
                "--master-key-file",
                str(tmp_path / "none.key"),
            ],
            "master key",
        ),
    ]
    for args, expected in cases:
        result = run(*args)
        assert result.returncode == 1, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    (tmp_path / "k").mkdir(mode=0o700)
    (tmp_path / "k" / "master.key").write_text("A" * 43 + "\n")
    (tmp_path / "k" / "master.key").chmod(0o600)
    (tmp_path / "junk").write_bytes(b"not gzip")
    for path, expected in ((tmp_path / "none", "no backup at"), (tmp_path / "junk", "not a")):
        result = run("restore", "--in", str(path), "--data-dir", str(tmp_path / "k"))
        assert result.returncode == 1 and expected in result.stderr, result.stderr
