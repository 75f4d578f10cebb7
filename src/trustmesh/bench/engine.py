"""``trustmesh bench engine``: our decision engine against Cedar (cedarpy) and casbin on
one generated federation, each given the same policy with the same semantics.

The workload (``_policygen``): 50 clusters, 10,000 workloads, 500 global roles (resource,
non-resource and service rules, wildcards, ``*/sub`` subresources, ``*``/``**`` path
globs), 2,000 role bindings (allow and deny; subjects by claims, workload, SPIFFE ID and
matchExpressions; cluster scopes by name, label selector or none; some namespaces), all
loaded through the manifest schema, the registry and the compiler; and 100,000 requests
(mostly things a binding naming the identity covers, near misses of those, and random
ones), each evaluated on the identity's own cluster (85%) or another one.

What is measured:

- **compile**: ``compile_all`` over every cluster plus building one ``Engine`` per
  cluster (what all agents together do for a new revision);
- **trustmesh**: ``Engine.decide`` per request and the decision's ``reason`` read (an
  agent writes it into every decision's audit record; the engine writes a default
  deny's explanation only when it is read), each call timed alone with
  ``perf_counter_ns`` (the timer's own cost is reported, not subtracted), on engines
  fresh from compilation: an identity's first request on a cluster pays for finding the
  bindings that name it (then memoised), as an agent after a new bundle does. A second
  pass over the same requests (every memo warm) is reported next to it, and the bench
  process's CPU share over each timed pass;
- **cedar**: ``cedarpy.is_authorized_batch`` on batches of up to ``batch_size`` requests
  of one cluster and family; a decision's latency is its batch's time divided by the
  batch's size, so its p50/p99 are those of batch averages;
- **casbin**: ``Enforcer.enforce`` per request, timed alone.

A peer too slow for every request is timed on a deterministic subset (every k-th
request); its agreement — the fraction of requests on which it decides as we do — is
over the requests it decided, which the output states. A race on different answers
proves nothing: agreement must be 1.0."""

from __future__ import annotations

import gc
import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trustmesh.bench._extra import require
from trustmesh.bench._policygen import (
    BenchRequest,
    Identity,
    Sizes,
    World,
    generate_bodies,
    generate_requests,
    load_world,
    template_accounts,
)
from trustmesh.bench._stats import Distribution, row, summarise, timer_overhead, verdict
from trustmesh.bench._translate import peer_bindings
from trustmesh.policy.compiler import compile_all
from trustmesh.policy.engine import Engine
from trustmesh.request import Request

if TYPE_CHECKING:  # imported when a peer is measured: they come with the bench extra
    from trustmesh.bench._casbin import CasbinPeer
    from trustmesh.bench._cedar import CedarPeer

__all__ = ["PEERS", "Query", "decide_all", "measure", "run"]

PEERS = ("cedar", "casbin")
_PEER_PACKAGES = {"cedar": ("Cedar", "cedarpy"), "casbin": ("Casbin", "casbin")}
# Issue 11: a Python engine that matches Cedar's native median on the same policy.
GOAL_P50_US = 8.0
GOAL_P99_US = 30.0
GOAL_AGREEMENT = 1.0
GOAL_COMPILE_S = 2.0
CASBIN_SAMPLE = 10_000  # casbin is timed on about this many requests (every k-th)


@dataclass(frozen=True)
class Query:
    """One question for every engine: who, on which cluster, what."""

    identity: Identity
    cluster: str
    request: Request


def _roles(world: World) -> dict[str, dict[str, Any]]:
    return {doc.name: doc.body["spec"] for doc in world.documents if doc.kind == "GlobalRole"}


def _require_peers(peers: Sequence[str], command: str = "engine") -> None:
    """Every requested peer's package is importable, or one line naming the extra."""
    chosen = [_PEER_PACKAGES[name] for name in PEERS if name in peers]
    if chosen:
        require(
            [package for _, package in chosen],
            f"trustmesh bench {command} compares against "
            + " and ".join(title for title, _ in chosen),
        )


def _build_cedar(
    world: World,
    extra: Sequence[Identity] = (),
    clusters: Sequence[str] | None = None,
    principals: Sequence[Identity] | None = None,
) -> CedarPeer:
    """Cedar's policy sets for ``clusters`` (default: all) and an entity for each of
    ``principals`` (default: every registered identity) plus ``extra``."""
    from trustmesh.bench import _cedar

    roles = _roles(world)
    texts = {
        cluster: _cedar.translate(
            peer_bindings(roles, world.binding_bodies, world.registry, cluster)
        )
        for cluster in sorted(world.registry.clusters if clusters is None else clusters)
    }
    who = world.identities if principals is None else principals
    entities = {i.spiffe_id: i.claims for i in (*who, *extra)}
    return _cedar.CedarPeer(texts, entities.items())


