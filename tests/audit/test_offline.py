"""Reading a stored log straight from SQLite (trustmesh.audit.offline), in-process: what it
returns for a real log, and the typed error it raises for each thing that is missing.
The same paths through the real CLI are in tests/cli/test_audit_cli.py."""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
from pathlib import Path

import pytest

from trustmesh.audit import events as ev
from trustmesh.audit.log import VERIFIER_KEY, AuditLog, record_of
from trustmesh.audit.note import parse_verifier_key
from trustmesh.audit.offline import open_engine, read_log
from trustmesh.audit.verify import LogVerifier
from trustmesh.common.errors import ConfigError, DatabaseUrlError, MasterKeyError
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage.db import open_database


def stored_log(data_dir: Path, events: int = 5) -> str:
    """A log of ``events`` key rotations and one checkpoint, as a server leaves it in its
    data dir (master.key beside trustmesh.db); returns its verifier key."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(None, data_dir)
    log = AuditLog(db, MasterKey.load_or_create(data_dir / "master.key"), "example.org", "r1")
    log.open()
    log.append(
        [
            record_of(
                ev.new_event(
                    ev.KEY_ROTATED, source=log.source, actor="admin:test", detail={"kid": f"k{n}"}
                )
            )
            for n in range(events)
        ]
    )
    assert log.checkpoint_now() is not None
    db.dispose()
    return log.verifier_key


@pytest.fixture(autouse=True)
def no_master_key_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTMESH_MASTER_KEY_FILE", raising=False)


def test_a_stored_log_is_read_with_the_key_its_master_key_unseals(tmp_path: Path) -> None:
    key = stored_log(tmp_path)
    found = read_log(open_engine(tmp_path, None), tmp_path)
    assert str(found.verifier) == key and found.warnings == ()
    assert [size for size, _ in found.checkpoints] == [5]
    verifier = LogVerifier(found.verifier, found.checkpoints)
    entries = list(found.entries)
    assert [index for index, *_ in entries] == list(range(5))
    for index, leaf, stored_hash, columns in entries:
        assert stored_hash is not None and columns is not None
        verifier.add(index, leaf, stored_hash)
        verifier.check_columns(index, leaf, columns)
    assert verifier.finish().ok


def test_the_stored_verifier_key_is_compared_never_trusted(tmp_path: Path) -> None:
    key = stored_log(tmp_path)
    with sqlite3.connect(tmp_path / "trustmesh.db") as db:
        db.execute("UPDATE meta SET value = 'x+00000000+AA==' WHERE name = ?", (VERIFIER_KEY,))
    db.close()
    found = read_log(open_engine(tmp_path, None), tmp_path)
    assert str(found.verifier) == key
    assert len(found.warnings) == 1 and f"meta {VERIFIER_KEY}" in found.warnings[0]
    list(found.entries)


def test_a_pinned_key_needs_no_master_key(tmp_path: Path) -> None:
    key = stored_log(tmp_path)
    (tmp_path / "master.key").unlink()
    found = read_log(open_engine(tmp_path, None), None, parse_verifier_key(key))
    assert str(found.verifier) == key and len(list(found.entries)) == 5


def test_what_is_missing_is_a_config_error_that_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no database at .*: pass the server's --data-dir"):
        open_engine(tmp_path / "nowhere", None)
    with pytest.raises(DatabaseUrlError, match="is not supported"):
        open_engine(None, "mysql://x/y")
    with sqlite3.connect(tmp_path / "trustmesh.db") as other:
        other.execute("CREATE TABLE notes (text TEXT)")
    other.close()
    with pytest.raises(ConfigError, match="holds no audit log"):
        open_engine(tmp_path, None)

    schema_only = tmp_path / "schema-only"
    schema_only.mkdir()
    open_database(None, schema_only).dispose()
    with pytest.raises(ConfigError, match="holds no audit signing key") as raised:
        read_log(open_engine(schema_only, None), schema_only)
    assert not isinstance(raised.value, MasterKeyError)


def test_the_master_key_must_be_found_and_must_open_the_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    stored_log(data_dir)
    engine = open_engine(None, f"sqlite:///{data_dir / 'trustmesh.db'}")
    with pytest.raises(MasterKeyError, match="pass --data-dir, set TRUSTMESH_MASTER_KEY_FILE"):
        read_log(engine, None)

    missing = tmp_path / "missing.key"
    monkeypatch.setenv("TRUSTMESH_MASTER_KEY_FILE", str(missing))
    with pytest.raises(MasterKeyError, match=re.escape(f"no master key at {missing}")):
        read_log(engine, data_dir)

    another = tmp_path / "another.key"
    another.write_text(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="))
    monkeypatch.setenv("TRUSTMESH_MASTER_KEY_FILE", str(another))
    with pytest.raises(
        MasterKeyError, match=re.escape(f"cannot open the audit signing key with {another}")
    ):
        read_log(engine, data_dir)

    monkeypatch.setenv("TRUSTMESH_MASTER_KEY_FILE", str(data_dir / "master.key"))
    assert len(list(read_log(engine, None).entries)) == 5
    engine.dispose()
