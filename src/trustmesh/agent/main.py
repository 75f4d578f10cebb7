"""``trustmesh agent``: restore persisted state, serve, sync; one line once ready.

On SIGTERM uvicorn stops accepting and drains the requests in flight; then the summary
of the open refusal window is spooled, the audit shipper stops, the spool is fsynced
and what is left is shipped within ``AUDIT_FINAL_SHIP_TIMEOUT`` seconds (the rest waits
in the spool for the next start).

With ``--workers N`` (N > 1) this process supervises N workers, each an agent as
above on the same port with a spool of its own (``agent/workers.py``). With
``--reuse-port`` a single agent listens with ``SO_REUSEPORT``, so several agents of the
cluster — each its own credential and data dir — can listen on one address of one host
(the kernel spreads new connections over them; docs/operations.md, "Several agents per
cluster")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from trustmesh.agent.admission import Admission, AdmissionConfig
from trustmesh.agent.app import AgentApp, build_agent_app, readiness
from trustmesh.agent.audit import AuditShipper, DecisionAudit
from trustmesh.agent.authn import Authenticator
from trustmesh.agent.controlplane import ControlPlaneClient
from trustmesh.agent.decide import Decider
from trustmesh.agent.envoy import DEFAULT_GATEWAY_CLAIMS, ExtAuthzOptions
from trustmesh.agent.keys import KeySync
from trustmesh.agent.metrics import AgentMetrics
from trustmesh.agent.policy import PolicyHolder, agent_id, run_bundle_sync
from trustmesh.agent.revocations import (
    DEFAULT_STALENESS_BOUND,
    RevocationHolder,
    run_revocation_sync,
)
from trustmesh.agent.roots import RootHolder, run_root_reports
from trustmesh.agent.spool import DEFAULT_FSYNC_INTERVAL, AuditSpool
from trustmesh.agent.workers import (
    MAX_WORKERS,
    Supervisor,
    WorkerFailed,
    WorkerSpec,
    WorkerStatus,
    stranded_spools,
)
from trustmesh.agent.xfcc import CertificateAuthenticator
from trustmesh.audit.folding import DEFAULT_AGENT_LIMITS, FoldingLimits
from trustmesh.common.addresses import parse_listen, url_for
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import ConfigError, CredentialRejected, SpoolError
from trustmesh.common.files import private_directory
from trustmesh.common.limits import DEFAULT_LIMITS, HttpLimits
from trustmesh.common.serving import bind_socket, serve_socket
from trustmesh.common.tls import ServerTls, client_verify, server_tls
from trustmesh.common.tracing import Tracing, check_exporter

AUDIT_FINAL_SHIP_TIMEOUT = 2.0

log = logging.getLogger("trustmesh.agent")


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
    audit_refusals: FoldingLimits = DEFAULT_AGENT_LIMITS
    otel_exporter: str = "none"
    http_limits: HttpLimits = DEFAULT_LIMITS
    workers: int = 1
    reuse_port: bool = False  # share the address with other agents (SO_REUSEPORT)
    trust_xfcc: bool = False
    gateway_claims: tuple[str, ...] = DEFAULT_GATEWAY_CLAIMS
    extra: dict[str, str] = field(default_factory=dict)
    tls_cert: Path | None = None  # with tls_key: serve HTTPS (common/tls.py)
    tls_key: Path | None = None
    ca_file: Path | None = None  # the control plane's CA (None: the public roots)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)


def read_credential(path: Path) -> str:
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror}") from None
    if not secret:
        raise ValueError(f"token file {path} is empty")
    return secret


@dataclass
class Agent:
    """One agent's parts, wired together (:func:`build_agent`); nothing runs yet."""

    config: AgentConfig
    client: ControlPlaneClient
    keys: KeySync
    policy: PolicyHolder
    revocations: RevocationHolder
    spool: AuditSpool
    shipper: AuditShipper
    decider: Decider
    instance: str
    tracing: Tracing
    worker: WorkerSpec | None = None
    status: WorkerStatus | None = None  # a worker's snapshots, when it is one
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    roots: RootHolder = field(default_factory=RootHolder)
    admission: Admission | None = None

    @property
    def surfaces(self) -> AgentApp:
        options = ExtAuthzOptions(self.config.trust_xfcc, self.config.gateway_claims)
        return AgentApp(self.decider, self.keys, self.shipper, self.status, options, self.admission)

    def restore(self) -> bool:
        """The state persisted in the data dir, so the agent answers before it has
        reconnected; whether all of it was there."""
        keys = self.keys.restore()
        return keys and self.policy.restore() and self.revocations.restore()

    def ready(self) -> bool:
        return (
            self.policy.version is not None
            and self.decider.authn.configured
            and self.revocations.synced_at is not None
        )

    def start(self, on_fatal: Callable[[str], None]) -> None:
        """The loops that keep the state in sync and ship the audit spool (call on the
        event loop)."""
        self.tasks += [
            asyncio.create_task(self.keys.run(on_fatal)),
            asyncio.create_task(
                run_bundle_sync(self.client, self.policy, self.keys, self.instance)
            ),
            asyncio.create_task(run_revocation_sync(self.client, self.revocations)),
            asyncio.create_task(self.shipper.run()),
            asyncio.create_task(self.decider.audit.run()),
            asyncio.create_task(run_root_reports(self.client, self.roots)),
        ]
        if self.status is not None:
            self.tasks.append(asyncio.create_task(self.status.run()))
        spec = self.worker or WorkerSpec(1, 1)
        if spec.index == 1:  # the spools of workers an earlier run had more of
            for directory in stranded_spools(self.config.data_dir, spec.count):
                self.tasks.append(asyncio.create_task(self._ship_stranded(directory)))

    async def _ship_stranded(self, directory: Path) -> None:
        try:
            spool = await asyncio.to_thread(AuditSpool.open, directory, fsync_interval=0)
        except SpoolError as exc:
            log.error("audit: cannot open the stranded spool %s: %s", directory.name, exc)
            return
        try:
            shipper = AuditShipper(spool, self.client)
            await shipper.drain_all()
            log.info("audit: shipped what was left in %s", directory.name)
        finally:
            await asyncio.to_thread(spool.close)

    async def stop(self) -> None:
        """Stop the loops, spool the summary of folded refusals, ship what the spool
        holds (within a bound), close."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        try:
            self.decider.audit.flush()
            await self.shipper.drain(AUDIT_FINAL_SHIP_TIMEOUT)
        finally:
            await asyncio.to_thread(self.spool.close)
            await self.client.aclose()
            self.tracing.shutdown()


def build_agent(
    config: AgentConfig, clock: Clock = system_clock, worker: WorkerSpec | None = None
) -> Agent:
    """Wire an agent's parts from one clock (``worker``: as that worker of several).
    Raises ConfigError (an exporter that cannot work, an audit spool that cannot be
    opened, a CA file or an admission flag that cannot be used)."""
    admission_config = config.admission.checked(config.servers)
    verify = client_verify(config.ca_file) if config.ca_file is not None else True
    private_directory(config.data_dir, "the agent's data dir")  # ours, no one else's, 0700
    tracing = Tracing("trustmesh-agent", config.otel_exporter)
    spool = AuditSpool.open(
        config.data_dir / (worker or WorkerSpec(1, 1)).spool_dir,
        fsync_interval=config.audit_fsync_interval,
    )
    authn = Authenticator(
        cluster=config.cluster, clock=clock, leeway=config.leeway, cache_size=config.cache_size
    )
    client = ControlPlaneClient(
        config.servers, config.credential, config.cluster, clock, verify=verify
    )
    roots = RootHolder()
    keys = KeySync(
        client,
        authn,
        config.data_dir,
        max_interval=config.max_sync_interval,
        on_state=roots.update,
    )
    policy = PolicyHolder(config.cluster, config.data_dir, authn.keys, clock)
    revocations = RevocationHolder(config.data_dir, clock, config.staleness_bound, config.fail_open)
    instance = agent_id(config.data_dir)
    audit = DecisionAudit(
        spool, config.cluster, instance, clock=clock, refusals=config.audit_refusals
    )
    shipper = AuditShipper(spool, client)
    decider = Decider(
        authn=authn,
        certificates=CertificateAuthenticator(roots, config.cache_size),
        refresh_keys=keys.request_refresh,
        revocations=revocations,
        policy=policy,
        audit=audit,
        metrics=AgentMetrics(authn, revocations, keys.age, audit, shipper, policy, clock),
        tracing=tracing,
        clock=clock,
    )
    status = None
    if worker is not None:
        status = WorkerStatus(
            config.data_dir,
            worker,
            lambda: readiness(decider, keys, shipper),
            decider.metrics.registry,
            clock,
        )
    admission = Admission(
        config.cluster,
        admission_config,
        lambda: keys.state,
        lambda: policy.engine,
        spool,
        instance,
        tracing,
        registry=decider.metrics.registry,
        clock=clock,
    )
    return Agent(
        config,
        client,
        keys,
        policy,
        revocations,
        spool,
        shipper,
        decider,
        instance,
        tracing,
        worker,
        status,
        roots=roots,
        admission=admission,
    )


def _ready_line(config: AgentConfig, url: str, source: str) -> str:
    return f"trustmesh agent for cluster {config.cluster} ready on {url} ({source})"


def run_agent(config: AgentConfig, listen: str) -> None:
    """Serve until SIGTERM; one line once ready. Raises ConfigError with one clear line
    before serving, and CredentialRejected when the agent stops because its credential
    is refused."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 1 to {MAX_WORKERS}")
    tls = server_tls(config.tls_cert, config.tls_key)  # a bad pair: one line, before any worker
    if config.workers > 1:
        _supervise(config, host, port, "https" if tls else "http")
        return
    try:
        sock = bind_socket(host, port, reuse_port=config.reuse_port)
    except OSError as exc:
        shared = "" if config.reuse_port else " (agents that share one address: --reuse-port)"
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}{shared}") from None
    url = url_for(host, sock.getsockname()[1], "https" if tls else "http")
    announced = False

    def announce(source: str) -> None:
        nonlocal announced
        if not announced:
            announced = True
            print(_ready_line(config, url, source), flush=True)

    _serve(config, build_agent(config), sock, announce, tls)


