"""``trustmesh get pending`` and ``trustmesh report stale`` (DESIGN §11): service
accounts refused for want of a Workload, with the manifest that would admit each, and
the Workloads nobody has used for N days."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
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
    print_json,
    print_line,
    print_lines,
    print_table,
    resolve_server,
    resolve_token,
)

report_app = typer.Typer(help="Reports over the registry and its use.")


class WideOutput(StrEnum):
    """``get workloads -o``: ``wide`` adds the last-use columns (DESIGN §11)."""

    table = "table"
    wide = "wide"
    json = "json"


class PendingOutput(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def when(ts: float | None) -> str:
    """A time in UTC for a table cell, or ``never``."""
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def get_pending(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: PendingOutput = typer.Option(
        PendingOutput.table,
        "--output",
        "-o",
        help="table for people, json for scripts, yaml: the Workload manifest that would "
        "admit each (trustmesh apply -f takes it; add claims first).",
    ),
) -> None:
    """List service accounts refused with unauthorized_client because no Workload
    selects them and no WorkloadTemplate matches them: how often, first and last seen."""
    answer = _client(server, token_file).request("GET", "/v1/pending")
    items: list[dict[str, Any]] = answer["items"]
    if output is PendingOutput.json:
        print_json(answer)
        return
    if output is PendingOutput.yaml:
        manifests = [item["manifest"] for item in items]
        if manifests:
            print_lines(yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True))
        return
    print_table(
        ["CLUSTER", "NAMESPACE", "SERVICE ACCOUNT", "COUNT", "FIRST SEEN", "LAST SEEN"],
        [
            [
                i["cluster"],
                i["namespace"],
                i["serviceAccount"],
                i["count"],
                when(i["firstSeen"]),
                when(i["lastSeen"]),
            ]
            for i in items
        ],
    )
    dropped = answer.get("limits", {}).get("droppedByThisReplica")
    if dropped:
        print_line(
            f"note: {dropped} refusal(s) of service accounts not listed were dropped: a "
            "cluster (or the whole list) is at its cap",
            err=True,
        )


@report_app.command("stale")
def report_stale(
    days: int = typer.Option(..., "--days", min=0, max=36500, help="Unused for this many days."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Workloads that neither received a credential nor were seen in a decision for N
    days (one never used counts from its last apply), longest idle first. Explicit
    Workloads only, not identities WorkloadTemplates gave."""
    answer = _client(server, token_file).request(
        "GET", "/v1/reports/stale", params={"days": str(days)}
    )
    if output is Output.json:
        print_json(answer)
        return
    print_table(
        ["NAME", "CLUSTER", "SPIFFE ID", "LAST CREDENTIAL", "LAST DECISION", "IDLE DAYS"],
        [
            [
                i["name"],
                i["cluster"],
                i["spiffeId"],
                when(i["usage"]["lastCredentialAt"]),
                when(i["usage"]["lastDecisionAt"]),
                i["idleDays"],
            ]
            for i in answer["items"]
        ],
    )
