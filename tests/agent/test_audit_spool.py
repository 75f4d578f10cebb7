"""The agent's audit spool on real files: numbering across restarts, torn writes cut
off, the cursor, segment rotation and deletion, writes that are done before
``append`` returns (checked by killing a writer with SIGKILL), and the events the
agent builds for it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from agent_support import client_of, local_agent

from trustmesh.agent.audit import DecisionAudit, decision_event, shrunk
from trustmesh.agent.spool import CURSOR_FILE, SOURCE_FILE, AuditSpool, LineTooLong, segment_name
from trustmesh.audit.events import (
    AUTHZ_DECISION,
    check_event,
    new_event,
    new_event_id,
    now_time,
)
from trustmesh.common.errors import AuditUnavailable, SpoolError
from trustmesh.common.tracing import Span
from trustmesh.policy.engine import Engine


def event(n: int = 0, pad: int = 100) -> dict[str, Any]:
    return {"source": {"kind": "agent", "id": "test"}, "n": n, "pad": "x" * pad}


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def all_lines(directory: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(directory.glob("segment-*.jsonl")):
        found.extend(lines_of(path))
    return found


def drain(spool: AuditSpool, **limits: int) -> list[int]:
    """Read and acknowledge everything shippable; the seqs, in order."""
    seqs: list[int] = []
    while (batch := spool.read_batch(**limits)) is not None:
        body = orjson.loads(batch.body())
        seqs.extend(e["source"]["seq"] for e in body["events"])
        assert [e["source"]["seq"] for e in body["events"]] == list(
            range(batch.first_seq, batch.last_seq + 1)
        )
        spool.acknowledge(batch)
    return seqs


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "audit-spool"


def test_numbering_continues_across_reopen_under_one_source(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    source = spool.source_id
    assert [spool.append(event(i)) for i in range(5)] == [1, 2, 3, 4, 5]
    spool.close()
    spool = AuditSpool.open(directory, fsync_interval=0)
    assert spool.source_id == source and len(source) == 32
    assert spool.append(event()) == 6
    spool.close()
    assert [e["source"]["seq"] for e in all_lines(directory)] == [1, 2, 3, 4, 5, 6]
    assert oct(directory.stat().st_mode & 0o777) == "0o700"


def test_a_deleted_spool_starts_a_new_source(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    first = spool.source_id
    spool.append(event())
    spool.close()
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    spool = AuditSpool.open(directory, fsync_interval=0)
    assert spool.source_id != first
    assert spool.append(event()) == 1
    spool.close()


def test_segments_without_a_source_file_are_refused(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    spool.append(event())
    spool.close()
    (directory / SOURCE_FILE).unlink()
    with pytest.raises(SpoolError, match="no source file"):
        AuditSpool.open(directory)


def test_a_torn_last_line_is_cut_off(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    for i in range(3):
        spool.append(event(i))
    spool.close()
    segment = directory / segment_name(1)
    whole = segment.read_bytes()
    with open(segment, "ab") as handle:  # the process died in the middle of a write
        handle.write(b'{"source":{"kind":"agent","id":"test","seq":4},"n":')
    spool = AuditSpool.open(directory, fsync_interval=0)
    assert segment.read_bytes() == whole
    assert spool.append(event(3)) == 4
    spool.close()
    assert [e["n"] for e in lines_of(segment)] == [0, 1, 2, 3]


def test_a_damaged_last_line_after_power_loss_is_dropped(directory: Path) -> None:
    """Blocks written out of order: the file grew, but its tail holds zeros."""
    spool = AuditSpool.open(directory, fsync_interval=0)
    for i in range(3):
        spool.append(event(i))
    spool.close()
    segment = directory / segment_name(1)
    with open(segment, "ab") as handle:
        handle.write(b"\0" * 200 + b"\n" + b"\0" * 50)
    spool = AuditSpool.open(directory, fsync_interval=0)
    assert spool.append(event(3)) == 4
    spool.close()
    assert [e["source"]["seq"] for e in lines_of(segment)] == [1, 2, 3, 4]


def test_the_cursor_is_replaced_atomically_and_survives_reopen(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    for i in range(10):
        spool.append(event(i))
    assert drain(spool, max_events=4) == list(range(1, 11))
    assert (directory / CURSOR_FILE).read_text() == "10\n"
    assert not list(directory.glob("*.tmp"))
    for i in range(5):
        spool.append(event(i))
    spool.close()
    # a crash while the next cursor was being written leaves a stray temporary file
    (directory / (CURSOR_FILE + ".tmp")).write_text("1")
    spool = AuditSpool.open(directory, fsync_interval=0)
    assert spool.acked_seq == 10 and spool.backlog == 5
    assert drain(spool) == [11, 12, 13, 14, 15]
    spool.close()


def test_segments_rotate_and_acknowledged_ones_are_deleted(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0, segment_bytes=2048)
    for i in range(60):
        spool.append(event(i))
    segments = sorted(directory.glob("segment-*.jsonl"))
    assert len(segments) >= 4
    for path in segments:  # each named after its first seq, numbered without holes
        seqs = [e["source"]["seq"] for e in lines_of(path)]
        assert seqs[0] == int(path.stem.split("-")[1])
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert path.stat().st_size <= 2048
    # acknowledge part way (a batch never crosses a segment): only segments wholly
    # acknowledged go
    while spool.acked_seq < 25:
        batch = spool.read_batch(max_events=25 - spool.acked_seq)
        assert batch is not None and batch.first_seq == spool.acked_seq + 1
        spool.acknowledge(batch)
    assert spool.read_batch(max_events=1) is not None  # (not acknowledged)
    remaining = sorted(directory.glob("segment-*.jsonl"))
    assert remaining and all(lines_of(path)[-1]["source"]["seq"] >= 25 for path in remaining[:-1])
    spool.close()
    spool = AuditSpool.open(directory, fsync_interval=0, segment_bytes=2048)
    assert drain(spool, max_events=7) == list(range(26, 61))
    assert len(list(directory.glob("segment-*.jsonl"))) == 1
    assert spool.append(event()) == 61
    spool.close()


def test_batches_respect_event_and_byte_limits(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    for i in range(50):
        spool.append(event(i, pad=1000))
    batch = spool.read_batch(max_events=1000, max_bytes=10_000)
    assert batch is not None and 5 <= batch.size <= 10
    assert len(batch.body()) <= 10_000 + 100
    batch = spool.read_batch(max_events=3)
    assert batch is not None and batch.size == 3
    spool.close()


def test_only_fsynced_events_are_handed_to_the_shipper(directory: Path) -> None:
    """Whatever the control plane may hold is on disk first: after a power loss the
    spool never numbers a different event with a seq the control plane has seen."""
    spool = AuditSpool.open(directory, fsync_interval=60)
    spool.append(event())
    assert spool.written_seq == 1 and spool.read_batch() is None
    spool.sync()
    assert spool.read_batch() is not None
    spool.close()
    spool = AuditSpool.open(directory, fsync_interval=0.02)
    spool.append(event())
    deadline = time.monotonic() + 5
    while spool.synced_seq < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spool.synced_seq == 2  # the background fsync got there
    spool.close()


def test_numbering_never_goes_back_below_the_cursor(directory: Path) -> None:
    """Lines lost although the control plane acknowledged them (a disk that lied):
    numbering continues after the cursor, in a new segment."""
    spool = AuditSpool.open(directory, fsync_interval=0)
    for i in range(5):
        spool.append(event(i))
    drain(spool)
    spool.close()
    segment = directory / segment_name(1)
    segment.write_bytes(b"".join(segment.read_bytes().splitlines(keepends=True)[:2]))
    spool = AuditSpool.open(directory, fsync_interval=0)
    assert spool.append(event()) == 6
    assert (directory / segment_name(6)).exists()
    spool.close()


def test_every_line_is_in_the_file_when_append_returns(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=60)  # no fsync involved
    segment = directory / segment_name(1)
    for i in range(20):
        seq = spool.append(event(i))
        with open(segment, "rb") as reader:  # another descriptor, as after a crash
            assert orjson.loads(reader.read().splitlines()[-1])["source"]["seq"] == seq
    spool.close()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from trustmesh.agent.spool import AuditSpool
    spool = AuditSpool.open(Path(sys.argv[1]), fsync_interval=60, segment_bytes=64 * 1024)
    while True:
        seq = spool.append({"source": {"kind": "agent", "id": "x"}, "pad": "y" * 300})
        print(seq, flush=True)
    """
)


