"""``trustmesh bench access`` end to end at a small size: every trial's grant reached
every agent and left it at the expiry, with no publish between; every child stopped.
Nothing here asserts speed (these machines are shared and noisy)."""

from __future__ import annotations

import pytest

from helpers import check_bench_shape, child_pids, kill_leftover_children
from trustmesh.bench import access


@pytest.mark.slow
def test_access_bench_small() -> None:
    before = child_pids()
    result = access.run(agents=3, trials=2, duration=3)
    assert not kill_leftover_children(before), "the bench left child processes running"

    check_bench_shape(result)
    assert result["agents"] == 3 and result["duration_s"] == 3
    assert result["incomplete"] == 0 and result["errors"] == 0, result["trials"]
    assert result["revision_moved"] == 0
    trials = result["trials"]
    assert len(trials) == 2
    for trial in trials:
        assert trial["in_force_all_ms"] is not None and trial["in_force_all_ms"] > 0, trial
        assert trial["gone_all_ms"] is not None and trial["gone_all_ms"] >= 0, trial
        assert trial["revision_moved"] is False and trial["errors"] == 0
    for key in ("in_force_every_agent", "gone_every_agent"):
        spread = result[key]
        assert spread["n"] == 2
        assert 0 <= spread["p50_ms"] <= spread["p99_ms"] <= spread["max_ms"]
