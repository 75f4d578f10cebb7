"""``trustmesh bench access``: how long an approved access request takes to be in force
at every agent, and how long after its expiry it is gone — with no publish between.

A control plane (``trustmesh server``, SQLite), a simulated origin cluster and
``agents`` agents — one per target cluster, each with its own cluster credential — run
as their own processes on loopback. Three people are added (an admin, an approver, a
requester). One workload of the origin has no binding: every agent denies its GET.
Each trial:

1. exchanges a fresh service-account token for JWT-SVIDs naming every target cluster
   (at most 16 audiences per token: more agents, more tokens) and confirms every agent
   denies (``POST /v1/authorize``);
2. the requester asks for the role on every target cluster for ``duration`` seconds
   (the grant's ``expiresAt`` is in whole seconds, never later than asked: it lasts up
   to a second less);
3. the clock starts just before the approver's approval and every agent is polled
   concurrently (one keep-alive connection each) until it allows: an agent's figure is
   when its first allowing answer arrived (an upper bound); the trial's is the latest
   over all agents — "in force at every agent";
4. from the request's ``expiresAt`` (wall clock, the same machine's), every agent is
   polled again until it denies; the figure is the first denying answer minus
   ``expiresAt`` — "gone at every agent". The policy revision is read before and after:
   it must not have moved (the expiry needs no publish).

Goals (issue 14): p99 ≤ 1 s for both."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from trustmesh.bench._agentpoll import (
    AgentConnection,
    Spread,
    audience_groups,
    group_svids,
    rss_mb,
    target,
)
from trustmesh.bench._federation import (
    Federation,
    authorize_request,
    cluster_doc,
    federation,
    role_doc,
    workload_doc,
)
from trustmesh.bench._load import Malformed, run_async
from trustmesh.bench._stats import row, verdict

__all__ = ["run"]

ORIGIN = "origin"
WORKLOAD = "svc-needs-access"
ROLE = "reader"
REQUEST = {"host": "api.bench", "path": "/", "method": "GET"}
GOAL_P99_S = 1.0
PEOPLE = (("ops", "admin"), ("ann", "approver"), ("rick", "auditor"))


def _manifests(issuer: str, agents: int) -> list[dict[str, Any]]:
    """The origin, one cluster per agent, the workload, and the role it will ask for —
    no binding: until an access request is approved, every agent denies it."""
    claims = {"project": "bench", "environment": "prod", "tier": "gold"}
    return [
        cluster_doc(ORIGIN, issuer),
        *(cluster_doc(target(i)) for i in range(agents)),
        workload_doc(WORKLOAD, cluster=ORIGIN, namespace="team", service_account="app",
                     claims=claims),
        role_doc(ROLE, [{"services": ["*"], "paths": ["*"], "methods": ["GET"]}]),
    ]  # fmt: skip


def _people(fed: Federation) -> dict[str, dict[str, str]]:
    """Each person's Authorization header; from then on ``fed.admin`` is ops's (the
    bootstrap credential stops working once an admin person exists)."""
    headers: dict[str, dict[str, str]] = {}
    for name, role in PEOPLE:
        acting = headers.get("ops", fed.admin)
        response = fed.http.post(
            fed.url + "/v1/people", headers=acting, json={"name": name, "role": role}
        )
        if response.status_code != 200:
            raise RuntimeError(
                f"adding {name} failed: HTTP {response.status_code} {response.text[:200]}"
            )
        headers[name] = {"Authorization": f"Bearer {response.json()['token']}"}
    fed.admin = headers["ops"]
    return headers


@dataclass
class _Trial:
    in_force_ns: list[int | None]  # per agent, from just before the approval
    gone_ns: list[int | None]  # per agent, from the expiry
    approve_ns: int = 0  # until the approval was answered
    revision_moved: bool = False
    polls: int = 0
    errors: int = 0
    first_error: str | None = None

    @property
    def complete(self) -> bool:
        return all(t is not None for t in (*self.in_force_ns, *self.gone_ns))

    @staticmethod
    def every(values: list[int | None]) -> int | None:
        """The latest of the agents' figures; None unless every agent has one."""
        if any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    def to_json(self) -> dict[str, Any]:
        every_in = self.every(self.in_force_ns)
        every_gone = self.every(self.gone_ns)
        return {
            "in_force_all_ms": None if every_in is None else every_in / 1e6,
            "gone_all_ms": None if every_gone is None else every_gone / 1e6,
            "approve_request_ms": self.approve_ns / 1e6,
            "revision_moved": self.revision_moved,
            "polls": self.polls,
            "errors": self.errors,
            "first_error": self.first_error,
        }


