"""Backup and restore of a control plane's database (DESIGN §10, ``trustmesh backup``
and ``trustmesh restore``).

A backup is read straight from the database (``--data-dir``/``--db``, as ``trustmesh
audit verify --data-dir`` reads it), not through a server: it works while every
replica is down, which is when one needs it, it streams the audit log without paging
it through the admin API, and whoever may read the database may read everything in
it anyway. It is online: one read transaction over every table -- REPEATABLE READ on
PostgreSQL, a WAL read snapshot on SQLite (an explicit ``BEGIN`` before the first
read) -- so the tables agree with each other while the replicas keep writing. Sealed
keys stay sealed: rows are copied as stored, and the master key is never read.

The file (version 1) is gzip over JSON lines::

    {"format": "trustmesh-backup", "version": 1, "schema_version", "created_at", ...}
    {"table": NAME, "columns": [...]}            one per table, ``meta`` first
    [value, ...]                                 its rows; LargeBinary as base64
    {"end": {"rows": {NAME: count}, "sha256": HEX}}

where ``sha256`` is over every byte of the uncompressed lines before the last one.

A restore reads the file twice. The first pass checks it all -- the checksum, the
row counts, the master key (it must open the log's sealed signing key and the key
check value), the audit log (every leaf re-hashed, the Merkle root recomputed at
every signed checkpoint and each signature checked, as ``audit verify`` does), and,
when the operator gives the checkpoint that was published last, that the restored
log does not fork it -- before the second pass writes anything, into a database that
must be empty. A log shorter than the published checkpoint would fork the log: the
restore refuses unless ``accept_loss``, which starts a new log origin with a new key
(:func:`_start_new_origin`), so no key ever signs two inconsistent checkpoints.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    MetaData,
    Table,
    create_engine,
    delete,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from trustmesh.audit import events as ev
from trustmesh.audit import offline
from trustmesh.audit.checkpoint import Checkpoint, verify_checkpoint
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.log import ORIGIN, SIGNING_KEY, VERIFIER_KEY, AuditLog, record_of
from trustmesh.audit.note import check_key_name, verifier_key
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.audit.verify import LogVerifier, VerifyReport
from trustmesh.common.errors import (
    BackupError,
    CheckpointError,
    ConfigError,
    MasterKeyError,
    NoteError,
)
from trustmesh.common.files import fsync_directory, private_directory
from trustmesh.identity.sealing import CHECK_AAD, MasterKey
from trustmesh.storage import meta as meta_store
from trustmesh.storage import schema
from trustmesh.storage.db import Database, engine_url, open_database
from trustmesh.storage.migrations import LATEST, current_version

FORMAT = "trustmesh-backup"
VERSION = 1
MASTER_KEY_CHECK = "master_key_check"  # identity/keys.py
log = logging.getLogger(__name__)
BATCH = 2000
RESTORE_REPLICA = "restore"


# -- writing --------------------------------------------------------------------------------
def _tables(engine: Engine) -> list[Table]:
    """Every table of the schema the database holds, ``meta`` first and the checkpoints
    before the entries (a restore verifies the log as it streams: it needs the log's key,
    then the signed checkpoints, before the first entry), ``schema_migrations`` left out
    (the restore runs the migrations itself)."""
    present = set(inspect(engine).get_table_names())
    tables = [t for t in schema.metadata.sorted_tables if t.name in present]
    first = {"meta": 0, "audit_checkpoints": 1}
    tables.sort(key=lambda t: (first.get(t.name, 2), t.name))
    return [t for t in tables if t.name != "schema_migrations"]


def _encode(table: Table, row: Any) -> list[Any]:
    values = []
    for column, value in zip(table.columns, row, strict=True):
        if value is not None and isinstance(column.type, LargeBinary):
            value = base64.b64encode(bytes(value)).decode()
        values.append(value)
    return values


@dataclass(frozen=True)
class BackupSummary:
    path: str
    bytes: int
    seconds: float
    schema_version: int
    rows: dict[str, int]
    audit_size: int
    checkpoint_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "schema_version": self.schema_version,
            "rows": self.rows,
            "audit_size": self.audit_size,
            "checkpoint_size": self.checkpoint_size,
        }


class _Digest:
    """Lines into the gzip stream and the running SHA-256 of them."""

    def __init__(self, out: gzip.GzipFile) -> None:
        self.out = out
        self.sha = hashlib.sha256()

    def line(self, value: Any) -> None:
        raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        self.sha.update(raw)
        self.out.write(raw)


def _snapshot(conn: Connection) -> None:
    """Start the one read transaction every table is read in."""
    if conn.dialect.name == "sqlite":
        # pysqlite begins no transaction before a SELECT; without one every read would
        # see its own moment. A deferred BEGIN takes its WAL snapshot at the first read.
        conn.exec_driver_sql("BEGIN")
    conn.execute(select(func.count()).select_from(schema.meta)).scalar()


def write_backup(data_dir: Path | None, db: str | None, out: Path) -> BackupSummary:
    """Write a consistent backup of the database (``db``, else SQLite in ``data_dir``)
    to ``out`` (mode 0600, written beside it and renamed into place)."""
    started = time.monotonic()
    engine = offline.open_engine(data_dir, db)
    version = current_version(engine)
    if version > LATEST:  # its tables and columns would be left out without a word
        engine.dispose()
        raise BackupError(
            f"the database is of schema version {version}, newer than this trustmesh "
            f"({LATEST}): back it up with the trustmesh that serves it"
        )
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise BackupError(f"cannot write {out}: {exc.strerror}") from None
    rows: dict[str, int] = {}
    try:
        tables = _tables(engine)
        isolation = "REPEATABLE READ" if engine.dialect.name == "postgresql" else None
        options = {"isolation_level": isolation} if isolation else {}
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as out_gz,
            engine.connect().execution_options(**options) as conn,
        ):
            _snapshot(conn)
            digest = _Digest(out_gz)
            meta_rows = dict(conn.execute(select(schema.meta.c.name, schema.meta.c.value)).all())
            audit_size = int(
                conn.execute(select(func.count()).select_from(schema.audit_entries)).scalar() or 0
            )
            checkpoint_size = int(
                conn.execute(select(func.max(schema.audit_checkpoints.c.size))).scalar() or 0
            )
            digest.line(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "schema_version": version,
                    "created_at": time.time(),
                    "source_dialect": engine.dialect.name,
                    "trust_domain": meta_rows.get("trust_domain"),
                    "audit": {
                        "origin": meta_rows.get(ORIGIN),
                        "verifier_key": meta_rows.get(VERIFIER_KEY),
                        "size": audit_size,
                        "checkpoint_size": checkpoint_size,
                    },
                }
            )
            for table in tables:
                digest.line({"table": table.name, "columns": [c.name for c in table.columns]})
                count = 0
                order = list(table.primary_key.columns) or list(table.columns)
                result = conn.execution_options(yield_per=BATCH).execute(
                    select(*table.columns).order_by(*order)
                )
                for row in result:
                    digest.line(_encode(table, row))
                    count += 1
                rows[table.name] = count
            conn.rollback()
            trailer = {"end": {"rows": rows, "sha256": digest.sha.hexdigest()}}
            out_gz.write(json.dumps(trailer, separators=(",", ":")).encode() + b"\n")
            out_gz.flush()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, out)
        fsync_directory(out.parent)
    except SQLAlchemyError as exc:
        temporary.unlink(missing_ok=True)
        raise BackupError(f"reading the database failed: {exc.__class__.__name__}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()
    return BackupSummary(
        path=str(out),
        bytes=out.stat().st_size,
        seconds=time.monotonic() - started,
        schema_version=version,
        rows=rows,
        audit_size=audit_size,
        checkpoint_size=checkpoint_size,
    )


# -- reading --------------------------------------------------------------------------------
@dataclass
class _Section:
    table: Table
    columns: list[str]


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with gzip.open(path, "rb") as handle:
            yield from handle
    except FileNotFoundError:
        raise BackupError(f"no backup at {path}") from None
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged deflate stream
        raise BackupError(f"{path} is not a readable backup (gzip: {exc})") from None


def _read(
    path: Path, digests: list[str] | None = None, expected: str | None = None
) -> Iterator[tuple[dict[str, Any], _Section | None, list[Any] | None]]:
    """(header, section, row) for every row; a section's start comes with row None.
    Checks the structure, the row counts and the checksum at the end (raising
    BackupError): a reader acts on the rows only after the iteration completed.
    ``digests`` gets the checksum once it verified; ``expected``: the one the first pass
    verified — the file must not have changed between the passes (its checksum is no
    MAC: a file rewritten with a fresh one would otherwise load unchecked)."""
    sha = hashlib.sha256()
    header: dict[str, Any] | None = None
    section: _Section | None = None
    counts: dict[str, int] = {}
    trailer: dict[str, Any] | None = None
    for number, raw in enumerate(_lines(path), start=1):
        if trailer is not None:
            raise BackupError(
                f"{path} has data after its end (line {number}): the backup is damaged"
            )
        try:
            value = json.loads(raw)
        except ValueError:
            raise BackupError(f"{path} line {number} is not JSON: the backup is damaged") from None
        if header is None:
            if not isinstance(value, dict) or value.get("format") != FORMAT:
                raise BackupError(f"{path} is not a trustmesh backup")
            if value.get("version") != VERSION:
                raise BackupError(
                    f"{path} is a backup of format version {value.get('version')!r}; this "
                    f"trustmesh reads version {VERSION}"
                )
            header = value
            sha.update(raw)
            continue
        if isinstance(value, dict) and "end" in value:
            trailer = value["end"] if isinstance(value["end"], dict) else {}
            continue
        sha.update(raw)
        if isinstance(value, dict) and "table" in value:
            name = value.get("table")
            table = schema.metadata.tables.get(str(name))
            columns = value.get("columns")
            if table is None or not isinstance(columns, list):
                raise BackupError(
                    f"{path} line {number}: unknown table {name!r}: the backup is damaged"
                )
            unknown = set(columns) - set(table.columns.keys())
            if unknown:
                raise BackupError(
                    f"{path} table {name} has columns this trustmesh does not know: "
                    f"{', '.join(sorted(map(str, unknown)))} (the backup is damaged, or "
                    "was written by a newer trustmesh)"
                )
            section = _Section(table, [str(c) for c in columns])
            counts[table.name] = 0
            yield header, section, None
            continue
        if section is None or not isinstance(value, list) or len(value) != len(section.columns):
            raise BackupError(
                f"{path} line {number} is not a row of its table: the backup is damaged"
            )
        counts[section.table.name] += 1
        yield header, section, value
    if header is None:
        raise BackupError(f"{path} is empty")
    if trailer is None:
        raise BackupError(f"{path} has no end: the backup is truncated")
    if trailer.get("sha256") != sha.hexdigest():
        raise BackupError(f"{path} does not match its checksum: the backup is damaged")
    if trailer.get("rows") != counts:
        raise BackupError(f"{path} row counts do not match its end: the backup is damaged")
    if expected is not None and sha.hexdigest() != expected:
        raise BackupError(f"{path} changed while it was restored: nothing was restored")
    if digests is not None:
        digests.append(sha.hexdigest())


def _decode(section: _Section, values: list[Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, value in zip(section.columns, values, strict=True):
        if value is not None and isinstance(section.table.c[name].type, LargeBinary):
            value = base64.b64decode(value)
        row[name] = value
    return row


# -- checking -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """The checkpoint an operator says was published last (an auditor's or witness's copy,
    or ``trustmesh audit checkpoint -o json``), and how the backup relates to it."""

    checkpoint: Checkpoint
    note: str
    consistent: bool  # the backup's tree at its size has its root
    lost: int  # entries it signs that the backup lacks

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.checkpoint.size,
            "root_hash": base64.b64encode(self.checkpoint.root_hash).decode(),
            "consistent": self.consistent,
            "lost": self.lost,
        }


@dataclass
class Checked:
    """What the first pass of a restore established."""

    header: dict[str, Any]
    meta: dict[str, str]
    report: VerifyReport
    tree: MerkleLog
    checkpoints: list[tuple[int, str]]
    rows: dict[str, int] = field(default_factory=dict)
    published: Published | None = None
    warnings: list[str] = field(default_factory=list)
    sha256: str = ""  # the checksum the first pass verified

    @property
    def last_checkpoint(self) -> tuple[int, str] | None:
        return self.checkpoints[-1] if self.checkpoints else None


def _verifier_of(meta: Mapping[str, str], master: MasterKey) -> str:
    sealed, origin = meta.get(SIGNING_KEY), meta.get(ORIGIN)
    if sealed is None or origin is None:
        raise BackupError("the backup holds no audit signing key (meta audit_signing_key)")
    try:
        raw = master.open(sealed, SIGNING_KEY.encode())
        check = meta.get(MASTER_KEY_CHECK)
        if check is not None:
            master.open(check, CHECK_AAD)
    except MasterKeyError:
        raise MasterKeyError(
            "the master key does not open the keys sealed in this backup: restore with the "
            "master key of the control plane that wrote it (--master-key-file)"
        ) from None
    return verifier_key(origin, Ed25519PrivateKey.from_private_bytes(raw).public_key())


def _published(text: str, verifier: str, tree: MerkleLog) -> Published:
    note = text
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            raise BackupError("--published-checkpoint is neither a signed note nor JSON") from None
        note = str(document.get("note", "")) if isinstance(document, dict) else ""
    try:
        checkpoint = verify_checkpoint(note, verifier)
    except (CheckpointError, NoteError) as exc:
        raise BackupError(
            f"--published-checkpoint is not a checkpoint of the backup's log: {exc}"
        ) from None
    if checkpoint.size <= tree.size:
        consistent = checkpoint.size == 0 or tree.root(checkpoint.size) == checkpoint.root_hash
        return Published(checkpoint, note, consistent, 0)
    return Published(checkpoint, note, False, checkpoint.size - tree.size)


def check_backup(path: Path, master: MasterKey, published_checkpoint: str | None = None) -> Checked:
    """The first pass: everything a restore must know before it writes a byte."""
    meta: dict[str, str] = {}
    checkpoints: list[tuple[int, str]] = []
    tree = MerkleLog()
    verifier_state: LogVerifier | None = None
    verifier = ""
    header: dict[str, Any] = {}
    rows: dict[str, int] = {}
    warnings: list[str] = []
    digests: list[str] = []
    for line_header, section, values in _read(path, digests):
        assert section is not None
        header = line_header
        name = section.table.name
        if values is None:
            rows[name] = 0
            if name != "meta" and verifier_state is None:
                verifier = _verifier_of(meta, master)
                if meta.get(VERIFIER_KEY) not in (None, verifier):
                    warnings.append(
                        "the stored verifier key is not the sealed signing key's; "
                        "the derived one was used"
                    )
            continue
        rows[name] += 1
        row = _decode(section, values)
        if name == "meta":
            meta[str(row["name"])] = str(row["value"])
        elif name == "audit_checkpoints":
            checkpoints.append((int(row["size"]), str(row["note"])))
        elif name == "audit_entries":
            if verifier_state is None:
                verifier_state = LogVerifier(verifier, checkpoints)
            leaf = str(row["leaf"]).encode()
            verifier_state.add(int(row["idx"]), leaf, row.get("leaf_hash"))
            verifier_state.check_columns(int(row["idx"]), leaf, row)
            tree.append_leaf_hash(leaf_hash(leaf))
    if not verifier:
        verifier = _verifier_of(meta, master)
    if verifier_state is None:
        verifier_state = LogVerifier(verifier, checkpoints)
    report = verifier_state.finish()
    if not report.ok:
        first = report.problems[0] if report.problems else None
        where = f" at {first.where}" if first is not None else ""
        message = f": {first.message}" if first is not None else ""
        raise BackupError(
            f"the backup's audit log does not verify ({report.problem_count} problem(s)); "
            f"first{where}{message}"
        )
    checked = Checked(header, meta, report, tree, sorted(checkpoints), rows, None, warnings)
    checked.sha256 = digests[0]
    if published_checkpoint is not None:
        checked.published = _published(published_checkpoint, verifier, tree)
        if checked.published.lost == 0 and not checked.published.consistent:
            raise BackupError(
                f"the backup's log does not extend the published checkpoint of size "
                f"{checked.published.checkpoint.size} (another root at that size): it is not "
                "this log's history"
            )
    return checked


# -- restoring ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreResult:
    data_dir: str
    database: str
    trust_domain: str
    seconds: float
    backup_created_at: float
    schema_version: int
    rows: dict[str, int]
    audit_size: int
    checkpoints_verified: int
    published: Published | None
    new_origin: str | None
    origin_entry: int | None
    verifier_key: str
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "database": self.database,
            "trust_domain": self.trust_domain,
            "seconds": round(self.seconds, 3),
            "backup_created_at": self.backup_created_at,
            "schema_version": self.schema_version,
            "rows": self.rows,
            "audit_size": self.audit_size,
            "checkpoints_verified": self.checkpoints_verified,
            "published_checkpoint": None if self.published is None else self.published.to_json(),
            "fork_check": "skipped (no --published-checkpoint)"
            if self.published is None
            else "passed"
            if self.published.lost == 0
            else f"{self.published.lost} published entries lost; new log origin started",
            "new_origin": self.new_origin,
            "origin_entry": self.origin_entry,
            "verifier_key": self.verifier_key,
            "warnings": list(self.warnings),
        }


def load_master_key(data_dir: Path, master_key_file: Path | None) -> MasterKey:
    """The master key the restored control plane will run with: ``master_key_file``
    (read only), else ``DATA_DIR/master.key`` -- never created here: a new key would
    open none of the backup's sealed keys."""
    if master_key_file is not None:
        return MasterKey.load(master_key_file)
    path = data_dir / "master.key"
    if not path.exists():
        raise MasterKeyError(
            f"no master key at {path}: pass --master-key-file (the key of the control plane "
            "that wrote the backup), or copy it there"
        )
    return MasterKey.load_or_create(path)


