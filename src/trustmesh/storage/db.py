"""Opening the database: SQLite in the data dir by default, PostgreSQL by URL.

A SQLite database file is created 0600 before SQLite opens it (SQLite gives its WAL
and shared-memory files the database's mode), an existing one that is open to others
is tightened to 0600, and one that is a symlink or not ours is refused
(``common/files.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from trustmesh.common.errors import DatabaseUrlError
from trustmesh.common.files import private_file, tighten_private_file
from trustmesh.storage.migrations import migrate

WAL_AUTOCHECKPOINT_PAGES = 16384  # 64 MiB of 4 KiB pages
CONNECT_TIMEOUT = 5  # seconds a PostgreSQL connect may take (libpq connect_timeout)


def engine_url(db: str | None, data_dir: Path) -> str:
    """``None`` -> SQLite file in the data dir; ``postgresql://…`` -> psycopg 3 driver."""
    if not db:
        # absolute(), not resolve(): a symlink at trustmesh.db is refused, not followed
        return f"sqlite:///{(data_dir / 'trustmesh.db').absolute()}"
    for prefix in ("postgresql://", "postgres://"):
        if db.startswith(prefix):
            return "postgresql+psycopg://" + db[len(prefix) :]
    if db.startswith(("postgresql+psycopg://", "sqlite:///")):
        return db
    raise DatabaseUrlError(
        f"--db {db.split('://')[0]}://… is not supported: use postgresql://… or leave it out for SQLite"
    )


def _sqlite_pragmas(wal_autocheckpoint: int) -> Callable[[Any, Any], None]:
    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at every checkpoint of the WAL
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache (the default is 2 MiB): the audit log's indexes on random
        # values (trace ids, token hashes) outgrow 2 MiB at ~50k events, after which every
        # append batch reads index pages back from the OS.
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
        cur.close()

    return pragmas


def _private_sqlite_files(path: Path) -> None:
    private_file(path, "database")
    for suffix in ("-wal", "-shm", "-journal"):
        tighten_private_file(path.with_name(path.name + suffix), "database file")


@dataclass
class Database:
    engine: Engine
    url: str

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def dispose(self) -> None:
        self.engine.dispose()

    def checkpoint_wal(self) -> tuple[int, int, int] | None:
        """SQLite: copy what the WAL holds into the database file and sync it, without
        waiting for (or blocking) the writer (``PRAGMA wal_checkpoint(PASSIVE)``); the
        next commit then starts the WAL over. -> (busy, frames in the WAL, frames
        checkpointed); None on PostgreSQL, which has nothing to do."""
        if self.dialect != "sqlite":
            return None
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
        return int(row[0]), int(row[1]), int(row[2])


def open_database(
    db: str | None,
    data_dir: Path,
    *,
    background_wal_checkpoints: bool = False,
    schema_version: int | None = None,
) -> Database:
    """``background_wal_checkpoints``: SQLite's WAL is not checkpointed by the commit
    that fills it (which then copies and syncs some 64 MiB while every transaction
    waiting behind it waits too) but by whoever opened the database, calling
    :meth:`Database.checkpoint_wal` on a schedule of its own (the control plane: every
    second, on its own thread). ``schema_version``: migrate only that far (a restore of
    an older backup; see ``migrate``)."""
    url = engine_url(db, data_dir)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"--db is not a valid database URL: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_files(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": 10})
        autocheckpoint = 0 if background_wal_checkpoints else WAL_AUTOCHECKPOINT_PAGES
        event.listen(engine, "connect", _sqlite_pragmas(autocheckpoint))
    else:
        # pool_pre_ping: a connection the database dropped (a restart, an outage) is
        # found on checkout and replaced, so the first request after an outage does not
        # fail on it. connect_timeout bounds a connect to an address that drops packets;
        # pool_timeout bounds the wait for a connection while they all hang.
        engine = create_engine(
            url,
            pool_size=5,
            max_overflow=10,
            pool_pre_ping=True,
            pool_timeout=10,
            connect_args={"connect_timeout": CONNECT_TIMEOUT},
        )
    migrate(engine, schema_version)
    return Database(engine=engine, url=parsed.render_as_string(hide_password=True))