@dataclass
class _Bench:
    fed: Federation
    http: httpx.AsyncClient
    people: dict[str, dict[str, str]]
    agents: list[tuple[str, int]]
    connections: list[AgentConnection]
    duration: int
    poll_interval: float
    timeout: float
    trials: list[_Trial] = field(default_factory=list)

    async def _svids(self) -> list[str]:
        sa_token = self.fed.cluster.mint("team", "app")
        return await group_svids(self.http, self.fed.url, sa_token, len(self.agents))

    async def _call(self, person: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(self.fed.url + path, headers=self.people[person], json=body)
        if response.status_code not in (200, 201):
            raise RuntimeError(
                f"POST {path} failed: HTTP {response.status_code} {response.text[:300]}"
            )
        answer: dict[str, Any] = response.json()
        return answer

    async def _revision(self) -> int:
        response = await self.http.get(
            self.fed.url + "/v1/policy/versions/current", headers=self.people["rick"]
        )
        return int(response.json()["revision"])

    async def _until(
        self,
        trial: _Trial,
        requests: list[bytes],
        allowed: bool,
        start_ns: int,
        into: list[int | None],
    ) -> None:
        """Poll every agent until its decision is ``allowed``; ``into[i]``: when agent
        i's first such answer arrived, from ``start_ns`` (``time.time_ns`` clock)."""
        wanted = b'"allowed":true' if allowed else b'"allowed":false'
        deadline = time.monotonic() + self.timeout

        async def poll(index: int) -> None:
            conn, request = self.connections[index], requests[index]
            while time.monotonic() < deadline:
                try:
                    status, body = await conn.call(request)
                except (OSError, asyncio.IncompleteReadError, Malformed) as exc:
                    status, body = 0, repr(exc).encode()
                now = time.time_ns()
                trial.polls += 1
                if status == 200 and wanted in body.replace(b" ", b""):
                    into[index] = now - start_ns
                    return
                if status != 200:
                    trial.errors += 1
                    if trial.first_error is None:
                        trial.first_error = f"{target(index)}: HTTP {status} {body[:200]!r}"
                await asyncio.sleep(self.poll_interval)

        await asyncio.gather(*(poll(i) for i in range(len(self.agents))))

    async def trial(self) -> _Trial:
        svids = await self._svids()
        token_of: dict[int, str] = {}
        for group, svid in zip(audience_groups(len(self.agents)), svids, strict=True):
            token_of.update(dict.fromkeys(group, svid))
        requests = [
            authorize_request(host, port, token_of[i], REQUEST)
            for i, (host, port) in enumerate(self.agents)
        ]
        for i, (status, body) in enumerate(
            await asyncio.gather(
                *(c.call(r) for c, r in zip(self.connections, requests, strict=True))
            )
        ):
            if status != 200 or json.loads(body).get("allowed") is not False:
                raise RuntimeError(
                    f"agent {target(i)} did not deny before the approval: {body[:200]!r}"
                )
        asked = await self._call("rick", "/v1/access", {
            "role": ROLE,
            "subject": {"workload": WORKLOAD},
            "clusters": [target(i) for i in range(len(self.agents))],
            "duration": self.duration,
            "reason": "bench access",
        })  # fmt: skip
        trial = _Trial([None] * len(self.agents), [None] * len(self.agents))
        started = time.time_ns()

        async def approve() -> dict[str, Any]:
            answer = await self._call(
                "ann", f"/v1/access/{asked['id']}/approve", {"reason": "bench"}
            )
            trial.approve_ns = time.time_ns() - started
            return answer

        approved, _ = await asyncio.gather(
            approve(), self._until(trial, requests, True, started, trial.in_force_ns)
        )
        revision = await self._revision()
        expires_ns = int(float(approved["expiresAt"]) * 1e9)
        await asyncio.sleep(max(0.0, (expires_ns - time.time_ns()) / 1e9 - 0.05))
        await self._until(trial, requests, False, expires_ns, trial.gone_ns)
        trial.gone_ns = [None if t is None else max(0, t) for t in trial.gone_ns]
        trial.revision_moved = await self._revision() != revision
        self.trials.append(trial)
        return trial


async def _run_trials(
    fed: Federation,
    people: dict[str, dict[str, str]],
    agents: list[tuple[str, int]],
    trials: int,
    duration: int,
    poll_interval: float,
    timeout: float,
) -> list[_Trial]:
    connections = [AgentConnection(host, port) for host, port in agents]
    try:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            bench = _Bench(fed, http, people, agents, connections, duration, poll_interval, timeout)
            await bench.trial()  # warm-up: connections, code paths; not reported
            bench.trials.clear()
            for _ in range(trials):
                await bench.trial()
            return bench.trials
    finally:
        for conn in connections:
            conn.close()


def _report(
    trials: list[_Trial], agents: int, duration: int, poll_interval: float,
    memory_mb: float | None, startup_s: float,
) -> dict[str, Any]:  # fmt: skip
    complete = [t for t in trials if t.complete]
    moved = sum(t.revision_moved for t in trials)
    errors = sum(t.errors for t in trials)
    every_in = Spread.of([v for t in complete if (v := t.every(t.in_force_ns)) is not None])
    every_gone = Spread.of([v for t in complete if (v := t.every(t.gone_ns)) is not None])
    one_in = Spread.of([v for t in complete for v in t.in_force_ns if v is not None])
    one_gone = Spread.of([v for t in complete for v in t.gone_ns if v is not None])
    approve = Spread.of([t.approve_ns for t in trials])
    rows = []
    summary = [
        f"{len(trials)} trials, {agents} agents on loopback (one per target cluster), access for "
        f"{duration} s per trial, agents polled with {poll_interval * 1000:.0f} ms sleeps; "
        f"{len(trials) - len(complete)} trials where an agent never changed its answer, "
        f"{errors} unexpected responses, {moved} trials where the policy revision moved "
        "between approval and expiry (must be 0: the expiry needs no publish)"
    ]
    for label, spread, note in (
        ("in force at every agent after approval", every_in, "from just before the approval"),
        ("gone at every agent after expiry", every_gone, "from expiresAt"),
        ("in force at one agent (per agent)", one_in, "agent-trials"),
        ("gone at one agent (per agent)", one_gone, "agent-trials"),
        ("approval answered", approve, "POST /v1/access/ID/approve: gate, publish"),
    ):
        if spread is None:
            continue
        rows.append(row(label, p50_us=spread.p50_ms * 1000, p99_us=spread.p99_ms * 1000,
                        note=f"{note}; {spread.n} samples, max {spread.max_ms:.1f} ms"))  # fmt: skip
    for label, spread in (
        ("in force at every agent", every_in),
        ("gone at every agent", every_gone),
    ):
        if spread is not None:
            met = spread.p99_ms <= GOAL_P99_S * 1000 and len(complete) == len(trials) and not moved
            summary.append(
                f"{label}: p50 {spread.p50_ms:.1f} ms, p99 {spread.p99_ms:.1f} ms, max "
                f"{spread.max_ms:.1f} ms over {spread.n} trials; goal p99 ≤ {GOAL_P99_S:.0f} s "
                f"{verdict(met)}"
            )
    memory = "" if memory_mb is None else f"; agents' RSS {memory_mb:,.0f} MB in total"
    summary.append(f"{agents} agents ready in {startup_s:.1f} s{memory}")
    return {
        "benchmark": "access",
        "title": f"access requests: approval to in force, expiry to gone, {agents} agents",
        "agents": agents,
        "duration_s": duration,
        "results": rows,
        "summary": summary,
        "in_force_every_agent": None if every_in is None else every_in.to_json(),
        "gone_every_agent": None if every_gone is None else every_gone.to_json(),
        "trials": [t.to_json() for t in trials],
        "revision_moved": moved,
        "incomplete": len(trials) - len(complete),
        "errors": errors,
    }


def run(
    agents: int = 20,
    trials: int = 10,
    *,
    duration: int = 3,
    poll_interval: float = 0.002,
    timeout: float = 10.0,
    ready_timeout: float = 300.0,
) -> dict[str, Any]:
    """``trials`` access requests, each approved then left to expire, against ``agents``
    agents. Every child process is stopped on return."""
    if agents < 1 or trials < 1 or duration < 1:
        raise ValueError("agents, trials and duration must be positive")
    if poll_interval < 0 or timeout <= 0:
        raise ValueError("poll_interval must be ≥ 0 and timeout positive")
    with federation(ORIGIN) as fed:
        fed.apply(_manifests(fed.cluster.issuer, agents))
        began = time.monotonic()
        started = fed.start_agents([target(i) for i in range(agents)], ready_timeout)
        startup_s = time.monotonic() - began
        memory_mb = rss_mb([agent.child for agent in started])
        people = _people(fed)
        addresses = [(agent.host, agent.port) for agent in started]
        measured, loop = run_async(
            _run_trials(fed, people, addresses, trials, duration, poll_interval, timeout)
        )
    result = _report(measured, agents, duration, poll_interval, memory_mb, startup_s)
    result["event_loop"] = loop
    return result
