"""``trustmesh admission config``: the ``MutatingWebhookConfiguration`` and
``ValidatingWebhookConfiguration`` (``admissionregistration.k8s.io/v1``) that send a
cluster's pod CREATEs to its agent's admission webhooks (DESIGN §9 "Admission";
``agent/admission.py``, docs/admission.md), printed as YAML for ``kubectl apply -f -``.
Nothing is asked of the control plane."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import typer
import yaml

from trustmesh.cli._common import fail, print_lines
from trustmesh.common.errors import ConfigError

admission_app = typer.Typer(
    help="Kubernetes admission webhooks served by the agent.", no_args_is_help=True
)

FAILURE_POLICIES = ("Ignore", "Fail")


def _agent_url(value: str) -> str:
    """The API server calls webhooks over https only; a URL with a query or fragment is
    refused by it, one with credentials never belongs in a configuration."""
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        fail(
            f"--agent-url {value!r} must be an absolute https:// URL (the API server calls webhooks over HTTPS only)"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        fail(f"--agent-url {value!r} must carry no query, fragment or credentials")
    return value


@admission_app.command("config")
def config(
    cluster: str = typer.Option(
        ..., "--cluster", help="The cluster whose agent serves the webhooks."
    ),
    agent_url: str | None = typer.Option(
        None,
        "--agent-url",
        help="https://HOST[:PORT] at which the API server reaches the agent (default: the "
        "Service --service in --namespace).",
    ),
    namespace: str = typer.Option(
        "trustmesh",
        "--namespace",
        help="The namespace trustmesh runs in: the agent's Service, and left out of admission.",
    ),
    service: str = typer.Option(
        "trustmesh-agent", "--service", help="The agent's Service (without --agent-url)."
    ),
    port: int = typer.Option(443, "--port", min=1, max=65535, help="The Service's port."),
    ca_file: Path | None = typer.Option(
        None,
        "--ca-file",
        help="PEM file of the CA that signed the agent's --tls-cert: the webhooks' "
        "caBundle (default: none, the API server's own roots).",
    ),
    failure_policy: str = typer.Option(
        "Ignore",
        "--failure-policy",
        help="What the API server does when the agent cannot be reached in time: Ignore "
        "(admit the pod unchanged) or Fail (refuse it).",
    ),
    timeout_seconds: int = typer.Option(
        5, "--timeout-seconds", min=1, max=30, help="How long the API server waits for an answer."
    ),
    exclude_namespace: list[str] = typer.Option(
        [],
        "--exclude-namespace",
        help="Another namespace left out of admission (repeatable; kube-system and "
        "--namespace always are).",
    ),
) -> None:
    """Print the webhook configurations for the agent of one cluster, as YAML."""
    from trustmesh.agent.admission import WebhookTarget, webhook_configurations
    from trustmesh.common.tls import read_ca_file
    from trustmesh.manifests import dns_label

    if failure_policy not in FAILURE_POLICIES:
        fail(f"--failure-policy must be one of {', '.join(FAILURE_POLICIES)}")
    excluded = list(dict.fromkeys(["kube-system", namespace, *exclude_namespace]))
    try:
        for name, flag in [(cluster, "--cluster"), (service, "--service")] + [
            (ns, "--namespace/--exclude-namespace") for ns in excluded
        ]:
            try:
                dns_label(name)
            except ValueError as exc:
                fail(f"{flag}: {exc}")
        bundle = read_ca_file(ca_file, "--ca-file") if ca_file is not None else None
    except ConfigError as exc:
        fail(exc.description)
    target = WebhookTarget(
        url=_agent_url(agent_url) if agent_url is not None else None,
        service_namespace=namespace,
        service_name=service,
        service_port=port,
    )
    documents = webhook_configurations(
        cluster, target, bundle, excluded, failure_policy, timeout_seconds
    )
    print_lines(yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True))
