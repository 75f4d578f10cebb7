"""``trustmesh bench revocation`` end to end at a small size: structure, every trial
completed, every agent denied in every trial, every child stopped. Nothing here asserts
speed (these machines are shared and noisy)."""

from __future__ import annotations

from helpers import check_bench_shape, child_pids, kill_leftover_children
from trustmesh.bench import revocation
from trustmesh.bench._agentpoll import MAX_AUDIENCES, audience_groups


def test_revocation_bench_small() -> None:
    before = child_pids()
    result = revocation.run(agents=3, trials=3, iterations=2_000, entries=1_000, rounds=2)
    assert not kill_leftover_children(before), "the bench left child processes running"

    check_bench_shape(result)

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
        groups = audience_groups(agents)
        assert sorted(i for g in groups for i in g) == list(range(agents))
        assert all(0 < len(g) <= MAX_AUDIENCES for g in groups)
        assert len(groups) == -(-agents // MAX_AUDIENCES)