def _build_casbin(world: World, clusters: Sequence[str] | None = None) -> CasbinPeer:
    from trustmesh.bench import _casbin

    roles = _roles(world)
    lines = {
        cluster: _casbin.policy_lines(
            peer_bindings(roles, world.binding_bodies, world.registry, cluster)
        )
        for cluster in sorted(world.registry.clusters if clusters is None else clusters)
    }
    return _casbin.CasbinPeer(lines)


def decide_all(
    world: World, queries: Sequence[Query], peers: Sequence[str] = PEERS
) -> dict[str, list[bool]]:
    """Every engine's answer (allowed?) to every query, untimed: for tests of agreement."""
    _require_peers(peers)
    bundles = compile_all(world.policy, world.registry, 1)
    engines = {name: Engine(bundle) for name, bundle in bundles.items()}
    out = {
        "trustmesh": [
            engines[q.cluster].decide(q.identity.spiffe_id, q.identity.claims, q.request).allowed
            for q in queries
        ]
    }
    if "cedar" in peers:
        from trustmesh.bench._cedar import cedar_request

        cedar = _build_cedar(world, [q.identity for q in queries])
        answers = []
        for q in queries:
            request = cedar_request(q.identity.spiffe_id, q.request)
            (result,) = cedar.decide_batch(q.cluster, request["action"]["id"], [request])
            if result.diagnostics.errors:
                raise RuntimeError(f"Cedar evaluation errors: {result.diagnostics.errors}")
            answers.append(result.allowed)
        out["cedar"] = answers
    if "casbin" in peers:
        casbin = _build_casbin(world)
        out["casbin"] = [
            casbin.decide(
                q.cluster, casbin.arguments(q.identity.spiffe_id, q.identity.claims, q.request)
            )
            for q in queries
        ]
    return out


# --- measurement -------------------------------------------------------------------------


@dataclass
class _Measured:
    dist: Distribution
    allowed: dict[int, bool]  # request index -> decision
    note: str
    build_seconds: float = 0.0
    extra: dict[str, Any] | None = None


def _time_ours(
    engines: Mapping[str, Engine], requests: Sequence[BenchRequest]
) -> tuple[Distribution, list[bool], float]:
    """(latencies, answers, this process's CPU share over the timed pass)."""
    calls = [
        (engines[r.cluster].decide, r.identity.spiffe_id, r.identity.claims, r.request)
        for r in requests
    ]
    clock = time.perf_counter_ns
    latencies = [0] * len(calls)
    allowed = [False] * len(calls)
    gc.collect()
    cpu0 = time.process_time()
    started = clock()
    for i, (decide, spiffe_id, claims, request) in enumerate(calls):
        t0 = clock()
        decision = decide(spiffe_id, claims, request)
        decision.reason  # noqa: B018 - written when read: an agent reads it for the audit record
        latencies[i] = clock() - t0
        allowed[i] = decision.allowed
    wall = clock() - started
    share = (time.process_time() - cpu0) / (wall / 1e9) if wall else math.nan
    return summarise(latencies, wall), allowed, share


