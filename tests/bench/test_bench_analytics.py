"""``trustmesh bench analytics`` at tiny sizes (the figures come from a quiet machine):
both arms of every trial ran, on fresh control planes, in alternating order; every
trigger became a finding through a real server's runner; each figure is positive;
every child stopped. Nothing here asserts speed."""

from __future__ import annotations

import pytest

from helpers import check_bench_shape, child_pids, kill_leftover_children
from trustmesh.bench import analytics


@pytest.mark.slow
def test_analytics_bench_small() -> None:
    before = child_pids()
    result = analytics.run(
        trials=2,
        events=2_000,
        triggers=3,
        report_entries=2_000,
        detector_events=2_000,
        catchup=1_000,
        rounds=1,
    )
    assert not kill_leftover_children(before), "the bench left child processes running"
    check_bench_shape(result)

    ingestion = result["ingestion"]
    assert [(a["trial"], a["arm"]) for a in ingestion["arms"]] == [
        (0, "off"),
        (0, "on"),
        (1, "on"),
        (1, "off"),
    ]
    for arm in ingestion["arms"]:
        assert arm["events"] == 2_000 and arm["log_size"] >= 2_000
        assert arm["events_per_s"] > 0
        if arm["arm"] == "on":
            # an arm shorter than the runner's interval may end before its first round
            assert arm["runner_read"] >= 0
            assert arm["runner_read"] + arm["runner_backlog"] == arm["log_size"]
        else:
            assert arm["catchup_read"] == 1_000 and arm["catchup_per_s"] > 0
    assert ingestion["off_per_s"] > 0 and ingestion["on_per_s"] > 0
    assert ingestion["ratio_on_off"] > 0 and ingestion["runner_catchup_per_s"] > 0

    detectors = result["detectors"]
    assert len(detectors["detectors"]) == 6 and detectors["events_per_s"] > 0

    latency = result["latency"]
    assert len(latency["trials"]) == 3
    assert len({t["id"] for t in latency["trials"]}) == 3
    for trial in latency["trials"]:
        assert 0 < trial["to_row_s"] <= trial["to_event_s"], trial
    for figure in ("to_event", "to_row"):
        spread = latency[figure]
        assert spread["n"] == 3 and 0 < spread["p50_s"] <= spread["p99_s"] <= spread["max_s"]

    report = result["report"]
    assert report["entries"] == 2_000 and all(s > 0 for s in report["seconds"])
    assert set(result["goals"]) == {
        "ingest_on_per_s",
        "trigger_to_finding_p99_s",
        "report_s_per_million",
    }
