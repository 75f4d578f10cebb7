"""``trustmesh audit query|trace|sources`` (DESIGN §6, §7): read the log through the
admin API -- entries matching filters, every event of one W3C trace, and each agent
spool's sequence state -- and print them for people (tables) or scripts (``-o json``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from trustmesh.audit.canonical import format_time
from trustmesh.cli._common import (
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    cell,
    console,
    fail,
    print_json,
    print_line,
    print_table,
)
from trustmesh.cli.audit._shared import PAGE, AuditClient, audit_client

# -- query, trace, sources ------------------------------------------------------------------
_AGE = re.compile(r"(\d{1,9})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def _time_bound(value: str, name: str, now: datetime | None = None) -> str:
    """``--since``/``--until``: RFC 3339, a date, or an age (``15m``, ``2h``, ``7d``), as
    the event time format the server compares."""
    text = value.strip()
    age = _AGE.fullmatch(text)
    if age:
        moment = (now or datetime.now(UTC)) - timedelta(**{_UNITS[age[2]]: int(age[1])})
        return format_time(moment)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(
            f"{name} {value!r} is not a time: use RFC 3339 (2026-11-29T05:20:00Z), a date "
            "(2026-11-29) or an age (15m, 2h, 7d)"
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_time(moment)


def _trace_id(value: str) -> str:
    trace = value.strip().lower()
    if not _TRACE_ID.fullmatch(trace):
        fail(f"trace id {value!r} is not 32 hex digits (the W3C trace-id of a traceparent)")
    return trace


def _query(client: AuditClient, filters: dict[str, Any], limit: int, after: int | None) -> Any:
    """Up to ``limit`` matching entries, page by page; returns them and the next cursor."""
    found: list[dict[str, Any]] = []
    cursor = after
    while len(found) < limit:
        params = {**filters, "limit": min(PAGE, limit - len(found))}
        if cursor is not None:
            params["after"] = cursor
        body = client.get("/v1/audit/query", **params)
        page = body.get("entries") or []
        found.extend(page)
        cursor = body.get("next")
        if cursor is None or not page:
            break
    return found, cursor


def _describe_request(request: Any) -> str:
    """What was asked, in one short phrase."""
    if not isinstance(request, dict):
        return ""
    surface = request.get("surface")
    if "host" in request or "method" in request:
        text = f"{request.get('method', '')} {request.get('host', '')}{request.get('path', '')}"
    elif "nonResourceURL" in request:
        text = f"{request.get('verb', '')} {request['nonResourceURL']}"
    elif "resource" in request:
        resource = "/".join(
            str(part)
            for part in (
                request.get("apiGroup"),
                request.get("resource"),
                request.get("subresource"),
            )
            if part
        )
        name = f"/{request['name']}" if request.get("name") else ""
        where = f" in {request['namespace']}" if request.get("namespace") else ""
        text = f"{request.get('verb', '')} {resource}{name}{where}"
    elif request.get("audiences"):
        text = "authenticate for " + ", ".join(str(a) for a in request["audiences"])
    elif request.get("audience"):
        audience = request["audience"]
        text = "token for " + (", ".join(audience) if isinstance(audience, list) else str(audience))
    else:
        text = ", ".join(f"{k}={v}" for k, v in request.items() if k != "surface")
    text = text.strip()
    if surface and surface != "token":
        return f"{text} ({surface})" if text else str(surface)
    return text


def _subject(event: dict[str, Any]) -> str:
    identity = event.get("identity") or {}
    return str(identity.get("spiffe_id") or event.get("actor") or "")


def _decision(event: dict[str, Any]) -> tuple[str, str]:
    decision = event.get("decision") or {}
    allowed = decision.get("allowed")
    verdict = "" if allowed is None else ("allow" if allowed else "deny")
    return verdict, str(decision.get("reason") or "")


def _short_detail(event: dict[str, Any]) -> str:
    reason = _decision(event)[1]
    if reason:
        return reason
    request = _describe_request(event.get("request"))
    if request:
        return request
    detail = event.get("detail") or {}
    # Short scalar facts only: hashes and nested documents are for -o json.
    facts = [
        f"{k}={v}"
        for k, v in detail.items()
        if not isinstance(v, dict | list) and len(str(v)) <= 40 and not k.endswith("sha256")
    ]
    return ", ".join(facts[:4])


def _event_rows(entries: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for entry in entries:
        event = entry.get("event") or {}
        rows.append(
            [
                entry.get("index"),
                event.get("time"),
                event.get("type"),
                event.get("cluster"),
                _subject(event),
                _decision(event)[0],
                _short_detail(event)[:120],
            ]
        )
    return rows


def query(
    identity: str | None = typer.Option(
        None, "--identity", "--subject", help="SPIFFE ID (or actor such as admin:NAME)."
    ),
    cluster: str | None = typer.Option(None, "--cluster", help="Where it happened."),
    type_: str | None = typer.Option(
        None, "--type", help="Event type: token.issued, authz.decision, policy.published…"
    ),
    since: str | None = typer.Option(
        None, "--since", help="From this time on: RFC 3339, a date, or an age (15m, 2h, 7d)."
    ),
    until: str | None = typer.Option(None, "--until", help="Before this time (same forms)."),
    decision: str | None = typer.Option(None, "--decision", help="allow or deny."),
    trace_id: str | None = typer.Option(None, "--trace-id", help="W3C trace id (32 hex)."),
    source: str | None = typer.Option(
        None, "--source", help="An agent's source, CLUSTER/AGENT/SPOOL (see audit sources)."
    ),
    limit: int = typer.Option(100, "--limit", help="At most this many entries."),
    after: int | None = typer.Option(
        None, "--after", help="Only entries after this index (the 'next' of a previous page)."
    ),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Entries matching every filter given, in log order."""
    if not 1 <= limit <= 100_000:
        fail(f"--limit must be between 1 and 100000, got {limit}")
    if after is not None and after < 0:
        fail(f"--after must be an index (0 or more), got {after}")
    if decision is not None and decision not in ("allow", "deny"):
        fail(f"--decision must be allow or deny, got {decision!r}")
    filters: dict[str, Any] = {
        "subject": identity,
        "cluster": cluster,
        "type": type_,
        "decision": decision,
        "source": source,
        "trace_id": _trace_id(trace_id) if trace_id else None,
        "since": _time_bound(since, "--since") if since else None,
        "until": _time_bound(until, "--until") if until else None,
    }
    filters = {k: v for k, v in filters.items() if v is not None}
    entries, cursor = _query(audit_client(server, token_file), filters, limit, after)
    if output is Output.json:
        print_json({"entries": entries, "next": cursor})
        return
    table = Table(header_style="bold")
    for column in ("INDEX", "TIME", "TYPE"):
        table.add_column(column, no_wrap=True)
    for column in ("CLUSTER", "IDENTITY", "DECISION", "DETAIL"):
        table.add_column(column, overflow="fold")
    for row in _event_rows(entries):
        table.add_row(*[cell(value) for value in row])
    console.print(table)
    more = f"; more after index {cursor} (--after {cursor})" if cursor is not None else ""
    print_line(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}{more}")