def _existing_rows(engine: Engine) -> tuple[str, int] | None:
    """The first table of the schema that holds data (``meta`` counts only beyond the
    zero counters a migration seeds, ``analytics_state`` only beyond the runner's row a
    migration seeds over an empty log); None for an empty database."""
    present = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            if table.name not in present or table.name == "schema_migrations":
                continue
            query = select(func.count()).select_from(table)
            if table is schema.meta:
                query = query.where(
                    ~(schema.meta.c.name.in_(meta_store.COUNTERS) & (schema.meta.c.value == "0"))
                )
            if table is schema.analytics_state:
                state = schema.analytics_state.c
                query = query.where(
                    ~(state.holder.is_(None) & (state.cursor == -1) & (state.snapshots == "{}"))
                )
            count = int(conn.execute(query).scalar() or 0)
            if count:
                return table.name, count
    return None


def _target_engine_is_empty(db: str | None, data_dir: Path) -> None:
    url = make_url(engine_url(db, data_dir))
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        return
    engine = create_engine(url)
    shown = url.render_as_string(hide_password=True)
    try:
        found = _existing_rows(engine)
    except SQLAlchemyError as exc:
        raise BackupError(f"cannot open {shown}: {exc.__class__.__name__}") from None
    finally:
        engine.dispose()
    if found is not None:
        raise BackupError(
            f"{shown} is not empty ({found[1]} row(s) in {found[0]}): restore only into an "
            "empty database"
        )


