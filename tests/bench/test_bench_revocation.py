"""``trustmesh bench revocation`` end to end at a small size: structure, every trial
completed, every agent denied in every trial, every child stopped. Nothing here asserts
speed (these machines are shared and noisy)."""

from __future__ import annotations

import json
import os
import signal

from trustmesh.bench import revocation

ROW_KEYS = {"name", "p50_us", "p99_us", "per_s", "note"}


def _children() -> set[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return {int(pid) for pid in f.read().split()}
    except OSError:
        return set()


def test_revocation_bench_small() -> None:
    before = _children()
    result = revocation.run(agents=3, trials=3, iterations=2_000, entries=1_000, rounds=2)
    leftovers = _children() - before
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, "the bench left child processes running"

    assert isinstance(result["title"], str) and result["title"]
    assert result["results"] and all(set(r) >= ROW_KEYS for r in result["results"])
    assert result["summary"] and all(isinstance(line, str) for line in result["summary"])
    json.dumps(result)  # -o json must be able to print it

    assert result["agents"] == 3 and result["kinds"] == ["jti", "workload"]
    trials = result["trials"]
    assert len(trials) == 3 * 2
    assert [t["kind"] for t in trials] == ["jti", "workload"] * 3
    assert result["incomplete_trials"] == 0 and result["errors"] == 0
    for trial in trials:
        assert trial["denied"] == 3, trial
        assert all(ms is not None and ms > 0 for ms in trial["first_deny_ms"]), trial
        assert trial["all_deny_ms"] == max(trial["first_deny_ms"])
        assert trial["revoked"] and trial["errors"] == 0
    for label in ("all kinds", "jti", "workload"):
        spread = result["all_deny"][label]
        assert spread["n"] == (6 if label == "all kinds" else 3)
        assert 0 < spread["p50_ms"] <= spread["p99_ms"] <= spread["max_ms"]
    assert result["per_agent_first_deny"]["n"] == 3 * 6

    micro = result["micro"]
    assert micro["entries"] == 1_000
    assert set(micro["figures"]) == {
        "dict.get",
        "revoked (miss)",
        "revoked (jti hit)",
        "authenticate cached, no check",
        "authenticate cached, with check",
    }
    assert all(f["p50_ns"] > 0 and f["per_s"] > 0 for f in micro["figures"].values())


def test_groups_respect_the_audience_limit() -> None:
    for agents in (1, 3, 16, 17, 20, 33):
        groups = revocation._groups(agents)
        assert sorted(i for g in groups for i in g) == list(range(agents))
        assert all(0 < len(g) <= revocation.MAX_AUDIENCES for g in groups)
        assert len(groups) == -(-agents // revocation.MAX_AUDIENCES)
