"""``trustmesh cluster credential``, ``trustmesh user add|list|remove``, ``trustmesh login``
(a person's token for a cluster's API server) and ``trustmesh
credentials list|rotate|revoke`` (DESIGN §7, §11): a credential for one agent instance
of one cluster, named people with a role, and the life cycle of every credential
(people's and clusters' alike). Secrets go to stdout alone (so ``> file`` captures exactly the
secret); what people need to know about them goes to stderr."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
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

cluster_app = typer.Typer(help="Cluster operations.", no_args_is_help=True)
credentials_app = typer.Typer(
    help="Every credential of the control plane: list (with last use), rotate, revoke.",
    no_args_is_help=True,
)

user_app = typer.Typer(
    help="Named people with a role (admin, approver, auditor) and their credentials.",
    no_args_is_help=True,
)

_DURATION = re.compile(r"([0-9]{1,9})([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> int:
    """``90s``, ``30m``, ``12h``, ``30d``, ``2w`` -> seconds (ASCII digits only)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        fail(f"{option} must be a duration such as 90s, 30m, 12h, 30d or 2w, not {text!r}")
    return int(match.group(1)) * _UNIT[match.group(2)]


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else ""


def _note(text: str) -> None:
    print_line(text, err=True)


@cluster_app.command("credential")
def cluster_credential(
    name: str = typer.Argument(..., help="Registered cluster name."),
    agent: str | None = typer.Option(
        None,
        "--agent",
        help="The agent instance it is for (default: a new id); one live credential per agent.",
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="Valid for this long (90s, 30m, 12h, 30d, 2w); default: no expiry."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Print a new credential that lets one agent instance act for cluster NAME only."""
    body: dict[str, Any] = {}
    if agent is not None:
        body["agent"] = agent
    if expires is not None:
        body["expires_in"] = parse_duration(expires, "--expires")
    result = _client(server, token_file).request(
        "POST", f"/v1/clusters/{name}/credentials", json=body
    )
    if output is Output.json:
        print_json(result)
        return
    print_line(result["token"])
    until = f", expires {_when(result['expires_at'])}" if result.get("expires_at") else ""
    _note(f"credential {result['id']} for agent {result['agent']} of cluster {name}{until}")


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="The person's name: lowercase letters, digits, . _ -"),
    role: str = typer.Option(..., "--role", help="admin, approver or auditor."),
    expires: str | None = typer.Option(
        None, "--expires", help="Valid for this long (90s, 30m, 12h, 30d, 2w); default: no expiry."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Add person NAME with a role and print their personal credential (shown once)."""
    body: dict[str, Any] = {"name": name, "role": role}
    if expires is not None:
        body["expires_in"] = parse_duration(expires, "--expires")
    result = _client(server, token_file).request("POST", "/v1/people", json=body)
    if output is Output.json:
        print_json(result)
        return
    print_line(result["token"])
    until = f", expires {_when(result['expires_at'])}" if result.get("expires_at") else ""
    _note(
        f"user:{result['person']} ({result['role']}), credential {result['id']}{until}: "
        "give them this secret; it is not shown again"
    )


@user_app.command("list")
def user_list(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Every person: role, credential, state, expiry and last use."""
    items: list[dict[str, Any]] = _client(server, token_file).request("GET", "/v1/people")["people"]
    if output is Output.json:
        print_json(items)
        return
    print_table(
        ["NAME", "ROLE", "CREDENTIAL", "STATE", "CREATED", "CREATED BY", "EXPIRES", "LAST USED"],
        [[p["person"], p["role"], p["id"], p["state"], _when(p["created_at"]), p["created_by"],
          _when(p["expires_at"]), _when(p["last_used_at"])] for p in items],
    )  # fmt: skip


@user_app.command("remove")
def user_remove(
    name: str = typer.Argument(..., help="The person's name (user list)."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the audit log)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Remove person NAME: their credential stops now (not the last admin), and so do their
    login tokens at every cluster (a revocation of user:NAME)."""
    result = _client(server, token_file).request(
        "POST", f"/v1/people/{name}/remove", json={"reason": reason}
    )
    if output is Output.json:
        print_json(result)
        return
    print_line(f"removed: user:{name} (credential {result['credential']['id']} revoked)")


class LoginOutput(StrEnum):
    token = "token"  # noqa: S105 (an output format, not a secret)
    exec_credential = "exec-credential"
    json = "json"


EXEC_CREDENTIAL_API = "client.authentication.k8s.io/v1"


def exec_credential(result: dict[str, Any]) -> dict[str, Any]:
    """kubectl's exec credential plugin answer (``client.authentication.k8s.io/v1``)."""
    expires = datetime.fromtimestamp(result["expiresAt"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": EXEC_CREDENTIAL_API,
        "kind": "ExecCredential",
        "status": {"token": result["token"], "expirationTimestamp": expires},
    }


def login_command(
    cluster: str = typer.Option(..., "--cluster", help="The registered cluster to log in to."),
    ttl: str = typer.Option(
        "15m", "--ttl", help="How long the token lives (60s to 1h: 90s, 15m, 1h)."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: LoginOutput = typer.Option(
        LoginOutput.token,
        "--output",
        "-o",
        help="token (the bare token), exec-credential (kubectl's exec plugin) or json.",
    ),
) -> None:
    """Print a short-lived token for CLUSTER's API server, as the person of your credential
    (username user:NAME at the cluster's agent; what you may do there is the policy's)."""
    seconds = parse_duration(ttl, "--ttl")
    result = _client(server, token_file).request(
        "POST", "/v1/login", json={"cluster": cluster, "ttl": seconds}
    )
    if output is LoginOutput.json:
        print_json(result)
    elif output is LoginOutput.exec_credential:
        print_json(exec_credential(result))
    else:
        print_line(result["token"])
        _note(
            f"{result['username']} at cluster {result['cluster']}, expires {_when(result['expiresAt'])}"
        )


def _owner(credential: dict[str, Any]) -> str:
    if credential["kind"] == "cluster":
        return f"agent {credential['agent']} of cluster {credential['cluster']}"
    if credential["kind"] == "person":
        return f"user:{credential['person']}, {credential['role']}"
    return "user:bootstrap, the admin.token"


@credentials_app.command("list")
def credentials_list(
    cluster: str | None = typer.Option(None, "--cluster", help="Only this cluster's agents."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Every credential, people's and clusters': owner, state, expiry, last use, rotation
    and revocation."""
    params = {"cluster": cluster} if cluster else None
    found = _client(server, token_file).request("GET", "/v1/credentials", params=params)
    items: list[dict[str, Any]] = found["credentials"]
    if output is Output.json:
        print_json(items)
        return
    print_table(
        ["ID", "KIND", "OWNER", "STATE", "CREATED", "EXPIRES", "LAST USED",
         "OLD SECRET UNTIL", "REVOKED"],
        [[c["id"], c["kind"], _owner(c), c["state"], _when(c["created_at"]),
          _when(c["expires_at"]), _when(c["last_used_at"]), _when(c["previous_valid_until"]),
          _when(c["revoked_at"])] for c in items],
    )  # fmt: skip


@credentials_app.command("rotate")
def credentials_rotate(
    credential_id: str = typer.Argument(..., metavar="ID", help="The credential's id (list)."),
    overlap: str = typer.Option(
        "1h", "--overlap", help="How long the old secret keeps working (0s: it stops now)."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Print a new secret for credential ID; the old one works for --overlap more."""
    seconds = parse_duration(overlap, "--overlap")
    result = _client(server, token_file).request(
        "POST", f"/v1/credentials/{credential_id}/rotate", json={"overlap": seconds}
    )
    if output is Output.json:
        print_json(result)
        return
    print_line(result["token"])
    until = result["credential"]["previous_valid_until"]
    old = f"works until {_when(until)}" if until else "stopped working now"
    _note(f"credential {credential_id} rotated: the new secret works now, the old one {old}")


@credentials_app.command("revoke")
def credentials_revoke(
    credential_id: str = typer.Argument(..., metavar="ID", help="The credential's id (list)."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the audit log)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Stop credential ID now, every secret of it (not the last admin credential)."""
    result = _client(server, token_file).request(
        "POST", f"/v1/credentials/{credential_id}/revoke", json={"reason": reason}
    )
    if output is Output.json:
        print_json(result)
        return
    credential = result["credential"]
    owner = _owner(credential)
    verb = "revoked" if result["revoked"] else "already revoked"
    print_line(f"{verb}: credential {credential_id} ({owner})")
