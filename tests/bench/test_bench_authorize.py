"""``trustmesh bench authorize``: wrk's output read right, and small runs of both load
generators against real agents (one worker, then two) whose every decision is counted
in the control plane's log."""

from __future__ import annotations

import json

import pytest

from helpers import child_pids, kill_leftover_children
from trustmesh.bench import authorize

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:41019/v1/authorize
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.11ms    1.02ms  24.15ms   91.02%
    Req/Sec    10.40k   612.33    11.02k    80.00%
  Latency Distribution
     50%    2.97ms
     75%    3.20ms
     90%    3.61ms
     99%  850.00us
  103512 requests in 10.00s, 61.20MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  10351.02
Transfer/sec:      6.12MB
"""


def test_wrk_output_is_read_with_its_units() -> None:
    figures = authorize.parse_wrk(WRK_OUTPUT)
    assert figures.requests == 103_512 and figures.per_s == pytest.approx(10_351.02)
    assert figures.p50_ms == pytest.approx(2.97) and figures.p99_ms == pytest.approx(0.85)
    assert figures.non_2xx == 7 and figures.socket_errors == 3
    with pytest.raises(ValueError, match="--latency"):
        authorize.parse_wrk(WRK_OUTPUT.replace("     99%  850.00us\n", ""))
    with pytest.raises(ValueError, match="not wrk output"):
        authorize.parse_wrk("unable to connect to 127.0.0.1:9 Connection refused")


@pytest.mark.slow
@pytest.mark.parametrize("wrk", [True, False])
def test_authorize_bench_counts_every_decision_in_the_log(wrk: bool) -> None:
    before = child_pids()
    result = authorize.run(seconds=1, concurrency=4, workloads=3, warmup=10, wrk=wrk,
                           workers=(1, 2))  # fmt: skip
    assert not kill_leftover_children(before), "the bench left child processes running"
    json.dumps(result)
    assert [r["name"] for r in result["http"]] == [
        f"{surface}, {workers}" for workers in ("1 worker", "2 workers")
        for surface in ("POST /v1/authorize", "ext_authz")
    ]  # fmt: skip
    assert all(r["unexpected"] == 0 and r["decisions_per_s"] > 0 for r in result["http"])
    assert all(set(r["cpu_percent"]) == {"load", "agent", "control_plane"} for r in result["http"])
    for workers, audit in zip((1, 2), result["audit"], strict=True):
        assert audit["complete"] and audit["gaps"] == 0 and audit["backlog"] == 0
        assert audit["logged"] == audit["spooled"] >= audit["answered"] > 0
        assert audit["workers"] == audit["sources"] == workers
    assert result["goals"] == {"decisions_per_s": 10_000.0, "p99_ms": 5.0, "connections": 32}
    audited = [line for line in result["summary"] if "every decision audited" in line]
    assert len(audited) == 2 and all(line.endswith("shipped: met") for line in audited)


@pytest.mark.parametrize("wrk", [True, False])
def test_authorize_bench_measures_xfcc_beside_the_bearer_path(wrk: bool) -> None:
    """``--xfcc``: checks from X.509-SVIDs of the real issuance, every one allowed or
    denied as the bearer checks are, and their rate set against the bearer path's."""
    result = authorize.run(seconds=1, concurrency=4, workloads=2, warmup=10, wrk=wrk, xfcc=True)
    assert [r["name"] for r in result["http"]] == [
        "POST /v1/authorize",
        "ext_authz",
        "ext_authz (XFCC)",
    ]
    assert all(r["unexpected"] == 0 and r["decisions_per_s"] > 0 for r in result["http"])
    if not wrk:  # allowed GETs and denied DELETEs alike
        assert set(result["http"][2]["statuses"]) == {200, 403}
    [compared] = [line for line in result["summary"] if "of the bearer path" in line]
    assert compared.startswith("ext_authz (XFCC) vs ext_authz: ")
    assert result["audit"][0]["complete"]
