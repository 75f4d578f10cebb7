"""What every CLI command shares: where the server is, the credential, output format,
and the one-line error rule (no tracebacks, non-zero exit)."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table

DEFAULT_CONFIG = Path("~/.config/trustmesh/config.yaml").expanduser()

console = Console()
err_console = Console(stderr=True)


class Output(StrEnum):
    table = "table"
    json = "json"


class CliError(Exception):
    """Printed as ``error: <message>`` on one line; exit code 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def load_config() -> dict[str, Any]:
    """``TRUSTMESH_CONFIG`` or ``~/.config/trustmesh/config.yaml``: ``server``,
    ``token_file``. Environment and flags override it."""
    path = Path(os.environ.get("TRUSTMESH_CONFIG", DEFAULT_CONFIG)).expanduser()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read config file {path}: {exc}")
    if not isinstance(data, dict):
        fail(f"config file {path} must be a mapping (server:, token_file:)")
    unknown = set(data) - {"server", "token_file"}
    if unknown:
        fail(f"config file {path}: unknown key {sorted(unknown)[0]!r} (known: server, token_file)")
    return data


def resolve_servers(server: str | None) -> list[str]:
    """Every control-plane URL given (comma-separated), in order: for failover."""
    value = server or os.environ.get("TRUSTMESH_SERVER") or load_config().get("server")
    urls = [u.strip().rstrip("/") for u in str(value or "").split(",") if u.strip()]
    if not urls:
        fail("no control plane given: pass --server URL or set TRUSTMESH_SERVER")
    return urls


def resolve_server(server: str | None) -> str:
    """The first control-plane URL (admin commands talk to one)."""
    return resolve_servers(server)[0]


def resolve_token(token_file: Path | None) -> str:
    if token_file is None:
        env = os.environ.get("TRUSTMESH_TOKEN")
        if env:
            return env.strip()
        configured = load_config().get("token_file")
        if not configured:
            fail("no credential given: set TRUSTMESH_TOKEN or pass --token-file FILE")
        token_file = Path(str(configured)).expanduser()
    try:
        secret = token_file.read_text().strip()
    except OSError as exc:
        fail(f"cannot read token file {token_file}: {exc.strerror}")
    if not secret:
        fail(f"token file {token_file} is empty")
    return secret


class ApiClient:
    """A thin synchronous client of the admin API that turns every failure into one line."""

    def __init__(self, server: str, token: str | None) -> None:
        self.server = server
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=server, headers=headers, timeout=30.0, trust_env=False)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach {self.server}: {exc.__class__.__name__}: {exc}".rstrip(": "))
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "error" in body:
                problems = body.get("problems") or []
                if len(problems) > 1:
                    for problem in problems:
                        err_console.print(f"  {problem}", markup=False, highlight=False)
                fail(
                    f"{body.get('error_description') or body['error']} ({body['error']}, HTTP {response.status_code})"
                )
            fail(f"{method} {path} failed with HTTP {response.status_code}")
        return body


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    table = Table(title=title, header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if cell is None else str(cell) for cell in row])
    console.print(table)


ServerOption = typer.Option(
    None, "--server", help="Control-plane URL (or TRUSTMESH_SERVER, or the config file)."
)
TokenFileOption = typer.Option(
    None, "--token-file", help="File holding the admin credential (or TRUSTMESH_TOKEN)."
)
OutputOption = typer.Option(
    Output.table, "--output", "-o", help="table for people, json for scripts."
)
