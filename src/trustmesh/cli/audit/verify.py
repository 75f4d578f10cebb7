"""``trustmesh audit verify|checkpoint|proof`` (DESIGN §6, §7): verify the log, its
latest signed checkpoint, and inclusion or consistency proofs.

``verify`` reads the log either through the admin API (online) or straight from the
database (offline, ``--data-dir``, through :mod:`trustmesh.audit.offline`), and in both
cases trusts only the verifier key: pinned with ``--key``, derived from the sealed
signing key with the master key (offline), or fetched from the server (online, trust on
first use). Everything else -- entries, hashes, checkpoints, proofs -- is checked, never
believed.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text

from trustmesh.audit.checkpoint import Checkpoint
from trustmesh.audit.note import Verifier
from trustmesh.audit.proof import root_from_inclusion_proof, verify_consistency
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.audit.verify import REWRITTEN, LogVerifier, VerifyReport, narrow_with_proofs
from trustmesh.cli._common import (
    CliError,
    Output,
    OutputOption,
    ServerOption,
    TokenFileOption,
    cell,
    console,
    fail,
    print_facts,
    print_json,
    print_line,
    print_table,
)
from trustmesh.cli.audit._shared import (
    PAGE,
    AuditClient,
    KeyOption,
    audit_client,
    latest_checkpoint,
    list_checkpoints,
    pinned_key,
    resolve_key,
    signed_checkpoint_at,
)
from trustmesh.common.errors import ConfigError, ProofError

if TYPE_CHECKING:  # the offline reader (SQLAlchemy) is imported by verify --data-dir only
    from trustmesh.audit.offline import Entry

NARROW_LIMIT = 2000
"""Online, a rewritten range up to this many entries is narrowed with inclusion proofs
(one request per entry)."""


# -- reading entries online -----------------------------------------------------------------
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
    covered = f"the tree matches the signed checkpoints up to size {report.verified_size}"
    if report.ok and report.unsigned:
        covered += f"; the {report.unsigned} entries after it are not signed yet"
    print_facts(
        [
            ("log", f"{report.origin} ({origin_of_entries})"),
            ("key", f"{verifier} ({key_source})"),
            (
                "entries",
                f"{report.entries} read, log size {report.size}: each leaf hashed again and "
                "checked as the canonical JSON of a valid event",
            ),
            (
                "checkpoints",
                f"{report.checkpoints} stored, {report.checkpoints_verified} signed and "
                "matching the tree",
            ),
            ("covered", covered),
            (
                "speed",
                f"{report.entries_per_second:,.0f} entries/s verifying ({report.seconds:.2f} s; "
                f"{elapsed:.2f} s in all)",
            ),
        ]
    )
    if report.ok:
        console.print(Text.assemble(("OK", "bold green"), ": every entry and checkpoint verifies"))
        return
    rows = [[p.where, p.kind, p.message] for p in report.problems]
    print_table(["WHERE", "PROBLEM", "DETAIL"], rows, title="Problems")
    if report.problem_count > len(report.problems):
        print_line(
            f"… and {report.problem_count - len(report.problems)} more "
            "(raise --max-problems to see them)"
        )


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
        from trustmesh.audit import offline

        try:
            engine = offline.open_engine(data_dir, db)
            stored_log = offline.read_log(engine, data_dir, pinned_key(key) if key else None)
        except ConfigError as exc:
            fail(exc.description)
        log_key, checkpoints = stored_log.verifier, stored_log.checkpoints
        entries = stored_log.entries
        warnings.extend(stored_log.warnings)
        key_source = "pinned with --key" if key else "derived from the sealed signing key"
        mode = f"offline, {engine.url.render_as_string(hide_password=True)}"
        at_least = 0
    else:
        client = audit_client(server, token_file)
        log_key, key_source = resolve_key(client, key)
        latest, _ = latest_checkpoint(client, log_key)
        checkpoints = list_checkpoints(client)
        at_least = latest.size
        entries = _online_entries(client, at_least)
        mode = f"online, {client.server}"
    for warning in warnings:
        print_line(f"warning: {warning}", err=True)
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
def checkpoint(
    key: str | None = KeyOption,
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
    output: Output = OutputOption,
) -> None:
    """Fetch the latest signed checkpoint, verify its signature, print what it commits to."""
    client = audit_client(server, token_file)
    verifier, key_source = resolve_key(client, key)
    latest, note = latest_checkpoint(client, verifier)
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
    print_facts(
        [
            ("origin", latest.origin),
            ("size", latest.size),
            ("root", base64.b64encode(latest.root_hash).decode()),
            ("key", f"{verifier} ({key_source})"),
            ("signature", "verified (C2SP signed note, Ed25519)"),
        ]
    )


def _check_size(value: int | None, name: str, minimum: int) -> None:
    if value is not None and value < minimum:
        fail(f"{name} must be at least {minimum}, got {value}")


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
    client = audit_client(server, token_file)
    verifier, key_source = resolve_key(client, key)
    latest, _ = latest_checkpoint(client, verifier)
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
    console.print(Text.assemble(("verified", "bold green"), ": ", cell(result["statement"])))
    facts: list[tuple[str, Any]] = []
    shown = ["index", "size", "leaf_hash", "event", "root_hash"]
    shown += ["first", "first_root", "second", "second_root"]
    for name in shown:
        if name in result:
            value = result[name]
            if isinstance(value, dict):
                value = f"{value.get('type')} at {value.get('time')} ({value.get('event_id')})"
            facts.append((name.replace("_", " "), value))
    facts.append(("proof", f"{len(result['hashes'])} hashes"))
    facts.append(("checkpoint", f"size {latest.size}, signature verified"))
    facts.append(("key", f"{verifier} ({key_source})"))
    print_facts(facts)


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
    old = signed_checkpoint_at(client, verifier, first)
    new = latest if later == latest.size else signed_checkpoint_at(client, verifier, later)
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
