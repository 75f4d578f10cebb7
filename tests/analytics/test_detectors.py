"""The detectors over sequences of real events (audit/events.py's ``new_event``, the
constructor the agents and the control plane use), checked against the log's schema."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.analytics.detectors import (
    MAX_EVIDENCE,
    ConcurrentUse,
    DenialBurst,
    Detector,
    DormantUse,
    NewEdge,
    RefusalBurst,
    WrongCluster,
    all_detectors,
    observe_all,
    printable,
)
from trustmesh.analytics.findings import Finding
from trustmesh.analytics.settings import AnomalySettings, DetectorSettings
from trustmesh.audit.events import check_event, new_event

TD = "spiffe://corp.example"
T0 = 1_790_000_000.0
CP = {"kind": "control-plane", "id": "cp1"}
_seq = iter(range(1, 10**9))


def agent_source(cluster: str) -> dict[str, Any]:
    return {
        "kind": "agent",
        "id": f"{cluster}/a1/s1",
        "agent": "a1",
        "spool": "s1",
        "seq": next(_seq),
    }


def spiffe(cluster: str, sa: str = "payments") -> str:
    return f"{TD}/cluster/{cluster}/ns/shop/sa/{sa}"


def issued(
    at: float, origin: str, audiences: list[str], sa: str = "payments", digest: str = "a" * 64
) -> dict[str, Any]:
    event = new_event(
        "token.issued",
        source=CP,
        cluster=origin,
        actor=spiffe(origin, sa),
        identity={
            "spiffe_id": spiffe(origin, sa),
            "workload": sa,
            "origin_cluster": origin,
            "jti": "j1",
        },
        request={"surface": "token", "audience": [f"{TD}/cluster/{a}" for a in audiences]},
        detail={"issued_token_sha256": digest, "expires_in": 300},
        at=at,
    )
    check_event(event)
    return event


def decision(
    at: float,
    cluster: str,
    origin: str,
    allowed: bool,
    host: str = "api.test",
    sa: str = "payments",
    jti: str = "j1",
    reason: str | None = None,
    caller: str | None = None,
) -> dict[str, Any]:
    """``caller``: the request's ``source`` (the caller's address), None for none."""
    asked: dict[str, Any] = {"surface": "authorize", "method": "GET", "host": host, "path": "/"}
    if caller is not None:
        asked["source"] = caller
    event = new_event(
        "authz.decision",
        source=agent_source(cluster),
        cluster=cluster,
        actor=spiffe(origin, sa),
        identity={
            "spiffe_id": spiffe(origin, sa),
            "workload": sa,
            "origin_cluster": origin,
            "jti": jti,
        },
        request=asked,
        decision={
            "allowed": allowed,
            "reason": reason or ("allowed" if allowed else "denied"),
            "policy_revision": 1,
        },
        at=at,
    )
    check_event(event)
    return event


def unauthenticated(at: float, cluster: str, reason: str, digest: str = "b" * 64) -> dict[str, Any]:
    event = new_event(
        "authz.decision",
        source=agent_source(cluster),
        cluster=cluster,
        identity={"token_sha256": digest},
        request={"surface": "authorize", "method": "GET", "host": "api.test", "path": "/"},
        decision={"allowed": False, "reason": f"unauthenticated: {reason}", "policy_revision": 1},
        at=at,
    )
    check_event(event)
    return event


def exchange_failed(at: float, issuer: str) -> dict[str, Any]:
    event = new_event(
        "token.exchange_failed",
        source=CP,
        actor="anonymous",
        identity={"token_sha256": "c" * 64},
        request={"surface": "token"},
        decision={"allowed": False, "reason": "invalid_grant: bad signature"},
        detail={
            "error": "invalid_grant",
            "claimed": {"iss": issuer, "sub": "system:serviceaccount:x:y"},
        },
        at=at,
    )
    check_event(event)
    return event


def folded_exchanges(at: float, issuer: str, count: int) -> dict[str, Any]:
    stamp = new_event("x", source=CP, at=at)["time"]
    event = new_event(
        "audit.refusals_folded",
        source=CP,
        actor="system",
        detail={
            "folded_type": "token.exchange_failed",
            "folded": count,
            "first": stamp,
            "last": stamp,
            "by": {"issuer": {"values": {issuer: count}}},
            "limits": {"window_ms": 10000, "quota": 20, "per_source": 5},
        },
        at=at,
    )
    check_event(event)
    return event


def policy(**named: DetectorSettings) -> AnomalySettings:
    return AnomalySettings(detectors=named)


def feed(
    detector: Detector, events: list[dict[str, Any]], pol: AnomalySettings, start: int = 0
) -> list[Finding]:
    return observe_all([detector], enumerate(events, start), pol)


# -- new edges -------------------------------------------------------------------------
EDGE = DetectorSettings(window=60, threshold=1, baseline_window=3600, warmup=100)


def test_new_edge_only_after_warmup_and_once_per_audience() -> None:
    pol = policy(new_edge=EDGE)
    events = [
        issued(T0, "eu", ["us"]),  # learned in the warm-up: never reported
        issued(T0 + 200, "eu", ["us"]),  # known edge
        issued(T0 + 300, "eu", ["ap", "ap", "us"]),  # ap new (once), us known
        issued(T0 + 301, "eu", ["ap"]),
    ]
    findings = feed(NewEdge(), events, pol)
    assert [(f.key, f.evidence, f.subject) for f in findings] == [
        ("new_edge:payments|eu->ap", [2], {"workload": "payments"})
    ]
    assert findings[0].details["from"] == "eu" and findings[0].details["to"] == "ap"


def test_new_edge_from_decisions_and_hosts_and_after_the_baseline() -> None:
    pol = policy(new_edge=EDGE)
    events = [
        decision(T0, "us", "eu", True),
        decision(T0 + 200, "us", "eu", True, host="db.test"),  # a new service host
        decision(T0 + 210, "us", "eu", False, host="secret.test"),  # denied: not reached
        decision(T0 + 5000, "us", "eu", True),  # pair and host unseen for > baseline
    ]
    keys = [(f.key, f.evidence) for f in feed(NewEdge(), events, pol)]
    assert keys == [
        ("new_edge:payments|host:db.test", [1]),
        ("new_edge:payments|host:api.test", [3]),
        ("new_edge:payments|eu->us", [3]),
    ]


# -- denial bursts ---------------------------------------------------------------------
BURST = DetectorSettings(window=60, threshold=5, baseline_window=3600, warmup=0)


def test_denial_burst_per_identity_and_cluster_once_per_window() -> None:
    pol = policy(denial_burst=BURST)
    events = [decision(T0 + i, "us", "eu", False) for i in range(12)]
    findings = feed(DenialBurst(), events, pol)
    assert sorted(f.key for f in findings) == [
        "denial_burst:cluster:us",
        f"denial_burst:identity:{spiffe('eu')}",
    ]
    for found in findings:
        assert found.evidence == [0, 1, 2, 3, 4, 5]  # the 6th denial crossed threshold 5
        assert found.details["count"] == 6
    # after the window, a new burst reports again
    later = [decision(T0 + 200 + i, "us", "eu", False) for i in range(6)]
    again = feed(DenialBurst(), events + later, pol)
    assert len(again) == 4


def test_denial_burst_counts_folded_refusals_and_ignores_no_opinion() -> None:
    pol = policy(denial_burst=BURST)
    quiet = [
        decision(T0 + i, "us", "eu", False, reason="no opinion: nothing matched") for i in range(20)
    ]
    assert feed(DenialBurst(), quiet, pol) == []
    stamp = new_event("x", source=CP, at=T0)["time"]
    summary = new_event(
        "audit.refusals_folded",
        source=agent_source("us"),
        cluster="us",
        actor="system",
        detail={
            "folded_type": "authz.decision",
            "folded": 40,
            "first": stamp,
            "last": stamp,
            "by": {"error": {"values": {"malformed": 40}}},
        },
        at=T0 + 30,
    )
    check_event(summary)
    findings = feed(DenialBurst(), [unauthenticated(T0 + 29, "us", "malformed"), summary], pol)
    assert [(f.key, f.evidence, f.details["count"]) for f in findings] == [
        ("denial_burst:cluster:us", [0, 1], 41)
    ]


def test_denial_burst_baseline_raises_the_bar() -> None:
    """A key that steadily sees 6 denials a minute for an hour has a baseline of about
    6 a window: 8 in a minute is no burst, 30 is."""
    pol = policy(
        denial_burst=DetectorSettings(window=60, threshold=5, baseline_window=3600, warmup=0)
    )
    detector = DenialBurst()
    steady = [decision(T0 + 10 * i, "us", "eu", False) for i in range(3600 // 10)]
    first = feed(detector, steady, pol)
    assert first  # the very first minute, before any baseline, is above the threshold
    base = T0 + 3700
    calm = [decision(base + 7 * i, "us", "eu", False) for i in range(8)]
    assert feed(detector, calm, pol, start=len(steady)) == []
    storm = [decision(base + 100 + i, "us", "eu", False) for i in range(30)]
    found = feed(detector, storm, pol, start=len(steady) + len(calm))
    assert found and found[0].details["baseline"] > 3


def test_a_steady_rate_is_no_burst_when_the_baseline_is_as_short_as_the_window() -> None:
    """The window being judged is not quiet time: the baseline decays only over the gap
    between the last bucket it was fed and the window's start. With a time constant
    equal to the window, 3 denials a second for two minutes never exceed 3 x baseline
    once the baseline has been fed for a few windows, even in clumps of 12 every 4 s the
    way agents' batches arrive (it used to be decayed by e^-1 more, and a steady stream
    looked like a burst)."""
    pol = policy(
        denial_burst=DetectorSettings(window=10, threshold=5, baseline_window=10, warmup=40)
    )
    detector = DenialBurst()
    steady = [decision(T0 + 4 * (i // 12), "us", "eu", False) for i in range(3 * 120)]
    assert feed(detector, steady, pol) == []
    storm = [decision(T0 + 121 + i / 30, "us", "eu", False) for i in range(150)]
    found = feed(detector, storm, pol, start=len(steady))
    assert found and found[0].details["baseline"] > 20


# -- refusal bursts and wrong clusters -------------------------------------------------
def test_refusal_burst_per_claimed_issuer_with_folded_counts() -> None:
    pol = policy(refusal_burst=BURST)
    issuer = "https://oidc.eu.example\x1b[31m"
    events = [exchange_failed(T0 + i, issuer) for i in range(3)]
    events.append(exchange_failed(T0 + 3, "https://other.example"))
    events.append(folded_exchanges(T0 + 10, issuer, 50))
    findings = feed(RefusalBurst(), events, pol)
    assert len(findings) == 1
    found = findings[0]
    assert found.key == f"refusal_burst:issuer:{issuer}"
    assert found.evidence == [0, 1, 2, 4] and found.details["count"] == 53
    assert "\x1b" not in found.summary and "\\x1b" in found.summary
    assert found.subject == {"issuer": printable(issuer)}


def test_wrong_cluster_joins_the_issuance() -> None:
    pol = policy(wrong_cluster=DetectorSettings(window=300, threshold=1, warmup=0))
    events = [
        issued(T0, "eu", ["us"], digest="d" * 64),
        unauthenticated(T0 + 1, "ap", "wrong_audience", digest="d" * 64),
        unauthenticated(T0 + 2, "ap", "wrong_audience", digest="d" * 64),  # same key, window
        unauthenticated(T0 + 3, "ap", "wrong_audience", digest="e" * 64),  # issuance unknown
        unauthenticated(T0 + 4, "ap", "expired", digest="f" * 64),
    ]
    findings = feed(WrongCluster(), events, pol)
    assert [(f.key, f.evidence, f.subject) for f in findings] == [
        (f"wrong_cluster:{spiffe('eu')}|ap", [0, 1], {"workload": "payments"}),
        ("wrong_cluster:token:" + "e" * 64 + "|ap", [3], {"cluster": "ap"}),
    ]
    assert findings[0].details["audiences"] == ["us"]


# -- dormant and concurrent use --------------------------------------------------------
def test_dormant_use_after_the_baseline_window() -> None:
    pol = policy(dormant_use=DetectorSettings(window=60, baseline_window=1000, warmup=0))
    events = [
        issued(T0, "eu", ["us"]),
        decision(T0 + 500, "us", "eu", True),
        decision(T0 + 1400, "us", "eu", True),  # 900 s idle: not dormant
        issued(T0 + 3000, "eu", ["us"]),  # 1600 s idle: dormant
        issued(T0 + 3001, "eu", ["us"]),
    ]
    findings = feed(DormantUse(), events, pol)
    assert [(f.key, f.evidence) for f in findings] == [(f"dormant_use:{spiffe('eu')}", [2, 3])]
    assert findings[0].details["idle"] == 1600


A, B = "10.0.0.1", "10.0.0.2"
CONCURRENT = DetectorSettings(window=60, warmup=0)


def test_concurrent_use_from_two_places_at_two_clusters() -> None:
    pol = policy(concurrent_use=CONCURRENT)
    events = [
        decision(T0, "us", "eu", True, jti="j9", caller=A),
        decision(T0 + 1, "us", "eu", True, jti="j9", caller=B),  # same cluster: fine
        decision(T0 + 100, "ap", "eu", True, jti="j9", caller=B),  # outside the window
        decision(T0 + 110, "us", "eu", False, jti="j9", caller=A),  # inside: reported
        decision(T0 + 111, "ap", "eu", True, jti="j9", caller=B),  # same key within window: once
    ]
    findings = feed(ConcurrentUse(), events, pol)
    assert [(f.key, f.evidence, f.severity) for f in findings] == [
        ("concurrent_use:jti:j9", [2, 3], "high")
    ]
    (found,) = findings
    assert found.subject == {"spiffeId": spiffe("eu")}
    assert found.details == {
        "credential": "jti:j9",
        "clusters": ["ap", "us"],
        "sources": [A, B],
        "uses": [
            {"cluster": "ap", "source": B, "index": 2},
            {"cluster": "us", "source": A, "index": 3},
        ],
    }
    assert A in found.summary and B in found.summary and "ap, us" in found.summary


def test_one_place_at_two_clusters_is_quiet() -> None:
    """A token with several audiences (or one workload's X.509-SVID) used by its one
    workload at agents of two clusters, again and again: never a finding."""
    pol = policy(concurrent_use=CONCURRENT)
    events = [
        decision(T0 + i, cluster, "eu", True, jti="multi", caller=A)
        for i in range(20)
        for cluster in ("us", "ap", "eu")
    ]
    assert feed(ConcurrentUse(), events, pol) == []
    # IPv4-mapped IPv6 is the same place as its IPv4 address
    mapped = [
        decision(T0, "us", "eu", True, jti="m", caller=A),
        decision(T0 + 1, "ap", "eu", True, jti="m", caller="::ffff:" + A),
    ]
    assert feed(ConcurrentUse(), mapped, pol) == []


def test_a_decision_without_a_source_is_quiet() -> None:
    """Kubernetes webhooks and agents older than ``request.source``: nothing to compare."""
    pol = policy(concurrent_use=CONCURRENT)
    one_side = [
        decision(T0, "us", "eu", True, jti="k", caller=A),
        decision(T0 + 1, "ap", "eu", True, jti="k"),
    ]
    assert feed(ConcurrentUse(), one_side, pol) == []
    other_side = [
        decision(T0, "us", "eu", True, jti="k"),
        decision(T0 + 1, "ap", "eu", True, jti="k", caller=B),
    ]
    assert feed(ConcurrentUse(), other_side, pol) == []
    neither = [decision(T0, "us", "eu", True, jti="k"), decision(T0 + 1, "ap", "eu", True, jti="k")]
    assert feed(ConcurrentUse(), neither, pol) == []


def test_a_source_that_is_not_an_address_is_no_source() -> None:
    """What an agent wrote is read again as an address: anything else (a compromised
    agent's text, an IPv6 zone, a port) makes the decision one without a source, and
    never reaches a finding."""
    pol = policy(concurrent_use=CONCURRENT)
    for odd in ["evil\x1b[31m", "10.0.0.2:443", "fe80::1%eth0", "host.example", "1" * 60]:
        events = [
            decision(T0, "us", "eu", True, jti="z", caller=A),
            decision(T0 + 1, "ap", "eu", True, jti="z", caller=odd),
        ]
        assert feed(ConcurrentUse(), events, pol) == [], odd


def test_concurrent_use_state_is_bounded() -> None:
    pol = policy(concurrent_use=CONCURRENT)
    detector = ConcurrentUse(cap=5)
    # one credential from 20 places at one cluster: 8 kept, the oldest dropped
    events = [
        decision(T0 + i, "us", "eu", True, jti="wide", caller=f"10.1.0.{i}") for i in range(20)
    ]
    assert feed(detector, events, pol) == []
    (kept,) = detector.uses.items.values()
    assert len(kept) == 8 and [use[1] for use in kept] == [f"10.1.0.{i}" for i in range(12, 20)]
    # a use from another place at another cluster still meets those kept
    found = feed(detector, [decision(T0 + 20, "ap", "eu", True, jti="wide", caller=B)], pol, 20)
    assert len(found) == 1 and found[0].evidence == list(range(12, 21))
    # credentials are capped, least recently used dropped and counted
    feed(
        detector,
        [decision(T0 + 30 + i, "us", "eu", True, jti=f"c{i}", caller=A) for i in range(9)],
        pol,
        21,
    )
    assert len(detector.uses) == 5 and detector.dropped()["uses"] == 5
    state = json.loads(json.dumps(detector.snapshot()))
    assert state["version"] == 2 and all(len(v) <= 8 for _, v in state["uses"]["items"])
    too_many = [["us", f"10.2.0.{i}", T0, i] for i in range(9)]
    restored = ConcurrentUse()
    restored.restore({**state, "uses": {"items": [["jti:x", too_many]], "dropped": 0}})
    assert len(restored.uses) == 0 and restored.dropped()["uses"] == 1


def test_a_version_1_snapshot_is_taken_back() -> None:
    """Snapshots from before ``request.source`` kept uses per cluster without an
    address: those can never make a finding now and are left out; the clock and the
    keys reported (nothing fires twice within its window) are kept."""
    pol = policy(concurrent_use=CONCURRENT)
    old = {
        "version": 1,
        "detector": "concurrent_use",
        "first": T0,
        "latest": T0 + 10,
        "fired": {"items": [["jti:j9", T0 + 10]], "dropped": 0},
        "uses": {"items": [["jti:j9", {"us": [T0 + 5, 1], "ap": [T0 + 10, 2]}]], "dropped": 0},
    }
    detector = ConcurrentUse()
    detector.restore(old)
    assert detector.first == T0 and detector.latest == T0 + 10 and len(detector.uses) == 0
    assert len(detector.fired) == 1
    events = [
        decision(T0 + 20, "us", "eu", True, jti="j9", caller=A),
        decision(T0 + 21, "ap", "eu", True, jti="j9", caller=B),  # reported within 60 s
        decision(T0 + 80, "us", "eu", True, jti="j8", caller=A),
        decision(T0 + 81, "ap", "eu", True, jti="j8", caller=B),
    ]
    assert [f.key for f in feed(detector, events, pol, start=3)] == ["concurrent_use:jti:j8"]
    assert detector.snapshot()["version"] == 2
    other = ConcurrentUse()
    other.restore({**old, "version": 3})
    assert other.first is None and len(other.fired) == 0


# -- bounds, snapshots ------------------------------------------------------------------
def test_tracked_keys_are_capped_and_drops_counted() -> None:
    detector = NewEdge(cap=10)
    events = [issued(T0 + i, "eu", [f"c{i}"]) for i in range(25)]
    feed(detector, events, policy(new_edge=EDGE))
    assert len(detector.edges) == 10 and detector.dropped()["edges"] == 15
    burst = DenialBurst(cap=3)
    feed(burst, [decision(T0 + i, "us", "eu", False, sa=f"sa{i}") for i in range(10)], policy())
    assert len(burst.counter.keys) == 3 and burst.dropped()["counts"] > 0


def test_evidence_is_bounded() -> None:
    pol = policy(denial_burst=DetectorSettings(window=600, threshold=150, warmup=0))
    findings = feed(DenialBurst(), [decision(T0 + i, "us", "eu", False) for i in range(200)], pol)
    assert findings and all(len(f.evidence) <= MAX_EVIDENCE for f in findings)
    assert findings[0].evidence[-1] == 150


# -- properties ------------------------------------------------------------------------
CLUSTERS = ["eu", "us", "ap"]
WORKLOADS = ["payments", "orders"]


@st.composite
def streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A stream of mixed events at increasing times."""
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 6),
                st.integers(0, 2),
                st.integers(0, 2),
                st.integers(0, 1),
                st.floats(0, 400),
                st.sampled_from([None, "10.0.0.1", "10.0.0.2"]),
            ),
            max_size=60,
        )
    )
    at = T0
    events = []
    for kind, a, b, w, gap, caller in steps:
        at += gap
        origin, target, sa = CLUSTERS[a], CLUSTERS[b], WORKLOADS[w]
        if kind == 0:
            events.append(
                issued(
                    at,
                    origin,
                    [target, CLUSTERS[(b + 1) % 3]],
                    sa=sa,
                    digest=f"{a}{b}{w}".ljust(64, "0"),
                )
            )
        elif kind in (1, 2):
            events.append(
                decision(at, target, origin, kind == 1, sa=sa, jti=f"j{w}", caller=caller)
            )
        elif kind == 3:
            events.append(
                unauthenticated(at, target, "wrong_audience", digest=f"{a}{b}{w}".ljust(64, "0"))
            )
        elif kind == 4:
            events.append(exchange_failed(at, f"https://{origin}.example"))
        elif kind == 5:
            events.append(folded_exchanges(at, f"https://{origin}.example", 1 + a * 7))
        else:
            events.append(
                decision(at, target, origin, False, sa=sa, reason="unauthenticated: revoked")
            )
    return events


