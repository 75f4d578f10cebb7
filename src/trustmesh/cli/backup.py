"""``trustmesh backup``, ``trustmesh restore`` and ``trustmesh drill`` (DESIGN §10).

Backup and restore talk to the database directly (``--data-dir``/``--db``, as
``trustmesh audit verify --data-dir``), not to a server: see ``server/backup.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

from trustmesh.cli._common import (
    Output,
    OutputOption,
    TokenFileOption,
    fail,
    print_facts,
    print_json,
    print_table,
    resolve_token,
)
from trustmesh.common.errors import ConfigError, TrustmeshError
from trustmesh.common.files import read_mounted_file

DataDirOption = typer.Option(
    None, "--data-dir", help="The server's data dir (its SQLite database, unless --db)."
)
DbOption = typer.Option(
    None, "--db", help="postgresql://… when the server uses PostgreSQL (default: SQLite)."
)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def backup(
    out: Path = typer.Option(..., "--out", help="Write the backup here (mode 0600)."),
    data_dir: Path | None = DataDirOption,
    db: str | None = DbOption,
    output: Output = OutputOption,
) -> None:
    """Write a consistent backup of a control plane's database, online (one read
    transaction; sealed keys stay sealed; the audit log and its checkpoints included)."""
    from trustmesh.server.backup import write_backup

    if data_dir is None and db is None:
        fail("pass --data-dir (SQLite) or --db postgresql://…")
    try:
        summary = write_backup(data_dir, db, out)
    except ConfigError as exc:
        fail(exc.description)
    if output is Output.json:
        print_json(summary.to_json())
        return
    print_facts(
        [
            ("backup", summary.path),
            ("size", f"{summary.bytes} bytes"),
            ("rows", sum(summary.rows.values())),
            ("audit log", f"{summary.audit_size} entries, signed to {summary.checkpoint_size}"),
            ("schema", summary.schema_version),
            ("took", f"{summary.seconds:.2f} s"),
        ]
    )


def restore(
    in_: Path = typer.Option(..., "--in", help="The backup to restore."),
    data_dir: Path = typer.Option(
        ..., "--data-dir", help="The restored server's data dir (its SQLite database, unless --db)."
    ),
    db: str | None = DbOption,
    master_key_file: Path | None = typer.Option(
        None,
        "--master-key-file",
        envvar="TRUSTMESH_MASTER_KEY_FILE",
        help="The master key of the control plane that wrote the backup (default: "
        "DATA_DIR/master.key, which must exist).",
    ),
    published_checkpoint: Path | None = typer.Option(
        None,
        "--published-checkpoint",
        help="The checkpoint published last (a signed note, or `trustmesh audit checkpoint "
        "-o json`, e.g. an auditor's or witness's copy): the restore refuses to fork it.",
    ),
    accept_loss: bool = typer.Option(
        False,
        "--accept-loss",
        help="The backup falls short of the published checkpoint: start a new log origin "
        "(new log key) whose first entry records what was lost.",
    ),
    output: Output = OutputOption,
) -> None:
    """Rebuild a control plane's database from a backup, into an empty database (SQLite or
    PostgreSQL, whichever engine wrote it); refuses a backup whose audit log does not
    verify or whose sealed keys the master key does not open."""
    from trustmesh.server.backup import restore as run_restore

    try:
        published = (
            None
            if published_checkpoint is None
            else read_mounted_file(published_checkpoint, "published checkpoint").decode()
        )
        result = run_restore(
            in_,
            data_dir,
            db,
            master_key_file,
            published_checkpoint=published,
            accept_loss=accept_loss,
        )
    except ConfigError as exc:
        fail(exc.description)
    except UnicodeDecodeError:
        fail("--published-checkpoint is not UTF-8 text")
    if output is Output.json:
        print_json(result.to_json())
        return
    document = result.to_json()
    facts: list[tuple[str, object]] = [
        ("restored", f"{result.database} ({result.data_dir})"),
        ("backup taken", _when(result.backup_created_at)),
        ("rows", sum(result.rows.values())),
        (
            "audit log",
            f"{result.audit_size} entries; {result.checkpoints_verified} checkpoint(s) verified",
        ),
        ("fork check", document["fork_check"]),
        ("took", f"{result.seconds:.2f} s"),
    ]
    if result.new_origin is not None:
        facts.append(("new log origin", f"{result.new_origin} (entry {result.origin_entry})"))
    facts.extend(("warning", w) for w in result.warnings)
    print_facts(facts)


def drill(
    db: str | None = typer.Option(
        None,
        "--db",
        help="A scratch, empty PostgreSQL database for the drill's control plane (it is "
        "destroyed and restored); default: SQLite in the drill's data dir.",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Keep the drill's files (logs, backup) here (default: a temp dir)."
    ),
    log_entries: int = typer.Option(
        0,
        "--log-entries",
        min=0,
        help="Fill the drill's audit log to this many entries first (agent decisions "
        "shipped through the ingest endpoint), to see the recovery time of a log that size.",
    ),
    server: str | None = typer.Option(
        None,
        "--server",
        help="Drill beside this live control plane instead: back it up (read only) and "
        "restore into a scratch instance (--db, else SQLite in the drill's data dir).",
    ),
    live_data_dir: Path | None = typer.Option(
        None, "--live-data-dir", help="With --server: the live server's data dir."
    ),
    live_db: str | None = typer.Option(
        None, "--live-db", help="With --server: the live server's postgresql://… database."
    ),
    master_key_file: Path | None = typer.Option(
        None,
        "--master-key-file",
        help="With --server: the live master key (default: LIVE_DATA_DIR/master.key).",
    ),
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """A disaster-recovery drill on a local federation: back up, generate traffic, crash
    the control plane and destroy its database, restore, restart; report recovery time,
    what was lost, and whether each guarantee held (exit 1 if one failed). With --server,
    a live control plane is backed up and restored beside itself, never touched."""
    from trustmesh.sim.drill import run_drill, run_live_drill

    try:
        if server is None:
            report = run_drill(db, data_dir, log_entries)
        else:
            report = run_live_drill(
                server,
                resolve_token(token_file),
                live_data_dir,
                live_db,
                master_key_file,
                db,
                data_dir,
            )
    except ConfigError as exc:
        fail(exc.description)
    except TrustmeshError as exc:
        fail(exc.description)
    if output is Output.json:
        print_json(report.to_json())
    else:
        lost = report.lost
        print_facts(
            [
                ("engine", report.engine),
                (
                    "recovery time",
                    f"{report.recovery_seconds:.2f} s "
                    + (
                        "(database destroyed -> serving)"
                        if report.mode == "local"
                        else "(restore -> scratch instance serving)"
                    ),
                ),
                (
                    "lost (after the backup)",
                    f"{lost['entries']} log entries"
                    + (f" [{lost['first_index']}..{lost['last_index']}]" if lost["entries"] else "")
                    + (
                        f"; registry revision {lost['changes']['registry_revision']}"
                        if lost["changes"]
                        else ""
                    ),
                ),
                ("lost by type", ", ".join(f"{k} {v}" for k, v in lost["by_type"].items()) or "-"),
                ("new log origin", lost["new_log_origin"] or "-"),
            ]
        )
        print_table(
            ["guarantee", "held", "detail"],
            [
                [name, {True: "yes", False: "NO", None: "n/a"}[g["ok"]], g["detail"]]
                for name, g in report.guarantees.items()
            ],
            title="drill",
        )
    if not report.ok:
        raise typer.Exit(1)
