"""Signing keys on both engines: life cycle, JWKS contents, sealing at rest."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select, update

from trustmesh.common.errors import MasterKeyError
from trustmesh.identity.keys import (
    ACTIVE,
    CLOCK_SKEW,
    MAX_TOKEN_TTL,
    PREPARED,
    RETIRED,
    KeyManager,
    jwk_thumbprint,
)
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage import open_database
from trustmesh.storage.schema import signing_keys


@pytest.fixture
def manager(db_url: str | None, tmp_path: Path) -> KeyManager:
    db = open_database(db_url, tmp_path)
    keys = KeyManager(db, MasterKey.load_or_create(tmp_path / "master.key"))
    keys.check_master_key()
    keys.ensure_keys(now=1000.0)
    return keys


def states(manager: KeyManager) -> dict[str, str]:
    return {record.kid: record.state for record in manager.list_keys(include_removed=True)}


def test_first_start_has_one_active_and_one_prepared_key(manager: KeyManager) -> None:
    assert sorted(states(manager).values()) == [ACTIVE, PREPARED]
    keyset = manager.load()
    published = {jwk["kid"] for jwk in keyset.jwks()["keys"]}
    assert keyset.active.kid in published and len(published) == 2
    for jwk in keyset.jwks()["keys"]:
        assert jwk["kid"] == jwk_thumbprint(jwk)  # RFC 7638 key ids
        assert jwk["alg"] == "ES256" and jwk["crv"] == "P-256"
        assert "d" not in jwk
    manager.ensure_keys(now=1001.0)  # a restart adds nothing
    assert len(states(manager)) == 2


def test_rotation_walks_prepared_active_retired_removed(manager: KeyManager) -> None:
    before = manager.load()
    prepared = next(r.kid for r in manager.list_keys() if r.state == PREPARED)
    new_active = manager.rotate(now=2000.0)
    assert new_active.kid == prepared  # the key agents already know becomes active
    after = states(manager)
    assert after[before.active.kid] == RETIRED
    assert after[prepared] == ACTIVE
    assert list(after.values()).count(PREPARED) == 1
    keyset = manager.load()
    assert keyset.revision > before.revision
    assert before.active.kid in {j["kid"] for j in keyset.jwks()["keys"]}  # still published

    # Not removed while a token it signed (max TTL) may still be valid ...
    assert manager.remove_expired(now=2000.0 + MAX_TOKEN_TTL) == []
    # ... removed afterwards: unpublished and its sealed private key erased.
    assert manager.remove_expired(now=2000.0 + MAX_TOKEN_TTL + CLOCK_SKEW + 1) == [
        before.active.kid
    ]
    assert before.active.kid not in {j["kid"] for j in manager.load().jwks()["keys"]}
    with manager.db.engine.connect() as conn:
        sealed = conn.execute(
            select(signing_keys.c.private_key).where(signing_keys.c.kid == before.active.kid)
        ).scalar_one()
    assert sealed == ""


def test_concurrent_automatic_rotation_rotates_once(manager: KeyManager) -> None:
    results = []

    def rotate() -> None:
        results.append(manager.rotate_if_older_than(60.0, now=5000.0))

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert list(states(manager).values()).count(RETIRED) == 1
    assert list(states(manager).values()).count(ACTIVE) == 1
    assert manager.rotate_if_older_than(60.0, now=5001.0) is None  # the new key is young


def test_private_keys_are_sealed_at_rest(manager: KeyManager, tmp_path: Path) -> None:
    with manager.db.engine.connect() as conn:
        rows = list(conn.execute(select(signing_keys.c.kid, signing_keys.c.private_key)))
    for _kid, sealed in rows:
        assert sealed.startswith("aes256gcm:v1:")
        assert "PRIVATE KEY" not in sealed
    # Another master key cannot open them, and says what to do.
    stranger = KeyManager(manager.db, MasterKey.load_or_create(tmp_path / "other.key"))
    with pytest.raises(MasterKeyError, match="same master key"):
        stranger.check_master_key()
    with pytest.raises(MasterKeyError):
        stranger.load()


def test_sealed_key_moved_to_another_row_does_not_open(manager: KeyManager) -> None:
    records = manager.list_keys()
    active = next(r for r in records if r.state == ACTIVE)
    prepared = next(r for r in records if r.state == PREPARED)
    with manager.db.engine.begin() as conn:
        sealed = conn.execute(
            select(signing_keys.c.private_key).where(signing_keys.c.kid == prepared.kid)
        ).scalar_one()
        conn.execute(
            update(signing_keys).where(signing_keys.c.kid == active.kid).values(private_key=sealed)
        )
    with pytest.raises(MasterKeyError):
        manager.load()


def test_master_key_file_is_private(tmp_path: Path) -> None:
    MasterKey.load_or_create(tmp_path / "m.key")
    assert (tmp_path / "m.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "bad.key").write_text("short")
    (tmp_path / "bad.key").chmod(0o600)
    with pytest.raises(MasterKeyError, match="32"):
        MasterKey.load_or_create(tmp_path / "bad.key")