SMALL = AnomalySettings(
    detectors={
        name: DetectorSettings(window=120, threshold=3, baseline_window=900, warmup=300)
        for name in (
            "new_edge",
            "denial_burst",
            "refusal_burst",
            "wrong_cluster",
            "dormant_use",
            "concurrent_use",
        )
    }
)


@settings(max_examples=60, deadline=None)
@given(streams(), st.data())
def test_replay_from_a_snapshot_gives_the_same_findings(
    events: list[dict[str, Any]], data: st.DataObject
) -> None:
    entries = list(enumerate(events))
    straight = observe_all(all_detectors(), entries, SMALL)
    cut = data.draw(st.integers(0, len(entries)))
    first = all_detectors()
    before = observe_all(first, entries[:cut], SMALL)
    saved = [json.loads(json.dumps(d.snapshot())) for d in first]
    second = all_detectors()
    for detector, state in zip(second, saved, strict=True):
        detector.restore(state)
    after = observe_all(second, entries[cut:], SMALL)
    assert before + after == straight
    assert [d.snapshot() for d in second] == [d.snapshot() for d in _replayed(entries)]


def _replayed(entries: list[tuple[int, dict[str, Any]]]) -> list[Detector]:
    detectors = all_detectors()
    observe_all(detectors, entries, SMALL)
    return detectors


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(CLUSTERS),
            st.sampled_from(CLUSTERS),
            st.sampled_from(["api.test", "db.test"]),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(2, 30),
)
def test_a_quiet_stream_of_known_edges_reports_nothing_after_warmup(
    edges: list[tuple[str, str, str]], rounds: int
) -> None:
    """Every edge is used during the warm-up, then the same edges again and again,
    each at least once per baseline window: no new_edge finding, ever."""
    pol = policy(new_edge=DetectorSettings(window=60, baseline_window=600, warmup=300))
    events = []
    at = T0
    for _ in range(rounds):
        for origin, target, host in edges:
            events.append(issued(at, origin, [target]))
            events.append(decision(at + 1, target, origin, True, host=host))
            at += 250 / len(edges)
    assert feed(NewEdge(), events, pol) == []


