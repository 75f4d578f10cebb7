"""``trustmesh bench analytics``: what the anomaly detectors cost beside the audit
sequencer, how soon a trigger becomes a finding, and how long the report takes (issue 15,
"Measure"; DESIGN §11).

**1. Ingestion beside the detectors.** A real control plane (``ControlPlane``: SQLite
in a temporary data dir, opened and started as ``trustmesh server`` does, its background
loops running on an event loop in a thread of the bench process) sequences agents'
``authz.decision`` batches the way ``bench audit`` drives the sequencer (its
``_append_round``: ``agent_records`` on the JSON body, then ``AuditLog.append``; batches
of 1000 from 8 spools taking turns). Two arms, the same workload:

* ``off``: no analytics runner (``--analytics off``);
* ``on``: the runner as ``trustmesh server`` runs it (``--analytics process``): the
  analytics child process (``server/analysis.py``, started and stopped by the same
  ``AnalyticsProcess`` the server uses) on the same SQLite database, a round every
  ``ANALYTICS_INTERVAL`` and at once after a round that read a full batch (the lease,
  reading the new entries, every detector, the commit of findings and state). The
  appends start once the child holds the lease.

Each trial runs both arms, each on a fresh control plane, in alternating order (off/on,
then on/off…); a rate is events / wall time of the arm's appends, the median over
trials. Beside the on arm: the entries the runner read meanwhile (its cursor) and its
backlog at the end. After each off arm's appends, the runner is called back to back
(``run_once`` without the interval) over up to ``catchup`` entries of the backlog: what
one runner reads, detects and commits per second when it never waits.

**Detectors alone.** The six event detectors (``all_detectors()``; ``escalation`` reads
policy diffs, not the stream) fed ``detector_events`` of the same decisions, their times
20,000 a second apart, every detector's warm-up 0 (each one does its full work), in
process, no database; median of ``rounds`` fresh sets.

**2. Trigger → finding.** A real ``trustmesh server`` (``bench/_federation.py``; its
refusal limits raised so every refused exchange is its own ``token.exchange_failed``
event, not folded into a window's summary) with an AnomalyPolicy: ``refusal_burst``
window 60 s, threshold 3, warm-up 0. Each trigger is a burst of 4 forged SA tokens
(signed by an attacker's key, claiming an issuer of their own: one key per trigger)
at ``/oauth2/token``; the bench waits for the finding in ``GET /v1/anomalies``, then a
random pause below the runner's interval (so triggers land at every phase of its
rounds). Afterwards the server's SQLite file is read: per finding, the time from the
triggering entry (the last of its evidence) being sequenced (``sequenced_at``) to its
``anomaly.detected`` event being sequenced, and to its row's ``detected_at`` (the
runner's clock when it committed). Both times are the server's own clock.

**3. The report.** ``bench report`` (``bench/report.py``) over ``report_entries``.

Goals (issue 15): ingestion with the runner on ≥ 20,000 events/s on SQLite; trigger →
finding p99 ≤ 5 s; the report ≤ 30 s over 1,000,000 entries (``trustmesh bench report``
measures that size on its own)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from trustmesh.analytics.detectors import all_detectors, observe_all
from trustmesh.analytics.settings import DEFAULTS, AnomalySettings
from trustmesh.audit import events as ev
from trustmesh.bench import report as report_bench
from trustmesh.bench._federation import TRUST_DOMAIN, Federation, es256_key, federation
from trustmesh.bench._stats import row, verdict
from trustmesh.bench.audit import CLUSTERS, _agent_event, _append_round, _Target
from trustmesh.common.token_exchange import exchange_form
from trustmesh.identity.svid import mint_svid
from trustmesh.manifests import API_VERSION
from trustmesh.server.analysis import AnalyticsProcess
from trustmesh.server.analytics import BATCH as RUNNER_BATCH
from trustmesh.server.analytics import RUNNER
from trustmesh.server.controlplane import ANALYTICS_INTERVAL, ControlPlane, ServerConfig
from trustmesh.storage.schema import analytics_state

__all__ = ["run"]

GOAL_INGEST_PER_S = 20_000.0
GOAL_P99_S = 5.0
BATCH = 1000  # an agent's full upload
RUNNER_START_TIMEOUT = 60.0  # seconds the analytics child has to take the lease
DETECTOR_RATE = 20_000.0  # event times of the detectors-alone run: this many a second
BURST_THRESHOLD = 3  # refusal_burst fires on the 4th refusal of a key in its window
BURST_WINDOW = 60
FINDING_TIMEOUT = 30.0  # seconds a trigger's finding may take before the bench gives up
ORIGIN = "bench-origin"


# -- 1. ingestion, the runner off and on ---------------------------------------------------


@contextlib.contextmanager
def _plane(data: Path) -> Iterator[ControlPlane]:
    """A control plane opened and started as ``trustmesh server --analytics off`` does
    (no HTTP: the appends call the sequencer), its loops on an event loop in a thread."""
    config = ServerConfig(data_dir=data, trust_domain=TRUST_DOMAIN, analytics="off")
    plane = ControlPlane(config, "http://127.0.0.1:1")  # never served, never called
    plane.open()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-control-plane", daemon=True)
    thread.start()
    started = False
    try:
        asyncio.run_coroutine_threadsafe(plane.start(), loop).result(timeout=60)
        started = True
        yield plane
    finally:
        if started:
            asyncio.run_coroutine_threadsafe(plane.stop(), loop).result(timeout=60)
        else:
            plane.db.dispose()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _state(plane: ControlPlane) -> tuple[str | None, int]:
    """The runner's lease holder and the last audit index it committed as read."""
    with plane.db.engine.connect() as conn:
        holder, cursor = conn.execute(
            select(analytics_state.c.holder, analytics_state.c.cursor).where(
                analytics_state.c.name == RUNNER
            )
        ).one()
    return holder, int(cursor)