def _time_cedar(
    world: World,
    requests: Sequence[BenchRequest],
    every: int,
    batch_size: int,
    clusters: Sequence[str] | None = None,
) -> _Measured:
    """``clusters``: only these clusters' policy sets, and entities only for the
    identities that ask (the scale benchmark's sample)."""
    from trustmesh.bench._cedar import cedar_request

    t0 = time.perf_counter()
    if clusters is None:
        cedar = _build_cedar(world)
    else:
        asking = {r.identity.spiffe_id: r.identity for r in requests}
        cedar = _build_cedar(world, clusters=clusters, principals=list(asking.values()))
    build = time.perf_counter() - t0
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in range(0, len(requests), every):
        r = requests[i]
        groups[(r.cluster, r.family)].append(i)
    batches = []
    for (cluster, family), indexes in sorted(groups.items()):
        for start in range(0, len(indexes), batch_size):
            chunk = indexes[start : start + batch_size]
            payload = [
                cedar_request(requests[i].identity.spiffe_id, requests[i].request) for i in chunk
            ]
            batches.append((cluster, family, chunk, payload))
    clock = time.perf_counter_ns
    latencies: list[int] = []
    outcomes = []
    gc.collect()
    cpu0 = time.process_time()
    started = clock()
    for cluster, family, chunk, payload in batches:
        b0 = clock()
        results = cedar.decide_batch(cluster, family, payload)
        elapsed = clock() - b0
        latencies.extend([elapsed // len(chunk)] * len(chunk))
        outcomes.append((chunk, results))
    wall = clock() - started
    share = (time.process_time() - cpu0) / (wall / 1e9) if wall else math.nan
    dist = summarise(latencies, wall)
    allowed: dict[int, bool] = {}
    errors = 0
    for chunk, results in outcomes:
        for i, result in zip(chunk, results, strict=True):
            allowed[i] = result.allowed
            errors += bool(result.diagnostics.errors)
    per_cluster = sum(cedar.policy_counts.values()) / max(1, len(cedar.policy_counts))
    note = (
        f"cedarpy.is_authorized_batch, batches of ≤{batch_size:,} requests of one cluster and family; "
        f"per decision = batch time / batch size; {per_cluster:,.0f} policies per cluster"
    )
    return _Measured(
        dist,
        allowed,
        note,
        build,
        {
            "evaluation_errors": errors,
            "policies_per_cluster": round(per_cluster),
            "cpu_share": round(share, 2),
        },
    )


def _time_casbin(
    world: World,
    requests: Sequence[BenchRequest],
    every: int,
    clusters: Sequence[str] | None = None,
) -> _Measured:
    t0 = time.perf_counter()
    casbin = _build_casbin(world, clusters)
    build = time.perf_counter() - t0
    indexes = list(range(0, len(requests), every))
    calls = [
        (
            casbin.enforcers[requests[i].cluster].enforce,
            casbin.arguments(
                requests[i].identity.spiffe_id, requests[i].identity.claims, requests[i].request
            ),
        )
        for i in indexes
    ]
    clock = time.perf_counter_ns
    latencies = [0] * len(calls)
    answers = [False] * len(calls)
    gc.collect()
    cpu0 = time.process_time()
    started = clock()
    for n, (enforce, arguments) in enumerate(calls):
        t0_ns = clock()
        answer = enforce(*arguments)
        latencies[n] = clock() - t0_ns
        answers[n] = bool(answer)
    wall = clock() - started
    share = (time.process_time() - cpu0) / (wall / 1e9) if wall else math.nan
    dist = summarise(latencies, wall)
    per_cluster = sum(casbin.line_counts.values()) / max(1, len(casbin.line_counts))
    note = f"Enforcer.enforce per request, one enforcer per cluster, {per_cluster:,.0f} policy lines per cluster"
    return _Measured(
        dist,
        dict(zip(indexes, answers, strict=True)),
        note,
        build,
        {"policy_lines_per_cluster": round(per_cluster), "cpu_share": round(share, 2)},
    )


def _workload(
    sizes: Sizes,
    world: World,
    requests: Sequence[BenchRequest],
    bundles: dict[str, dict[str, Any]],
    ours: list[bool],
) -> dict[str, Any]:
    families = Counter(r.family for r in requests)
    origins = Counter(r.origin for r in requests)
    n = len(requests)
    bindings = [len(b["bindings"]) for b in bundles.values()]
    rules = sum(len(rules) for rules in world.role_rules.values())
    denies = sum(1 for spec in world.binding_bodies.values() if spec.get("effect") == "deny")
    return {
        **sizes.to_json(),
        "rules": rules,
        "deny_bindings": denies,
        "bindings_per_cluster": round(sum(bindings) / len(bindings), 1),
        "requests": n,
        "families": {k: round(v / n, 3) for k, v in sorted(families.items())},
        "generated_as": {k: round(v / n, 3) for k, v in sorted(origins.items())},
        "allow_fraction": round(sum(ours) / n, 3),
        "distinct_identities": len({r.identity.spiffe_id for r in requests}),
        # a template-derived identity's workload name is TEMPLATE/CLUSTER/NAMESPACE/SA
        "template_identity_requests": round(
            sum(1 for r in requests if "/" in r.identity.workload) / n, 3
        ),
        "distinct_identity_cluster_pairs": len(
            {(r.identity.spiffe_id, r.cluster) for r in requests}
        ),
    }


def _agreement(ours: list[bool], theirs: dict[int, bool]) -> tuple[float, list[int]]:
    differ = [i for i, answer in theirs.items() if answer != ours[i]]
    return (1.0 - len(differ) / len(theirs) if theirs else math.nan), differ


def run(
    requests: int = 100_000,
    seed: int = 7,
    peers: tuple[str, ...] = PEERS,
    *,
    clusters: int = 50,
    workloads: int = 10_000,
    projects: int = 100,
    roles: int = 500,
    bindings: int = 2_000,
    template_identities: int = 0,
    batch_size: int = 1_000,
    cedar_every: int = 1,
    casbin_every: int | None = None,
) -> dict[str, Any]:
    """Generate the federation and the requests, measure every engine, compare answers.
    ``casbin_every`` (default: so that about 10,000 requests are timed) and
    ``cedar_every`` (default: all) pick every k-th request for a peer.
    ``template_identities``: that many identities WorkloadTemplates give, beside the
    ``workloads`` explicit ones; requests are drawn from both alike."""
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer {sorted(unknown)[0]!r}; peers are {', '.join(PEERS)}")
    if (
        requests < 1
        or batch_size < 1
        or cedar_every < 1
        or (casbin_every is not None and casbin_every < 1)
    ):
        raise ValueError("requests, batch_size and the sampling steps must be positive")
    _require_peers(peers)
    if casbin_every is None:
        casbin_every = max(1, requests // CASBIN_SAMPLE)
    sizes = Sizes(
        clusters=clusters,
        workloads=workloads,
        projects=projects,
        roles=roles,
        bindings=bindings,
        template_identities=template_identities,
    )
    t0 = time.perf_counter()
    world = load_world(generate_bodies(sizes, seed), accounts=template_accounts(sizes, seed))
    load_seconds = time.perf_counter() - t0
    bench_requests = generate_requests(world, requests, seed, sizes)

    gc.collect()
    t0 = time.perf_counter()
    bundles = compile_all(world.policy, world.registry, 1)
    t1 = time.perf_counter()
    engines = {name: Engine(bundle) for name, bundle in bundles.items()}
    t2 = time.perf_counter()
    compile_seconds, compile_all_seconds, engines_seconds = t2 - t0, t1 - t0, t2 - t1

    measured = measure(
        world,
        bench_requests,
        engines,
        peers,
        batch_size=batch_size,
        cedar_every=cedar_every,
        casbin_every=casbin_every,
    )
    workload = _workload(sizes, world, bench_requests, bundles, measured["ours"])
    summary = [
        f"compile: {compile_seconds:.2f} s for {clusters} clusters (compile_all {compile_all_seconds:.2f} s + "
        f"{clusters} engines {engines_seconds:.2f} s); goal ≤ {GOAL_COMPILE_S:.0f} s: "
        f"{verdict(compile_seconds <= GOAL_COMPILE_S)}",
        *measured["summary"],
        f"{requests:,} requests, {workload['allow_fraction']:.0%} allowed, over {workload['distinct_identities']:,} "
        f"identities ({workload['distinct_identity_cluster_pairs']:,} identityxcluster pairs); timer overhead "
        f"{measured['timer_overhead_ns']} ns per call, not subtracted",
    ]
    goals = measured["goals"]
    goals.update(compile_s=GOAL_COMPILE_S, compile_met=compile_seconds <= GOAL_COMPILE_S)
    return {
        "title": "Authorization decisions: trustmesh engine vs. Cedar (cedarpy) and casbin, same policy",
        "workload": workload,
        "results": measured["results"],
        "agreement": measured["agreement"],
        "summary": summary,
        "compile_seconds": round(compile_seconds, 3),
        "compile_all_seconds": round(compile_all_seconds, 3),
        "engines_seconds": round(engines_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "ratio_vs_fastest_peer": measured["ratio_vs_fastest_peer"],
        "timer_overhead_ns": measured["timer_overhead_ns"],
        "peers": measured["peers"],
        "disagreements": measured["disagreements"],
        "seed": seed,
        "goals": goals,
    }


def measure(
    world: World,
    bench_requests: Sequence[BenchRequest],
    engines: Mapping[str, Engine],
    peers: Sequence[str],
    *,
    batch_size: int,
    cedar_every: int,
    casbin_every: int,
    clusters: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Our engine (fresh ``engines``, then warm) and the peers on ``bench_requests``:
    result rows, agreement, summary lines and the issue-11 goals. ``clusters``: the
    peers are built for these clusters only (every request is on one of them)."""
    cold, ours, cold_share = _time_ours(engines, bench_requests)
    warm, again, warm_share = _time_ours(engines, bench_requests)
    if again != ours:  # pragma: no cover - the memo must not change answers
        raise RuntimeError("the engine answered differently with a warm memo")
    timer = timer_overhead()

    timed: dict[str, _Measured] = {}
    if "cedar" in peers:
        timed["cedar"] = _time_cedar(world, bench_requests, cedar_every, batch_size, clusters)
    if "casbin" in peers:
        timed["casbin"] = _time_casbin(world, bench_requests, casbin_every, clusters)

    pairs = len({(r.identity.spiffe_id, r.cluster) for r in bench_requests})
    results = [
        row(
            "trustmesh",
            p50_us=cold.p50_us,
            p99_us=cold.p99_us,
            per_s=cold.per_s,
            note=(
                f"Engine.decide + reason, fresh engines: {pairs:,} first (identity, cluster) lookups "
                f"memoised; warm memo p50 {warm.p50_us:.1f} µs, p99 {warm.p99_us:.1f} µs; "
                f"bench process CPU share {cold_share:.2f}"
            ),
            decisions_per_s=round(cold.per_s),
            allow_fraction=round(sum(ours) / len(ours), 4),
            decided=len(ours),
            warm_p50_us=round(warm.p50_us, 2),
            warm_p99_us=round(warm.p99_us, 2),
            warm_decisions_per_s=round(warm.per_s),
            cpu_share=round(cold_share, 2),
            warm_cpu_share=round(warm_share, 2),
        )
    ]
    agreement: dict[str, float] = {}
    disagreements: dict[str, list[dict[str, Any]]] = {}
    peer_counts: dict[str, dict[str, Any]] = {}
    for name, m in timed.items():
        fraction, differ = _agreement(ours, m.allowed)
        agreement[name] = fraction
        every = cedar_every if name == "cedar" else casbin_every
        over = "all requests" if every == 1 else f"every {every}th request ({len(m.allowed):,})"
        peer_counts[name] = {"decided": len(m.allowed), "every": every, "agreement_over": over}
        disagreements[name] = [
            {
                "cluster": bench_requests[i].cluster,
                "spiffe_id": bench_requests[i].identity.spiffe_id,
                "request": bench_requests[i].request.to_json(),
                "trustmesh": ours[i],
                name: m.allowed[i],
            }
            for i in differ[:5]
        ]
        results.append(
            row(
                name,
                p50_us=m.dist.p50_us,
                p99_us=m.dist.p99_us,
                per_s=m.dist.per_s,
                note=f"{m.note}; timed and compared on {over}",
                decisions_per_s=round(m.dist.per_s),
                allow_fraction=round(sum(m.allowed.values()) / len(m.allowed), 4),
                decided=len(m.allowed),
                build_seconds=round(m.build_seconds, 2),
                **(m.extra or {}),
            )
        )

    fastest = min((m.dist.p50_us for m in timed.values()), default=math.nan)
    ratio = fastest / cold.p50_us if timed else math.nan
    fastest_name = min(timed, key=lambda k: timed[k].dist.p50_us) if timed else ""
    p50_met, p99_met = cold.p50_us <= GOAL_P50_US, cold.p99_us <= GOAL_P99_US
    agreed = bool(timed) and all(v >= GOAL_AGREEMENT for v in agreement.values())
    summary = [
        f"trustmesh p50 {cold.p50_us:.1f} µs per decision, goal ≤ {GOAL_P50_US:.0f} µs: {verdict(p50_met)}; "
        f"p99 {cold.p99_us:.1f} µs, goal ≤ {GOAL_P99_US:.0f} µs: {verdict(p99_met)} (fresh engines; warm "
        f"memo p50 {warm.p50_us:.1f} µs, p99 {warm.p99_us:.1f} µs; bench process CPU share {cold_share:.2f})",
    ]
    if timed:
        summary.append(f"fastest peer ({fastest_name}) median {fastest:.1f} µs = {ratio:.1f}x ours")
        summary.append(
            "agreement with trustmesh: "
            + ", ".join(
                f"{k} {v:.4f} ({peer_counts[k]['agreement_over']})" for k, v in agreement.items()
            )
            + f"; goal {GOAL_AGREEMENT:.1f}: {verdict(agreed)}"
            + ("" if agreed else " — the race proves nothing")
        )
    return {
        "ours": ours,
        "results": results,
        "agreement": agreement,
        "disagreements": disagreements,
        "peers": peer_counts,
        "summary": summary,
        "ratio_vs_fastest_peer": round(ratio, 2) if timed else None,
        "timer_overhead_ns": timer.p50_ns,
        "goals": {
            "p50_us": GOAL_P50_US,
            "p99_us": GOAL_P99_US,
            "agreement": GOAL_AGREEMENT,
            "p50_met": p50_met,
            "p99_met": p99_met,
            "agreement_met": agreed,
        },
    }