def test_findings_are_json_and_bounded() -> None:
    pol = policy(refusal_burst=BURST)
    issuer = "https://" + "x" * 5000
    found = feed(RefusalBurst(), [exchange_failed(T0 + i, issuer) for i in range(8)], pol)
    assert found
    text = json.dumps(found[0].to_json())
    assert len(found[0].summary) <= 500 and len(text) < 12_000
    # the key an attacker-written issuer makes is bounded too, stable and distinct
    assert len(found[0].key) <= 500 and found[0].key.startswith("refusal_burst:issuer:https://")
    again = feed(RefusalBurst(), [exchange_failed(T0 + i, issuer) for i in range(8)], pol)
    other = feed(RefusalBurst(), [exchange_failed(T0 + i, issuer + "y") for i in range(8)], pol)
    assert again[0].key == found[0].key != other[0].key


def test_warmup_counts_every_entry_the_detector_sees() -> None:
    """A log whose first hours hold no edge at all: the warm-up is over by the time
    the first edge arrives, which is then new."""
    pol = policy(new_edge=EDGE)
    early = exchange_failed(T0, "https://eu.example")
    findings = feed(NewEdge(), [early, issued(T0 + 150, "eu", ["us"])], pol)
    assert [(f.key, f.evidence) for f in findings] == [("new_edge:payments|eu->us", [1])]
    assert feed(NewEdge(), [early, issued(T0 + 50, "eu", ["us"])], pol) == []


