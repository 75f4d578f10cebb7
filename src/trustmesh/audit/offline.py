"""Reading a stored audit log straight from the database (DESIGN §6, ``trustmesh audit
verify --data-dir``), for a verifier that believes nothing the database says about
itself.

It owns three things, all read-only:

* opening the server's database as it is -- no migration, no writes -- and refusing
  one that holds no audit log (:func:`open_engine`);
* the verifier key: pinned by the caller, or derived from the sealed signing key with
  the master key (``TRUSTMESH_MASTER_KEY_FILE`` or ``<data-dir>/master.key``, found as
  the server finds it). The master key lives outside the database, so whoever altered
  the database cannot swap the key; the verifier key stored beside it is compared,
  never trusted;
* every signed checkpoint, and every entry streamed in index order as the exact bytes
  stored, with the stored leaf hash and query columns (:func:`read_log`), ready for
  :class:`~trustmesh.audit.verify.LogVerifier`, which checks them all.

A log that cannot be read raises :class:`ConfigError` (:class:`MasterKeyError` when
the master key is missing or does not open the signing key), whose message says what
to change.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, LargeBinary, cast, create_engine, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from trustmesh.audit.events import QUERY_COLUMNS
from trustmesh.audit.log import ORIGIN, SIGNING_KEY, VERIFIER_KEY
from trustmesh.audit.note import Verifier, parse_verifier_key, verifier_key
from trustmesh.common.errors import ConfigError, DatabaseUrlError, MasterKeyError, NoteError
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage import meta as meta_store
from trustmesh.storage.db import engine_url
from trustmesh.storage.schema import audit_checkpoints, audit_entries

Entry = tuple[int, bytes, bytes | None, dict[str, Any] | None]
"""(index, leaf bytes, stored leaf hash, stored query columns): what a reader feeds
:class:`~trustmesh.audit.verify.LogVerifier`. Read from the database, every member is
there; a reader over the admin API has no stored hash or columns (``None``)."""


@dataclass(frozen=True)
class StoredLog:
    """A log as :func:`read_log` found it. ``entries`` streams the rows in index order
    and closes the connection when it is exhausted; ``warnings`` are sentences for
    people (the stored verifier key disagreeing with the sealed signing key)."""

    verifier: Verifier
    checkpoints: list[tuple[int, str]]
    entries: Iterator[Entry]
    warnings: tuple[str, ...] = ()


def open_engine(data_dir: Path | None, db: str | None) -> Engine:
    """An engine on the server's database (``db``, else SQLite in ``data_dir``), opened
    as it is: no migration, no writes."""
    text = engine_url(db, data_dir or Path())
    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as exc:
        raise DatabaseUrlError(f"--db is not a valid database URL: {exc}") from None
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if not path.is_file():
            raise ConfigError(
                f"no database at {path}: pass the server's --data-dir (and --db if it uses one)"
            )
        engine = create_engine(url, connect_args={"timeout": 10})
    else:
        engine = create_engine(url)
    shown = url.render_as_string(hide_password=True)
    try:
        if not inspect(engine).has_table("audit_entries"):
            raise ConfigError(f"{shown} holds no audit log")
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot open {shown}: {exc.__class__.__name__}") from None
    return engine


def _master_key_file(data_dir: Path | None) -> Path:
    configured = os.environ.get("TRUSTMESH_MASTER_KEY_FILE")
    if configured:
        return Path(configured)
    if data_dir is None:
        raise MasterKeyError(
            "the log's signing key is sealed with the master key: pass --data-dir, set "
            "TRUSTMESH_MASTER_KEY_FILE, or pin the key with --key"
        )
    return data_dir / "master.key"


def _derived_key(conn: Connection, data_dir: Path | None, warnings: list[str]) -> Verifier:
    """The verifier key of the sealed signing key, opened with the master key."""
    sealed = meta_store.get(conn, SIGNING_KEY)
    origin = meta_store.get(conn, ORIGIN)
    if sealed is None or origin is None:
        raise ConfigError(
            f"the database holds no audit signing key (meta {SIGNING_KEY}); pass --key"
        )
    path = _master_key_file(data_dir)
    if not path.is_file():
        raise MasterKeyError(
            f"no master key at {path}: it opens the log's signing key (set "
            "TRUSTMESH_MASTER_KEY_FILE, or pin the key with --key)"
        )
    try:
        # Read only: never created here, refused if others may write it.
        raw = MasterKey.load(path).open(sealed, SIGNING_KEY.encode())
        public_key = Ed25519PrivateKey.from_private_bytes(raw).public_key()
        derived = verifier_key(origin, public_key)
    except (MasterKeyError, ValueError, NoteError) as exc:
        raise MasterKeyError(f"cannot open the audit signing key with {path}: {exc}") from None
    stored = meta_store.get(conn, VERIFIER_KEY)
    if stored != derived:
        warnings.append(
            f"meta {VERIFIER_KEY} ({stored}) is not the key of the sealed signing key "
            f"({derived}); verifying with the derived one"
        )
    return parse_verifier_key(derived)


def read_log(engine: Engine, data_dir: Path | None, pinned: Verifier | None = None) -> StoredLog:
    """The log in ``engine``'s tables, checked against ``pinned`` or, without it, the key
    derived from the sealed signing key (the master key found beside ``data_dir``)."""
    conn = engine.connect()
    try:
        warnings: list[str] = []
        verifier = pinned if pinned is not None else _derived_key(conn, data_dir, warnings)
        checkpoints = [
            (int(size), str(note))
            for size, note in conn.execute(
                select(audit_checkpoints.c.size, audit_checkpoints.c.note).order_by(
                    audit_checkpoints.c.size
                )
            )
        ]
    except BaseException:
        conn.close()
        raise
    return StoredLog(verifier, checkpoints, _entries(engine, conn), tuple(warnings))


def _entries(engine: Engine, conn: Connection) -> Iterator[Entry]:
    # The exact stored bytes: SQLite's CAST AS BLOB returns them even when they are not
    # UTF-8 (decoding them as text would fail, and lose the evidence).
    leaf: Any
    stored: Any
    if engine.dialect.name == "sqlite":
        leaf = cast(audit_entries.c.leaf, LargeBinary)
        stored = cast(audit_entries.c.leaf_hash, LargeBinary)
    else:
        leaf = func.convert_to(audit_entries.c.leaf, "UTF8", type_=LargeBinary)
        stored = audit_entries.c.leaf_hash
    columns = [audit_entries.c[name] for name in QUERY_COLUMNS]
    try:
        result = conn.execution_options(stream_results=True, yield_per=5000).execute(
            select(audit_entries.c.idx, leaf, stored, *columns).order_by(audit_entries.c.idx)
        )
        for index, raw, hash_, *values in result:
            yield (
                int(index),
                bytes(raw or b""),
                bytes(hash_ or b""),
                dict(zip(QUERY_COLUMNS, values, strict=True)),
            )
    finally:
        conn.close()
