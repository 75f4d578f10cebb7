"""Storage on both engines: migrations, revision counters, the schema in use."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import insert, inspect

from trustmesh.common.errors import DatabaseUrlError
from trustmesh.storage import meta as meta_store
from trustmesh.storage import open_database
from trustmesh.storage.db import engine_url
from trustmesh.storage.migrations import LATEST, current_version, migrate
from trustmesh.storage.schema import schema_migrations


def test_migrations_create_schema_and_are_idempotent(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    try:
        assert current_version(db.engine) == LATEST
        tables = set(inspect(db.engine).get_table_names())
        assert {
            "meta",
            "signing_keys",
            "registry_objects",
            "credentials",
            "schema_migrations",
        } <= tables
        assert migrate(db.engine) == LATEST  # a second run changes nothing
        assert current_version(db.engine) == LATEST
    finally:
        db.dispose()


def test_database_newer_than_code_is_refused(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    with db.engine.begin() as conn:
        conn.execute(
            insert(schema_migrations).values(
                version=LATEST + 1, description="future", applied_at=0.0
            )
        )
    with pytest.raises(RuntimeError, match="newer than this trustmesh"):
        migrate(db.engine)
    db.dispose()


def test_revision_counters_are_distinct_under_concurrency(
    db_url: str | None, tmp_path: Path
) -> None:
    db = open_database(db_url, tmp_path)
    seen: list[int] = []
    lock = threading.Lock()

    def bump_many() -> None:
        for _ in range(10):
            with db.engine.begin() as conn:
                value = meta_store.bump(conn, meta_store.REGISTRY_REVISION)
            with lock:
                seen.append(value)

    threads = [threading.Thread(target=bump_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 41))
    with db.engine.connect() as conn:
        assert meta_store.revisions(conn)[meta_store.REGISTRY_REVISION] == 40
    db.dispose()


def test_meta_insert_if_absent_keeps_first_value(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    with db.engine.begin() as conn:
        assert meta_store.insert_if_absent(conn, "trust_domain", "a.example") == "a.example"
        assert meta_store.insert_if_absent(conn, "trust_domain", "b.example") == "a.example"
    db.dispose()


def test_engine_url_selection(tmp_path: Path) -> None:
    assert engine_url(None, tmp_path).startswith("sqlite:///")
    assert engine_url("postgresql://u@h/db", tmp_path) == "postgresql+psycopg://u@h/db"
    assert engine_url("postgres://u@h/db", tmp_path) == "postgresql+psycopg://u@h/db"
    with pytest.raises(DatabaseUrlError, match="mysql"):
        engine_url("mysql://u@h/db", tmp_path)