_STEPS = {
    "token.issued": "issuance",
    "token.exchange_failed": "issuance refused",
    "authz.decision": "decision",
}


def _path_segment(event: dict[str, Any]) -> list[str]:
    """The steps one event adds to a trace's path: issuance → decision → access."""
    kind = str(event.get("type"))
    cluster = event.get("cluster") or "?"
    if kind == "token.issued":
        identity = event.get("identity") or {}
        origin = identity.get("origin_cluster") or cluster
        return [f"issuance from {origin}"]
    if kind == "token.exchange_failed":
        detail = event.get("detail") or {}
        return [f"issuance refused ({detail.get('error', 'error')})"]
    if kind == "authz.decision":
        verdict, _ = _decision(event)
        request = _describe_request(event.get("request"))
        if verdict == "allow":
            return [f"decision in {cluster}: allow", f"access {request}".strip()]
        return [f"decision in {cluster}: {verdict or '?'}", f"no access to {request}".strip()]
    return [kind]


def _trace_step(number: int, entry: dict[str, Any]) -> list[str]:
    """One event of a trace: a heading line, then what it is about."""
    event = entry.get("event") or {}
    kind = str(event.get("type"))
    step = _STEPS.get(kind, kind)
    cluster = event.get("cluster") or "-"
    lines = [
        f"{number:>2}  {step:<16} {event.get('time')}  cluster {cluster}  "
        f"(index {entry.get('index')})"
    ]
    facts = [("identity", _subject(event)), ("request", _describe_request(event.get("request")))]
    verdict, reason = _decision(event)
    if verdict:
        revision = (event.get("decision") or {}).get("policy_revision")
        at = f" (policy revision {revision})" if revision is not None else ""
        facts.append(("decision", f"{verdict}: {reason}{at}" if reason else verdict + at))
    identity = event.get("identity") or {}
    if identity.get("origin_cluster") and identity.get("origin_cluster") != cluster:
        facts.append(("origin", str(identity["origin_cluster"])))
    lines.extend(f"    {name:<9} {value}" for name, value in facts if value)
    return lines


def trace(
    trace_id: str = typer.Argument(..., help="The W3C trace id (32 hex) of a traceparent."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Every event of one trace, in time order: issuance → decision → access."""
    trace = _trace_id(trace_id)
    entries, _ = _query(audit_client(server, token_file), {"trace_id": trace}, 100_000, None)
    if not entries:
        fail(f"no audit event carries trace id {trace}")
    entries.sort(key=lambda e: (str((e.get("event") or {}).get("time")), e.get("index", 0)))
    path = [step for e in entries for step in _path_segment(e.get("event") or {})]
    if output is Output.json:
        print_json({"trace_id": trace, "path": path, "entries": entries})
        return
    lines = [f"trace {trace}: " + " → ".join(path), ""]
    for number, entry in enumerate(entries, 1):
        lines.extend(_trace_step(number, entry))
    for line in lines:  # a newline inside a value shows as \n, never as a line of its own
        print_line(line)


def _gaps(gaps: Any) -> str:
    spans = []
    for gap in gaps or []:
        first, last = gap
        spans.append(str(first) if first == last else f"{first}-{last}")
    return ", ".join(spans)


def _when(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def sources(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Each agent source's sequence state (CLUSTER/AGENT/SPOOL: the spool of an agent
    credential): the next number expected and the gaps seen."""
    found = audit_client(server, token_file).get("/v1/audit/sources").get("sources") or []
    if output is Output.json:
        print_json(found)
        return
    rows = [
        [
            s.get("cluster"),
            s.get("agent"),
            str(s.get("source", "")).rsplit("/", 1)[-1],  # the spool: cluster and agent shown
            s.get("next_seq"),
            _when(s.get("last_seen")),
            _gaps(s.get("gaps")) or "none",
        ]
        for s in found
    ]
    print_table(["CLUSTER", "AGENT", "SPOOL", "NEXT SEQ", "LAST SEEN", "GAPS"], rows)