def _load(db: Database, path: Path, expected: str) -> None:
    """The second pass: every row, in one transaction, over whatever the migrations
    seeded (the backup's own counters replace them); the file must be the one the first
    pass checked (``expected``, its checksum), else the transaction rolls back."""
    with db.engine.begin() as conn:
        for table in _tables(db.engine):
            conn.execute(delete(table))
        batch: list[dict[str, Any]] = []
        current: Table | None = None
        for _, section, values in _read(path, expected=expected):
            assert section is not None
            if values is None:
                if batch and current is not None:
                    conn.execute(current.insert(), batch)
                batch, current = [], section.table
                continue
            batch.append(_decode(section, values))
            if len(batch) >= BATCH:
                conn.execute(section.table.insert(), batch)
                batch = []
        if batch and current is not None:
            conn.execute(current.insert(), batch)


def _empty(db: str | None, data_dir: Path) -> None:
    """Drop every table a failed restore created or filled in the target, which was
    empty when the restore began (``_target_engine_is_empty``), so a retry starts from
    nothing."""
    url = engine_url(db, data_dir)
    engine = create_engine(url)
    try:
        tables = MetaData()
        tables.reflect(engine)
        tables.drop_all(engine)
    except SQLAlchemyError:
        log.exception(
            "a failed restore could not empty %s again",
            make_url(url).render_as_string(hide_password=True),
        )
    finally:
        engine.dispose()


