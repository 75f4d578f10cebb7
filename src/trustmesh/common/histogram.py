"""A latency histogram cheap enough for the decision hot path: one ``bisect`` and two
additions per observation, no lock (every observation of one histogram happens on
one thread: the event loop of its process). Exposed to Prometheus by the collector
that owns it (:meth:`Histogram.samples` gives the cumulative buckets a
``HistogramMetricFamily`` takes), so ``prometheus_client``'s locked children stay off
the hot path."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

DECISION_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
"""Seconds, for a decision inside the agent (tens of microseconds when the token is
cached, a few milliseconds when its signature is verified)."""

LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Seconds, for propagation and shipping lags (goals: revocation within 1 s, policy
within 5 s)."""


class Histogram:
    """Counts of observations per bucket (``le`` semantics: a value equal to a bound
    falls in that bound's bucket) and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must increase")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def samples(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative ``(le, count)`` pairs ending with ``+Inf``, sum)."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out, self.sum
