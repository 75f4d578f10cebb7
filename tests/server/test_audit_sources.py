"""Audit sources are bound to the credential that sends them (issue 10, finding 1):
``CLUSTER/AGENT/SPOOL``. What the log held before that (migration 6) neither breaks an
upgraded agent's numbering nor lets a source squatted back then block its agent. The
log itself on real SQLite and PostgreSQL databases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import delete, select, update

from trustmesh.audit import events as ev
from trustmesh.audit.events import UNBOUND
from trustmesh.audit.log import AuditLog, agent_records, record_of
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage import open_database
from trustmesh.storage.migrations import LATEST, migrate
from trustmesh.storage.schema import audit_entries, audit_gaps, audit_sources, schema_migrations

SPOOL = "5d44f30fbf66aa0f"


def decision(cluster: str, source_id: str, seq: int) -> dict[str, Any]:
    return ev.new_event(
        ev.AUTHZ_DECISION,
        source={"kind": "agent", "id": source_id, "agent": "instance-1", "seq": seq},
        cluster=cluster,
        request={"surface": "authorize"},
        decision={"allowed": True, "reason": "test", "policy_revision": 1},
    )


def body(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"events": events})


def open_log(db_url: str | None, data_dir: Path) -> AuditLog:
    log = AuditLog(open_database(db_url, data_dir), MasterKey(b"m" * 32), "example.org", "r1")
    log.open()
    return log


def sources(log: AuditLog) -> dict[str, Any]:
    with log.db.engine.connect() as conn:
        return {row.source: row for row in conn.execute(select(audit_sources))}


def test_an_agent_keeps_its_numbering_across_the_upgrade(
    db_url: str | None, tmp_path: Path
) -> None:
    log = open_log(db_url, tmp_path)
    # as the log held them before migration 6: keyed by the spool id alone
    log.append([record_of(decision("east", SPOOL, seq)) for seq in range(1, 6)])
    resent_and_new = [decision("east", SPOOL, seq) for seq in range(4, 8)]
    result = log.append(agent_records(body(resent_and_new), "east", "agent-7"))
    assert (result.accepted, result.duplicates, result.gaps) == (2, 2, [])
    assert sources(log)[f"east/agent-7/{SPOOL}"].next_seq == 8
    # another cluster's source of that spool id does not carry over
    other = log.append(agent_records(body([decision("west", SPOOL, 6)]), "west", "agent-7"))
    assert other.gaps == [(f"west/agent-7/{SPOOL}", 1, 5)]
    log.db.dispose()


def test_a_source_squatted_before_the_upgrade_cannot_block_its_agent(
    db_url: str | None, tmp_path: Path
) -> None:
    """Before migration 6 a credential of cluster west could name any source id, so it
    could squat the key east's agent would be bound to later (its spool id was on
    /readyz). The migration sets such sources apart; east's agent is not blocked."""
    log = open_log(db_url, tmp_path)
    key = f"east/agent-1/{SPOOL}"
    squat = [record_of(decision("west", key, seq)) for seq in (1, 2, 9)]
    assert log.append(squat).gaps == [(UNBOUND + key, 3, 8)]  # as migration 6 leaves it
    engine = log.db.engine
    with engine.begin() as conn:  # ... and as the log held it before migration 6
        for table in (audit_entries, audit_sources, audit_gaps):
            conn.execute(update(table).where(table.c.source == UNBOUND + key).values(source=key))
        conn.execute(delete(schema_migrations).where(schema_migrations.c.version == 6))
    assert migrate(engine) == LATEST
    assert set(sources(log)) == {UNBOUND + key}
    assert log.inconsistent is None
    result = log.append(
        agent_records(body([decision("east", SPOOL, seq) for seq in (1, 2)]), "east", "agent-1")
    )
    assert (result.accepted, result.duplicates, result.gaps) == (2, 0, [])
    state = sources(log)[key]
    assert (state.cluster, state.agent, state.next_seq) == ("east", "agent-1", 3)
    with engine.connect() as conn:
        rows = conn.execute(select(audit_entries.c.leaf, audit_entries.c.source)).all()
    for leaf, source in rows:  # every query column agrees with its record
        assert ev.query_columns(orjson.loads(leaf))["source"] == source
    log.db.dispose()
