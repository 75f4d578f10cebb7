"""An agent built in this process the way ``trustmesh agent`` builds it
(:func:`trustmesh.agent.main.build_agent`: real spool, real holders, one clock), with
no control plane behind it (its URL refuses connections), for tests that drive the
decision pipeline or the HTTP surfaces directly, on a clock they move."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from trustmesh.agent.app import build_agent_app
from trustmesh.agent.decide import Outcome
from trustmesh.agent.hot import HotSurfaces
from trustmesh.agent.main import Agent, AgentConfig, build_agent

NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def local_agent(
    data_dir: Path,
    cluster: str = "east",
    clock: Callable[[], float] = time.time,
    **config: object,
) -> Agent:
    return build_agent(
        AgentConfig(
            cluster=cluster,
            servers=[NOWHERE],
            data_dir=data_dir,
            credential="tmc_test",
            audit_fsync_interval=0,
            **config,  # type: ignore[arg-type]
        ),
        clock,
    )


def app_of(agent: Agent) -> HotSurfaces:
    async def nothing() -> None:
        return None

    return build_agent_app(agent.surfaces, nothing, nothing)


def client_of(agent: Agent) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_of(agent)), base_url="http://agent"
    )


def reason(outcome: Outcome) -> str | None:
    """Why the decision refused, or None if it allowed."""
    return outcome.refusal.reason if outcome.refusal is not None else None
