"""``trustmesh get receivers``: the EventReceivers findings are pushed to (RFC 8935,
docs/ssf.md "Push delivery") with their delivery state — delivered, pending, failed,
the last error; ``trustmesh get deliveries``: the outbox rows themselves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from trustmesh.cli._common import (
    ApiClient,
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    items_or_json,
    print_json,
    print_table,
    resolve_server,
    resolve_token,
)
from trustmesh.cli.federation import _ago


def get_receivers(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List EventReceivers and the state of their deliveries."""
    items = items_or_json(server, token_file, "/v1/receivers", output is Output.json)
    if items is None:
        return
    now = time.time()
    rows = []
    for item in items:
        spec = item["spec"]
        delivery: dict[str, Any] = item.get("status", {}).get("delivery") or {}
        rows.append(
            [
                item["metadata"]["name"],
                spec["endpoint"],
                ",".join(spec.get("events") or ["all"]),
                delivery.get("delivered", 0),
                delivery.get("pending", 0),
                delivery.get("failed", 0),
                _ago(delivery.get("lastDelivered"), now),
                delivery.get("lastError") or "-",
            ]
        )
    columns = ["NAME", "ENDPOINT", "EVENTS", "DELIVERED", "PENDING", "FAILED"]
    print_table([*columns, "LAST DELIVERED", "LAST ERROR"], rows)


def get_deliveries(
    receiver: str | None = typer.Option(None, "--receiver", help="Only this EventReceiver's."),
    state: str | None = typer.Option(None, "--state", help="pending, delivered or failed."),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="At most this many."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List pushed anomaly SETs (newest first) and their delivery state."""
    client = ApiClient(resolve_server(server), resolve_token(token_file))
    params: dict[str, Any] = {"limit": limit}
    if receiver:
        params["receiver"] = receiver
    if state:
        params["state"] = state
    items = client.request("GET", "/v1/deliveries", params=params)["items"]
    if output is Output.json:
        print_json(items)
        return
    now = time.time()
    rows = [
        [
            item["receiver"],
            item["findingId"],
            item["detector"],
            item["state"],
            item["attempts"],
            _ago(item.get("lastAttempt"), now),
            _ago(item.get("nextAttempt"), now),
            item.get("lastError") or "-",
        ]
        for item in items
    ]
    columns = ["RECEIVER", "FINDING", "DETECTOR", "STATE", "ATTEMPTS", "LAST ATTEMPT"]
    print_table([*columns, "NEXT ATTEMPT", "LAST ERROR"], rows)
