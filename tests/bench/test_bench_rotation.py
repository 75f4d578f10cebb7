"""``trustmesh bench rotation`` end to end, small: a control plane, two simulated
clusters, an agent with --trust-xfcc, a sidecar per client workload and one feeding a
real Envoy over SDS, py-spiffe clients making mTLS requests in a process of their own —
every X.509-SVID (10 s) rotates during the window and no request fails. A run too short
for any rotation says it proved nothing and exits 1. Nothing here asserts speed."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import check_bench_shape, child_pids, kill_leftover_children, trustmesh_cmd
from trustmesh.bench import rotation


@pytest.mark.slow
def test_every_svid_of_a_small_fleet_rotates_under_load_without_a_failed_request() -> None:
    before = child_pids()
    result = rotation.run(sidecars=3, ttl=10, seconds=14)
    check_bench_shape(result)
    assert result["failed"] == 0 and result["failures"] == {}, result["failure_examples"]
    assert result["sent"] == result["succeeded"] > 0
    assert result["ok"] and result["problems"] == [] and result["goal_met"]
    assert result["every_svid_rotated"] and result["every_client_svid_rotated"]
    workloads = result["workloads"]
    assert [w["spiffe_id"] for w in workloads] == [rotation.client_id(i) for i in range(3)]
    for workload in workloads:
        assert workload["sent"] == workload["succeeded"] > 0
        # the upstream saw the workload present more than one certificate (from XFCC) ...
        assert workload["rotations"] >= 1
        assert workload["certificates_seen_upstream"] == workload["rotations"] + 1
        # ... and py-spiffe received the renewed SVIDs on the Workload API stream
        assert workload["svids_received_on_stream"] >= 2
        assert workload["svid_problems"] == [] and not workload["source_closed"]
    receiver = result["receiver"]
    assert receiver["rotated"] and receiver["certificates_seen"] >= 2
    assert receiver["spiffe_id"] == rotation.RECEIVER_ID
    # every success went through ext_authz to the upstream, named by its certificate
    assert result["upstream_requests"] == result["succeeded"]
    assert result["upstream_without_xfcc"] == 0 and result["upstream_identity_mismatches"] == 0
    assert 0 < result["p50_us"] <= result["p99_us"]
    assert result["processes_ended"] == []
    assert set(result["cpu_percent"]) >= {"control_plane", "agent", "envoy", "sidecars", "load"}
    # every process it started was stopped and reaped
    assert not kill_leftover_children(before)


def test_a_run_too_short_for_a_rotation_says_it_proved_nothing_and_exits_1() -> None:
    completed = subprocess.run(
        trustmesh_cmd("bench", "rotation", "--sidecars", "1", "--ttl", "600",
                      "--duration", "2", "-o", "json"),
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stderr
    result = json.loads(completed.stdout)
    check_bench_shape(result)
    assert result["failed"] == 0 and result["succeeded"] > 0 and result["goal_met"]
    assert not result["every_svid_rotated"] and not result["ok"]
    assert result["workloads"][0]["rotations"] == 0
    assert not result["receiver"]["rotated"]
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("error: 1 client SVID(s) did not rotate during the window")
    assert "the receiving side's SVID did not rotate" in line
    assert "did not prove the point" in result["summary"][-1]
