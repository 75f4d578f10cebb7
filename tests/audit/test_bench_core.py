"""The core benchmark runs and reports sane figures (a small run; the real one is 1M)."""

from __future__ import annotations

from trustmesh.audit import bench_core


def test_benchmark_reports_every_figure() -> None:
    result = bench_core.run(entries=5_000, samples=200)
    assert result.entries == 5_000
    assert result.appends_per_second > 0
    for figure in (result.inclusion_total, result.consistency_total, result.root_latest):
        assert 0 < figure.p50 <= figure.p99
    text = result.report()
    assert "inclusion gen+verify" in text
    assert "5,000 entries" in text
