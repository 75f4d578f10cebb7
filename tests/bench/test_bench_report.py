"""``trustmesh bench report`` runs small (the figures come from a quiet machine): the log
is filled, the report reads every entry, and the filler's unused grant is found."""

from __future__ import annotations

from helpers import check_bench_shape
from trustmesh.bench import report


def test_report_bench_small() -> None:
    result = report.run(entries=3_000, rounds=2)
    check_bench_shape(result)
    assert result["entries"] == 3_000
    assert len(result["report_seconds"]) == 2 and all(s > 0 for s in result["report_seconds"])
    assert result["results"][0]["per_s"] > 0
    assert "unused grants 1" in result["summary"][0]
