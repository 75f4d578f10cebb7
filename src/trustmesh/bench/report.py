"""``trustmesh bench report --entries N``: how long ``trustmesh report`` takes over a log of
N entries (issue 15 goal: 1,000,000 entries in ≤ 30 s).

The log is a SQLite file opened as ``trustmesh server`` opens it, filled through the
sequencer (``AuditLog.append``, batches of 1000 from 8 agent spools taking turns) with
``bench audit``'s agents' ``authz.decision`` events (``bench/audit.py``'s filler: seven
workloads calling each other across four clusters, 90 % allowed by a
``<caller>-to-<target>`` binding), their times spread evenly over the day before now,
plus one access request and its approval every 10,000 entries. The policy has every
binding the filler names and one that nothing uses; the registry one Workload per
workload. Filling is not timed. Then ``analytics.report.build_report`` runs over the
whole day, as ``GET /v1/report`` would, timed once per round; the peak resident size of
the process is reported beside it (the report reads the log page by page)."""

from __future__ import annotations

import random
import resource
import secrets
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from trustmesh.analytics.report import ReportInputs, build_report
from trustmesh.audit import events as ev
from trustmesh.audit.log import AuditLog, Record, record_of
from trustmesh.bench.audit import CLUSTERS, TRUST_DOMAIN, WORKLOADS, _agent_event
from trustmesh.identity.sealing import MasterKey
from trustmesh.manifests import API_VERSION, document_from_body
from trustmesh.policy.compiler import PolicySet
from trustmesh.registry import build_registry
from trustmesh.storage.db import open_database

__all__ = ["run"]

GOAL_SECONDS_PER_MILLION = 30.0
BATCH = 1000
SPOOLS = 8
DAY = 86400.0
ACCESS_EVERY = 10_000


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def _world() -> ReportInputs:
    bodies = [_doc("Cluster", c, {"issuer": f"https://{c}.example"}) for c in CLUSTERS]
    for i, w in enumerate(WORKLOADS):
        bodies.append(
            _doc(
                "Workload",
                w,
                {
                    "selector": {
                        "cluster": CLUSTERS[i % len(CLUSTERS)],
                        "namespace": w,
                        "serviceAccount": w,
                    }
                },
            )
        )
    for target in WORKLOADS:
        rule = {"services": ["*.svc"], "paths": [f"/api/v1/{target}/*"], "methods": ["*"]}
        bodies.append(_doc("GlobalRole", f"{target}-reader", {"rules": [rule]}))
        for caller in WORKLOADS:
            bodies.append(
                _doc(
                    "RoleBinding",
                    f"{caller}-to-{target}",
                    {"role": f"{target}-reader", "subjects": [{"workload": caller}]},
                )
            )
    bodies.append(
        _doc(
            "GlobalRole",
            "admin",
            {"rules": [{"services": ["*"], "paths": ["/**"], "methods": ["*"]}]},
        )
    )
    bodies.append(
        _doc("RoleBinding", "ledger-admin", {"role": "admin", "subjects": [{"workload": "ledger"}]})
    )
    documents = [document_from_body(b) for b in bodies]
    registry = build_registry(
        TRUST_DOMAIN, 1, [d for d in documents if d.kind in ("Cluster", "Workload")]
    )
    return ReportInputs(
        registry=registry,
        policy=PolicySet.from_documents(documents),
        policy_revision=42,
        tests=(),
        stale=(),
        stale_days=30.0,
    )


def _access_pair(rng: random.Random, at: float) -> list[Record]:
    request_id = f"{rng.getrandbits(40):010x}"
    detail = {
        "id": request_id,
        "requester": "user:rita",
        "role": "orders-reader",
        "subject": {"workload": "orders"},
        "clusters": [CLUSTERS[0]],
        "namespaces": None,
        "duration": 3600,
        "reason": "bench",
    }
    source = {"kind": "control-plane", "id": "bench-replica"}
    asked = ev.new_event(ev.ACCESS_REQUESTED, source=source, actor="user:rita", detail=detail)
    asked["time"] = ev.now_time(at)
    approved = ev.new_event(ev.ACCESS_APPROVED, source=source, actor="user:dave", detail=detail)
    approved["time"] = ev.now_time(at + rng.uniform(30, 900))
    return [record_of(asked), record_of(approved)]


def _fill(log: AuditLog, entries: int, start: float, seed: int) -> int:
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not security
    step = DAY / max(1, entries)
    spools = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(SPOOLS)]
    next_seq = [1] * SPOOLS
    written, turn = 0, 0
    while written < entries:
        spool = turn % SPOOLS
        turn += 1
        cluster = CLUSTERS[spool % len(CLUSTERS)]
        records: list[Record] = []
        while len(records) < min(BATCH, entries - written):
            position = written + len(records)
            if position and position % ACCESS_EVERY == 0 and entries - position >= 2:
                records.extend(_access_pair(rng, start + position * step))
                continue
            event = _agent_event(rng, spools[spool], cluster, next_seq[spool])
            next_seq[spool] += 1
            event["time"] = ev.now_time(start + position * step)
            records.append(record_of(event))
        log.append(records)
        written += len(records)
    return written


def run(entries: int = 1_000_000, rounds: int = 1, seed: int = 15) -> dict[str, Any]:
    """Fill a log of ``entries`` entries, then time the report over it ``rounds`` times."""
    if entries < 1 or rounds < 1:
        raise ValueError("entries and rounds must be positive")
    inputs = _world()
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-report-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        db = open_database(None, data)
        try:
            log = AuditLog(db, MasterKey(secrets.token_bytes(32)), TRUST_DOMAIN, "bench-replica")
            log.open()
            now = time.time()
            fill_started = time.perf_counter()
            written = _fill(log, entries, now - DAY, seed)
            log.checkpoint_now()
            fill_s = time.perf_counter() - fill_started
            seconds: list[float] = []
            body: dict[str, Any] = {}
            for _ in range(rounds):
                started = time.perf_counter()
                body = build_report(db, inputs, now - DAY - 1, now + 1, time.time())
                seconds.append(time.perf_counter() - started)
        finally:
            db.dispose()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = statistics.median(seconds)
    goal = GOAL_SECONDS_PER_MILLION * max(1.0, written / 1_000_000)
    lp = body["leastPrivilege"]
    return {
        "title": f"trustmesh report over a {written:,}-entry SQLite log",
        "entries": written,
        "fill_seconds": round(fill_s, 2),
        "report_seconds": [round(s, 3) for s in seconds],
        "peak_rss_mb": round(peak_mb, 1),
        "results": [
            {
                "name": "report (whole day)",
                "p50_us": round(median * 1e6),
                "p99_us": round(max(seconds) * 1e6),
                "per_s": round(written / median),
                "note": f"{median:.2f} s; goal ≤ {goal:.0f} s "
                f"({'met' if median <= goal else 'missed'})",
            }
        ],
        "summary": [
            f"decisions {body['decisions']['total']:,}, access requests fulfilled "
            f"{body['access']['fulfilled']} (p50 {body['access']['p50Seconds']} s), "
            f"unused grants {len(lp['unused'])}, narrowable {len(lp['narrowable'])}",
            f"filled in {fill_s:.1f} s (not timed); peak RSS {peak_mb:.0f} MB",
        ],
    }