def _new_origin_name(old: str) -> str:
    base, _, last = old.rpartition("/")
    stem = base if last.startswith("r") and last[1:].isdigit() else old
    name = f"{stem}/r{int(time.time())}"
    check_key_name(name)
    return name


def _start_new_origin(
    db: Database, master: MasterKey, checked: Checked, published: Published | None, reason: str
) -> tuple[str, int]:
    """DESIGN §10: the backup's log falls short of a published checkpoint. A new log key
    under a new origin continues the restored entries; its first entry records the old
    origin's last checkpoint the restored entries verify against and what was lost, and
    the old key's checkpoints leave the table (they stay in the backup and in that
    entry), so no key ever signs two inconsistent checkpoints. Returns the new origin
    and the index of its first entry.

    A scratch copy beside a live control plane (``trustmesh drill --server``) starts one
    too, whatever it lost: it will append entries of its own, which the live log's key
    must never sign."""
    trust_domain = checked.meta.get("trust_domain", "")
    old_origin = checked.meta[ORIGIN]
    origin = _new_origin_name(old_origin)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    with db.engine.begin() as conn:
        conn.execute(delete(schema.audit_checkpoints))
        meta_store.put(conn, SIGNING_KEY, master.seal(raw, SIGNING_KEY.encode()))
        meta_store.put(conn, ORIGIN, origin)
        meta_store.put(conn, VERIFIER_KEY, verifier_key(origin, key.public_key()))
    log = AuditLog(db, master, trust_domain, RESTORE_REPLICA)
    log.open()
    last = checked.last_checkpoint
    event = ev.new_event(
        ev.ORIGIN_STARTED,
        source={"kind": "control-plane", "id": RESTORE_REPLICA},
        actor="admin:restore",
        detail={
            "reason": reason,
            "old_origin": old_origin,
            "old_verifier_key": checked.meta.get(VERIFIER_KEY),
            "last_consistent_checkpoint": None if last is None else last[1],
            "published_checkpoint": None if published is None else published.note,
            "restored_entries": checked.tree.size,
            "lost_from_index": checked.tree.size,
            "lost_to_index": checked.tree.size + (0 if published is None else published.lost),
            "lost_entries": 0 if published is None else published.lost,
            "backup_created_at": ev.now_time(float(checked.header.get("created_at", 0.0))),
        },
    )
    index = log.size
    log.append([record_of(event)])
    log.checkpoint_now()
    return origin, index


