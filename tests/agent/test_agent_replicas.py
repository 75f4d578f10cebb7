"""Several agents per cluster (issue 13, item 3; DESIGN §10), as real processes: two
control-plane replicas on one real PostgreSQL, two agents of one cluster — each its
own credential (``trustmesh cluster credential NAME --agent ID``) and data dir, sharing
nothing but the control plane, each told the replicas in another order — listed to one
real Envoy as two endpoints (``trustmesh envoy config --agent A --agent B``).

What is proved: traffic through Envoy reaches both agents; a policy change and a
revocation, made at one replica, reach both agents (same revisions, same answers,
within the staleness bound); one agent SIGKILLed under load costs the callers nothing
(Envoy retries at the other) and, restarted on its data dir, resumes its spool; the
central log holds every decision a caller got exactly once (counted by decision id),
each agent's source numbered without a hole."""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from helpers import (
    Agent,
    Envoy,
    Federation,
    Process,
    Server,
    eventually,
    free_port,
    log_entries,
    new_postgres_database,
    register_federation,
    serve_echo,
    start_envoy,
    start_replica,
    start_server,
    stop_envoy,
    trustmesh_cmd,
)
from trustmesh.agent.revocations import DEFAULT_STALENESS_BOUND
from trustmesh.sim import SimulatedCluster

HOST = "replicated.internal"
POLICY = f"""
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: replicated-reader}}
spec:
  rules:
  - services: [{HOST}]
    paths: [/public/**]
    methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-replicated}}
spec:
  role: replicated-reader
  subjects: [{{claims: {{project: shop}}}}]
"""
CHANGE = f"""
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: replicated-reports}}
spec:
  rules:
  - services: [{HOST}]
    paths: [/reports/**]
    methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-reports}}
spec:
  role: replicated-reports
  subjects: [{{claims: {{project: shop}}}}]
"""
ALLOWED = {"host": HOST, "path": "/public/a", "method": "GET"}
REPORTS = {"host": HOST, "path": "/reports/q3", "method": "GET"}
DECISION = "x-trustmesh-decision-id"
WAIT = 60.0
BOUND = DEFAULT_STALENESS_BOUND  # how long an agent may lag the control plane


# --- the processes -----------------------------------------------------------------------


