"""``trustmesh server``: open state, bind, serve, print one ready line; with
``--analytics process`` (the default) the anomaly detectors run in a child process
(``server/analysis.py``), started once the state is open and stopped after serving."""

from __future__ import annotations

import sys

from sqlalchemy.exc import DBAPIError

from trustmesh.common.addresses import parse_listen, url_for
from trustmesh.common.errors import ConfigError
from trustmesh.common.limits import DEFAULT_LIMITS, HttpLimits
from trustmesh.common.serving import bind_socket, serve_socket
from trustmesh.common.tls import ServerTls
from trustmesh.server.analysis import AnalyticsProcess
from trustmesh.server.app import build_app
from trustmesh.server.controlplane import ControlPlane, ServerConfig


def run_server(
    config: ServerConfig,
    listen: str,
    limits: HttpLimits = DEFAULT_LIMITS,
    tls: ServerTls | None = None,
) -> None:
    """``tls``: serve HTTPS (``--tls-cert``/``--tls-key``); the default issuer is then
    the https URL."""
    host, port = parse_listen(listen)
    sock = bind_socket(host, port)
    issuer = config.issuer or url_for(host, sock.getsockname()[1], "https" if tls else "http")
    plane = ControlPlane(config, issuer)
    try:
        plane.open()
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else exc.__class__.__name__
        raise ConfigError(f"cannot use the database: {reason}") from None
    app = build_app(plane)

    def ready(url: str) -> None:
        note = (
            f"; admin credential written to {config.data_dir / 'admin.token'}"
            if plane.admin_token_created
            else ""
        )
        print(
            f"trustmesh server listening on {url} (issuer {plane.issuer}, trust domain "
            f"spiffe://{plane.trust_domain}, {plane.db.dialect}){note}",
            flush=True,
        )

    analytics = AnalyticsProcess(config, plane.issuer) if config.analytics == "process" else None
    if analytics is not None:
        analytics.start()
    try:
        serve_socket(app, sock, ready, plane.snapshots.begin_stopping, limits, tls=tls)
    finally:
        if analytics is not None:
            analytics.stop()
    sys.stdout.flush()
