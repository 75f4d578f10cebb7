"""``trustmesh policy …``: history, show, rollback, offline tests, diff, export-rbac."""

from __future__ import annotations

import difflib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
import yaml

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
from trustmesh.cli.policy_reports import register
from trustmesh.common.terminal import printable

policy_app = typer.Typer(
    help="Policy versions, tests, effective diff and RBAC export.", no_args_is_help=True
)
register(policy_app)


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else ""


@policy_app.command("history")
def history(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Every policy version, newest first."""
    versions = _client(server, token_file).request("GET", "/v1/policy/versions")["versions"]
    if output is Output.json:
        print_json(versions)
        return
    rows = [
        [
            v["revision"],
            _when(v["createdAt"]),
            _author(v),
            v["source"],
            ", ".join(f"{c['action']} {c['kind']}/{c['name']}" for c in v["changes"]),
            v["message"],
            v["contentHash"][:12],
        ]
        for v in versions
    ]
    print_table(["REV", "TIME", "AUTHOR", "SOURCE", "CHANGES", "MESSAGE", "HASH"], rows)


def _author(version: dict[str, Any]) -> str:
    """The authenticated author, and the author it claimed to be, if any."""
    claimed = version.get("claimedAuthor")
    return f"{version['author']} (as {claimed})" if claimed else str(version["author"])


def _yaml(body: dict[str, Any] | None) -> list[str]:
    return yaml.safe_dump(body, sort_keys=False).splitlines(keepends=True) if body else []


@policy_app.command("show")
def show(
    revision: str = typer.Argument(..., help="Revision number, or 'current'."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """One version: who, when, why, and its diff against the version before."""
    if revision != "current" and not revision.isdigit():
        fail(f"revision {revision!r} is not a number or 'current'")
    version = _client(server, token_file).request("GET", f"/v1/policy/versions/{revision}")
    if output is Output.json:
        print_json(version)
        return
    print_line(
        f"revision {version['revision']}  {_when(version['createdAt'])}  by {_author(version)}  ({version['source']})"
    )
    print_line(f"content hash {version['contentHash']}")
    if version["message"]:
        print_line(f"message: {version['message']}")
    for change in version["diff"]:
        name = f"{change['kind']}/{change['name']}"
        diff = difflib.unified_diff(
            _yaml(change["before"]),
            _yaml(change["after"]),
            f"a/{printable(name)}",
            f"b/{printable(name)}",
        )
        print_lines("".join(diff))
    print_line(f"{len(version['documents'])} policy documents in force at this revision")


@policy_app.command("rollback")
def rollback(
    revision: int = typer.Argument(..., min=0, help="The revision to return to (0: no policy)."),
    message: str = typer.Option("", "--message", "-m", help="Why."),
    author: str | None = typer.Option(
        None, "--author", help="Claimed author, kept beside the authenticated one."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Publish a new version equal to REVISION (policy tests run again)."""
    body: dict[str, Any] = {"revision": revision, "message": message}
    if author:
        body["author"] = author
    result = _client(server, token_file).request("POST", "/v1/policy/rollback", json=body)
    if output is Output.json:
        print_json(result)
    elif not result["changes"]:
        print_line(
            f"revision {revision} is already in force (policy revision {result['policyRevision']})"
        )
    else:
        print_line(
            f"policy revision {result['policyRevision']} published: equal to revision {revision}"
        )


@policy_app.command("test")
def test(
    paths: list[Path] = typer.Argument(
        ...,
        help="Manifest files or directories: policy plus the Clusters, Workloads and WorkloadTemplates the tests name.",
    ),
    trust_domain: str = typer.Option(
        "example.org",
        "--trust-domain",
        help="Trust domain for the workloads' SPIFFE IDs (as the server's).",
    ),
    output: Output = OutputOption,
) -> None:
    """Run every PolicyTest offline, exactly as publication would (for CI pipelines)."""
    from trustmesh.common.errors import ManifestError, PolicyError, RegistryConflict
    from trustmesh.manifests import load_paths
    from trustmesh.policy.compiler import PolicySet, compile_all
    from trustmesh.policy.testing import run_policy_tests
    from trustmesh.registry import build_registry

    try:
        documents = load_paths([str(p) for p in paths])
    except ManifestError as exc:
        fail(str(exc))
    from trustmesh.common.errors import SpiffeIdError
    from trustmesh.spiffeid import normalize_trust_domain

    registry_docs = [d for d in documents if d.kind in ("Cluster", "Workload", "WorkloadTemplate")]
    try:
        registry = build_registry(normalize_trust_domain(trust_domain), 0, registry_docs)
        policy = PolicySet.from_documents(documents)
        results = run_policy_tests(policy, registry, 0, compile_all(policy, registry, 0))
    except (RegistryConflict, PolicyError, SpiffeIdError) as exc:
        fail(str(exc))
    failed = [r for r in results if not r.passed]
    if output is Output.json:
        print_json(
            {
                "passed": len(results) - len(failed),
                "total": len(results),
                "results": [r.to_json() for r in results],
            }
        )
    else:
        for result in results:
            mark = "PASS" if result.passed else "FAIL"
            print_line(f"{mark} {result.describe()}")
        print_line(f"{len(results) - len(failed)}/{len(results)} policy test cases passed")
    if not results:
        fail("no PolicyTest cases found")
    if failed:
        raise typer.Exit(1)
