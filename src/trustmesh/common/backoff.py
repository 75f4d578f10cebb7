"""Exponential backoff with full jitter, shared by every retry loop (agent, SDK, shipper)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays grow as ``base * factor**attempt`` up to ``cap``; each is drawn uniformly
    from ``[cap_n / 2, cap_n]`` so that many agents restarting together spread out
    ("equal jitter": never zero, never above the cap)."""

    base: float = 0.1
    factor: float = 2.0
    cap: float = 10.0
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * self.factor**self.attempt)
        self.attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0
