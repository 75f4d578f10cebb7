"""``trustmesh bench failover``, short: two replicas on one embedded PostgreSQL, SDK
clients exchanging through both URLs, the preferred replica SIGKILLed mid-run and
restarted — no exchange fails, and the restarted replica serves again. Nothing here
asserts speed."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import child_pids, kill_leftover_children, trustmesh_cmd


@pytest.mark.slow
def test_a_replica_killed_mid_run_fails_no_exchange_and_comes_back() -> None:
    before = child_pids()
    completed = subprocess.run(
        trustmesh_cmd("bench", "failover", "--before", "2", "--down", "1.5", "--after", "1.5",
                      "--window", "1", "--concurrency", "2", "-o", "json"),
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["ok"] and result["problems"] == []
    assert result["failed"] == 0 and result["failure_examples"] == []
    before_kill, window, rest = result["results"]
    assert sum(row["exchanges"] for row in result["results"]) == result["exchanges"] > 0
    # the SDK preferred the replica that was killed, then the survivor answered
    assert before_kill["answered_by"]["killed"] > 0
    assert window["exchanges"] > 0 and window["answered_by"]["survivor"] > 0
    assert rest["answered_by"]["survivor"] > 0
    assert all(row["failed"] == 0 for row in result["results"])
    assert result["p99_before_us"] > 0 and result["p99_failover_window_us"] > 0
    restarted = result["restarted_replica_seconds"]
    assert 0 < restarted["listening"] <= restarted["ready_to_issue"] <= restarted["first_exchange"]
    assert "failed: 0 (goal 0)" in result["summary"][0]
    assert not kill_leftover_children(before)


def test_a_database_that_cannot_be_reached_is_one_line_and_exit_1() -> None:
    completed = subprocess.run(
        trustmesh_cmd("bench", "failover", "--before", "1", "--down", "1", "--after", "1",
                      "--postgres", "postgresql://nobody@127.0.0.1:9/none"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 1
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("error: replica-a exited with")
