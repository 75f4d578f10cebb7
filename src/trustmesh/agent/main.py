"""``trustmesh agent``: restore persisted state, serve, sync; one line once ready.

On SIGTERM uvicorn stops accepting and drains the requests in flight; then the audit
shipper stops, the spool is fsynced and what is left is shipped within
``AUDIT_FINAL_SHIP_TIMEOUT`` seconds (the rest waits in the spool for the next start)."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from trustmesh.agent.app import build_agent_app
from trustmesh.agent.audit import AuditShipper, DecisionAudit
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.policy import PolicyHolder, agent_id, run_bundle_sync
from trustmesh.agent.revocations import (
    DEFAULT_STALENESS_BOUND,
    RevocationHolder,
    run_revocation_sync,
)
from trustmesh.agent.spool import DEFAULT_FSYNC_INTERVAL, SPOOL_DIR, AuditSpool
from trustmesh.agent.sync import ControlPlaneClient, ControlPlaneState, Synchronizer
from trustmesh.common.addresses import parse_listen, url_for
from trustmesh.common.serving import bind_socket, serve_socket
from trustmesh.common.tracing import Tracing

AUDIT_FINAL_SHIP_TIMEOUT = 2.0


@dataclass(frozen=True)
class AgentConfig:
    cluster: str
    servers: list[str]
    data_dir: Path
    credential: str
    leeway: float = 10.0
    cache_size: int = 100_000
    max_sync_interval: float = 30.0
    staleness_bound: float = DEFAULT_STALENESS_BOUND
    fail_open: bool = False
    audit_fsync_interval: float = DEFAULT_FSYNC_INTERVAL
    otel_exporter: str = "none"
    extra: dict[str, str] = field(default_factory=dict)


class AgentFailed(RuntimeError):
    """The agent stopped because it can never become ready (e.g. its credential is refused)."""


def read_credential(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"token file {path} is empty")
    return secret


def run_agent(config: AgentConfig, listen: str) -> None:
    """Raises ValueError (bad listen address), TracingError (exporter) or SpoolError
    (the audit spool cannot be opened) with one clear line before serving."""
    host, port = parse_listen(listen)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.data_dir, 0o700)
    tracing = Tracing("trustmesh-agent", config.otel_exporter)
    spool = AuditSpool.open(config.data_dir / SPOOL_DIR, fsync_interval=config.audit_fsync_interval)
    sock = bind_socket(host, port)
    url = url_for(host, sock.getsockname()[1])
    authn = Authenticator(
        cluster=config.cluster, leeway=config.leeway, cache_size=config.cache_size
    )
    client = ControlPlaneClient(config.servers, config.credential, config.cluster)

    def apply(state: ControlPlaneState) -> None:
        authn.configure(issuer=state.issuer, trust_domain=state.trust_domain, jwks=state.jwks)

    sync = Synchronizer(client, config.data_dir, apply, max_interval=config.max_sync_interval)
    policy = PolicyHolder(config.cluster, config.data_dir, authn)
    revocations = RevocationHolder(config.data_dir, config.staleness_bound, config.fail_open)
    authn.revocations = revocations
    instance = agent_id(config.data_dir)
    audit = DecisionAudit(spool, config.cluster, instance)
    shipper = AuditShipper(spool, client)
    announced = False

    def announce(source: str) -> None:
        nonlocal announced
        if not announced:
            announced = True
            print(
                f"trustmesh agent for cluster {config.cluster} ready on {url} ({source})",
                flush=True,
            )

    tasks: list[asyncio.Task[None]] = []

    def stop_on_fatal(_reason: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the normal, draining shutdown path

    async def on_start() -> None:
        restored = sync.restore() and policy.restore() and revocations.restore()

        async def announce_when_ready() -> None:
            while policy.version is None or not authn.configured or revocations.synced_at is None:
                await asyncio.sleep(0.02)
            announce(f"synced with the control plane, policy revision {policy.version[0]}")

        tasks.append(asyncio.create_task(sync.run(None, stop_on_fatal)))
        tasks.append(asyncio.create_task(run_bundle_sync(client, policy, sync, instance)))
        tasks.append(asyncio.create_task(run_revocation_sync(client, revocations)))
        tasks.append(asyncio.create_task(shipper.run()))
        if restored:
            announce("state restored from the data dir; syncing")
        else:
            tasks.append(asyncio.create_task(announce_when_ready()))

    async def on_stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await shipper.drain(AUDIT_FINAL_SHIP_TIMEOUT)
        finally:
            await asyncio.to_thread(spool.close)
            await client.aclose()
            tracing.shutdown()

    app = build_agent_app(
        authn, sync, policy, on_start, on_stop, audit=audit, shipper=shipper, tracing=tracing
    )
    app.state.revocations = revocations
    serve_socket(app, sock, lambda _url: None)
    if sync.fatal is not None:
        raise AgentFailed(sync.fatal)