def restore(
    path: Path,
    data_dir: Path,
    db: str | None,
    master_key_file: Path | None,
    *,
    published_checkpoint: str | None = None,
    accept_loss: bool = False,
    scratch: bool = False,
) -> RestoreResult:
    """Check the backup (:func:`check_backup`), then rebuild a control plane's database
    from it into an empty ``db`` (SQLite in ``data_dir`` by default). ``scratch``: a copy
    beside a live control plane, under a log origin of its own (:func:`_start_new_origin`)."""
    started = time.monotonic()
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)
    private_directory(data_dir, "data dir")
    master = load_master_key(data_dir, master_key_file)
    checked = check_backup(path, master, published_checkpoint)
    published = checked.published
    if published is not None and published.lost and not (accept_loss or scratch):
        raise BackupError(
            f"the backup's log has {checked.tree.size} entries but a checkpoint of "
            f"{published.checkpoint.size} was published: restoring it would fork the log. "
            f"Pass --accept-loss to start a new log origin that records the "
            f"{published.lost} lost entries"
        )
    version = int(checked.header.get("schema_version", 0))
    if not 1 <= version <= LATEST:
        raise BackupError(
            f"the backup is of schema version {version}; this trustmesh knows 1 to {LATEST}"
        )
    _target_engine_is_empty(db, data_dir)
    try:
        database = open_database(db, data_dir, schema_version=version)
    except (ConfigError, SQLAlchemyError) as exc:
        raise BackupError(f"cannot open the target database: {exc}") from None
    if _existing_rows(database.engine) is not None:  # a race with another writer
        database.dispose()
        raise BackupError("the target database filled while the restore began")
    try:
        _load(database, path, checked.sha256)
        database.dispose()
        database = open_database(db, data_dir)  # the migrations after the backup's version
        new_origin, origin_entry = None, None
        if scratch:
            new_origin, origin_entry = _start_new_origin(
                database, master, checked, published, "scratch copy beside a live control plane"
            )
        elif published is not None and published.lost:
            new_origin, origin_entry = _start_new_origin(
                database, master, checked, published, "restore accepted loss"
            )
        with database.engine.connect() as conn:
            size = int(
                conn.execute(select(func.count()).select_from(schema.audit_entries)).scalar() or 0
            )
            key = str(meta_store.get(conn, VERIFIER_KEY) or "")
        shown = database.url
    except BaseException:
        # nothing half-restored: the target was empty (checked above), so leave it so
        database.dispose()
        _empty(db, data_dir)
        raise
    finally:
        database.dispose()
    return RestoreResult(
        data_dir=str(data_dir),
        database=shown,
        trust_domain=checked.meta.get("trust_domain", ""),
        seconds=time.monotonic() - started,
        backup_created_at=float(checked.header.get("created_at", 0.0)),
        schema_version=version,
        rows=checked.rows,
        audit_size=size,
        checkpoints_verified=checked.report.checkpoints_verified,
        published=published,
        new_origin=new_origin,
        origin_entry=origin_entry,
        verifier_key=key,
        warnings=tuple(checked.warnings),
    )
