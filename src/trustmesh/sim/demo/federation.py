"""Bringing the federation up, in order: the data dir, the control plane, the simulated
clusters (and the intruder's unregistered one), the registry and initial policy in one
apply, then the agents with their cluster credentials. Everything started is entered
into the caller's ExitStack, so a start-up that fails halfway leaves nothing running."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo.admin import Admin, tests_passed
from trustmesh.sim.demo.processes import Child, start_agents, start_clusters, start_server
from trustmesh.sim.demo.scenario import (
    CLUSTERS,
    DEFAULT_SVID_TTL,
    MESH_WORKLOADS,
    ROGUE_CLUSTER,
    WORKLOADS,
    manifest,
    policy_manifest,
    write_policy_files,
)
from trustmesh.sim.demo.scoreboard import PolicyState


@dataclass
class Federation:
    """Everything the start-up brought up; the ExitStack owns stopping it."""

    server_url: str
    admin: Admin
    clusters: dict[str, SimulatedCluster]
    rogue: SimulatedCluster
    agent_urls: dict[str, str]
    policy: PolicyState
    agents: list[Child]


CONSOLE_PERSON = "demo-admin"


def open_console(admin: Admin, server_url: str, say: Callable[[str], None]) -> None:
    """Add the person the demo's web console is signed in as (an admin) and say where
    the console is and with which credential; the demo's changes are that person's
    from now on (the bootstrap admin.token stops working once an admin person exists)."""
    token = admin.add_person(CONSOLE_PERSON, "admin")
    admin.act_as(token)
    say(f"web console: {server_url}/console/ (sign in as {CONSOLE_PERSON} with {token})")


def start_federation(
    stack: ExitStack,
    root: Path,
    http: httpx.Client,
    say: Callable[[str], None],
    svid_ttl: int = DEFAULT_SVID_TTL,
) -> Federation:
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server_url = start_server(stack, root, logs)
    say(f"control plane listening on {server_url}")
    token = (root / "control-plane" / "admin.token").read_text(encoding="utf-8").strip()
    admin = Admin(http, server_url, token)
    open_console(admin, server_url, say)
    clusters = start_clusters(stack, root)
    for name, cluster in clusters.items():
        say(f"simulated cluster {name}: service-account issuer {cluster.issuer}")
    rogue = SimulatedCluster(ROGUE_CLUSTER)  # never registered: the intruder's cluster
    stack.enter_context(rogue.serve())
    issuers = {name: c.issuer for name, c in clusters.items()}
    policy = apply_initial(admin, root, issuers, say, svid_ttl)
    agents: list[Child] = []
    agent_urls = start_agents(stack, root, logs, admin.cluster_credential, server_url, agents)
    for name, url in agent_urls.items():
        say(f"agent for {name} ready on {url}")
    return Federation(server_url, admin, clusters, rogue, agent_urls, policy, agents)


def apply_initial(
    admin: Admin,
    root: Path,
    issuers: dict[str, str],
    say: Callable[[str], None],
    svid_ttl: int = DEFAULT_SVID_TTL,
) -> PolicyState:
    """Registry and initial policy in one apply (the PolicyTest runs before publishing)."""
    files = {"registry.yaml": manifest(issuers, svid_ttl), "policy.yaml": policy_manifest(0)}
    result = admin.apply(files, "trustmesh demo: registry and initial policy")
    revision = int(result["policyRevision"])
    say(
        f"registered {len(CLUSTERS)} clusters (keys by OIDC discovery) "
        f"and {len(WORKLOADS) + len(MESH_WORKLOADS)} workloads ({len(MESH_WORKLOADS)} of them "
        f"in the mesh, maxTokenTTL {svid_ttl} s): registry revision {result['registryRevision']}"
    )
    say(
        f"policy revision {revision}: GlobalRoles orders-reader, ledger-writer; RoleBindings "
        "shop-reads-orders (project shop, production clusters), ledger-writers (workload "
        "payments), finance-writes-ledger (project finance), bronze-never-writes-ledger "
        "(deny, tier bronze), gold-web-reads-orders (project web, tier gold); PolicyTest "
        f"demo-expectations: {tests_passed(result)} cases passed"
    )
    write_policy_files(root)
    return PolicyState(revision, tests_passed(result), {revision: 0})


def data_root(stack: ExitStack, data_dir: Path | None) -> tuple[Path, bool]:
    """The demo's data dir, and whether it is a temporary one (removed at the end)."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return data_dir.resolve(), False
    root = Path(tempfile.mkdtemp(prefix="trustmesh-demo-"))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    return root, True
