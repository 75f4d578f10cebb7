"""``trustmesh get anomalies`` and ``trustmesh anomalies ack|resolve ID`` (DESIGN §11
"Anomalies and escalation"): what the detectors found, and people acknowledging and
resolving it. Everything the control plane answers is printed escaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from trustmesh.cli._common import (
    ApiClient,
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    print_json,
    print_line,
    print_table,
    resolve_server,
    resolve_token,
)
from trustmesh.cli.lifecycle import WideOutput, when

anomalies_app = typer.Typer(
    help="Anomalies the detectors found: acknowledge, resolve.", no_args_is_help=True
)


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def _subject(item: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(item["subject"].items()))


def _quarantine(item: dict[str, Any]) -> str:
    found = item.get("quarantined")
    if not found:
        return ""
    if found.get("created") or "error" not in found:
        return f"{found.get('kind')} {found.get('value')} suspended"
    return f"not quarantined: {found['error']}"


def get_anomalies(
    state: str | None = typer.Option(
        None, "--state", help="open, acknowledged or resolved (default: all)."
    ),
    detector: str | None = typer.Option(None, "--detector", help="Only this detector's."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: WideOutput = typer.Option(
        WideOutput.table, "-o", "--output", help="table, wide (evidence, quarantine) or json."
    ),
) -> None:
    """Anomalies, newest first."""
    params = {k: v for k, v in (("state", state), ("detector", detector)) if v}
    answer = _client(server, token_file).request("GET", "/v1/anomalies", params=params or None)
    items: list[dict[str, Any]] = answer["items"]
    if output is WideOutput.json:
        print_json(answer)
        return
    columns = ["ID", "DETECTED", "DETECTOR", "SEVERITY", "STATE", "SUBJECT", "SUMMARY"]
    rows = [
        [i["id"], when(i["detectedAt"]), i["detector"], i["severity"], i["state"], _subject(i),
         i["summary"]]
        for i in items
    ]  # fmt: skip
    if output is WideOutput.wide:
        columns += ["EVIDENCE", "QUARANTINE", "BY"]
        for row, i in zip(rows, items, strict=True):
            by = i["resolvedBy"] or i["acknowledgedBy"] or ""
            row += [",".join(str(e) for e in i["evidence"]), _quarantine(i), by]
    print_table(columns, rows)


NoteOption = typer.Option(None, "--note", help="Why, or what was done (kept with it).")


def _move(action: str, anomaly_id: str, note: str | None, server: str | None,
          token_file: Path | None, output: Output) -> dict[str, Any]:  # fmt: skip
    body = {"note": note} if note is not None else {}
    item: dict[str, Any] = _client(server, token_file).request(
        "POST", f"/v1/anomalies/{anomaly_id}/{action}", json=body
    )
    if output is Output.json:
        print_json(item)
    return item


@anomalies_app.command("ack")
def anomalies_ack(
    anomaly_id: str = typer.Argument(..., metavar="ID", help="The anomaly's id (get anomalies)."),
    note: str | None = NoteOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Acknowledge an open anomaly (someone is on it): admin or approver."""
    item = _move("acknowledge", anomaly_id, note, server, token_file, output)
    if output is not Output.json:
        print_line(
            f"acknowledged: anomaly {item['id']} ({item['detector']}) by {item['acknowledgedBy']}"
        )


@anomalies_app.command("resolve")
def anomalies_resolve(
    anomaly_id: str = typer.Argument(..., metavar="ID", help="The anomaly's id (get anomalies)."),
    note: str | None = NoteOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Resolve an open or acknowledged anomaly: admin or approver."""
    item = _move("resolve", anomaly_id, note, server, token_file, output)
    if output is not Output.json:
        print_line(f"resolved: anomaly {item['id']} ({item['detector']}) by {item['resolvedBy']}")
