"""``trustmesh suspend|resume`` and ``trustmesh get suspensions`` (DESIGN §5): while a
workload, SPIFFE ID or cluster is suspended no credential of any kind is issued for it;
suspending also revokes what was issued (and, for a cluster, its agents' credentials)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    print_table,
    resolve_server,
    resolve_token,
)

WorkloadOption = typer.Option(None, "--workload", help="A registered Workload, by name.")
ClusterOption = typer.Option(
    None, "--cluster", help="A registered Cluster: every workload whose tokens come from it."
)
SpiffeIdOption = typer.Option(None, "--spiffe-id", help="A SPIFFE ID of the trust domain.")


def _target(workload: str | None, cluster: str | None, spiffe_id: str | None) -> dict[str, str]:
    given = [(k, v) for k, v in (("workload", workload), ("cluster", cluster),
                                 ("subject", spiffe_id)) if v is not None]  # fmt: skip
    if len(given) != 1:
        fail("give exactly one of --workload, --cluster, --spiffe-id")
    return {"kind": given[0][0], "value": given[0][1]}


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _what(suspension: dict[str, Any]) -> str:
    kind = "SPIFFE ID" if suspension["kind"] == "subject" else suspension["kind"]
    return f"{kind} {suspension['value']}"


def suspend(
    workload: str | None = WorkloadOption,
    cluster: str | None = ClusterOption,
    spiffe_id: str | None = SpiffeIdOption,
    reason: str = typer.Option("", "--reason", help="Why (recorded in the audit log)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Stop every new credential for a workload, cluster or SPIFFE ID and revoke what
    was issued (a cluster's agent credentials too), until `trustmesh resume`."""
    body = {**_target(workload, cluster, spiffe_id), "reason": reason}
    result = _client(server, token_file).request("POST", "/v1/suspensions", json=body)
    if output is Output.json:
        print_json(result)
        return
    suspension = result["suspension"]
    if not result["created"]:
        print_line(
            f"already suspended: {_what(suspension)} (since {_when(suspension['suspended_at'])}, "
            f"by {suspension['actor']})"
        )
        return
    revoked = result["credentials_revoked"]
    agents = f"; {len(revoked)} agent credential(s) revoked" if revoked else ""
    print_line(
        f"suspended: {_what(suspension)}; tokens issued until now revoked "
        f"(revocation {result['revocation']['revision']}){agents}"
    )


def resume(
    workload: str | None = WorkloadOption,
    cluster: str | None = ClusterOption,
    spiffe_id: str | None = SpiffeIdOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """End a suspension: credentials are issued again (what was revoked stays revoked;
    a cluster's agents need new credentials)."""
    body = _target(workload, cluster, spiffe_id)
    result = _client(server, token_file).request("POST", "/v1/suspensions/resume", json=body)
    if output is Output.json:
        print_json(result)
        return
    print_line(f"resumed: {_what(result['resumed'])}")


def get_suspensions(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List the suspensions in force."""
    items = _client(server, token_file).request("GET", "/v1/suspensions")["suspensions"]
    if output is Output.json:
        print_json(items)
        return
    print_table(
        ["KIND", "VALUE", "SINCE", "ACTOR", "REASON"],
        [[s["kind"], s["value"], _when(s["suspended_at"]), s["actor"], s["reason"]] for s in items],
    )
