"""``trustmesh envoy config --cluster C`` (DESIGN §9 "Claims at the gateway"): prints, as
YAML (API v3), the Envoy configuration ``agent/envoy_config.py`` builds — ext_authz to the
agent in front of a local upstream and, with ``--sds-socket``, mutual TLS with the
X.509-SVID and trust bundle a ``trustmesh sidecar`` serves over SDS. That module says what
the configuration guarantees and why; docs/agent-surfaces.md explains every part."""

from __future__ import annotations

import typer
import yaml

from trustmesh.agent.envoy_defaults import DEFAULT_MAX_CONNECTION_DURATION, SYSTEM_CA_FILE
from trustmesh.cli._common import fail
from trustmesh.common.errors import SpiffeIdError

envoy_app = typer.Typer(
    help="Envoy in front of a workload: its configuration.", no_args_is_help=True
)


@envoy_app.command("config")
def envoy_config(
    cluster: str = typer.Option(..., "--cluster", help="The cluster the workload runs in."),
    listen: str = typer.Option(
        "0.0.0.0:10000", "--listen", help="HOST:PORT Envoy serves the workload's callers on."
    ),
    agent: list[str] = typer.Option(
        ["http://127.0.0.1:8181"],
        "--agent",
        help="The cluster's agent (ext_authz), http(s)://HOST:PORT; repeat it for each "
        "agent replica (a check that fails at one is retried at another).",
    ),
    upstream: str = typer.Option(
        "127.0.0.1:8080", "--upstream", help="HOST:PORT of the workload behind Envoy."
    ),
    admin: str = typer.Option(
        "127.0.0.1:9901", "--admin", help="HOST:PORT of Envoy's admin interface."
    ),
    namespace: str = typer.Option(
        None, "--namespace", help="The destination namespace the checks name (DESIGN §3)."
    ),
    sds_socket: str = typer.Option(
        None,
        "--sds-socket",
        help="The trustmesh sidecar's SDS socket: serve mutual TLS with its SVID and "
        "bundle, and forward the verified client certificate to the agent (XFCC).",
    ),
    trust_domain: str = typer.Option(
        None,
        "--trust-domain",
        help="With --sds-socket: accept only client certificates of this trust domain "
        "(default: any SPIFFE ID the bundle vouches for; the agent checks the rest).",
    ),
    authz_timeout: str = typer.Option(
        "0.5s", "--authz-timeout", help="How long Envoy waits for the agent (then 503)."
    ),
    egress_listen: str = typer.Option(
        None,
        "--egress-listen",
        help="With --sds-socket: also a plain-HTTP listener for the workload's outgoing "
        "calls, sent to --egress-to over mutual TLS with the SVID.",
    ),
    egress_to: str = typer.Option(None, "--egress-to", help="HOST:PORT of the peer's Envoy."),
    egress_peer: str = typer.Option(
        None,
        "--egress-peer",
        help="The SPIFFE ID the peer must present (default: any of the trust domain).",
    ),
    max_connection_duration: str = typer.Option(
        DEFAULT_MAX_CONNECTION_DURATION,
        "--max-connection-duration",
        help="With --egress-listen: how long one mutual-TLS connection to the peer may "
        "live, so a rotated SVID is presented soon (keep it under 45 % of the "
        "X.509-SVID lifetime).",
    ),
    agent_ca_file: str = typer.Option(
        SYSTEM_CA_FILE,
        "--agent-ca-file",
        help="With an https --agent: the CA file (PEM, a path on Envoy's host) its "
        "certificate must chain to; the certificate must also name the agent's host.",
    ),
) -> None:
    """Print an Envoy configuration (YAML, API v3) with ext_authz to the agent."""
    from trustmesh.agent.envoy_config import build_config

    try:
        config = build_config(
            cluster=cluster,
            listen=listen,
            agent=agent,
            upstream=upstream,
            admin=admin,
            namespace=namespace,
            sds_socket=sds_socket,
            trust_domain=trust_domain,
            authz_timeout=authz_timeout,
            egress_listen=egress_listen,
            egress_to=egress_to,
            egress_peer=egress_peer,
            max_connection_duration=max_connection_duration,
            agent_ca_file=agent_ca_file,
        )
    except (ValueError, SpiffeIdError) as exc:
        fail(str(exc))
    typer.echo(yaml.safe_dump(config, sort_keys=False), nl=False)