def _cursor(plane: ControlPlane) -> int:
    return _state(plane)[1]


@contextlib.contextmanager
def _analytics_process(plane: ControlPlane) -> Iterator[None]:
    """The analytics child on the plane's database, as ``trustmesh server`` starts it;
    yields once it holds the lease, stops it (the lease released) afterwards."""
    config = replace(plane.config, analytics="process", analytics_interval=ANALYTICS_INTERVAL)
    child = AnalyticsProcess(config, plane.issuer)
    child.start()
    try:
        deadline = time.monotonic() + RUNNER_START_TIMEOUT
        while _state(plane)[0] is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the analytics process did not take the lease; see above")
            time.sleep(0.05)
        yield
    finally:
        child.stop()


def _arm(
    root: Path, label: str, runner: bool, events: int, catchup: int, rng: random.Random
) -> dict[str, Any]:
    data = root / label
    with _plane(data) as plane, contextlib.ExitStack() as stack:
        if runner:
            stack.enter_context(_analytics_process(plane))
        target = _Target(label, "", plane.db, plane.audit, (BATCH,))
        first_cursor = _cursor(plane)
        started = time.perf_counter()
        _append_round(target, BATCH, events, rng)
        wall = time.perf_counter() - started
        read = _cursor(plane) - first_cursor
        size = plane.audit.size
        arm: dict[str, Any] = {
            "arm": "on" if runner else "off",
            "events": events,
            "events_per_s": target.rates[BATCH][0],
            "wall_s": round(wall, 3),
            "log_size": size,
        }
        if runner:
            arm["runner_read"] = read
            arm["runner_read_per_s"] = read / wall if wall > 0 else 0.0
            arm["runner_backlog"] = size - 1 - (first_cursor + read)
        elif catchup > 0:
            arm.update(_catch_up(plane, catchup))
    return arm


def _catch_up(plane: ControlPlane, entries: int) -> dict[str, Any]:
    """The runner called back to back over the backlog, up to ``entries`` entries."""
    first = _cursor(plane)
    goal = min(entries, plane.audit.size - 1 - first)
    runner = plane.analytics
    findings = 0
    started = time.perf_counter()
    while runner.cursor is None or runner.cursor - first < goal:
        findings += len(runner.run_once())
        if runner.cursor is None:
            raise RuntimeError("the bench's analytics runner did not take the lease")
    wall = time.perf_counter() - started
    read = runner.cursor - first
    return {
        "catchup_read": read,
        "catchup_s": round(wall, 3),
        "catchup_per_s": read / wall if wall > 0 else 0.0,
        "catchup_findings": findings,
    }


@contextlib.contextmanager
def _own_resource_tracker() -> Iterator[None]:
    """multiprocessing's spawn starts a resource tracker process beside the first child
    it starts and keeps it for the life of this process; one the bench started is
    stopped when the bench is done with its children, so it leaves no process behind."""
    tracker = resource_tracker._resource_tracker
    had = getattr(tracker, "_pid", None) is not None
    try:
        yield
    finally:
        if not had and getattr(tracker, "_pid", None) is not None:
            tracker._stop()  # type: ignore[attr-defined]  # private, in 3.11 and later


