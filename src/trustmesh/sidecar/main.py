"""``trustmesh sidecar`` (DESIGN §9): wiring and the process's life.

Start-up checks the flags (one line on error), binds the Workload API socket (and the
SDS socket), prints ``trustmesh sidecar serving …`` once they accept calls, and starts
the SVID keeper and the JWT bundle keeper (which also brings the federated trust
domains' bundles: their roots go to the SVID keeper). Once the first X.509-SVID is in service it
prints ``trustmesh sidecar ready: <SPIFFE ID> …``. The log (stderr) says when each SVID
was renewed, when it expires, why a renewal failed and what is still served.

On SIGTERM or SIGINT the servers stop taking calls, open streams end, and the socket
files are removed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from trustmesh.common.addresses import is_loopback_host
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import ConfigError
from trustmesh.common.failover import normalise_urls
from trustmesh.common.terminal import PrintableFormatter
from trustmesh.common.tls import client_verify
from trustmesh.identity.spiffe_bundle import FederatedBundle
from trustmesh.sidecar.controlplane import SidecarClient
from trustmesh.sidecar.folder import CredentialFolder
from trustmesh.sidecar.jwt import JwtBundleKeeper, JwtSvids
from trustmesh.sidecar.keeper import SvidKeeper, when
from trustmesh.sidecar.sds import MAX_MESSAGE_BYTES as SDS_MAX_MESSAGE_BYTES
from trustmesh.sidecar.sds import SecretDiscovery, add_sds
from trustmesh.sidecar.workload_api import (
    MAX_MESSAGE_BYTES,
    RequireWorkloadHeader,
    WorkloadApi,
    add_workload_api,
)

log = logging.getLogger("trustmesh.sidecar")

MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
MAX_CONCURRENT_RPCS = 256
SHUTDOWN_GRACE = 1.0


@dataclass(frozen=True)
class SidecarConfig:
    servers: list[str]
    sa_token_file: Path
    socket: Path
    sds_socket: Path | None = None
    credential_dir: Path | None = None
    socket_mode: int = 0o600
    ca_file: Path | None = None  # the control plane's CA (None: the public roots)


def check_servers(urls: list[str]) -> list[str]:
    """The service-account token travels to these URLs: https, or plain http to a
    loopback address only."""
    try:
        found = normalise_urls(urls)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for url in found:
        parts = urlsplit(url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            raise ConfigError(
                f"control-plane URL {url} is plain http: the service-account token would "
                "cross the network in clear (use https; http is allowed on loopback only)"
            )
    return found


def prepare_socket_path(path: Path, what: str) -> None:
    """``path`` may be bound: short enough, its directory there, and nothing at it but
    a stale socket (removed). A socket someone still serves on is refused."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"{what} path {path} is longer than {MAX_SOCKET_PATH} bytes")
    if not path.parent.is_dir():
        raise ConfigError(f"the directory of {what} {path} does not exist")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot use {what} {path}: {exc.strerror}") from None
    else:
        raise ConfigError(f"{what} {path} is in use by another process")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("trustmesh.sidecar", "trustmesh.client"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


@dataclass
class Sidecar:
    """One sidecar's parts, wired together (:func:`build_sidecar`); nothing runs yet."""

    config: SidecarConfig
    client: SidecarClient
    keeper: SvidKeeper
    jwt_bundles: JwtBundleKeeper
    workload_api: WorkloadApi
    sds: SecretDiscovery | None
    folder: CredentialFolder | None


def build_sidecar(config: SidecarConfig, clock: Clock = system_clock) -> Sidecar:
    servers = check_servers(config.servers)
    prepare_socket_path(config.socket, "Workload API socket")
    if config.sds_socket is not None:
        if config.sds_socket == config.socket:
            raise ConfigError("--sds-socket must differ from --socket")
        prepare_socket_path(config.sds_socket, "SDS socket")
    folder = None
    if config.credential_dir is not None:
        folder = CredentialFolder(config.credential_dir)
        folder.prepare()
    client = SidecarClient(
        servers, verify=client_verify(config.ca_file) if config.ca_file else True
    )
    keeper = SvidKeeper(client, config.sa_token_file, clock)
    if folder is not None:
        keeper.on_rotate.append(lambda svid: folder.write(svid, {svid.trust_domain: svid.bundle}))
    jwt_bundles = JwtBundleKeeper(client, clock)

    async def federated_roots(bundles: dict[str, FederatedBundle]) -> None:
        await keeper.set_federated({domain: b.bundle.roots for domain, b in bundles.items()})

    jwt_bundles.on_federated.append(federated_roots)
    jwt_svids = JwtSvids(servers, config.sa_token_file, client.http, clock)
    return Sidecar(
        config=config,
        client=client,
        keeper=keeper,
        jwt_bundles=jwt_bundles,
        workload_api=WorkloadApi(keeper, jwt_bundles, jwt_svids),
        sds=SecretDiscovery(keeper) if config.sds_socket is not None else None,
        folder=folder,
    )


async def _bind(
    path: Path, mode: int, max_message: int, add: Callable[[grpc.aio.Server], None], **kw: object
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_concurrent_streams", MAX_CONCURRENT_RPCS),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        **kw,
    )
    add(server)
    previous = os.umask(0o177)  # the socket file is born 0600, then given its mode
    try:
        server.add_insecure_port(f"unix:{path}")
        await server.start()
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {path}: {exc}") from None
    finally:
        os.umask(previous)
    os.chmod(path, mode)
    return server


async def serve(sidecar: Sidecar, stop: asyncio.Event) -> None:
    config = sidecar.config
    servers = [
        await _bind(
            config.socket,
            config.socket_mode,
            MAX_MESSAGE_BYTES,
            lambda s: add_workload_api(s, sidecar.workload_api),
            interceptors=[RequireWorkloadHeader()],
        )
    ]
    sds = sidecar.sds
    if sds is not None and config.sds_socket is not None:
        servers.append(
            await _bind(
                config.sds_socket,
                config.socket_mode,
                SDS_MAX_MESSAGE_BYTES,
                lambda s: add_sds(s, sds),
            )
        )
    where = f"the SPIFFE Workload API on unix:{config.socket}"
    if config.sds_socket is not None:
        where += f" and Envoy SDS on unix:{config.sds_socket}"
    print(f"trustmesh sidecar serving {where}", flush=True)

    async def announce_ready() -> None:
        keeper = sidecar.keeper
        while keeper.current is None:
            await keeper.wait_change(keeper.generation)
        svid = keeper.current
        print(
            f"trustmesh sidecar ready: {svid.spiffe_id} (X.509-SVID valid until {when(svid.not_after)})",
            flush=True,
        )

    tasks = [
        asyncio.create_task(sidecar.keeper.run()),
        asyncio.create_task(sidecar.jwt_bundles.run()),
        asyncio.create_task(announce_ready()),
    ]
    try:
        await stop.wait()
    finally:
        for server in servers:
            await server.stop(SHUTDOWN_GRACE)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sidecar.client.aclose()
        for path in (config.socket, config.sds_socket):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()


def run_sidecar(config: SidecarConfig) -> None:
    """Serve until SIGTERM or SIGINT. Raises ConfigError (one line) before serving."""
    configure_logging()
    sidecar = build_sidecar(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(sidecar, stop)

    asyncio.run(main())
