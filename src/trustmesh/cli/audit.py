"""``trustmesh audit …`` (DESIGN §6, §7): verify the log, its checkpoints and proofs, and
read it (query, trace, sources).

``verify`` reads the log either through the admin API (online) or straight from the
database (offline, ``--data-dir``), and in both cases trusts only the verifier key:
pinned with ``--key``, derived from the sealed signing key with the master key
(offline), or fetched from the server (online, trust on first use). Everything else
-- entries, hashes, checkpoints, proofs -- is checked, never believed.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.table import Table

from trustmesh.audit import offline
from trustmesh.audit.canonical import format_time
from trustmesh.audit.checkpoint import Checkpoint, verify_checkpoint
from trustmesh.audit.note import Verifier, parse_verifier_key
from trustmesh.audit.offline import Entry
from trustmesh.audit.proof import root_from_inclusion_proof, verify_consistency
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.audit.verify import REWRITTEN, LogVerifier, VerifyReport, narrow_with_proofs
from trustmesh.cli._common import (
    ApiClient,
    CliError,
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    console,
    err_console,
    fail,
    print_json,
    print_table,
    resolve_server,
    resolve_token,
)
from trustmesh.common.errors import CheckpointError, ConfigError, NoteError, ProofError

audit_app = typer.Typer(
    help="The tamper-evident audit log: verify it, its checkpoints and proofs; query it.",
    no_args_is_help=True,
)

PAGE = 1000
"""The most entries, checkpoints or query results the server returns per call."""

NARROW_LIMIT = 2000
"""Online, a rewritten range up to this many entries is narrowed with inclusion proofs
(one request per entry)."""

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
            fail(f"cannot reach {self.server}: {exc.__class__.__name__}: {exc}".rstrip(": "))
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


def _client(server: str | None, token_file: Path | None) -> AuditClient:
    return AuditClient(resolve_server(server), resolve_token(token_file))


# -- keys and checkpoints -------------------------------------------------------------------
def _parse_key(text: str, where: str) -> Verifier:
    try:
        return parse_verifier_key(text.strip())
    except NoteError as exc:
        fail(f"{where} is not a verifier key: {exc}")


def _pinned_key(value: str) -> Verifier:
    """``--key``: the key itself, or a file that holds it."""
    path = Path(value).expanduser()
    if "+" not in value and path.is_file():
        try:
            return _parse_key(path.read_text(), f"--key file {path}")
        except OSError as exc:
            fail(f"cannot read --key file {path}: {exc.strerror}")
    return _parse_key(value, "--key")


def _key(client: AuditClient, pinned: str | None) -> tuple[Verifier, str]:
    """The verifier key and where it came from."""
    if pinned:
        return _pinned_key(pinned), "pinned with --key"
    return _parse_key(client.text("/v1/audit/key"), "the server's /v1/audit/key"), "from the server"


def _latest_checkpoint(client: AuditClient, verifier: Verifier) -> tuple[Checkpoint, str]:
    note = client.text("/v1/audit/checkpoint")
    try:
        return verify_checkpoint(note, verifier), note
    except CheckpointError as exc:
        fail(f"the latest checkpoint does not verify with {verifier.name}: {exc}")


def _online_checkpoints(client: AuditClient) -> list[tuple[int, str]]:
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


def _signed_checkpoint_at(client: AuditClient, verifier: Verifier, size: int) -> Checkpoint:
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


# -- reading entries ------------------------------------------------------------------------
def _b64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        fail(f"{what} is not base64")


def _entry_page(client: AuditClient, start: int, end: int) -> list[dict[str, Any]]:
    page = client.get("/v1/audit/entries", start=start, end=end).get("entries")
    if not isinstance(page, list):
        fail("/v1/audit/entries did not answer a list of entries")
    for item in page:
        if not isinstance(item, dict) or not isinstance(item.get("index"), int):
            fail("/v1/audit/entries answered an entry without an index")
    return page


def _online_entries(client: AuditClient, at_least: int) -> Iterator[Entry]:
    """Every entry, page by page, until a page comes back empty past ``at_least`` (the
    latest checkpoint's size: a run of missing entries before it is not the end)."""
    start = 0
    while True:
        page = _entry_page(client, start, start + PAGE)
        if not page:
            if start >= at_least:
                return
            start += PAGE
            continue
        for item in page:
            leaf = _b64(item.get("leaf"), f"entry {item['index']}'s leaf")
            yield item["index"], leaf, None, None
        start = page[-1]["index"] + 1


def _online_proof(client: AuditClient, index: int, size: int) -> list[bytes]:
    try:
        body = client.get("/v1/audit/proof/inclusion", index=index, size=size)
    except CliError as exc:
        raise ProofError(str(exc)) from None
    return [_b64(h, "a proof hash") for h in body.get("hashes") or []]


def _narrow_online(
    client: AuditClient, verifier: LogVerifier, report: VerifyReport
) -> VerifyReport:
    """Name the entries of each rewritten range whose inclusion proofs fail, when the
    server's tree still holds the signed hashes (a database altered under it)."""
    for problem in list(report.problems):
        if problem.kind != REWRITTEN or problem.index is None or problem.end is None:
            continue
        if problem.end - problem.index > NARROW_LIMIT:
            continue
        checkpoint = verifier.checkpoints[problem.end]
        leaves: list[tuple[int, bytes]] = []
        for start in range(problem.index, problem.end, PAGE):
            for item in _entry_page(client, start, min(start + PAGE, problem.end)):
                leaves.append((item["index"], _b64(item.get("leaf"), "a leaf")))
        narrowed = narrow_with_proofs(
            problem, checkpoint, leaves, partial(_online_proof, client, size=checkpoint.size)
        )
        if narrowed is not None:
            report = report.replacing(problem, narrowed)
    return report


# -- verify ---------------------------------------------------------------------------------
def _where_list(report: VerifyReport) -> str:
    shown = [f"{p.where} ({p.kind})" for p in report.problems[:8]]
    more = report.problem_count - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _print_report(
    report: VerifyReport,
    verifier: Verifier,
    key_source: str,
    origin_of_entries: str,
    elapsed: float,
) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    summary.add_row("log", f"{report.origin} ({origin_of_entries})")
    summary.add_row("key", f"{verifier} ({key_source})")
    summary.add_row(
        "entries",
        f"{report.entries} read, log size {report.size}: each leaf hashed again and checked "
        "as the canonical JSON of a valid event",
    )
    summary.add_row(
        "checkpoints",
        f"{report.checkpoints} stored, {report.checkpoints_verified} signed and matching the tree",
    )
    covered = f"the tree matches the signed checkpoints up to size {report.verified_size}"
    if report.ok and report.unsigned:
        covered += f"; the {report.unsigned} entries after it are not signed yet"
    summary.add_row("covered", covered)
    summary.add_row(
        "speed",
        f"{report.entries_per_second:,.0f} entries/s verifying ({report.seconds:.2f} s; "
        f"{elapsed:.2f} s in all)",
    )
    console.print(summary)
    if report.ok:
        console.print("[bold green]OK[/]: every entry and checkpoint verifies")
        return
    rows = [[p.where, p.kind, p.message] for p in report.problems]
    print_table(["WHERE", "PROBLEM", "DETAIL"], rows, title="Problems")
    if report.problem_count > len(report.problems):
        console.print(
            f"… and {report.problem_count - len(report.problems)} more "
            "(raise --max-problems to see them)"
        )


@audit_app.command("verify")
def verify(
    key: str | None = KeyOption,
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Verify offline: read the server's database (and master key) in this data dir.",
    ),
    db: str | None = typer.Option(
        None, "--db", help="Verify offline: the server's --db URL, when it is not SQLite."
    ),
    max_problems: int = typer.Option(100, "--max-problems", help="How many problems to list."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Recompute the whole tree and check every entry and checkpoint; exit 1 naming
    every changed, dropped, duplicated or reordered record."""
    if max_problems < 1:
        fail("--max-problems must be at least 1")
    started = time.perf_counter()
    warnings: list[str] = []
    client: AuditClient | None = None
    entries: Iterator[Entry]
    if data_dir is not None or db:
        try:
            engine = offline.open_engine(data_dir, db)
            stored_log = offline.read_log(engine, data_dir, _pinned_key(key) if key else None)
        except ConfigError as exc:
            fail(exc.description)
        log_key, checkpoints = stored_log.verifier, stored_log.checkpoints
        entries = stored_log.entries
        warnings.extend(stored_log.warnings)
        key_source = "pinned with --key" if key else "derived from the sealed signing key"
        mode = f"offline, {engine.url.render_as_string(hide_password=True)}"
        at_least = 0
    else:
        client = _client(server, token_file)
        log_key, key_source = _key(client, key)
        latest, _ = _latest_checkpoint(client, log_key)
        checkpoints = _online_checkpoints(client)
        at_least = latest.size
        entries = _online_entries(client, at_least)
        mode = f"online, {client.server}"
    for warning in warnings:
        err_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
    verifier = LogVerifier(log_key, checkpoints, max_problems=max_problems)
    for index, leaf, stored, columns in entries:
        verifier.add(index, leaf, stored)
        if columns is not None:
            verifier.check_columns(index, leaf, columns)
    report = verifier.finish()
    if client is not None and not report.ok:
        report = _narrow_online(client, verifier, report)
    elapsed = time.perf_counter() - started
    if output is Output.json:
        print_json(
            {
                **report.to_json(),
                "mode": mode,
                "key": str(log_key),
                "key_source": key_source,
                "warnings": warnings,
                "elapsed_seconds": round(elapsed, 3),
            }
        )
    else:
        _print_report(report, log_key, key_source, mode, elapsed)
    if not report.ok:
        fail(
            f"audit log verification failed: {report.problem_count} problem(s): {_where_list(report)}"
        )


# -- checkpoint and proofs ------------------------------------------------------------------
@audit_app.command("checkpoint")
def checkpoint(
    key: str | None = KeyOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Fetch the latest signed checkpoint, verify its signature, print what it commits to."""
    client = _client(server, token_file)
    verifier, key_source = _key(client, key)
    latest, note = _latest_checkpoint(client, verifier)
    if output is Output.json:
        print_json(
            {
                "origin": latest.origin,
                "size": latest.size,
                "root_hash": base64.b64encode(latest.root_hash).decode(),
                "key": str(verifier),
                "key_source": key_source,
                "note": note,
            }
        )
        return
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    summary.add_row("origin", latest.origin)
    summary.add_row("size", str(latest.size))
    summary.add_row("root", base64.b64encode(latest.root_hash).decode())
    summary.add_row("key", f"{verifier} ({key_source})")
    summary.add_row("signature", "verified (C2SP signed note, Ed25519)")
    console.print(summary)


def _check_size(value: int | None, name: str, minimum: int) -> None:
    if value is not None and value < minimum:
        fail(f"{name} must be at least {minimum}, got {value}")


@audit_app.command("proof")
def proof(
    index: int | None = typer.Option(None, "--index", help="Prove that entry INDEX is in the log."),
    size: int | None = typer.Option(
        None, "--size", help="With --index: in the tree of SIZE entries (default: the latest)."
    ),
    first: int | None = typer.Option(
        None, "--first", help="Prove that the log at --second extends the log at FIRST."
    ),
    second: int | None = typer.Option(
        None, "--second", help="With --first: the later size (default: the latest checkpoint)."
    ),
    key: str | None = KeyOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Fetch an inclusion (--index) or consistency (--first/--second) proof and verify it
    here against the signed checkpoint."""
    if (index is None) == (first is None):
        fail("give --index I [--size S] for an inclusion proof, or --first A [--second B]")
    if index is None and size is not None:
        fail("--size goes with --index; a consistency proof takes --first and --second")
    if first is None and second is not None:
        fail("--second goes with --first")
    _check_size(index, "--index", 0)
    _check_size(size, "--size", 1)
    _check_size(first, "--first", 1)
    _check_size(second, "--second", 1)
    client = _client(server, token_file)
    verifier, key_source = _key(client, key)
    latest, _ = _latest_checkpoint(client, verifier)
    if index is not None:
        result = _inclusion(client, latest, index, size)
    else:
        assert first is not None
        result = _consistency(client, verifier, latest, first, second)
    result["key"] = str(verifier)
    result["key_source"] = key_source
    if output is Output.json:
        print_json(result)
        return
    console.print(f"[bold green]verified[/]: {result['statement']}")
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    shown = ["index", "size", "leaf_hash", "event", "root_hash"]
    shown += ["first", "first_root", "second", "second_root"]
    for name in shown:
        if name in result:
            value = result[name]
            if isinstance(value, dict):
                value = f"{value.get('type')} at {value.get('time')} ({value.get('event_id')})"
            summary.add_row(name.replace("_", " "), str(value))
    summary.add_row("proof", f"{len(result['hashes'])} hashes")
    summary.add_row("checkpoint", f"size {latest.size}, signature verified")
    summary.add_row("key", f"{verifier} ({key_source})")
    console.print(summary)


def _inclusion(
    client: AuditClient, latest: Checkpoint, index: int, size: int | None
) -> dict[str, Any]:
    tree_size = latest.size if size is None else size
    if tree_size > latest.size:
        fail(f"size {tree_size} is beyond the latest signed checkpoint ({latest.size} entries)")
    if index >= tree_size:
        fail(f"entry {index} is not in a tree of {tree_size} entries")
    page = _entry_page(client, index, index + 1)
    if not page or page[0]["index"] != index:
        fail(f"entry {index} is not in the log")
    leaf = _b64(page[0].get("leaf"), f"entry {index}'s leaf")
    body = client.get("/v1/audit/proof/inclusion", index=index, size=tree_size)
    hashes = [_b64(h, "a proof hash") for h in body.get("hashes") or []]
    try:
        root = root_from_inclusion_proof(leaf_hash(leaf), index, tree_size, hashes)
    except ProofError as exc:
        fail(f"the inclusion proof of entry {index} is malformed: {exc}")
    consistency: list[bytes] = []
    if tree_size == latest.size:
        if root != latest.root_hash:
            fail(
                f"entry {index} is not in the signed log: its inclusion proof does not lead "
                f"to the root of the checkpoint at size {latest.size}"
            )
    else:
        consistency = _consistency_hashes(client, tree_size, latest.size)
        try:
            verify_consistency(tree_size, latest.size, root, latest.root_hash, consistency)
        except ProofError as exc:
            fail(
                f"entry {index} is not in the signed log: the root its proof gives at size "
                f"{tree_size} is not a prefix of the checkpoint at size {latest.size} ({exc})"
            )
    via = "" if not consistency else f" (consistent with the checkpoint at size {latest.size})"
    return {
        "verified": True,
        "statement": f"entry {index} is in the log of {tree_size} entries{via}",
        "index": index,
        "size": tree_size,
        "leaf_hash": leaf_hash(leaf).hex(),
        "root_hash": base64.b64encode(root).decode(),
        "hashes": [base64.b64encode(h).decode() for h in hashes],
        "consistency": [base64.b64encode(h).decode() for h in consistency],
        "checkpoint": {
            "size": latest.size,
            "root_hash": base64.b64encode(latest.root_hash).decode(),
        },
        "event": page[0].get("event"),
    }


def _consistency_hashes(client: AuditClient, first: int, second: int) -> list[bytes]:
    body = client.get("/v1/audit/proof/consistency", first=first, second=second)
    return [_b64(h, "a proof hash") for h in body.get("hashes") or []]


def _consistency(
    client: AuditClient, verifier: Verifier, latest: Checkpoint, first: int, second: int | None
) -> dict[str, Any]:
    later = latest.size if second is None else second
    if later > latest.size:
        fail(f"--second {later} is beyond the latest signed checkpoint ({latest.size} entries)")
    if first > later:
        fail(f"--first {first} is larger than --second {later}")
    old = _signed_checkpoint_at(client, verifier, first)
    new = latest if later == latest.size else _signed_checkpoint_at(client, verifier, later)
    hashes = _consistency_hashes(client, first, later)
    try:
        verify_consistency(first, later, old.root_hash, new.root_hash, hashes)
    except ProofError as exc:
        fail(f"the log at size {later} does not extend the log at size {first}: {exc}")
    return {
        "verified": True,
        "statement": f"the signed log at size {later} extends the signed log at size {first}",
        "first": first,
        "second": later,
        "first_root": base64.b64encode(old.root_hash).decode(),
        "second_root": base64.b64encode(new.root_hash).decode(),
        "hashes": [base64.b64encode(h).decode() for h in hashes],
    }


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


@audit_app.command("query")
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
    source: str | None = typer.Option(None, "--source", help="An agent spool id."),
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
    entries, cursor = _query(_client(server, token_file), filters, limit, after)
    if output is Output.json:
        print_json({"entries": entries, "next": cursor})
        return
    table = Table(header_style="bold")
    for column in ("INDEX", "TIME", "TYPE"):
        table.add_column(column, no_wrap=True)
    for column in ("CLUSTER", "IDENTITY", "DECISION", "DETAIL"):
        table.add_column(column, overflow="fold")
    for row in _event_rows(entries):
        table.add_row(*["" if cell is None else str(cell) for cell in row])
    console.print(table)
    more = f"; more after index {cursor} (--after {cursor})" if cursor is not None else ""
    console.print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}{more}")


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


@audit_app.command("trace")
def trace(
    trace_id: str = typer.Argument(..., help="The W3C trace id (32 hex) of a traceparent."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Every event of one trace, in time order: issuance → decision → access."""
    trace = _trace_id(trace_id)
    entries, _ = _query(_client(server, token_file), {"trace_id": trace}, 100_000, None)
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
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


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


@audit_app.command("sources")
def sources(
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Each agent spool's sequence state: the next number expected and the gaps seen."""
    found = _client(server, token_file).get("/v1/audit/sources").get("sources") or []
    if output is Output.json:
        print_json(found)
        return
    rows = [
        [
            s.get("source"),
            s.get("cluster"),
            s.get("agent"),
            s.get("next_seq"),
            _when(s.get("last_seen")),
            _gaps(s.get("gaps")) or "none",
        ]
        for s in found
    ]
    print_table(["SOURCE", "CLUSTER", "AGENT", "NEXT SEQ", "LAST SEEN", "GAPS"], rows)
