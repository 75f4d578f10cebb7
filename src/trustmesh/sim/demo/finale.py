"""The demo's last act: prove the audit log, on screen, with public algorithms only.

Once the traffic ends the agents stop (SIGTERM: each ships what is left in its
spool), then, against the still-running control plane:

1. the latest checkpoint is fetched and its Ed25519 signed note verified with the
   log's verifier key (C2SP signed-note / tlog-checkpoint);
2. every entry and every stored checkpoint is fetched and checked the way
   ``trustmesh audit verify`` does (``audit/verify.py``): each leaf re-hashed, canonical
   JSON of a valid event, agents' sequence numbers without holes, the RFC 6962 tree
   rebuilt and every signed checkpoint's root matched;
3. one entry -- the revocation the demo made -- is proven included with an inclusion
   proof from the server, verified locally against the signed root, and the first
   non-empty checkpoint is proven a prefix of the last with a consistency proof;
4. one request's trace is shown: issuance at the control plane, then the decision at
   the agent of the cluster it called, tied by the W3C trace id the demo sent;
5. no agent's sequence numbers have gaps.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from trustmesh.audit import events as ev
from trustmesh.audit.checkpoint import Checkpoint, verify_checkpoint
from trustmesh.audit.proof import verify_consistency, verify_inclusion
from trustmesh.audit.rfc6962 import leaf_hash
from trustmesh.audit.verify import verify_log
from trustmesh.common.errors import ProofError

CHECKPOINT_WAIT = 10.0


@dataclass
class AuditFinale:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    size: int = 0  # the entries the log held when it was proven


class _Log:
    def __init__(self, http: httpx.Client, server_url: str, admin_token: str) -> None:
        self.http, self.url = http, server_url
        self.headers = {"Authorization": f"Bearer {admin_token}"}

    def get(self, path: str, **params: Any) -> httpx.Response:
        response = self.http.get(self.url + path, params=params, headers=self.headers)
        if response.status_code != 200:
            raise ProofError(f"GET {path}: {response.status_code} {response.text[:200]}")
        return response

    def json(self, path: str, **params: Any) -> Any:
        return self.get(path, **params).json()


def _b64(values: list[str]) -> list[bytes]:
    return [base64.b64decode(v) for v in values]


def latest_checkpoint(log: _Log, key: str, size: int) -> tuple[Checkpoint, str]:
    """The newest checkpoint once it covers ``size`` entries (signed every 0.5 s)."""
    deadline = time.monotonic() + CHECKPOINT_WAIT
    while True:
        note = log.get("/v1/audit/checkpoint").text
        checkpoint = verify_checkpoint(note, key)
        if checkpoint.size >= size or time.monotonic() > deadline:
            return checkpoint, note
        time.sleep(0.1)


def fetch_entries(log: _Log, size: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    while len(entries) < size:
        page = log.json("/v1/audit/entries", start=len(entries), end=size)["entries"]
        if not page:
            break
        entries.extend(page)
    return entries


def fetch_checkpoints(log: _Log) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while True:
        params = {"after": found[-1]["size"]} if found else {}
        page = log.json("/v1/audit/checkpoints", **params)["checkpoints"]
        if not page:
            return found
        found.extend(page)


def run_finale(
    http: httpx.Client,
    server_url: str,
    admin_token: str,
    trace_id: str | None,
    say: Callable[[str], None],
) -> AuditFinale:
    finale = AuditFinale()
    log = _Log(http, server_url, admin_token)
    try:
        _verify(log, trace_id, finale, say)
    except (ProofError, ValueError, KeyError, httpx.HTTPError) as exc:
        finale.problems.append(f"audit verification failed: {exc}")
    return finale


def _verify(
    log: _Log, trace_id: str | None, finale: AuditFinale, say: Callable[[str], None]
) -> None:
    key = log.get("/v1/audit/key").text.strip()
    size = int(log.json("/readyz")["audit_size"])
    finale.size = size
    checkpoint, note = latest_checkpoint(log, key, size)
    say("audit: latest checkpoint (C2SP signed note), signature verified with " + key)
    for line in note.rstrip("\n").splitlines():
        say("    " + line)

    entries = fetch_entries(log, checkpoint.size)
    checkpoints = fetch_checkpoints(log)
    report = verify_log(
        key,
        ((e["index"], base64.b64decode(e["leaf"]), None) for e in entries),
        ((c["size"], c["note"]) for c in checkpoints if c["size"] <= checkpoint.size),
    )
    if not report.ok:
        finale.problems += [f"audit: {p.where}: {p.message}" for p in report.problems]
        return
    if report.verified_size != checkpoint.size:
        finale.problems.append(f"audit: the log was verified only up to {report.verified_size}")
        return
    types = Counter(e["event"]["type"] for e in entries)
    kinds = ", ".join(f"{n} {t}" for t, n in types.most_common())
    finale.lines.append(
        f"audit: all {checkpoint.size} entries re-hashed (RFC 6962) to the signed root "
        f"{checkpoint.root_hash.hex()[:16]}… and all {report.checkpoints_verified} signed "
        f"checkpoints checked ({report.entries_per_second:,.0f} entries/s): {kinds}"
    )

    revocations = [e for e in entries if e["event"]["type"] == ev.REVOCATION_CREATED]
    chosen = (revocations or entries)[-1]
    index = int(chosen["index"])
    proof = log.json("/v1/audit/proof/inclusion", index=index, size=checkpoint.size)
    hashes = _b64(proof["hashes"])
    verify_inclusion(
        leaf_hash(base64.b64decode(chosen["leaf"])),
        index,
        checkpoint.size,
        hashes,
        checkpoint.root_hash,
    )
    finale.lines.append(
        f"audit: inclusion proof verified: entry {index} ({chosen['event']['type']}, "
        f"{_what(chosen['event'])}) is in the tree of size {checkpoint.size} "
        f"({len(hashes)} hashes)"
    )

    # A control plane idle for its first checkpoint interval signs the empty tree; a
    # consistency proof needs 0 < first (RFC 9162 §2.1.4.1), so start from the
    # first checkpoint that holds an entry.
    first = next((c for c in checkpoints if c["size"] > 0), None)
    older = verify_checkpoint(first["note"], key) if first is not None else checkpoint
    if 0 < older.size < checkpoint.size:
        consistency = log.json(
            "/v1/audit/proof/consistency", first=older.size, second=checkpoint.size
        )
        verify_consistency(
            older.size,
            checkpoint.size,
            older.root_hash,
            checkpoint.root_hash,
            _b64(consistency["hashes"]),
        )
        finale.lines.append(
            f"audit: consistency proof verified: the first non-empty checkpoint (size "
            f"{older.size}) is a prefix of the last (size {checkpoint.size})"
        )

    if trace_id:
        path = [e["event"] for e in log.json("/v1/audit/query", trace_id=trace_id)["entries"]]
        if path:
            steps = " -> ".join(_grouped(_step(e) for e in path))
            finale.lines.append(f"audit: trace {trace_id}: {steps}")

    gaps = [
        (s["cluster"], gap) for s in log.json("/v1/audit/sources")["sources"] for gap in s["gaps"]
    ]
    if gaps:
        finale.problems.append(f"agent sequence gaps in the audit log: {gaps}")
    else:
        finale.lines.append("audit: every agent's events arrived, no sequence gaps")


def _grouped(steps: Iterable[str]) -> list[str]:
    """Repeated consecutive steps once, with their count: ``6 times authz.decision …``."""
    grouped: list[tuple[str, int]] = []
    for step in steps:
        if grouped and grouped[-1][0] == step:
            grouped[-1] = (step, grouped[-1][1] + 1)
        else:
            grouped.append((step, 1))
    return [step if n == 1 else f"{n} times {step}" for step, n in grouped]


def _what(event: dict[str, Any]) -> str:
    detail = event.get("detail") or {}
    if event["type"] == ev.REVOCATION_CREATED:
        return f"{detail.get('kind')} {detail.get('value')}, by {event.get('actor')}"
    return str(event.get("actor") or event.get("cluster") or "")


def _step(event: dict[str, Any]) -> str:
    if event["type"] == ev.TOKEN_ISSUED:
        return f"token.issued to {event['identity'].get('workload')} (control plane)"
    if event["type"] == ev.AUTHZ_DECISION:
        decision = event.get("decision") or {}
        verdict = "allowed" if decision.get("allowed") else "denied"
        return f"authz.decision at {event.get('cluster')}: {verdict} ({decision.get('reason')})"
    return f"{event['type']} ({event.get('cluster') or event.get('actor')})"