def _ingestion(trials: int, events: int, catchup: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not security
    arms: list[dict[str, Any]] = []
    with (
        _own_resource_tracker(),
        tempfile.TemporaryDirectory(prefix="trustmesh-bench-analytics-") as tmp,
    ):
        root = Path(tmp)
        for trial in range(trials):
            order = (False, True) if trial % 2 == 0 else (True, False)
            for runner in order:
                label = f"t{trial}-{'on' if runner else 'off'}"
                arm = _arm(root, label, runner, events, catchup, rng)
                arm["trial"] = trial
                arms.append(arm)
    return arms


# -- the detectors alone ----------------------------------------------------------------


def _detectors_alone(events: int, rounds: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 -- benchmark data, not security
    spools = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(8)]
    start = time.time() - events / DETECTOR_RATE
    stream: list[dict[str, Any]] = []
    for i in range(events):
        spool = i % len(spools)
        event = _agent_event(rng, spools[spool], CLUSTERS[spool % len(CLUSTERS)], i // 8 + 1)
        event["time"] = ev.now_time(start + i / DETECTOR_RATE)
        stream.append(orjson.loads(orjson.dumps(event)))  # as the runner reads a leaf
    settings = AnomalySettings(detectors={n: replace(s, warmup=0) for n, s in DEFAULTS.items()})
    rates: list[float] = []
    findings = 0
    for _ in range(rounds):
        detectors = all_detectors()
        started = time.perf_counter()
        found = observe_all(detectors, enumerate(stream), settings)
        wall = time.perf_counter() - started
        rates.append(events / wall if wall > 0 else 0.0)
        findings = len(found)
    return {
        "events": events,
        "detectors": [d.name for d in all_detectors()],
        "rounds_per_s": [round(r, 1) for r in rates],
        "events_per_s": statistics.median(rates),
        "findings": findings,
    }


# -- 2. trigger -> finding -------------------------------------------------------------


def _policy_doc() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AnomalyPolicy",
        "metadata": {"name": "default"},
        "spec": {
            "detectors": {
                "refusal_burst": {
                    "window": BURST_WINDOW,
                    "threshold": BURST_THRESHOLD,
                    "warmup": 0,
                }
            }
        },
    }


def _burst(fed: Federation, issuer: str) -> None:
    """``BURST_THRESHOLD + 1`` forged SA tokens claiming ``issuer``, each refused."""
    _, _, key = es256_key()  # the attacker's key
    audience = f"spiffe://{TRUST_DOMAIN}/cluster/{ORIGIN}"
    for _ in range(BURST_THRESHOLD + 1):
        now = int(time.time())
        claims = {
            "iss": issuer,
            "sub": "system:serviceaccount:shop:payments",
            "aud": [issuer],
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        form = exchange_form(mint_svid(key, claims), audience)
        answer = fed.http.post(fed.url + "/oauth2/token", data=form)
        if answer.status_code not in (400, 401):
            raise RuntimeError(
                f"a forged token was not refused: HTTP {answer.status_code} {answer.text[:200]}"
            )


def _await_finding(fed: Federation, issuer: str) -> str:
    """The id of the ``refusal_burst`` finding about ``issuer``, once it is listed."""
    key = f"refusal_burst:issuer:{issuer}"
    deadline = time.monotonic() + FINDING_TIMEOUT
    while True:
        answer = fed.http.get(
            fed.url + "/v1/anomalies", params={"detector": "refusal_burst"}, headers=fed.admin
        )
        if answer.status_code != 200:
            raise RuntimeError(f"listing anomalies: HTTP {answer.status_code} {answer.text[:200]}")
        for item in answer.json()["items"]:
            if item["key"] == key:
                return str(item["id"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"no finding for {issuer} within {FINDING_TIMEOUT:g} s")
        time.sleep(0.02)


def _latencies(database: Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    """Per finding: its trigger's sequencing, its row's ``detected_at`` and its
    ``anomaly.detected`` event's sequencing, read from the server's SQLite file."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        rows = {
            r[0]: (json.loads(r[1]), float(r[2]))
            for r in conn.execute("SELECT id, evidence, detected_at FROM anomalies")
        }
        events: dict[str, float] = {}
        for leaf, at in conn.execute(
            "SELECT leaf, sequenced_at FROM audit_entries WHERE type = ?", (ev.ANOMALY_DETECTED,)
        ):
            events[str(json.loads(leaf)["detail"]["id"])] = float(at)
        out = []
        for anomaly_id in ids:
            evidence, detected_at = rows[anomaly_id]
            trigger = max(evidence)
            (sequenced,) = conn.execute(
                "SELECT sequenced_at FROM audit_entries WHERE idx = ?", (trigger,)
            ).fetchone()
            out.append(
                {
                    "id": anomaly_id,
                    "trigger_index": trigger,
                    "to_row_s": detected_at - float(sequenced),
                    "to_event_s": events[anomaly_id] - float(sequenced),
                }
            )
    return out


def _trigger_to_finding(triggers: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)  # noqa: S311 -- benchmark pacing, not security
    limits = ["--audit-refusal-per-source", "1000000", "--audit-refusal-quota", "1000000"]
    with federation(ORIGIN, server_args=limits) as fed:
        fed.apply([_policy_doc()])
        # a burst first, untimed: the runner has taken up the policy once it reports one
        _burst(fed, f"https://probe.{TRUST_DOMAIN}")
        _await_finding(fed, f"https://probe.{TRUST_DOMAIN}")
        ids = []
        for i in range(triggers):
            time.sleep(rng.uniform(0.0, ANALYTICS_INTERVAL))
            issuer = f"https://forged-{i}.{TRUST_DOMAIN}"  # no cluster has this issuer
            _burst(fed, issuer)
            ids.append(_await_finding(fed, issuer))
        trials = _latencies(fed.root / "server" / "trustmesh.db", ids)
    return {"triggers": triggers, "trials": trials}


def _spread(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p99 (nearest rank, as ``_stats.percentile``) and max of seconds."""
    ordered = sorted(values)

    def nearest(q: float) -> float:
        return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]

    return {"n": len(ordered), "p50_s": nearest(50), "p99_s": nearest(99), "max_s": ordered[-1]}


# -- the whole ------------------------------------------------------------------------


def run(
    trials: int = 3,
    events: int = 60_000,
    triggers: int = 20,
    report_entries: int = 20_000,
    *,
    detector_events: int = 100_000,
    catchup: int = 20_000,
    rounds: int = 3,
    seed: int = 15,
) -> dict[str, Any]:
    """``trials`` pairs (runner off, runner on) of ``events`` events each; the detectors
    alone over ``detector_events``; ``triggers`` refusal bursts timed to their finding;
    ``bench report`` over ``report_entries``."""
    if min(trials, events, triggers, report_entries, detector_events, rounds) < 1:
        raise ValueError("every size and count must be positive")
    if catchup < 0:
        raise ValueError("catchup must not be negative")
    arms = _ingestion(trials, events, catchup, seed)
    alone = _detectors_alone(detector_events, rounds, seed)
    latency = _trigger_to_finding(triggers, seed)
    report = report_bench.run(entries=report_entries, rounds=1, seed=seed)
    return _result(arms, alone, latency, report, trials, events)


def _result(
    arms: list[dict[str, Any]],
    alone: dict[str, Any],
    latency: dict[str, Any],
    report: dict[str, Any],
    trials: int,
    events: int,
) -> dict[str, Any]:
    off = [a for a in arms if a["arm"] == "off"]
    on = [a for a in arms if a["arm"] == "on"]
    off_rate = statistics.median(a["events_per_s"] for a in off)
    on_rate = statistics.median(a["events_per_s"] for a in on)
    ratio = on_rate / off_rate if off_rate > 0 else 0.0
    beside = statistics.median(a["runner_read_per_s"] for a in on)
    backlog = max(a["runner_backlog"] for a in on)
    keeps_up = backlog <= RUNNER_BATCH  # no more left than one round reads
    caught = [a for a in off if a.get("catchup_read")]
    catchup_rate = statistics.median(a["catchup_per_s"] for a in caught) if caught else None
    to_event = _spread([t["to_event_s"] for t in latency["trials"]])
    to_row = _spread([t["to_row_s"] for t in latency["trials"]])
    report_row = report["results"][0]
    report_s = statistics.median(report["report_seconds"])
    ingest_met = on_rate >= GOAL_INGEST_PER_S
    latency_met = to_event["p99_s"] <= GOAL_P99_S
    rows = [
        row(
            "ingest, analytics process off",
            per_s=off_rate,
            note=f"events/s sequenced, SQLite, batches of {BATCH}; median of {len(off)}",
        ),
        row(
            "ingest, analytics process on",
            per_s=on_rate,
            note=f"on/off {ratio:.2f}; goal ≥ {GOAL_INGEST_PER_S:,.0f}/s {verdict(ingest_met)}",
        ),
        row(
            "runner beside ingestion",
            per_s=beside,
            note=f"entries the runner read a second meanwhile; backlog up to {backlog:,}",
        ),
    ]
    if catchup_rate is not None:
        rows.append(
            row(
                "runner back to back",
                per_s=catchup_rate,
                note="run_once without its interval: read, 7 detectors, commit",
            )
        )
    rows += [
        row(
            "six detectors alone",
            per_s=alone["events_per_s"],
            note=f"in process, warm-up 0, {alone['events']:,} events, {alone['findings']} findings",
        ),
        row(
            "trigger -> anomaly.detected",
            p50_us=to_event["p50_s"] * 1e6,
            p99_us=to_event["p99_s"] * 1e6,
            note=f"{to_event['n']} refusal bursts; goal p99 ≤ {GOAL_P99_S:g} s "
            f"{verdict(latency_met)}",
        ),
        row(
            "trigger -> finding row",
            p50_us=to_row["p50_s"] * 1e6,
            p99_us=to_row["p99_s"] * 1e6,
            note="the row's detected_at (the runner's commit)",
        ),
        row(
            f"report over {report['entries']:,} entries",
            per_s=report_row["per_s"],
            note=f"{report_s:.2f} s; 1,000,000 entries: trustmesh bench report",
        ),
    ]
    summary = [
        f"ingestion: {trials} trials, each runner off and on, of {events:,} events, each arm "
        "on a fresh control plane, order alternating; median events/s of the sequencer "
        f"(agent_records + AuditLog.append): off {off_rate:,.0f}, on {on_rate:,.0f} "
        f"(on/off {ratio:.2f}); goal on ≥ {GOAL_INGEST_PER_S:,.0f} {verdict(ingest_met)}",
        f"the runner (its own process) read {beside:,.0f} entries/s beside it (at most "
        f"{RUNNER_BATCH} a round, "
        f"a round every {ANALYTICS_INTERVAL:g} s; an arm shorter than that ends before its "
        f"first round); backlog at the end of an on arm up to {backlog:,} entries: "
        + ("it kept up" if keeps_up else "it does NOT keep up with this ingestion")
        + ("" if catchup_rate is None else f"; back to back it reads {catchup_rate:,.0f}/s"),
        f"six detectors alone: {alone['events_per_s']:,.0f} events/s "
        f"(rounds {', '.join(f'{r:,.0f}' for r in alone['rounds_per_s'])})",
        f"trigger -> anomaly.detected over {to_event['n']} refusal bursts: p50 "
        f"{to_event['p50_s']:.2f} s, p99 {to_event['p99_s']:.2f} s, max {to_event['max_s']:.2f} s; "
        f"goal p99 ≤ {GOAL_P99_S:g} s {verdict(latency_met)} (to the row: p50 "
        f"{to_row['p50_s']:.2f} s, p99 {to_row['p99_s']:.2f} s)",
        f"report over {report['entries']:,} entries ({report_row['per_s']:,} entries/s): "
        f"{report_row['note']}; the goal's size: trustmesh bench report --entries 1000000",
    ]
    return {
        "title": "Anomaly detection: ingestion beside the detectors, trigger to finding, report",
        "results": rows,
        "summary": summary,
        "ingestion": {
            "trials": trials,
            "events_per_arm": events,
            "batch": BATCH,
            "off_per_s": off_rate,
            "on_per_s": on_rate,
            "ratio_on_off": ratio,
            "runner_read_per_s": beside,
            "runner_backlog_max": backlog,
            "runner_keeps_up": keeps_up,
            "runner_catchup_per_s": catchup_rate,
            "arms": arms,
        },
        "detectors": alone,
        "latency": {
            "triggers": latency["triggers"],
            "to_event": to_event,
            "to_row": to_row,
            "trials": latency["trials"],
        },
        "report": {
            "entries": report["entries"],
            "seconds": report["report_seconds"],
            "fill_seconds": report["fill_seconds"],
            "peak_rss_mb": report["peak_rss_mb"],
        },
        "goals": {
            "ingest_on_per_s": {"goal": GOAL_INGEST_PER_S, "measured": on_rate, "met": ingest_met},
            "trigger_to_finding_p99_s": {
                "goal": GOAL_P99_S,
                "measured": to_event["p99_s"],
                "met": latency_met,
            },
            "report_s_per_million": {
                "goal": report_bench.GOAL_SECONDS_PER_MILLION,
                "measured_at": report["entries"],
                "seconds": report_s,
            },
        },
    }
