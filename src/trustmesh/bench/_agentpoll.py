"""What the benchmarks that time a change reaching every agent share (``bench
revocation``, ``bench access``): one keep-alive connection per agent, the agents split
into groups one exchanged token can name (at most 16 audiences), the resident memory of
the agents, and the spread (p50, p99, max) of a set of timings."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trustmesh.bench._federation import TRUST_DOMAIN, exchanged
from trustmesh.bench._load import round_trip
from trustmesh.bench._procs import Child
from trustmesh.bench._stats import percentile
from trustmesh.common.token_exchange import exchange_form
from trustmesh.spiffeid import cluster_audience

MAX_AUDIENCES = 16  # per exchanged token (identity/rfc8693.py)


def target(i: int) -> str:
    """The name of the target cluster of agent ``i``."""
    return f"t-{i:02d}"


async def group_svids(
    http: httpx.AsyncClient, server: str, sa_token: str, agents: int
) -> list[str]:
    """One JWT-SVID per group of agents (``audience_groups``), each naming its group's
    target clusters, all exchanged for the same service-account token."""
    svids = []
    for group in audience_groups(agents):
        audiences = [cluster_audience(TRUST_DOMAIN, target(i)) for i in group]
        form = exchange_form(sa_token, audiences)
        svids.append(exchanged(await http.post(server + "/oauth2/token", data=form)))
    return svids


def audience_groups(agents: int) -> list[list[int]]:
    """Agent indices in near-equal groups of at most MAX_AUDIENCES (one SVID each)."""
    count = math.ceil(agents / MAX_AUDIENCES)
    return [list(range(agents))[g::count] for g in range(count)]


def rss_mb(children: Sequence[Child]) -> float | None:
    total = 0
    for child in children:
        try:
            status = Path(f"/proc/{child.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


class AgentConnection:
    """One keep-alive HTTP/1.1 connection to an agent; reconnects once if the agent
    closed it (uvicorn closes idle keep-alive connections after 5 s)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.close()
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def call(self, request: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self._reader is None or self._writer is None:
                reader, writer = await self._connect()
            else:
                reader, writer = self._reader, self._writer
            try:
                status, body, closing = await round_trip(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
                continue
            if closing:
                self.close()
            return status, body
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass(frozen=True)
class Spread:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values_ns: Sequence[int]) -> Spread | None:
        if not values_ns:
            return None
        ordered = sorted(values_ns)
        return cls(len(ordered), percentile(ordered, 50) / 1e6, percentile(ordered, 99) / 1e6,
                   ordered[-1] / 1e6)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "max_ms": round(self.max_ms, 3)}  # fmt: skip
