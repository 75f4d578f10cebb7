"""``trustmesh access request|list|show|approve|deny`` (DESIGN §11 "Access requests"):
any person asks for a role for a subject, on some clusters, for a while; an approver
who is neither the requester nor the one who gains the access approves (the binding
``access-ID`` is published through the policy gate, and stops matching at its expiry
on every agent) or denies. Everything the control plane answers is printed escaped."""

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
    fail,
    print_facts,
    print_json,
    print_line,
    print_table,
    resolve_server,
    resolve_token,
)
from trustmesh.cli.credentials import parse_duration
from trustmesh.cli.lifecycle import when

access_app = typer.Typer(
    help="Time-bound access requests: request, list, show, approve, deny.",
    no_args_is_help=True,
)

SUBJECT_KINDS = {"workload": "workload", "spiffeid": "spiffeId", "user": "user"}


def _client(server: str | None, token_file: Path | None) -> ApiClient:
    return ApiClient(resolve_server(server), resolve_token(token_file))


def parse_subject(text: str) -> dict[str, str]:
    """``workload=W``, ``spiffeId=S`` or ``user=U`` -> ``{KIND: VALUE}``."""
    kind, sep, value = text.partition("=")
    known = SUBJECT_KINDS.get(kind.strip().lower())
    if not sep or known is None or not value:
        fail(f"--subject must be workload=NAME, spiffeId=SPIFFE-ID or user=NAME, not {text!r}")
    return {known: value}


def _list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    items = [part.strip() for part in text.split(",")]
    if not all(items):
        fail(f"{option} must be a comma-separated list of names, not {text!r}")
    return items


def countdown(item: dict[str, Any], now: float) -> str:
    """Time left of an approved request (``1h02m``), ``expired`` past it, else empty."""
    if item["state"] == "expired":
        return "expired"
    if item["state"] != "approved" or item.get("expiresAt") is None:
        return ""
    left = int(item["expiresAt"] - now)
    if left <= 0:
        return "expired"
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _subject(item: dict[str, Any]) -> str:
    ((kind, value),) = item["subject"].items()
    return f"{kind}={value}"


def _duration(seconds: int) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@access_app.command("request")
def access_request(
    role: str = typer.Option(..., "--role", help="A GlobalRole of the current policy."),
    subject: str = typer.Option(
        ..., "--subject", help="Who gains the access: workload=W, spiffeId=S or user=U."
    ),
    clusters: str = typer.Option(..., "--clusters", help="Comma-separated cluster names."),
    namespaces: str | None = typer.Option(
        None, "--namespaces", help="Comma-separated namespaces (default: every namespace)."
    ),
    duration: str = typer.Option(
        ..., "--duration", help="How long, from the approval (30m, 2h; at most the role's max)."
    ),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Ask for ROLE for a subject on some clusters, for a while; an approver decides."""
    body: dict[str, Any] = {
        "role": role,
        "subject": parse_subject(subject),
        "clusters": _list(clusters, "--clusters"),
        "duration": parse_duration(duration, "--duration"),
        "reason": reason,
    }
    if namespaces is not None:
        body["namespaces"] = _list(namespaces, "--namespaces")
    result = _client(server, token_file).request("POST", "/v1/access", json=body)
    if output is Output.json:
        print_json(result)
        return
    print_line(result["id"])
    print_line(
        f"access request {result['id']} is pending: {result['role']} for {_subject(result)} "
        f"on {','.join(result['clusters'])} for {_duration(result['duration'])}; an approver "
        f"runs trustmesh access approve {result['id']}",
        err=True,
    )


@access_app.command("list")
def access_list(
    state: str | None = typer.Option(
        None, "--state", help="pending, approved, denied or expired (default: all)."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Access requests, newest first, with the time left of approved ones."""
    params = {"state": state} if state else None
    answer = _client(server, token_file).request("GET", "/v1/access", params=params)
    items: list[dict[str, Any]] = answer["items"]
    if output is Output.json:
        print_json(answer)
        return
    now = time.time()
    print_table(
        ["ID", "STATE", "ROLE", "SUBJECT", "CLUSTERS", "DURATION", "REQUESTER", "DECIDED BY",
         "EXPIRES IN", "REASON"],
        [[i["id"], i["state"], i["role"], _subject(i), ",".join(i["clusters"]),
          _duration(i["duration"]), i["requester"], i["decidedBy"], countdown(i, now),
          i["reason"]] for i in items],
    )  # fmt: skip


@access_app.command("show")
def access_show(
    request_id: str = typer.Argument(..., metavar="ID", help="The request's id (access list)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """One access request: who asked for what and why, who decided and until when."""
    item = _client(server, token_file).request("GET", f"/v1/access/{request_id}")
    if output is Output.json:
        print_json(item)
        return
    print_facts(
        [
            ("id", item["id"]),
            ("state", item["state"]),
            ("role", item["role"]),
            ("subject", _subject(item)),
            ("clusters", ",".join(item["clusters"])),
            ("namespaces", ",".join(item["namespaces"]) if item["namespaces"] else "all"),
            ("duration", _duration(item["duration"])),
            ("requester", item["requester"]),
            ("requested", when(item["createdAt"])),
            ("reason", item["reason"]),
            ("decided by", item["decidedBy"] or ""),
            ("decided", when(item["decidedAt"]) if item["decidedAt"] else ""),
            ("decision reason", item["decisionReason"] or ""),
            ("binding", item["binding"] or ""),
            ("policy revision", item["policyRevision"] or ""),
            ("expires", when(item["expiresAt"]) if item["expiresAt"] else ""),
            ("expires in", countdown(item, time.time())),
        ]
    )


@access_app.command("approve")
def access_approve(
    request_id: str = typer.Argument(..., metavar="ID", help="The request's id (access list)."),
    reason: str | None = typer.Option(None, "--reason", help="Why (recorded in the audit log)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Approve a pending request: its binding is published through the policy gate
    (PolicyTests can veto it) and stops matching at its expiry."""
    body = {"reason": reason} if reason is not None else {}
    item = _client(server, token_file).request(
        "POST", f"/v1/access/{request_id}/approve", json=body
    )
    if output is Output.json:
        print_json(item)
        return
    print_line(
        f"approved: access request {item['id']} ({item['role']} for {_subject(item)}), "
        f"binding {item['binding']} in policy revision {item['policyRevision']}, "
        f"expires {when(item['expiresAt'])}"
    )


@access_app.command("deny")
def access_deny(
    request_id: str = typer.Argument(..., metavar="ID", help="The request's id (access list)."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Deny a pending request."""
    item = _client(server, token_file).request(
        "POST", f"/v1/access/{request_id}/deny", json={"reason": reason}
    )
    if output is Output.json:
        print_json(item)
        return
    print_line(f"denied: access request {item['id']} ({item['role']} for {_subject(item)})")
