"""The benchmarks run end to end with tiny parameters: structure, positive figures and no
errors. Nothing here asserts speed (these machines are shared and noisy)."""

from __future__ import annotations

import json

import pytest

from helpers import check_bench_shape, child_pids, kill_leftover_children
from trustmesh.bench import authorize, exchange, svid, verify
from trustmesh.bench._stats import percentile, row, summarise


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7], 99) == 7
    dist = summarise([3000, 1000, 2000], wall_ns=6000)
    assert (dist.p50_ns, dist.p99_ns, dist.n) == (2000, 3000, 3)
    assert dist.per_s == pytest.approx(3 / 6e-6)
    assert row("x")["p50_us"] == ""


def test_verify_bench_small() -> None:
    result = verify.run(iterations=500, rounds=2)
    check_bench_shape(result)
    names = [r["name"] for r in result["results"]]
    assert names[:3] == ["bare", "uncached", "cached"]
    for r in result["results"][:3]:
        assert r["p50_us"] > 0 and r["p99_us"] >= r["p50_us"] and r["per_s"] > 0
    assert result["errors"] == 0
    assert result["cached_p50_us"] > 0 and result["uncached_p50_us"] > 0
    assert result["overhead_us"] == pytest.approx(
        result["uncached_p50_us"] - result["bare_p50_us"], abs=0.02
    )
    assert result["timer_overhead_ns"] > 0
    # every uncached call missed, every cached one hit (plus the set-up calls)
    assert result["cache_misses"] >= 2 * 500
    assert result["cache_hits"] >= 2 * 500


def test_the_wrk_script_posts_every_body_and_reports_one_line() -> None:
    bodies = [b"grant_type=a&subject_token=t1", b'x="quoted"\\']
    script = exchange.wrk_script(bodies)
    assert script.count("wrk.format(") == 1 and "function done(" in script
    table = script.split("local bodies = ", 1)[1].split("\n", 1)[0]
    assert json.loads("[" + table[1:-1] + "]") == [b.decode() for b in bodies]
    line = "trustmesh-wrk 1200 2000000 0 0 800 2500 900"
    assert exchange._WRK_RESULT.search(line) is not None


def test_exchange_bench_small() -> None:
    before = child_pids()
    result = exchange.run(seconds=1.5, concurrency=4, pool_size=100, warmup=20, limit_rounds=2)
    check_bench_shape(result)
    assert result["non_200"] == 0 and result["connection_errors"] == 0
    assert result["statuses"] == {"200": result["requests"]}
    assert result["requests"] > 0 and result["exchanges_per_s"] > 0
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert (
        result["limit_per_s"] > 0 and result["rs256_verify_us"] > 0 and result["es256_sign_us"] > 0
    )
    assert result["ratio"] == pytest.approx(
        result["exchanges_per_s"] / result["limit_per_s"], rel=0.01
    )
    # every 200 answer (warm-up, window, drain and the sanity exchange) is one
    # token.issued event committed to the server's database, and nothing more
    audit = result["audit"]
    assert audit["verified"] and result["goals"]["audit_verified"]
    assert audit["token_issued_in_log"] == audit["server_issued"] == audit["answered_200"]
    assert audit["answered_200"] >= result["requests"] + result["warmup_requests"]
    assert result["server_cpu_percent"] > 0 and result["load_generator_cpu_percent"] > 0
    assert any("issue 11" in line for line in result["summary"])
    http, limit = result["results"][0], result["results"][1]
    assert http["per_s"] > 0 and limit["per_s"] > 0
    # the server and the simulated cluster were stopped and reaped
    assert not kill_leftover_children(before)


def test_svid_bench_small() -> None:
    """A short run issues real X.509-SVIDs over HTTP and measures the limit beside them."""
    result = svid.run(seconds=1.5, concurrency=4, pool_size=60, warmup=10, limit_rounds=2)
    assert result["non_200"] == 0 and result["connection_errors"] == 0, result["first_error"]
    assert result["requests"] > 0 and result["svids_per_s"] > 0
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert result["limit_per_s"] > 0 and result["limit_with_token_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["svids_per_s"] / result["limit_per_s"], rel=0.01)
    assert result["server_cpu_percent"] is not None
    names = [r["name"] for r in result["results"]]
    assert names[:2] == ["X.509-SVID over HTTP", "limit: CSR verify + sign"]


def test_authorize_bench_small() -> None:
    before = child_pids()
    result = authorize.run(seconds=0.5, concurrency=2, workloads=3, warmup=10)
    assert not kill_leftover_children(before), "the bench left child processes running"
    check_bench_shape(result)
    assert [r["name"] for r in result["results"]] == ["POST /v1/authorize", "ext_authz"]
    by_name = {h["name"]: h for h in result["http"]}
    assert all(h["unexpected"] == 0 and h["decisions_per_s"] > 0 for h in result["http"])
    assert set(by_name["POST /v1/authorize"]["statuses"]) == {200}
    # ext_authz answers every allowed GET 200 and every DELETE 403
    assert set(by_name["ext_authz"]["statuses"]) == {200, 403}
