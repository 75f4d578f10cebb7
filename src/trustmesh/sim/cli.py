"""``sim`` commands: serve a simulated cluster's OIDC issuer, mint its service-account tokens.

``cluster`` plays kube-apiserver's ServiceAccountIssuerDiscovery endpoints; ``token``
plays ``kubectl create token`` (the TokenRequest API) against the keys it keeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from trustmesh.common.addresses import parse_listen
from trustmesh.sim.algorithms import SUPPORTED_ALGS

sim_app = typer.Typer(
    help="Simulated Kubernetes clusters (real OIDC service-account issuers) for demos and tests.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(exc: Exception) -> typer.Exit:
    print(f"error: {exc}", file=sys.stderr)
    return typer.Exit(1)


@sim_app.command("cluster")
def cluster_command(
    name: str = typer.Option(..., "--name", help="Cluster name (used in uids and node names)."),
    listen: str = typer.Option(..., "--listen", help="HOST:PORT to serve discovery and JWKS on."),
    data_dir: Path = typer.Option(..., "--data-dir", help="Where keys and the issuer URL live."),
    alg: str = typer.Option(
        "RS256", "--alg", help=f"Signing algorithm: {', '.join(SUPPORTED_ALGS)}."
    ),
) -> None:
    """Serve a cluster's OIDC issuer in the foreground until SIGINT/SIGTERM."""
    try:
        host, port = parse_listen(listen)
        from trustmesh.common.serving import serve_foreground
        from trustmesh.sim.cluster import SimulatedCluster

        cluster = SimulatedCluster(name, data_dir=data_dir, alg=alg)

        def ready(url: str) -> None:
            cluster.set_issuer(url)
            print(f"simulated cluster {name} issuer {cluster.issuer}", flush=True)

        serve_foreground(cluster.app(), host, port, ready)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None


@sim_app.command("token")
def token_command(
    data_dir: Path = typer.Option(..., "--data-dir", help="The cluster's data dir."),
    namespace: str = typer.Option(..., "--namespace", "-n"),
    service_account: str = typer.Option(..., "--service-account"),
    audience: list[str] = typer.Option(["trustmesh"], "--audience", help="Repeatable."),
    ttl: int = typer.Option(3600, "--ttl", help="Lifetime in seconds."),
) -> None:
    """Mint a projected service-account token with the cluster's current signing key."""
    try:
        from trustmesh.sim.cluster import SimulatedCluster

        cluster = SimulatedCluster.from_data_dir(data_dir)
        print(cluster.mint(namespace, service_account, audience=audience, ttl=ttl))
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None


if __name__ == "__main__":
    sim_app()