def x509_decision(at: float, cluster: str, serial: str, caller: str = A) -> dict[str, Any]:
    event = new_event(
        "authz.decision",
        source=agent_source(cluster),
        cluster=cluster,
        actor=spiffe("eu"),
        identity={
            "spiffe_id": spiffe("eu"),
            "workload": "payments",
            "origin_cluster": "eu",
            "credential": "x509-svid",
            "x509_serial": serial,
            "x509_sha256": "f" * 64,
        },
        request={
            "surface": "ext_authz",
            "method": "GET",
            "host": "api.test",
            "path": "/",
            "source": caller,
        },
        decision={"allowed": True, "reason": "allowed", "policy_revision": 1},
        at=at,
    )
    check_event(event)
    return event


def svid_issued(at: float, serial: str) -> dict[str, Any]:
    event = new_event(
        "svid.issued",
        source=CP,
        cluster="eu",
        actor=spiffe("eu"),
        identity={"spiffe_id": spiffe("eu"), "workload": "payments", "origin_cluster": "eu"},
        request={"surface": "x509-svid"},
        detail={"serial": serial, "not_before": int(at), "not_after": int(at) + 3600},
        at=at,
    )
    check_event(event)
    return event


def test_x509_svids_dormant_and_concurrent() -> None:
    pol = policy(
        dormant_use=DetectorSettings(window=60, baseline_window=1000, warmup=0),
        concurrent_use=DetectorSettings(window=60, warmup=0),
    )
    events = [
        svid_issued(T0, "0a1b"),
        x509_decision(T0 + 10, "us", "0a1b"),
        svid_issued(T0 + 5000, "0c0d"),  # dormant: 4990 s
        x509_decision(T0 + 5010, "us", "0c0d"),
        x509_decision(T0 + 5015, "ap", "0c0d"),  # one workload calling two clusters: fine
        x509_decision(T0 + 5020, "ap", "0c0d", B),  # the same certificate from elsewhere
    ]
    found = observe_all([DormantUse(), ConcurrentUse()], enumerate(events), pol)
    assert [(f.key, f.evidence) for f in found] == [
        (f"dormant_use:{spiffe('eu')}", [1, 2]),
        ("concurrent_use:x509:0c0d", [3, 5]),
    ]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = [
    "spiffe_id",
    "workload",
    "origin_cluster",
    "jti",
    "x509_serial",
    "source",
    "token_sha256",
    "audience",
    "host",
    "allowed",
    "reason",
    "issued_token_sha256",
    "claimed",
    "iss",
    "folded_type",
    "folded",
    "by",
    "issuer",
    "error",
    "values",
    "dropped",
    "count",
]
PLAUSIBLE = st.sampled_from(
    [
        "eu",
        "us",
        True,
        False,
        3,
        f"{TD}/cluster/us",
        [f"{TD}/cluster/ap"],
        "unauthenticated: wrong_audience",
        "authz.decision",
        "token.exchange_failed",
        "a" * 64,
        "10.0.0.1",
    ]
)
PARTS = st.recursive(
    JSONISH | PLAUSIBLE,
    lambda inner: st.dictionaries(st.sampled_from(FIELDS), inner, max_size=5),
    max_leaves=10,
)
MEMBERS = [
    "type",
    "time",
    "cluster",
    "actor",
    "identity",
    "request",
    "decision",
    "detail",
    "source",
]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    [
                        "token.issued",
                        "authz.decision",
                        "token.exchange_failed",
                        "audit.refusals_folded",
                        "svid.issued",
                    ]
                ),
                "time": st.one_of(
                    st.integers(0, 4000).map(
                        lambda s: new_event("x", source=CP, at=T0 + s)["time"]
                    ),
                    JSONISH,
                ),
            },
            optional={name: PARTS for name in MEMBERS[2:]},
        ),
        max_size=10,
    ),
    JSONISH,
)
def test_odd_events_and_snapshots_are_skipped_not_fatal(
    events: list[dict[str, Any]], junk: Any
) -> None:
    """Events holding anything where a member should be, and a snapshot of anything:
    no exception, the state stays JSON."""
    detectors = all_detectors()
    observe_all(detectors, enumerate(events), SMALL)
    for detector in detectors:
        json.dumps(detector.snapshot())
        detector.restore(junk if isinstance(junk, dict) else {"version": 1, "items": junk})
        observe_all([detector], enumerate(events), SMALL)
        json.dumps(detector.snapshot())


def test_a_snapshot_of_another_version_or_with_bad_items_starts_fresh_where_bad() -> None:
    pol = policy(dormant_use=DetectorSettings(window=60, baseline_window=1000, warmup=0))
    detector = DormantUse()
    feed(detector, [issued(T0, "eu", ["us"])], pol)
    state = json.loads(json.dumps(detector.snapshot()))
    state["last"]["items"].append(["spiffe://corp.example/x", ["soon", 3]])
    restored = DormantUse()
    restored.restore(state)
    assert len(restored.last) == 1 and restored.dropped()["last"] == 1
    assert feed(restored, [issued(T0 + 5000, "eu", ["us"])], pol, start=1)[0].evidence == [0, 1]
    other = DormantUse()
    other.restore({**state, "version": 99})
    assert len(other.last) == 0 and other.first is None