def _supervise(config: AgentConfig, host: str, port: int, scheme: str) -> None:
    """The supervisor of ``config.workers`` workers (``agent/workers.py``); each loads
    the TLS certificate itself (and reloads it when its files change)."""
    private_directory(config.data_dir, "the agent's data dir")
    check_exporter(config.otel_exporter)  # one that cannot work: now, once
    config.admission.checked(config.servers)  # so are admission flags and --ca-file
    if config.ca_file is not None:
        client_verify(config.ca_file)
    agent_id(config.data_dir)  # created once, before the workers read it
    reserved = bind_socket(host, port, listen=False, reuse_port=True)
    bound = reserved.getsockname()[1]
    url = url_for(host, bound, scheme)

    def worker(spec: WorkerSpec, messages: Connection) -> None:
        run_worker(config, host, bound, spec, messages)

    def announce(source: str) -> None:
        print(_ready_line(config, url, f"{config.workers} workers; {source}"), flush=True)

    try:
        Supervisor(config.workers, worker, reserved, announce).run()
    except WorkerFailed as exc:
        if exc.kind == "credential":
            raise CredentialRejected(exc.message) from None
        raise ConfigError(exc.message) from None
    finally:
        reserved.close()


def run_worker(
    config: AgentConfig, host: str, port: int, spec: WorkerSpec, messages: Connection
) -> None:
    """One worker: an agent on its own ``SO_REUSEPORT`` socket; says when it is ready,
    and why it stops when restarting it would not help."""
    try:
        tls = server_tls(config.tls_cert, config.tls_key)
        agent = build_agent(config, worker=spec)
        sock = bind_socket(host, port, reuse_port=True)
        _serve(config, agent, sock, lambda source: messages.send(("ready", source)), tls)
    except CredentialRejected as exc:
        messages.send(("fatal", "credential", str(exc)))
    except ConfigError as exc:
        messages.send(("fatal", "config", exc.description))
    except OSError as exc:
        messages.send(("fatal", "config", f"worker {spec.index} cannot listen: {exc}"))
    finally:
        with contextlib.suppress(OSError):
            messages.close()


def _serve(
    config: AgentConfig,
    agent: Agent,
    sock: socket.socket,
    announce: Callable[[str], None],
    tls: ServerTls | None = None,
) -> None:
    """Serve ``agent`` on ``sock`` until SIGTERM (HTTPS with ``tls``, the decision
    fast paths included); ``announce`` once it is ready."""

    def stop_on_fatal(_reason: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the normal, draining shutdown path

    async def announce_when_ready() -> None:
        while not agent.ready():
            await asyncio.sleep(0.02)
        assert agent.policy.version is not None
        announce(f"synced with the control plane, policy revision {agent.policy.version[0]}")

    async def on_start() -> None:
        restored = agent.restore()
        agent.start(stop_on_fatal)
        if restored:
            announce("state restored from the data dir; syncing")
        else:
            agent.tasks.append(asyncio.create_task(announce_when_ready()))

    app = build_agent_app(agent.surfaces, on_start, agent.stop)
    serve_socket(app, sock, lambda _url: None, limits=config.http_limits, fast=app, tls=tls)
    if agent.keys.fatal is not None:
        raise CredentialRejected(agent.keys.fatal)
