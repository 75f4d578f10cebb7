"""What every CLI command shares: where the server is, the credential, output format,
the one-line error rule (no tracebacks, non-zero exit), and the one way to print.

Everything printed for people goes through :func:`cell`, :func:`print_table`,
:func:`print_line` or :func:`print_lines`: values become Rich ``Text`` (no markup is
ever read from data: a ``[/x]`` in an issuer is shown, not parsed) with every control
character, bidi override and other character that is not printable shown as a visible
escape (``common/terminal.py``). ``-o json`` escapes them as JSON does (``\\u001b``)."""

from __future__ import annotations

import json
import os
import ssl
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from trustmesh.common.errors import ConfigError
from trustmesh.common.terminal import printable, printable_lines
from trustmesh.common.tls import CA_FILE_ENV, client_verify, tls_problem

DEFAULT_CONFIG = Path("~/.config/trustmesh/config.yaml").expanduser()

# Markup, emoji codes and highlighting off: a string printed by mistake without cell() is
# still shown as it is, never interpreted.
console = Console(markup=False, emoji=False, highlight=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)


class Output(StrEnum):
    table = "table"
    json = "json"


class CliError(Exception):
    """Printed as ``error: <message>`` on one line; exit code 1."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


CONFIG_KEYS = ("server", "token_file", "ca_file")


def load_config() -> dict[str, Any]:
    """``TRUSTMESH_CONFIG`` or ``~/.config/trustmesh/config.yaml``: ``server``,
    ``token_file``, ``ca_file``. Environment and flags override it."""
    path = Path(os.environ.get("TRUSTMESH_CONFIG", DEFAULT_CONFIG)).expanduser()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read config file {path}: {exc}")
    if not isinstance(data, dict):
        fail(f"config file {path} must be a mapping (server:, token_file:, ca_file:)")
    unknown = set(data) - set(CONFIG_KEYS)
    if unknown:
        known = ", ".join(CONFIG_KEYS)
        fail(f"config file {path}: unknown key {sorted(unknown)[0]!r} (known: {known})")
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


class GlobalFlags:
    """Flags given before the command (``trustmesh --ca-file PEM get clusters``): the
    app's callback sets them for the one command the process runs."""

    ca_file: Path | None = None


def resolve_ca_file() -> Path | None:
    """The PEM file of the CA the control plane's certificate must chain to: ``--ca-file``
    (before the command), ``TRUSTMESH_CA_FILE``, the config file's ``ca_file``; None:
    the public roots."""
    if GlobalFlags.ca_file is not None:
        return GlobalFlags.ca_file
    value = os.environ.get(CA_FILE_ENV) or load_config().get("ca_file")
    return Path(str(value)).expanduser() if value else None


def client_tls() -> ssl.SSLContext | bool:
    """``verify=`` for every HTTP client of the CLI (one line if the CA file is unusable)."""
    try:
        return client_verify(resolve_ca_file())
    except ConfigError as exc:
        fail(exc.description)


def unreachable(server: str, exc: httpx.HTTPError) -> str:
    """One line for a request that got no answer: what TLS said, else the error."""
    problem = tls_problem(exc) or f"{exc.__class__.__name__}: {exc}".rstrip(": ")
    return f"cannot reach {server}: {problem}"


class ApiClient:
    """A thin synchronous client of the admin API that turns every failure into one line."""

    def __init__(self, server: str, token: str | None) -> None:
        self.server = server
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=server, headers=headers, timeout=30.0, trust_env=False, verify=client_tls()
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(unreachable(self.server, exc))
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "error" in body:
                problems = body.get("problems") or []
                if len(problems) > 1:
                    for problem in problems:
                        print_line(f"  {problem}", err=True)
                fail(
                    f"{body.get('error_description') or body['error']} ({body['error']}, HTTP {response.status_code})"
                )
            fail(f"{method} {path} failed with HTTP {response.status_code}")
        return body


def print_json(data: Any) -> None:
    """JSON for scripts; ``ensure_ascii`` escapes every control and non-ASCII character."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n")


def items_or_json(
    server: str | None, token_file: Path | None, path: str, as_json: bool
) -> list[dict[str, Any]] | None:
    """The ``items`` of ``GET path`` with the caller's credential — or, for a list
    command's ``-o json``, those items printed as JSON and None (nothing left to do)."""
    items: list[dict[str, Any]] = ApiClient(
        resolve_server(server), resolve_token(token_file)
    ).request("GET", path)["items"]
    if as_json:
        print_json(items)
        return None
    return items


def cell(value: Any, style: str = "") -> Text:
    """A value as a table cell or grid value: plain text (never markup), every
    character that is not printable escaped, ``None`` empty."""
    return Text(printable(value), style=style)


def print_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    table = Table(title=None if title is None else cell(title), header_style="bold")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[cell(value) for value in row])
    console.print(table)


def print_facts(facts: list[tuple[str, Any]]) -> None:
    """Name-value lines, aligned (a summary): every value through :func:`cell`."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name, value in facts:
        grid.add_row(cell(name), cell(value))
    console.print(grid)


def print_line(text: str, err: bool = False) -> None:
    """One line (built from data) on stdout or stderr, as it is but with every
    character that is not printable escaped: nothing in it acts on the terminal and
    nothing in it can start another line."""
    typer.echo(printable(text), err=err)


def print_lines(text: str) -> None:
    """Text of several lines (a diff, YAML), each line made printable; a newline is
    added only when the text does not end with one (nothing is printed for none)."""
    if text:
        typer.echo(printable_lines(text), nl=not text.endswith("\n"))


ServerOption = typer.Option(
    None, "--server", help="Control-plane URL (or TRUSTMESH_SERVER, or the config file)."
)
TokenFileOption = typer.Option(
    None, "--token-file", help="File holding your credential (or TRUSTMESH_TOKEN)."
)
OutputOption = typer.Option(
    Output.table, "--output", "-o", help="table for people, json for scripts."
)
