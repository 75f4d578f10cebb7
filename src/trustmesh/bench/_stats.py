"""Small, dependency-free statistics for the benchmarks.

Latencies are kept as integer nanoseconds from ``time.perf_counter_ns`` and summarised
with the nearest-rank percentile (no interpolation: every reported figure is a latency
that was actually observed). Rates of repeated rounds are combined with the median, the
statistic least moved by one round that a noisy neighbour slowed down."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Distribution",
    "median",
    "percentile",
    "row",
    "summarise",
    "timer_overhead",
    "verdict",
]


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclass(frozen=True, slots=True)
class Distribution:
    """One latency sample: count, p50, p99 and mean in nanoseconds, plus the rate over
    the wall-clock time the sample took (``per_s``, which includes the loop around the
    timed calls, so it is never flattered by what the per-call timer leaves out)."""

    n: int
    p50_ns: int
    p99_ns: int
    mean_ns: float
    per_s: float

    @property
    def p50_us(self) -> float:
        return self.p50_ns / 1000.0

    @property
    def p99_us(self) -> float:
        return self.p99_ns / 1000.0


def summarise(latencies_ns: Sequence[int], wall_ns: int) -> Distribution:
    """Summarise per-call latencies measured over ``wall_ns`` nanoseconds of wall time."""
    ordered = sorted(latencies_ns)
    n = len(ordered)
    if n == 0:
        raise ValueError("no latencies to summarise")
    return Distribution(
        n=n,
        p50_ns=percentile(ordered, 50),
        p99_ns=percentile(ordered, 99),
        mean_ns=sum(ordered) / n,
        per_s=n / (wall_ns / 1e9) if wall_ns > 0 else float("inf"),
    )


def timer_overhead(samples: int = 20_000) -> Distribution:
    """What one ``perf_counter_ns()`` pair costs when nothing runs between the two
    reads: the floor under every per-call latency reported next to it."""
    clock = time.perf_counter_ns
    out = [0] * samples
    started = clock()
    for i in range(samples):
        t0 = clock()
        t1 = clock()
        out[i] = t1 - t0
    return summarise(out, clock() - started)


def _round(value: float, digits: int) -> float:
    return round(value, digits) if math.isfinite(value) else value


def row(
    name: str,
    *,
    p50_us: float | None = None,
    p99_us: float | None = None,
    per_s: float | None = None,
    note: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """One line of a benchmark table, as ``trustmesh bench`` prints it; missing figures
    print as empty cells. ``extra`` keys are kept for ``-o json``."""
    out: dict[str, Any] = {
        "name": name,
        "p50_us": "" if p50_us is None else _round(p50_us, 2),
        "p99_us": "" if p99_us is None else _round(p99_us, 2),
        "per_s": "" if per_s is None else (round(per_s) if math.isfinite(per_s) else per_s),
        "note": note,
    }
    out.update(extra)
    return out


def verdict(met: bool) -> str:
    """How a summary line reports a goal."""
    return "met" if met else "MISSED"
