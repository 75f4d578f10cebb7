"""The clock: seconds since the epoch, as ``time.time`` returns them.

Every component that compares times — token expiry, cache lifetimes, the staleness
bound of the revocation list, key rotation — takes one as a constructor argument, and
a process builds its components from one, so two parts of one decision never read two
different clocks and tests move time forward without sleeping. Monotonic time is used
only to measure intervals (timeouts, rate limits), never to compare with a token."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

system_clock: Clock = time.time
