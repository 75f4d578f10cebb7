"""Small, dependency-free statistics for the benchmarks.

Latencies are kept as integer nanoseconds from ``time.perf_counter_ns`` and summarised
with the nearest-rank percentile (no interpolation: every reported figure is a latency
that was actually observed). Rates of repeated rounds are combined with the median, the
statistic least moved by one round that a noisy neighbour slowed down."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trustmesh.bench._load import LoadResult

__all__ = [
    "Distribution",
    "LoadFigures",
    "load_figures",
    "median",
    "median_of",
    "percentile",
    "row",
    "summarise",
    "timed",
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


def timed(op: Callable[[int], object], n: int) -> Distribution:
    """``op(0)`` … ``op(n - 1)`` in a loop, each call timed (a single-core limit)."""
    clock = time.perf_counter_ns
    out = [0] * n
    started = clock()
    for i in range(n):
        t0 = clock()
        op(i)
        out[i] = clock() - t0
    return summarise(out, clock() - started)


def median_of(rounds: Sequence[dict[str, Distribution]], key: str) -> tuple[float, float, float]:
    """(p50 µs, p99 µs, per_s) of ``key``, each the median over the rounds."""
    return (
        median([r[key].p50_us for r in rounds]),
        median([r[key].p99_us for r in rounds]),
        median([r[key].per_s for r in rounds]),
    )


def limit_note(rounds: Sequence[dict[str, Distribution]], key: str = "both") -> str:
    """The note of a single-core limit's table row: how many rounds, and their spread."""
    limits = sorted(r[key].per_s for r in rounds)
    return f"one core, median of {len(rounds)} rounds ({limits[0]:,.0f} to {limits[-1]:,.0f}/s)"


@dataclass(frozen=True)
class LoadFigures:
    """What an HTTP load's report says of it, whatever the endpoint: the latency
    distribution, the window, both processes' CPU shares, errors, and the goals."""

    http: Distribution
    window_s: float
    server_cpu: float | None  # percent of one core
    client_cpu: float
    errors: int
    rate_ok: bool
    p99_ok: bool

    def members(
        self, load: LoadResult, loop_name: str, goal_per_s: float, goal_p99_ms: float
    ) -> dict[str, Any]:
        """The report's JSON members every HTTP benchmark shares."""
        return {
            "p50_us": round(self.http.p50_us, 1),
            "p99_us": round(self.http.p99_us, 1),
            "mean_us": round(self.http.mean_ns / 1000, 1),
            "requests": self.http.n,
            "window_s": round(self.window_s, 3),
            "non_200": load.non_200,
            "connection_errors": load.connection_errors,
            "statuses": {str(k): v for k, v in load.statuses.items()},
            "first_error": load.first_error,
            "warmup_requests": load.warmup_requests,
            "server_cpu_percent": None if self.server_cpu is None else round(self.server_cpu, 1),
            "client_cpu_percent": round(self.client_cpu, 1),
            "event_loop": loop_name,
            "goals": {
                "per_s": goal_per_s,
                "p99_ms": goal_p99_ms,
                "per_s_met": self.rate_ok,
                "p99_met": self.p99_ok,
            },
        }

    def cpu_line(self, loop_name: str) -> str:
        server = (
            ""
            if self.server_cpu is None
            else f"server process: {self.server_cpu:.0f}% of one core; "
        )
        return server + f"load generator ({loop_name}): {self.client_cpu:.0f}% of one core"

    def errors_line(self, load: LoadResult) -> str:
        return (
            f"errors: {load.non_200} non-200 answers, {load.connection_errors} connection errors"
            + (f" (first: {load.first_error})" if load.first_error else "")
        )


def load_figures(load: LoadResult, what: str, goal_per_s: float, goal_p99_ms: float) -> LoadFigures:
    """Summarise ``load``; RuntimeError when no ``what`` completed in its window."""
    if not load.latencies_ns:
        raise RuntimeError(f"no {what} completed in the measurement window ({load.first_error})")
    http = summarise(load.latencies_ns, load.window_ns)
    window_s = load.window_ns / 1e9
    server_cpu = None if load.server_cpu_s is None else 100.0 * load.server_cpu_s / window_s
    return LoadFigures(
        http=http,
        window_s=window_s,
        server_cpu=server_cpu,
        client_cpu=100.0 * load.client_cpu_s / window_s,
        errors=load.non_200 + load.connection_errors,
        rate_ok=http.per_s >= goal_per_s,
        p99_ok=http.p99_us / 1000.0 < goal_p99_ms,
    )
