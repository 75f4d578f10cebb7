"""``trustmesh bench scale``: the policy of a large federation (issue 11) — by default
100,000 workloads, 5,000 role bindings, 1,000 global roles and 500 clusters
(``_policygen.SCALE``), generated and loaded through the real path as in ``bench
engine`` — and what it costs:

- **compile**: ``compile_all`` for every cluster (the control plane's compiler; goal
  ≤ 10 s), with the bench process's CPU share;
- **sign**: ``sign_bundle`` of one cluster's bundle, and the bundle's size in bytes
  (the compact JWS an agent downloads). The control plane signs a cluster's bundle when
  its agent first asks for it; the figure for all clusters is that one times the
  number of clusters (stated as such);
- **agent load**: in a fresh process (``_agentload``), read the signed bundle, verify
  and parse it and build the ``Engine`` (goal ≤ 1 s), and the process's resident
  memory once loaded (goal ≤ 200 MB, the whole process: interpreter and imports
  included; the policy state alone, after minus before the load, is reported next to
  it) and at its peak during the load. Median of ``load_runs`` fresh processes, each
  with its CPU share;
- **decisions**: the ``bench engine`` figures (p50/p99 per decision, fresh engines then
  warm, agreement with Cedar and casbin) on this policy, at the agents of ``sample``
  clusters spread over the 500 (an agent holds only its own cluster's bundle, so a
  decision's cost does not depend on how many other agents there are; building all 500
  engines in one process would only measure this machine's memory). Requests are asked
  by identities of the sampled clusters (85% at their own cluster's agent). The peers
  decide every k-th request (default: about 2,000), which the output states."""

from __future__ import annotations

import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trustmesh.bench._federation import es256_key
from trustmesh.bench._policygen import SCALE, Sizes, generate_bodies, generate_requests, load_world
from trustmesh.bench._stats import verdict
from trustmesh.bench.engine import PEERS, _require_peers, measure
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import compile_all
from trustmesh.policy.engine import Engine

__all__ = ["GOAL_COMPILE_S", "GOAL_LOAD_S", "GOAL_RSS_MB", "run", "sample_clusters"]

GOAL_COMPILE_S = 10.0
GOAL_LOAD_S = 1.0
GOAL_RSS_MB = 200.0
PEER_SAMPLE = 2_000  # each peer decides about this many requests (every k-th)
_MB = 1024 * 1024


def sample_clusters(names: list[str], count: int) -> list[str]:
    """``count`` cluster names spread evenly over the sorted ``names``."""
    ordered = sorted(names)
    count = max(1, min(count, len(ordered)))
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def _agent_load(token: str, jwk: dict[str, Any], cluster: str, runs: int) -> dict[str, Any]:
    """``runs`` fresh processes each load the signed bundle (``_agentload``); medians."""
    with tempfile.TemporaryDirectory(prefix="tm-scale-") as tmp:
        token_file, jwks_file = Path(tmp) / "bundle.jws", Path(tmp) / "jwks.json"
        token_file.write_text(token, encoding="ascii")
        jwks_file.write_text(json.dumps({"keys": [jwk]}))
        argv = [sys.executable, "-m", "trustmesh.bench._agentload", str(token_file)]
        loads = []
        for _ in range(runs):
            done = subprocess.run(
                [*argv, str(jwks_file), cluster],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"the agent load failed ({done.returncode}): {done.stderr[-2000:]}"
                )
            loads.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {
        key: statistics.median(load[key] for load in loads)
        for key in ("read_s", "verify_parse_s", "engine_s", "load_s", "cpu_s")
    }
    for key in ("rss_before", "rss_after", "rss_peak"):
        out[key.replace("rss", "rss_mb")] = statistics.median(load[key] for load in loads) / _MB
    out["state_mb"] = out["rss_mb_after"] - out["rss_mb_before"]
    out["cpu_share"] = out["cpu_s"] / out["load_s"] if out["load_s"] else math.nan
    out["runs"] = runs
    out["bindings"] = loads[0]["bindings"]
    out["identities"] = loads[0]["identities"]
    return out