def test_sigkill_loses_nothing_append_returned(directory: Path) -> None:
    """A writer killed with SIGKILL mid-stream: every seq it reported (append had
    returned) is in the spool after recovery, numbering goes on after it."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    reported = 0
    while reported < 3000:
        reported = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    reported = max([reported, *(int(line) for line in writer.stdout.read().split())])
    spool = AuditSpool.open(directory, fsync_interval=0, segment_bytes=64 * 1024)
    seqs = [e["source"]["seq"] for e in all_lines(directory)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= reported
    assert spool.append(event()) == len(seqs) + 1
    assert len(list(directory.glob("segment-*.jsonl"))) > 1
    spool.close()


def test_a_spool_has_one_writer_until_it_dies(directory: Path) -> None:
    """Two writers would number their events alike (two agent replicas given one data
    dir): a second process is refused while the first has the spool open, and the
    kernel lets go of the lock when the first is killed, so its restart opens it."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    assert int(writer.stdout.readline()) >= 1  # it has the spool open
    with pytest.raises(SpoolError, match="in use by another agent process") as refused:
        AuditSpool.open(directory, fsync_interval=0)
    assert "--data-dir of its own" in str(refused.value)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    spool = AuditSpool.open(directory, fsync_interval=0)
    seqs = [e["source"]["seq"] for e in all_lines(directory)]
    assert spool.append(event()) == len(seqs) + 1
    with pytest.raises(SpoolError, match="in use"):  # one holder, in this process too
        AuditSpool.open(directory, fsync_interval=0)
    spool.close()
    AuditSpool.open(directory, fsync_interval=0).close()  # closing lets go


