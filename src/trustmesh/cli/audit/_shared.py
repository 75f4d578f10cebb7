"""What the ``trustmesh audit`` commands share: the admin API client (with the two audit
endpoints that answer text), the log's verifier key -- pinned with ``--key`` or fetched
from the server -- and its signed checkpoints, each checked before it is used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import typer

from trustmesh.audit.checkpoint import Checkpoint, verify_checkpoint
from trustmesh.audit.note import Verifier, parse_verifier_key
from trustmesh.cli._common import ApiClient, fail, resolve_server, resolve_token, unreachable
from trustmesh.common.errors import CheckpointError, NoteError

PAGE = 1000
"""The most entries, checkpoints or query results the server returns per call."""

KeyOption = typer.Option(
    None,
    "--key",
    help="Pin the log's verifier key (name+keyid+base64, or a file holding it) instead of "
    "fetching it from the server.",
)


class AuditClient(ApiClient):
    """The admin API, plus the two audit endpoints that answer text, not JSON."""

    def text(self, path: str) -> str:
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            fail(unreachable(self.server, exc))
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and "error" in body:
                description = body.get("error_description") or body["error"]
                fail(f"{description} ({body['error']}, HTTP {response.status_code})")
            fail(f"GET {path} failed with HTTP {response.status_code}")
        return response.text

    def get(self, path: str, **params: Any) -> Any:
        body = self.request("GET", path, params=params)
        if not isinstance(body, dict):
            fail(f"GET {path} did not answer a JSON object")
        return body


def audit_client(server: str | None, token_file: Path | None) -> AuditClient:
    return AuditClient(resolve_server(server), resolve_token(token_file))


# -- keys and checkpoints -------------------------------------------------------------------
def parse_key(text: str, where: str) -> Verifier:
    try:
        return parse_verifier_key(text.strip())
    except NoteError as exc:
        fail(f"{where} is not a verifier key: {exc}")


def pinned_key(value: str) -> Verifier:
    """``--key``: the key itself, or a file that holds it."""
    path = Path(value).expanduser()
    if "+" not in value and path.is_file():
        try:
            return parse_key(path.read_text(), f"--key file {path}")
        except OSError as exc:
            fail(f"cannot read --key file {path}: {exc.strerror}")
    return parse_key(value, "--key")


def resolve_key(client: AuditClient, pinned: str | None) -> tuple[Verifier, str]:
    """The verifier key and where it came from."""
    if pinned:
        return pinned_key(pinned), "pinned with --key"
    return parse_key(client.text("/v1/audit/key"), "the server's /v1/audit/key"), "from the server"


def latest_checkpoint(client: AuditClient, verifier: Verifier) -> tuple[Checkpoint, str]:
    note = client.text("/v1/audit/checkpoint")
    try:
        return verify_checkpoint(note, verifier), note
    except CheckpointError as exc:
        fail(f"the latest checkpoint does not verify with {verifier.name}: {exc}")


def list_checkpoints(client: AuditClient) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    params: dict[str, Any] = {}
    while True:
        page = client.get("/v1/audit/checkpoints", **params).get("checkpoints")
        if not isinstance(page, list):
            fail("/v1/audit/checkpoints did not answer a list of checkpoints")
        for item in page:
            if not isinstance(item, dict) or not isinstance(item.get("size"), int):
                fail("/v1/audit/checkpoints answered an item without a size")
            found.append((item["size"], str(item.get("note", ""))))
        if len(page) < PAGE:
            return found
        params = {"after": found[-1][0]}


def signed_checkpoint_at(client: AuditClient, verifier: Verifier, size: int) -> Checkpoint:
    """The log's signed checkpoint of exactly ``size`` entries."""
    page = client.get("/v1/audit/checkpoints", after=size - 1).get("checkpoints") or []
    exact = [item for item in page if isinstance(item, dict) and item.get("size") == size]
    if not exact:
        nearest = ", ".join(str(item.get("size")) for item in page[:3]) or "none"
        fail(
            f"the log has no signed checkpoint at size {size} (the next ones: {nearest}); "
            "see trustmesh audit checkpoint"
        )
    try:
        return verify_checkpoint(str(exact[0]["note"]), verifier)
    except CheckpointError as exc:
        fail(f"the checkpoint at size {size} does not verify: {exc}")