def run(
    requests: int = 20_000,
    seed: int = 7,
    peers: tuple[str, ...] = PEERS,
    *,
    sizes: Sizes = SCALE,
    sample: int = 20,
    batch_size: int = 1_000,
    cedar_every: int | None = None,
    casbin_every: int | None = None,
    load_runs: int = 3,
) -> dict[str, Any]:
    if requests < 1 or sample < 1 or load_runs < 1 or batch_size < 1:
        raise ValueError("requests, sample, load_runs and batch_size must be positive")
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peer {sorted(unknown)[0]!r}; peers are {', '.join(PEERS)}")
    _require_peers(peers, "scale")
    cedar_every = cedar_every or max(1, requests // PEER_SAMPLE)
    casbin_every = casbin_every or max(1, requests // PEER_SAMPLE)

    t0 = time.perf_counter()
    world = load_world(generate_bodies(sizes, seed))
    load_seconds = time.perf_counter() - t0

    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    bundles = compile_all(world.policy, world.registry, 1)
    compile_seconds = time.perf_counter() - t0
    compile_share = (time.process_time() - cpu0) / compile_seconds
    sampled = sample_clusters(list(bundles), sample)

    _, jwk, key = es256_key()
    signed = sampled[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    token = sign_bundle(bundles[signed], key)
    sign_seconds = time.perf_counter() - t0
    sign_share = (time.process_time() - cpu0) / sign_seconds
    agent = _agent_load(token, jwk, signed, load_runs)
    bundle_bytes = len(token)
    del token

    bench_requests = generate_requests(
        world, requests, seed, sizes, clusters=sampled, bundles=bundles
    )
    gc.collect()
    t0 = time.perf_counter()
    engines = {name: Engine(bundles[name]) for name in sampled}
    engine_seconds = (time.perf_counter() - t0) / len(sampled)
    measured = measure(
        world,
        bench_requests,
        engines,
        peers,
        batch_size=batch_size,
        cedar_every=cedar_every,
        casbin_every=casbin_every,
        clusters=sampled,
    )
    per_cluster = [len(bundles[name]["bindings"]) for name in sampled]
    pairs = len({(r.identity.spiffe_id, r.cluster) for r in bench_requests})

    compile_met = compile_seconds <= GOAL_COMPILE_S
    load_met = agent["load_s"] <= GOAL_LOAD_S
    rss_met = agent["rss_mb_after"] <= GOAL_RSS_MB
    summary = [
        f"compile: {compile_seconds:.2f} s for {sizes.clusters} clusters (compile_all; bench process CPU "
        f"share {compile_share:.2f}); goal ≤ {GOAL_COMPILE_S:.0f} s: {verdict(compile_met)}",
        f"sign: {sign_seconds:.2f} s for one bundle of {bundle_bytes:,} bytes (CPU share {sign_share:.2f}); "
        f"{sign_seconds * sizes.clusters:.0f} s for all {sizes.clusters} if each is signed once (extrapolated)",
        f"agent load: {agent['load_s']:.2f} s (read {agent['read_s']:.2f} + verify and parse "
        f"{agent['verify_parse_s']:.2f} + Engine {agent['engine_s']:.2f}; agent process CPU share "
        f"{agent['cpu_share']:.2f}; median of {load_runs}); goal ≤ {GOAL_LOAD_S:.0f} s: {verdict(load_met)}",
        f"agent memory: {agent['rss_mb_after']:.0f} MB resident once loaded (the policy state "
        f"{agent['state_mb']:.0f} MB over {agent['rss_mb_before']:.0f} MB of interpreter and imports; peak "
        f"during the load {agent['rss_mb_peak']:.0f} MB); goal ≤ {GOAL_RSS_MB:.0f} MB: {verdict(rss_met)}",
        *measured["summary"],
        f"{requests:,} requests at the agents of {len(sampled)} of {sizes.clusters} clusters "
        f"({statistics.mean(per_cluster):,.0f} bindings each on average, {pairs:,} identityxcluster pairs); "
        f"Engine build {engine_seconds * 1000:.0f} ms per cluster",
    ]
    goals = measured["goals"]
    goals.update(
        compile_s=GOAL_COMPILE_S,
        load_s=GOAL_LOAD_S,
        rss_mb=GOAL_RSS_MB,
        compile_met=compile_met,
        load_met=load_met,
        rss_met=rss_met,
    )
    return {
        "title": (
            f"Scale: {sizes.workloads:,} workloads, {sizes.bindings:,} bindings, {sizes.clusters} clusters — "
            "compile, one agent's bundle load and memory, decisions"
        ),
        "workload": {
            **sizes.to_json(),
            "requests": requests,
            "sampled_clusters": sampled,
            "bindings_per_sampled_cluster": round(statistics.mean(per_cluster), 1),
            "distinct_identity_cluster_pairs": pairs,
            "allow_fraction": round(sum(measured["ours"]) / len(measured["ours"]), 3),
        },
        "results": measured["results"],
        "agreement": measured["agreement"],
        "summary": summary,
        "load_world_seconds": round(load_seconds, 3),
        "compile_seconds": round(compile_seconds, 3),
        "compile_cpu_share": round(compile_share, 2),
        "sign_seconds": round(sign_seconds, 3),
        "sign_cpu_share": round(sign_share, 2),
        "bundle_bytes": bundle_bytes,
        "bundle_cluster": signed,
        "agent_load": {k: round(v, 3) if isinstance(v, float) else v for k, v in agent.items()},
        "engine_build_seconds": round(engine_seconds, 4),
        "ratio_vs_fastest_peer": measured["ratio_vs_fastest_peer"],
        "timer_overhead_ns": measured["timer_overhead_ns"],
        "peers": measured["peers"],
        "disagreements": measured["disagreements"],
        "seed": seed,
        "goals": goals,
    }
