"""The bounds on what a peer can make a trustmesh process hold over HTTP — header size
and count, header, body and idle time, open connections, long polls per credential —
in one place, so the CLI can name the defaults without loading the web server
(``common/serving.py`` and ``server/snapshots.py`` enforce them; docs/operations.md
lists them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpLimits:
    """Flags of the same names on ``trustmesh server`` and ``trustmesh agent``."""

    max_header_bytes: int = 64 * 1024  # Envoy's own default bound on headers is 60 KiB
    max_headers: int = 128  # Envoy forwards at most 100 fields, plus its x-envoy-* ones
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: int = 5
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024 or self.max_headers < 8 or self.max_connections < 1:
            raise ValueError("HTTP limits too small to serve anything")
        if min(self.header_timeout, self.body_timeout, self.keep_alive_timeout) <= 0:
            raise ValueError("HTTP timeouts must be positive")


DEFAULT_LIMITS = HttpLimits()

# Long polls and revocation streams one credential may hold at once on a control-plane
# replica (an agent holds two: its bundle and its revocations).
DEFAULT_LONG_POLLS_PER_CREDENTIAL = 8
# Service accounts refused for want of a Workload that ``trustmesh get pending`` keeps,
# per cluster and in all (server/usage.py): anyone with a valid SA token of a registered
# cluster can invent service accounts, so the list is bounded.
DEFAULT_PENDING_PER_CLUSTER = 500
DEFAULT_PENDING_TOTAL = 10_000
