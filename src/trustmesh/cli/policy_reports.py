"""``trustmesh policy diff A B`` and ``trustmesh policy export-rbac --cluster C``
(DESIGN §3, §4): reports computed locally from the documents of stored policy versions
and today's registry, both fetched from the control plane's admin API."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from trustmesh.cli._common import (
    ApiClient,
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    fail,
    print_json,
    print_line,
    print_lines,
    print_table,
    resolve_server,
    resolve_token,
)
from trustmesh.common.errors import ManifestError, PolicyError, RegistryConflict

if TYPE_CHECKING:  # the policy and registry code loads with the commands that use it
    from trustmesh.policy.compiler import PolicySet
    from trustmesh.policy.diff import Grant
    from trustmesh.registry import Registry

_REVISION = re.compile(r"^(current|0|[1-9][0-9]{0,17})$")


def _revision(value: str) -> str:
    if not _REVISION.match(value):
        fail(f"revision {value!r} is not a number (0 = empty policy) or 'current'")
    return value


def _documents(what: str, bodies: Any) -> list[Any]:
    if not isinstance(bodies, list):
        fail(f"{what}: the control plane answered no list of manifests")
    from trustmesh.manifests import document_from_body

    documents = []
    for body in bodies:
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != "status"}
        try:
            documents.append(document_from_body(body))
        except ManifestError as exc:
            fail(f"{what}: a stored manifest is not valid: {exc}")
    return documents


def fetch_policy(client: ApiClient, revision: str) -> tuple[int | str, PolicySet]:
    """(the revision the server resolved, its policy) for ``GET /v1/policy/versions/R``."""
    body = client.request("GET", f"/v1/policy/versions/{revision}")
    if not isinstance(body, dict):
        fail(f"policy revision {revision}: the control plane answered no JSON object")
    from trustmesh.policy.compiler import PolicySet

    documents = _documents(f"policy revision {revision}", body.get("documents"))
    return body.get("revision", revision), PolicySet.from_documents(documents)


def fetch_registry(client: ApiClient) -> Registry:
    """Today's registry from ``GET /v1/clusters`` and ``/v1/workloads``, in the trust
    domain discovery announces."""
    discovery = client.request("GET", "/.well-known/openid-configuration")
    trust_domain = str((discovery or {}).get("trust_domain", "")).removeprefix("spiffe://")
    if not trust_domain:
        fail("the control plane's discovery document names no trust_domain")
    documents = []
    observed: list[tuple[str, str, str]] = []
    for kind in ("clusters", "workloads", "workloadtemplates"):
        items = (client.request("GET", f"/v1/{kind}") or {}).get("items")
        if kind == "workloads" and isinstance(items, list):
            # identities templates gave are listed as Workloads with status.template
            derived = [i for i in items if isinstance(i, dict) and _template_of(i)]
            items = [i for i in items if not (isinstance(i, dict) and _template_of(i))]
            observed += [_account_of(i) for i in derived]
        documents += _documents(kind, items)
    from trustmesh.registry import build_registry

    try:
        registry = build_registry(trust_domain, 0, documents)
    except RegistryConflict as exc:
        fail(f"the registry does not fit together: {exc}")
    return dataclasses.replace(registry, observed=tuple(observed))


def _template_of(item: dict[str, Any]) -> str | None:
    status = item.get("status")
    template = status.get("template") if isinstance(status, dict) else None
    return template if isinstance(template, str) else None


def _account_of(item: dict[str, Any]) -> tuple[str, str, str]:
    try:
        selector = item["spec"]["selector"]
        return (
            str(selector["cluster"]),
            str(selector["namespace"]),
            str(selector["serviceAccount"]),
        )
    except (KeyError, TypeError):
        fail("the control plane listed a template-derived identity without its selector")


def _grant(value: Any) -> Grant:
    from trustmesh.policy.diff import Grant

    if not isinstance(value, dict):
        fail("policy diff: the control plane answered a grant that is not an object")
    try:
        return Grant(**{k: str(v) for k, v in value.items()})
    except TypeError:
        fail("policy diff: the control plane answered a grant with unknown fields")


def _diff_of(body: Any) -> tuple[Any, Any, list[Grant], list[Grant], list[tuple[Grant, list[str]]]]:
    """(from, to, appeared, disappeared, escalations) of ``GET /v1/policy/diff``."""
    try:
        escalations = [
            (_grant(e["grant"]), [str(f) for f in e["flags"]]) for e in body["escalations"]
        ]
        return (
            body["from"],
            body["to"],
            [_grant(g) for g in body["appeared"]],
            [_grant(g) for g in body["disappeared"]],
            escalations,
        )
    except (KeyError, TypeError):
        fail("policy diff: the control plane's answer is not a policy diff")


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def register(policy_app: typer.Typer) -> None:
    """Add ``diff`` and ``export-rbac`` to the ``trustmesh policy`` sub-app."""

    @policy_app.command("diff")
    def diff(
        old: str = typer.Argument(..., help="Policy revision to compare from (0 = empty)."),
        new: str = typer.Argument(..., help="Policy revision to compare to, or 'current'."),
        server: str | None = ServerOption,
        token_file: Path | None = TokenFileOption,
        output: Output = OutputOption,
    ) -> None:
        """Effective grants that appear (+) or disappear (-) between two policy
        revisions over the registered inventory, with escalation flags (computed by
        the control plane: ``GET /v1/policy/diff``, as the console shows it)."""
        from trustmesh.policy.diff import Grant

        client = _client(server, token_file)
        body = client.request(
            "GET", "/v1/policy/diff", params={"from": _revision(old), "to": _revision(new)}
        )
        if output is Output.json:
            print_json(body)
            return
        old_rev, new_rev, appeared, disappeared, escalations = _diff_of(body)
        if not appeared and not disappeared:
            print_line(f"no effective change from revision {old_rev} to {new_rev}")
            return
        flagged = {grant: flags for grant, flags in escalations}
        # EXPIRES only when a time-bound grant is listed (keeps the usual table narrow)
        timed = any(g.expires for g in (*appeared, *disappeared))
        width = len(Grant._fields) - (0 if timed else 1)
        rows = [["+", *grant[:width], ",".join(flagged.get(grant, ()))] for grant in appeared] + [
            ["-", *grant[:width], ""] for grant in disappeared
        ]
        headers = ["", "SUBJECT", "CLUSTER", "NAMESPACE", "ACTION", "TARGET", "KIND"]
        print_table(
            [*headers, *(["EXPIRES"] if timed else []), "FLAGS"],
            rows,
            title=f"policy revision {old_rev} -> {new_rev}: {len(appeared)} appeared, "
            f"{len(disappeared)} disappeared, {len(escalations)} flagged",
        )

    @policy_app.command("export-rbac")
    def export_rbac_command(
        cluster: str = typer.Option(..., "--cluster", help="The cluster to export for."),
        revision: str = typer.Option(
            "current", "--revision", help="Policy revision (default: the current one)."
        ),
        server: str | None = ServerOption,
        token_file: Path | None = TokenFileOption,
    ) -> None:
        """Print the native Kubernetes RBAC (ClusterRoles and bindings over the
        TokenReview groups) equivalent to the policy on one cluster, as YAML."""
        from trustmesh.policy.rbac import export_rbac, render_yaml

        client = _client(server, token_file)
        _, policy = fetch_policy(client, _revision(revision))
        registry = fetch_registry(client)
        if cluster not in registry.clusters:
            fail(f"cluster {cluster!r} is not a registered Cluster")
        try:
            manifests = export_rbac(policy, registry, cluster)
        except PolicyError as exc:
            fail(f"cannot compile the policy: {exc}")
        print_lines(render_yaml(manifests, manifests.warnings))