def test_a_line_too_long_is_refused_without_using_a_seq(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    with pytest.raises(LineTooLong):
        spool.append(event(pad=20_000))
    assert spool.append(event()) == 1
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(SpoolError):
        spool.append(event())


# --- the events --------------------------------------------------------------------


SPAN = Span(trace_id="ab" * 16, span_id="cd" * 8, parent_span_id=None)


def test_decision_events_are_what_new_event_builds() -> None:
    source = {"kind": "agent", "id": "f" * 32, "agent": "a1"}
    parts: dict[str, Any] = {
        "identity": {"spiffe_id": "spiffe://corp.example/x", "workload": None, "jti": "j"},
        "request": {"surface": "authorize", "host": "api", "path": "/", "method": "GET"},
        "decision": {"allowed": False, "reason": "r", "policy_revision": None},
    }
    fast = decision_event(source, "east", "spiffe://corp.example/x", **parts, span=SPAN)
    reference = new_event(
        AUTHZ_DECISION,
        source=source,
        cluster="east",
        actor="spiffe://corp.example/x",
        trace_id=SPAN.trace_id,
        span_id=SPAN.span_id,
        **parts,
    )
    assert list(fast) == list(reference)
    for name in ("type", "source", "cluster", "actor", "identity", "request", "decision"):
        assert fast[name] == reference[name], name
    fast["source"]["seq"] = 1
    check_event(fast)
    assert uuid.UUID(fast["event_id"]).version == 7
    assert source == {"kind": "agent", "id": "f" * 32, "agent": "a1"}  # not shared


def test_event_time_and_id_match_the_schema_helpers() -> None:
    for moment, text in (
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.999, "2023-11-14T22:13:20.999Z"),
        (1_700_000_001.5004, "2023-11-14T22:13:21.500Z"),
    ):
        assert now_time(moment) == text
    before = int(time.time() * 1000)
    ids = [new_event_id() for _ in range(1000)]
    after = int(time.time() * 1000)
    assert len(set(ids)) == 1000
    for value in ids[:50]:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 7  # RFC 9562: time-ordered
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # the 48-bit Unix milliseconds
    assert ids[0][:8] <= ids[-1][:8]


def test_events_the_json_log_cannot_hold_are_shrunk_to_fit(directory: Path) -> None:
    """A lone surrogate (valid in a JSON request, not in the log's UTF-8) and an event
    above the size limit are still audited, with the offending text cut."""
    spool = AuditSpool.open(directory, fsync_interval=0)
    audit = DecisionAudit(spool, "east", "agent-1")
    request = {"surface": "authorize", "verb": "get\ud800", "resource": "r" * 1024}
    decision = {
        "allowed": False,
        "reason": "x",
        "bindings": [f"binding-{i:04d}-" + "b" * 200 for i in range(100)],
    }
    assert audit.record(SPAN, request, decision) == 1
    stored = lines_of(directory / segment_name(1))[0]
    check_event(stored)
    assert stored["request"]["verb"] == "get?"
    assert len(stored["decision"]["bindings"]) == 21
    assert shrunk({"request": {"path": "/" + "p" * 300}})["request"]["path"].endswith("…")
    spool.close()


def test_an_unwritable_spool_makes_the_decision_unavailable(directory: Path) -> None:
    spool = AuditSpool.open(directory, fsync_interval=0)
    audit = DecisionAudit(spool, "east", "agent-1")
    spool.close()
    with pytest.raises(AuditUnavailable):
        audit.record(SPAN, {"surface": "authorize"}, {"allowed": False, "reason": "x"})
    assert audit.failures == 1


def test_no_answer_without_its_audit_record(directory: Path) -> None:
    """A spool that refuses writes: the agent answers 503 audit_unavailable on every
    surface instead of an unaudited decision."""
    agent = local_agent(directory.parent)
    agent.policy.engine = Engine({"cluster": "east", "revision": 3, "roles": {}, "bindings": []})
    spool = agent.spool
    access = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": "u", "nonResourceAttributes": {"path": "/", "verb": "get"}},
    }

    async def ask() -> tuple[list[httpx.Response], str]:
        async with client_of(agent) as http:
            first = await http.post("/k8s/authorize", json=access)
            spool.close()  # from now on every write fails
            answers = [
                await http.post("/k8s/authorize", json=access),
                await http.get("/ext_authz/api", headers={"host": "orders"}),
            ]
            metrics = (await http.get("/metrics")).text
        await agent.client.aclose()
        return [first, *answers], metrics

    (first, *refused), metrics = asyncio.run(ask())
    assert first.status_code == 200 and first.json()["status"]["allowed"] is False
    stored = lines_of(directory / segment_name(1))
    assert len(stored) == 1 and stored[0]["request"]["surface"] == "subjectaccessreview"
    assert stored[0]["decision"]["reason"].startswith("no opinion: ")
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "audit_unavailable"
        assert response.headers["retry-after"] == "1"
    assert "trustmesh_agent_audit_unavailable_total 2.0" in metrics
    assert "trustmesh_agent_audit_spooled_total 1.0" in metrics
