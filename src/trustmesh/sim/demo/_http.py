"""HTTP plumbing shared by the demo's clients of the control plane and the agents."""

from __future__ import annotations

from typing import Any

import httpx


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The JSON object an answer carries; empty when it carries none (an error page,
    a truncated body), so callers read members with ``.get`` and report the status."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
