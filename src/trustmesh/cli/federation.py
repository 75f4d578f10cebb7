"""``trustmesh get trustdomains`` (alias ``get federation``): the federated trust
domains (DESIGN §9, docs/federation.md) and the state of their bundles — last fetch,
sequence, keys, next refresh, whether the last good bundle is stale or was dropped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trustmesh.cli._common import (
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    items_or_json,
    print_table,
)


def _ago(ts: float | None, now: float) -> str:
    """``12s ago`` / ``in 3m``: how far an epoch time is from now, for a table cell."""
    if ts is None:
        return "-"
    delta = round(ts - now)
    size = abs(delta)
    text = f"{size}s" if size < 120 else (f"{size // 60}m" if size < 7200 else f"{size // 3600}h")
    return f"in {text}" if delta > 0 else f"{text} ago"


def _state(bundle: dict[str, Any]) -> str:
    state = str(bundle.get("state", "pending"))
    error = bundle.get("error")
    return f"{state}: {error}" if error else state


def get_trustdomains(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """List federated trust domains and the state of their bundles."""
    items = items_or_json(server, token_file, "/v1/trustdomains", output is Output.json)
    if items is None:
        return
    now = time.time()
    rows = []
    for item in items:
        spec = item["spec"]
        bundle = item.get("status", {}).get("bundle") or {}
        rows.append(
            [
                item["metadata"]["name"],
                spec["trustDomain"],
                spec["bundleEndpointURL"],
                "-" if bundle.get("sequence") is None else bundle["sequence"],
                f"{bundle.get('jwt_keys', 0)}/{bundle.get('x509_roots', 0)}",
                _ago(bundle.get("lastFetch"), now),
                _ago(bundle.get("nextRefresh"), now),
                _state(bundle),
            ]
        )
    columns = ["NAME", "TRUST DOMAIN", "ENDPOINT", "SEQUENCE", "JWT/X509 KEYS", "LAST FETCH"]
    print_table([*columns, "NEXT REFRESH", "STATE"], rows)