@dataclass
class Replica:
    """One agent replica: its id, data dir, credential file and fixed port (Envoy
    knows it by its address, so a restart takes the same one)."""

    agent_id: str
    data_dir: Path
    token_file: Path
    port: int
    servers: list[str]
    cluster: str
    agent: Agent | None = None
    flags: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Agent:
        args = ["agent", "--cluster", self.cluster, "--server", ",".join(self.servers)]
        args += ["--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir)]
        args += ["--token-file", str(self.token_file), *self.flags]
        log = self.data_dir.parent / f"{self.data_dir.name}.agent.log"
        process = Process(trustmesh_cmd(*args), log)
        line = process.wait_line("trustmesh agent for cluster ", timeout=WAIT)
        self.agent = Agent(process, line.split()[7], self.cluster, line)
        assert self.agent.url == self.url
        return self.agent

    def ready(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(self.url + "/readyz", timeout=10).json()
        return body

    def authorize(self, token: str, request: dict[str, str]) -> dict[str, Any]:
        answer = httpx.post(
            self.url + "/v1/authorize", json={"token": token, "request": request}, timeout=10
        )
        body: dict[str, Any] = answer.json()
        body["status"] = answer.status_code
        return body

    def source(self) -> str:
        return (self.data_dir / "audit-spool" / "source").read_text().strip()


def admin_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    token_file = server.data_dir / "admin.token"
    command = trustmesh_cmd(*args, "--server", server.url, "--token-file", str(token_file))
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def agent_credential(server: Server, cluster: str, agent_id: str, path: Path) -> Path:
    """``trustmesh cluster credential CLUSTER --agent ID``, written to ``path``."""
    answer = admin_cli(server, "cluster", "credential", cluster, "--agent", agent_id)
    assert answer.returncode == 0, answer.stderr
    assert f"for agent {agent_id} of cluster {cluster}" in answer.stderr
    path.write_text(answer.stdout.strip())
    path.chmod(0o600)
    return path


def envoy_for(directory: Path, cluster: str, agents: list[str], upstream: int) -> Envoy:
    """An Envoy configured only by ``trustmesh envoy config`` with every agent listed."""
    flags = ["--cluster", cluster, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    flags += ["--upstream", f"127.0.0.1:{upstream}", "--authz-timeout", "5s"]
    for url in agents:
        flags += ["--agent", url]
    printed = subprocess.run(
        trustmesh_cmd("envoy", "config", *flags), capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    directory.mkdir(parents=True, exist_ok=True)
    return start_envoy(directory, yaml.safe_load(printed.stdout), timeout=60)


# --- traffic through Envoy -------------------------------------------------------------


class Traffic:
    """Callers on threads asking through Envoy (allowed and denied paths in turn);
    every decision id a caller got (from the upstream's echo on 200, from the 403's
    header), and every call that got anything else."""

    def __init__(self, envoy: Envoy, token: str, callers: int = 3) -> None:
        self.envoy = envoy
        self.token = token
        self.answered: list[str] = []
        self.failed: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]

    def _call(self) -> None:
        headers = {"host": HOST, "authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.envoy.url, headers=headers, timeout=15) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                path = "/public/a" if n % 2 else "/private/b"
                try:
                    response = client.get(path)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failed[type(exc).__name__] += 1
                    continue
                if response.status_code == 200:
                    decision = response.json()["headers"].get(DECISION)
                elif response.status_code == 403:
                    decision = response.headers.get(DECISION)
                else:
                    decision = None
                with self._lock:
                    if decision:
                        self.answered.append(decision)
                    else:
                        self.failed[f"{response.status_code} {path}"] += 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for(self, answers: int) -> None:
        eventually(lambda: len(self.answered) >= answers, f"{answers} answers through Envoy")


def envoy_stats(envoy: Envoy) -> dict[str, int]:
    text = httpx.get(f"http://{envoy.admin}/stats", timeout=10).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            found[name] = int(value)
    return found


# --- the central log -------------------------------------------------------------------


def agent_events(server: Server, cluster: str) -> list[dict[str, Any]]:
    """Every event the cluster's agents sent, in log order."""
    return [
        e["event"]
        for e in log_entries(server)
        if e["event"]["source"].get("kind") == "agent" and e["event"]["cluster"] == cluster
    ]


def decisions_of(server: Server, cluster: str) -> list[dict[str, Any]]:
    """The cluster's agents' decision events in the log."""
    return [e for e in agent_events(server, cluster) if e["type"] == "authz.decision"]


def policy_status(server: Server, cluster: str) -> dict[str, Any]:
    """``status.policy`` of the cluster (``trustmesh get clusters -o json``)."""
    items = server.admin.get("/v1/clusters").json()["items"]
    [item] = [i for i in items if i["metadata"]["name"] == cluster]
    status: dict[str, Any] = item["status"]["policy"]
    return status


# --- the setup -------------------------------------------------------------------------


@dataclass
class Pair:
    first: Server  # the control plane: two replicas on one PostgreSQL
    second: Server
    federation: Federation
    a: Replica
    b: Replica
    envoy: Envoy
    directory: Path

    @property
    def replicas(self) -> tuple[Replica, Replica]:
        return self.a, self.b


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_base_url: str,
    origin_cluster: SimulatedCluster,
) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("replicas")
    db = new_postgres_database(postgres_base_url)
    issuer = ("--issuer", "https://trustmesh.replicas.test")  # one for every replica
    first = start_server(base / "cp1", db, *issuer)
    second = start_replica(base / "cp2", first, *issuer)
    replicas: list[Replica] = []
    envoy = None
    try:
        first.apply(POLICY)
        federation = register_federation(first, origin_cluster)
        cluster = federation.target_name
        order = [[first.url, second.url], [second.url, first.url]]
        for agent_id, servers in zip(("agent-a", "agent-b"), order, strict=True):
            token_file = agent_credential(first, cluster, agent_id, base / f"{agent_id}.token")
            replica = Replica(agent_id, base / agent_id, token_file, free_port(), servers, cluster)
            replica.data_dir.mkdir()
            replica.start()
            replicas.append(replica)
        with serve_echo() as upstream:
            envoy = envoy_for(base / "envoy", cluster, [r.url for r in replicas], upstream)
            yield Pair(first, second, federation, replicas[0], replicas[1], envoy, base)
    finally:
        if envoy is not None:
            stop_envoy(envoy)
        for replica in replicas:
            if replica.agent is not None:
                replica.agent.process.stop()
        second.stop()
        first.stop()


# --- the tests ---------------------------------------------------------------------------


def test_each_agent_has_its_own_credential_and_the_control_plane_sees_both(pair: Pair) -> None:
    cluster = pair.federation.target_name
    listed = admin_cli(pair.first, "credentials", "list", "--cluster", cluster, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    agents = {c["agent"] for c in yaml.safe_load(listed.stdout) if c["state"] == "active"}
    assert agents == {"agent-a", "agent-b"}
    # a second live credential for an agent id is refused: two agents never share one
    again = admin_cli(pair.first, "cluster", "credential", cluster, "--agent", "agent-a")
    assert again.returncode != 0 and "has a live credential" in again.stderr

    def reporting() -> list[str]:
        return sorted(a["agentId"] for a in policy_status(pair.second, cluster)["agents"])

    assert eventually(lambda: reporting() == ["agent-a", "agent-b"], "both agents reporting")


def test_a_third_agent_given_a_running_agents_data_dir_is_refused(pair: Pair) -> None:
    """Two agents on one data dir would write one spool, numbering their events alike
    (and the control plane would refuse every second one): refused at start."""
    cluster = pair.federation.target_name
    token_file = agent_credential(pair.first, cluster, "agent-c", pair.directory / "c.token")
    args = ["agent", "--cluster", cluster, "--server", pair.first.url]
    args += ["--listen", "127.0.0.1:0", "--data-dir", str(pair.a.data_dir)]
    answer = subprocess.run(
        trustmesh_cmd(*args, "--token-file", str(token_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode != 0 and answer.stdout == ""
    assert answer.stderr.startswith("error: the audit spool "), answer.stderr
    assert "in use by another agent process" in answer.stderr
    assert len(answer.stderr.strip().splitlines()) == 1, answer.stderr
    assert pair.a.ready()["ready"] is True  # the agent that has it never noticed


def test_a_policy_change_and_a_revocation_reach_both_agents(pair: Pair) -> None:
    fed = pair.federation
    token, victim = fed.svid(), fed.svid()
    for replica in pair.replicas:  # before: both deny the new path, both allow the victim
        assert replica.authorize(token, REPORTS)["allowed"] is False
        answer = replica.authorize(victim, ALLOWED)
        assert answer["allowed"] is True, answer
    before = pair.a.ready()["policy_revision"]

    pair.first.apply(CHANGE, "change.yaml")  # at one replica

    def same_new_policy() -> bool:
        revisions = {(r.ready()["policy_revision"], r.ready()["registry_revision"])
                     for r in pair.replicas}  # fmt: skip
        return len(revisions) == 1 and next(iter(revisions))[0] > before

    eventually(same_new_policy, "one new policy revision at both agents", BOUND)
    answers = [r.authorize(token, REPORTS) for r in pair.replicas]
    assert [a["allowed"] for a in answers] == [True, True], answers
    assert answers[0]["policy_revision"] == answers[1]["policy_revision"] > before

    def applied_everywhere() -> bool:  # as the control plane sees it: no drift
        status = policy_status(pair.first, fed.target_name)
        reported = {a["agentId"]: a["appliedRevision"] for a in status["agents"]}
        return status["drift"] is False and reported == {
            "agent-a": status["desiredRevision"],
            "agent-b": status["desiredRevision"],
        }

    eventually(applied_everywhere, "both agents reported at the desired revision", BOUND)

    jti = jwt.decode(victim, options={"verify_signature": False})["jti"]
    made = pair.second.admin.post(  # at the other replica
        "/v1/revocations", json={"kind": "jti", "value": jti, "reason": "leaked"}
    )
    assert made.status_code == 201, made.text
    revision = made.json()["revocation"]["revision"]

    def same_revocations() -> bool:
        seen = {r.ready()["revocation_revision"] for r in pair.replicas}
        return len(seen) == 1 and next(iter(seen)) >= revision

    eventually(same_revocations, "the revocation at both agents", BOUND)
    refused = [r.authorize(victim, ALLOWED) for r in pair.replicas]
    assert [(a["status"], a["reason"]) for a in refused] == [(401, "revoked")] * 2, refused
    assert [r.authorize(token, ALLOWED)["allowed"] for r in pair.replicas] == [True, True]


def test_one_agent_killed_under_load_costs_nothing_and_every_decision_is_logged_once(
    pair: Pair,
) -> None:
    fed = pair.federation
    cluster = fed.target_name
    token = fed.svid()
    a, b = pair.replicas
    cursor = a.data_dir / "audit-spool" / "cursor"
    source_a, source_b = a.source(), b.source()
    assert source_a != source_b
    with Traffic(pair.envoy, token) as traffic:
        traffic.wait_for(300)
        assert a.agent is not None
        a.agent.process.kill()  # SIGKILL, in the middle of answering
        killed_at = len(traffic.answered)
        acknowledged = int(cursor.read_text()) if cursor.exists() else 0
        traffic.wait_for(killed_at + 300)  # B answers everything meanwhile
        a.start()  # on its data dir, its port, its credential
        resumed = len(traffic.answered)
        traffic.wait_for(resumed + 300)

        def a_answers_again() -> bool:  # Envoy sends A traffic again once it is back
            ids = {e["decision"].get("decision_id") for e in decisions_of(pair.first, cluster)
                   if e["source"]["agent"] == "agent-a"}  # fmt: skip
            return bool(ids & set(traffic.answered[resumed:]))

        eventually(a_answers_again, "the restarted agent answering through Envoy")
    assert not traffic.failed, f"calls that got no decision: {dict(traffic.failed)}"
    stats = envoy_stats(pair.envoy)
    # the kill was felt: checks failed at A and were retried at B, A was left out a while
    assert stats["cluster.trustmesh_agent.upstream_rq_retry"] > 0
    assert stats["cluster.trustmesh_agent.outlier_detection.ejections_enforced_total"] > 0
    assert a.source() == source_a  # the same spool, resumed

    for replica in pair.replicas:  # SIGTERM: each ships what is left in its spool
        assert replica.agent is not None
        assert replica.agent.process.stop() == 0, replica.agent.process.stderr()
        replica.agent = None
    answered = traffic.answered
    events = eventually(
        lambda: (
            (found := decisions_of(pair.first, cluster))
            and {e["decision"].get("decision_id") for e in found} >= set(answered)
            and found
        ),
        "every answered decision in the log",
    )
    # (folded refusals are logged as one summary, with no decision id)
    logged = Counter(e["decision"].get("decision_id") for e in events)
    assert [d for d, n in logged.items() if d and n > 1] == [], "a decision is logged twice"
    assert [d for d in answered if logged[d] == 0] == []
    # requests in flight at the kill may have been spooled (and so logged) unanswered
    assert len(answered) <= len(events)

    by_source: dict[str, list[int]] = {}
    for event in agent_events(pair.first, cluster):
        by_source.setdefault(event["source"]["id"], []).append(event["source"]["seq"])
    assert set(by_source) == {f"{cluster}/agent-a/{source_a}", f"{cluster}/agent-b/{source_b}"}
    sources = pair.first.admin.get("/v1/audit/sources").json()["sources"]
    for source, seqs in by_source.items():  # each numbered 1..N: no hole, none twice
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), source
        mine = [s for s in sources if s["source"] == source]
        assert len(mine) == 1 and mine[0]["gaps"] == [], mine
    resumed_seqs = by_source[f"{cluster}/agent-a/{source_a}"]
    assert acknowledged < killed_at and max(resumed_seqs) > acknowledged


@pytest.mark.slow
def test_two_agents_on_one_address_with_reuse_port(pair: Pair) -> None:
    """Behind one address without a proxy: two agents (own credentials, own data
    dirs) listen on one port with ``--reuse-port``; the kernel spreads new connections
    over both. One killed, new connections reach the other; restarted, it takes its
    share again; every answered decision is logged once. Without the flag the second
    agent cannot listen there (one line)."""
    fed = pair.federation
    cluster = fed.target_name
    port = free_port()
    shared: list[Replica] = []
    for agent_id in ("agent-d", "agent-e"):
        token_file = agent_credential(pair.first, cluster, agent_id, pair.directory / agent_id)
        data_dir = pair.directory / f"{agent_id}-data"
        data_dir.mkdir()
        shared.append(
            Replica(agent_id, data_dir, token_file, port, [pair.first.url, pair.second.url],
                    cluster, flags=("--reuse-port",))
        )  # fmt: skip
    d, e = shared
    token = fed.svid()
    answered: list[str] = []

    def ask(times: int) -> set[str]:
        """``times`` questions, each on a new connection; the agents that answered."""
        ids = []
        for _ in range(times):
            ids.append(d.authorize(token, ALLOWED)["decision_id"])  # d.url is the one address
        answered.extend(ids)
        found = decisions_of(pair.first, cluster)
        return {ev["source"]["agent"] for ev in found if ev["decision"].get("decision_id") in ids}

    try:
        d.start()
        alone = subprocess.run(
            trustmesh_cmd("agent", "--cluster", cluster, "--server", pair.first.url,
                          "--listen", f"127.0.0.1:{port}", "--data-dir", str(e.data_dir),
                          "--token-file", str(e.token_file)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert alone.returncode == 1 and "--reuse-port" in alone.stderr, alone.stderr
        assert len(alone.stderr.strip().splitlines()) == 1
        e.start()
        assert eventually(lambda: ask(40) == {"agent-d", "agent-e"}, "both agents answering")
        assert d.agent is not None
        d.agent.process.kill()
        assert eventually(lambda: ask(40) == {"agent-e"}, "the other agent answering alone")
        d.start()
        assert eventually(lambda: ask(40) == {"agent-d", "agent-e"}, "both again")
    finally:
        for replica in shared:
            if replica.agent is not None:
                assert replica.agent.process.stop() == 0, replica.agent.process.stderr()
    events = eventually(
        lambda: (
            (found := decisions_of(pair.first, cluster))
            and {ev["decision"].get("decision_id") for ev in found} >= set(answered)
            and found
        ),
        "every answered decision in the log",
    )
    logged = Counter(ev["decision"].get("decision_id") for ev in events)
    assert all(logged[decision] == 1 for decision in answered)
