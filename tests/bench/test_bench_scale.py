"""``trustmesh bench scale`` at a small size: the figures it promises, the agent load in
a fresh process, the peers' agreement; the generator's scale sizes. Nothing here
asserts speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trustmesh.bench import scale
from trustmesh.bench._federation import es256_key
from trustmesh.bench._policygen import SCALE, Sizes, generate_bodies, load_world
from trustmesh.policy.bundle import sign_bundle
from trustmesh.policy.compiler import compile_all

pytest.importorskip("cedarpy")
pytest.importorskip("casbin")

SMALL = Sizes(clusters=6, workloads=600, projects=6, roles=40, bindings=150)


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    return scale.run(requests=1_500, seed=3, sizes=SMALL, sample=3, load_runs=1)


def test_the_scale_sizes_are_those_of_issue_11() -> None:
    assert (SCALE.workloads, SCALE.bindings, SCALE.clusters) == (100_000, 5_000, 500)
    assert SCALE.workloads // SCALE.projects == Sizes().workloads // Sizes().projects


def test_sampled_clusters_spread_over_all_of_them() -> None:
    names = [f"c{i:02d}" for i in range(500)]
    chosen = scale.sample_clusters(names, 20)
    assert len(chosen) == len(set(chosen)) == 20
    assert chosen[0] == "c00" and chosen[-1] == sorted(names)[475]
    assert scale.sample_clusters(names[:3], 20) == sorted(names[:3])


def test_a_small_run_reports_every_figure(small_run: dict[str, Any]) -> None:
    result = small_run
    assert result["compile_seconds"] > 0 and result["sign_seconds"] > 0
    assert result["bundle_bytes"] > 10_000
    load = result["agent_load"]
    assert load["load_s"] > 0 and load["engine_s"] > 0 and load["verify_parse_s"] > 0
    assert load["rss_mb_after"] > load["rss_mb_before"] > 0
    assert load["rss_mb_peak"] >= load["rss_mb_after"]
    assert load["identities"] == SMALL.workloads and load["bindings"] > 0
    assert result["workload"]["sampled_clusters"] == scale.sample_clusters(
        [f"c{i:02d}" for i in range(SMALL.clusters)], 3
    )
    assert [r["name"] for r in result["results"]] == ["trustmesh", "cedar", "casbin"]
    ours = result["results"][0]
    assert ours["decided"] == 1_500 and ours["cpu_share"] > 0
    assert set(result["goals"]) >= {
        "compile_met",
        "load_met",
        "rss_met",
        "p50_met",
        "p99_met",
        "agreement_met",
    }
    assert any(line.startswith("agent memory:") for line in result["summary"])
    json.dumps(result, allow_nan=False)


def test_a_small_run_agrees_with_both_peers(small_run: dict[str, Any]) -> None:
    assert small_run["agreement"] == {"cedar": 1.0, "casbin": 1.0}, small_run["disagreements"]
    assert small_run["goals"]["agreement_met"]


def test_an_agent_load_of_a_bundle_signed_by_another_key_fails_loudly(tmp_path: Path) -> None:
    world = load_world(
        generate_bodies(Sizes(clusters=2, workloads=20, projects=2, roles=5, bindings=10), 1)
    )
    bundles = compile_all(world.policy, world.registry, 1)
    _, _, signer = es256_key()
    _, other_jwk, _ = es256_key()
    token = sign_bundle(bundles["c00"], signer)
    with pytest.raises(RuntimeError, match="the agent load failed"):
        scale._agent_load(token, other_jwk, "c00", 1)
