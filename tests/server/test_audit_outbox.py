"""Events of a change are written in the change's own transaction (the outbox) and then
sequenced: a change that rolls back leaves no event, a committed change whose process
died before sequencing is logged by whoever drains next, and two replicas draining the
same outbox log each event once. Real SQLite and PostgreSQL databases."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from trustmesh.audit import events as ev
from trustmesh.audit.log import AuditLog
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage import open_database
from trustmesh.storage.schema import audit_entries, audit_outbox, meta

MASTER = MasterKey(b"m" * 32)


def admin_event(n: int) -> dict[str, object]:
    return ev.new_event(
        "admin.test",
        source={"kind": "control-plane", "id": "r1"},
        actor="admin",
        detail={"n": n},
    )


def logged_ids(log: AuditLog) -> list[str]:
    with log.db.engine.connect() as conn:
        return list(
            conn.execute(select(audit_entries.c.event_id).order_by(audit_entries.c.idx)).scalars()
        )


def open_log(db_url: str | None, data_dir: Path, replica: str) -> AuditLog:
    log = AuditLog(open_database(db_url, data_dir), MASTER, "example.org", replica)
    log.open()
    return log


def test_a_rolled_back_change_leaves_no_event_and_a_committed_one_survives_a_crash(
    db_url: str | None, tmp_path: Path
) -> None:
    first = open_log(db_url, tmp_path, "r1")
    kept, dropped = admin_event(1), admin_event(2)
    with first.db.engine.begin() as conn:  # a change and its event, committed together
        conn.execute(meta.insert().values(name="change-1", value="x"))
        first.stage(conn, kept)
    with pytest.raises(IntegrityError), first.db.engine.begin() as conn:
        first.stage(conn, dropped)  # a change that fails after staging its event
        conn.execute(meta.insert().values(name="change-1", value="duplicate key"))
    # the process "dies" here, before draining; another replica (or the restart) drains
    second = open_log(db_url, tmp_path, "r2")
    assert second.drain_outbox() == 1
    assert logged_ids(second) == [kept["event_id"]]
    with second.db.engine.connect() as conn:
        assert conn.execute(select(audit_outbox)).all() == []
    assert second.drain_outbox() == 0
    assert first.drain_outbox() == 0  # the first replica catches up and finds nothing
    first.db.dispose()
    second.db.dispose()


def test_two_replicas_draining_at_once_log_each_event_once(
    db_url: str | None, tmp_path: Path
) -> None:
    logs = [open_log(db_url, tmp_path, f"r{i}") for i in range(2)]
    staged = [admin_event(i) for i in range(300)]
    for start in range(0, 300, 30):
        with logs[0].db.engine.begin() as conn:
            for event in staged[start : start + 30]:
                logs[0].stage(conn, event)
    errors: list[BaseException] = []

    def drain(log: AuditLog) -> None:
        try:
            log.drain_outbox()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ids = logged_ids(logs[0])
    assert sorted(ids) == sorted(e["event_id"] for e in staged)
    assert logs[0].checkpoint_now() is not None
    for log in logs:
        log.db.dispose()
