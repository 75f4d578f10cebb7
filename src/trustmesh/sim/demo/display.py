"""Everything the demo prints: the live table or the plain event lines, the header and
summary lines, the lines about the policy change, the revocation and the rotation, the
mesh act's table and lines, the event texts the traffic and the operator report, and
the final summary.

Rendering only: it reads the scoreboard and never changes it. What the servers answered
(decision reasons, key ids, error messages) is printed as plain ``Text`` with every
character that is not printable escaped (``common/terminal.py``): never as markup, never
as terminal escapes."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography import x509
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trustmesh.common.terminal import printable
from trustmesh.sim.demo.scenario import (
    MESH_BY_NAME,
    MESH_SERVER,
    REVOKED_WORKLOAD,
    ROGUE_CLUSTER,
    SUSPENDED_WORKLOAD,
    TRUST_DOMAIN,
)
from trustmesh.sim.demo.scoreboard import (
    MeshCutOff,
    MeshFlow,
    MeshRun,
    PolicyChange,
    RevocationRun,
    Scoreboard,
)

SUMMARY_INTERVAL = 2.0  # seconds between summary lines in plain mode


class Events(Protocol):
    """Where the traffic and the operator report what happened (a display)."""

    def event(self, text: str) -> None: ...


# -- event texts ----------------------------------------------------------------------------


def decision_detail(body: dict[str, Any]) -> str:
    """Why, in a few words: the deciding RoleBinding, or the default deny."""
    bindings = body.get("bindings") or []
    if body.get("denied") is True and bindings:
        return f"explicit deny: RoleBinding {bindings[0]}"
    if body.get("allowed") is True and bindings:
        return f"RoleBinding {bindings[0]}"
    if body.get("allowed") is not True:
        return "default deny: no RoleBinding allows this request"
    return str(body.get("reason"))


def short_decision(body: dict[str, Any]) -> str:
    """For the table: ``r2 allow ledger-writers``, ``r1 default deny``."""
    bindings = body.get("bindings") or []
    if body.get("allowed") is True:
        what = f"allow {bindings[0]}" if bindings else "allow"
    else:
        what = f"deny {bindings[0]}" if body.get("denied") is True and bindings else "default deny"
    return f"r{body.get('policy_revision')} {what}"[:34]


def short_kid(kid: str) -> str:
    """A kid as the table and the event lines show it: its first ten characters."""
    return kid[:10] if kid else "-"


def revocation_text(run: RevocationRun) -> str:
    cut = ", ".join(f"{target} after {seconds:.2f} s" for target, seconds in run.cut_off.items())
    return (
        f"revoked workload {run.workload} (reason: {run.reason}): cut off at {cut} "
        f"(revocation revision {run.revision}, in force at all {len(run.agent_revisions)} "
        f"agents; its token was accepted everywhere just before; {run.probes} presentations, "
        f"{len(run.cut_off)} refused)"
    )


def resumed_text(run: RevocationRun) -> str:
    again = ", ".join(f"{target} after {run.resumed[target]:.2f} s" for target in run.targets)
    return (
        f"{run.workload} re-issued a token after the revocation: accepted again at {again} "
        "(new JWT-SVIDs, issued after the revocation's second)"
    )


def propagation_text(change: PolicyChange) -> str:
    agents = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in change.per_agent.items())
    return (
        f"policy revision {change.new_revision} in force at all {len(change.per_agent)} "
        f"agents after {change.propagation or 0:.2f} s ({agents})"
    )


def short_serial(serial: str) -> str:
    """A certificate serial (hex) as the lines show it: its first ten digits."""
    return serial[:10] if serial else "-"


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%H:%M:%SZ")


def possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def claim_headers_text(claims: dict[str, str]) -> str:
    inner = ", ".join(f"{name}={value}" for name, value in sorted(claims.items()))
    return f"x-trustmesh-claim-{{{inner}}}" if claims else "no claim headers"


def mesh_allowed_text(flow: MeshFlow, seen: dict[str, Any]) -> str:
    certificate = seen.get("client_certificate") or {}
    claims = {str(k): str(v) for k, v in (seen.get("claims") or {}).items()}
    return (
        f"mesh: {flow.name}: ALLOWED over mTLS (200; RoleBinding {flow.route.expect.binding} "
        f"allows it for the identity in the client certificate); the upstream saw "
        f"{seen.get('spiffe_id')}, client certificate serial "
        f"{short_serial(str(certificate.get('serial') or ''))} (valid until "
        f"{_clock(float(certificate.get('not_after') or 0))}), {claim_headers_text(claims)}"
    )


def _calls_of(run: MeshRun, workload: str) -> tuple[int, int]:
    flows = [f for f in run.flows if f.route.workload == workload]
    return sum(f.calls for f in flows), sum(f.failed for f in flows)


def mesh_seen_rotation_text(run: MeshRun, workload: str) -> str:
    serials = run.seen[workload]
    calls, failed = _calls_of(run, workload)
    return (
        f"mesh: {possessive(workload)} X.509-SVID rotated live: the upstream now sees client certificate "
        f"serial {short_serial(serials[-1])} (was {short_serial(serials[-2])}); {calls} calls "
        f"so far, {failed} failed"
    )


def mesh_held_rotation_text(run: MeshRun, workload: str, leaf: x509.Certificate) -> str:
    serials = run.held[workload]
    role = (
        "its Envoy presents it to callers from now on"
        if workload == MESH_SERVER
        else "its Envoy took it over SDS"
    )
    return (
        f"mesh: {possessive(workload)} sidecar renewed its X.509-SVID: serial {short_serial(serials[-2])} "
        f"-> {short_serial(serials[-1])}, valid until "
        f"{_clock(leaf.not_valid_after_utc.timestamp())}; {role} (renewals from now on are "
        "counted, not shown)"
    )


def mesh_cut_text(cut: MeshCutOff, target: str) -> str:
    refusal = next(iter(cut.refusals), "refused")
    return (
        f"mesh: suspended workload {cut.workload} (reason: {cut.reason}): no new credential, "
        f"the ones issued revoked; its mTLS calls refused at the agent of {target} ({refusal}) "
        f"after {cut.cut_off or 0:.2f} s (revocation revision {cut.revision}; "
        f"{cut.probes} presentations)"
    )


def mesh_rotations_line(run: MeshRun) -> str:
    seen = ", ".join(
        f"{workload} {run.rotations_seen(workload)} "
        f"({' -> '.join(short_serial(s) for s in serials)})"
        for workload, serials in run.seen.items()
    )
    held = ", ".join(f"{workload} {run.rotations_held(workload)}" for workload in run.held)
    t = run.totals()
    short = "" if run.rotation_due else " (a run this short expects none)"
    return (
        f"mesh: X.509-SVIDs of {run.svid_ttl} s, renewed at half-life{short}: rotations seen by the "
        f"upstream (client certificate serials in XFCC): {seen or 'none yet'}; renewals by the "
        f"sidecars: {held or 'none yet'}; {t['calls']} calls over mTLS ({t['allowed']} allowed, "
        f"{t['denied']} denied, {t['failed']} failed)"
    )


def mesh_cut_line(run: MeshRun) -> str:
    cut = run.cut
    if cut is None:
        return f"mesh: workload {SUSPENDED_WORKLOAD} not suspended yet"
    if cut.cut_off is None:
        return f"mesh: suspension of workload {cut.workload}: {'; '.join(cut.errors) or 'waiting'}"
    refusals = ", ".join(f"{n} {answer}" for answer, n in cut.refusals.most_common())
    serial = short_serial((run.held.get(cut.workload) or [""])[-1])
    sidecar = cut.new_svid or (
        f"its sidecar got no X.509-SVID issued after the suspension (the last it got: serial "
        f"{serial})"
    )
    return (
        f"mesh: workload {cut.workload} suspended at {cut.at:.1f} s (reason: {cut.reason}): cut "
        f"off after {cut.cut_off:.2f} s; {cut.refused} calls refused since (expected: "
        f"{refusals}), {cut.accepted_after} authenticated; {sidecar}"
    )


def mesh_lines(board: Scoreboard) -> list[str]:
    if board.mesh is None:
        return [board.mesh_skipped] if board.mesh_skipped else []
    return [mesh_rotations_line(board.mesh), mesh_cut_line(board.mesh)]


MESH_COLUMNS = (
    "FROM", "WORKLOAD", "TO", "REQUEST (mTLS)", "CALLS", "ALLOWED", "DENIED", "FAILED",
    "CUT OFF", "LAST ANSWER", "CERT SERIAL",
)  # fmt: skip
MESH_NUMERIC = {"CALLS", "ALLOWED", "DENIED", "FAILED", "CUT OFF"}


def mesh_table(run: MeshRun, title: str | None = None) -> Table:
    table = Table(title=title, expand=False, title_justify="left")
    for column in MESH_COLUMNS:
        table.add_column(column, justify="right" if column in MESH_NUMERIC else "left")
    for flow in run.flows:
        wl = MESH_BY_NAME[flow.route.workload]
        held = run.held.get(wl.name) or [""]
        table.add_row(
            cell(wl.cluster), cell(wl.name), cell(f"{MESH_SERVER}@{flow.route.target}"),
            cell(flow.route.call.short), cell(flow.calls),
            cell(flow.allowed, style="green" if flow.allowed else ""),
            cell(flow.denied, style="yellow" if flow.denied else ""),
            cell(flow.failed, style="bold red" if flow.failed else ""),
            cell(flow.cut_off, style="yellow" if flow.cut_off else ""),
            cell(flow.last[:34], style="bold red" if flow.unexpected else ""),
            cell(short_serial(held[-1])),
        )  # fmt: skip
    return table


# -- the table and the lines beside it -----------------------------------------------------

COLUMNS = (
    "FROM", "WORKLOAD", "TO", "REQUEST", "EXCH", "ALLOWED", "DENIED", "LAST DECISION",
    "REFUSED", "REVOKED", "KEY", "LAST MS",
)  # fmt: skip
NUMERIC = {"EXCH", "ALLOWED", "DENIED", "REFUSED", "REVOKED", "LAST MS"}


def cell(value: object, style: str = "") -> Text:
    """A table cell: plain text (no markup), every character that is not printable escaped."""
    return Text(printable(value), style=style)


def stats_table(board: Scoreboard, title: str | None = None) -> Table:
    table = Table(title=title, expand=False, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in NUMERIC else "left")
    for p in board.pairs:
        refused = p.refused + p.errors
        table.add_row(
            cell(p.workload.cluster), cell(p.workload.name), cell(p.target),
            cell(p.route.call.short), cell(p.exchanges),
            cell(p.allowed, style="green" if p.allowed else ""),
            cell(p.denied, style="yellow" if p.denied else ""),
            cell(p.last_decision, style="bold red" if p.unexpected else ""),
            cell(refused, style="bold red" if refused else ""),
            cell(p.revoked, style="yellow" if p.revoked else ""),
            cell(short_kid(p.last_kid)),
            cell("-" if p.last_latency_ms is None else f"{p.last_latency_ms:.1f}"),
        )  # fmt: skip
    for intruder in (board.forged, board.tampered):
        table.add_row(
            cell(ROGUE_CLUSTER), cell("intruder", style="red"), cell(intruder.target),
            cell(intruder.short), cell(intruder.attempts),
            cell(intruder.accepted, style="bold red" if intruder.accepted else ""), "",
            cell(intruder.last_reason[:34]), cell(intruder.refused, style="yellow"), "", "", "",
        )  # fmt: skip
    return table


def rotation_line(board: Scoreboard) -> str:
    rotation = board.rotation
    if board.rotation_error:
        return board.rotation_error
    if rotation is None:
        return "signing key: not rotated yet"
    return (
        f"signing key rotated at {rotation.at:.1f} s: {short_kid(rotation.old_kid)} -> "
        f"{short_kid(rotation.new_kid)}; since then {rotation.old_key_calls} calls verified with the "
        f"retired key, {rotation.new_key_calls} with the new one"
    )


def lifecycle_line(board: Scoreboard) -> str:
    run = board.lifecycle
    if run is None:
        return "life cycle act: not run"
    if run.errors:
        return f"life cycle act failed: {'; '.join(run.errors)}"
    parts = [f"life cycle act: {len(run.completed)}/6 steps done ({', '.join(run.completed)})"]
    if run.onboarded:
        parts.append(f"template identity {run.onboarded}")
    if run.pending_admitted:
        parts.append(f"pending service account admitted as Workload {run.pending_admitted}")
    if run.in_force_ms is not None and run.fulfilled_s is not None:
        parts.append(
            f"access request approved {run.fulfilled_s:.2f} s after it was made, in force "
            f"{run.in_force_ms:.0f} ms after approval"
        )
    if run.gone_ms is not None:
        parts.append(f"gone {run.gone_ms:.0f} ms after expiry")
    if run.retired:
        parts.append(f"retired workload refused: {run.retired}")
    return "; ".join(parts)


def revocation_line(board: Scoreboard) -> str:
    run = board.revocation
    if run is None:
        return f"revocation: workload {REVOKED_WORKLOAD} not revoked yet"
    if run.revoked_at is None:
        return f"revocation of workload {run.workload} failed: {'; '.join(run.errors)}"
    parts = [f"workload {run.workload} revoked at {run.at:.1f} s (reason: {run.reason}):"]
    cut = ", ".join(f"{target} after {seconds:.2f} s" for target, seconds in run.cut_off.items())
    parts.append(f"cut off at {cut or 'no cluster yet'};")
    refusals = sum(p.revoked for p in board.pairs)
    parts.append(f"{refusals} calls with its revoked token refused (expected);")
    if run.resumed:
        parts.append(
            f"accepted again with a new token at {', '.join(t for t in run.targets if t in run.resumed)}"
        )
    else:
        parts.append("no call with a new token yet")
    return " ".join(parts)


def policy_line(board: Scoreboard) -> str:
    change = board.policy.change
    if change is None:
        return "policy: not changed yet"
    parts = [f"policy changed at {change.at:.1f} s:"]
    if change.rejected:
        parts.append(
            f"bad change rejected ({change.rejected}), revision {change.kept_revision} kept;"
        )
    if change.propagation is not None:
        parts.append(
            f"good change accepted as revision {change.new_revision}, in force at all "
            f"{len(change.per_agent)} agents after {change.propagation:.2f} s"
        )
    elif change.new_revision is not None:
        parts.append(f"good change accepted as revision {change.new_revision}")
    return " ".join(parts)


def header_lines(board: Scoreboard) -> list[str]:
    agents = ", ".join(f"{name} {url}" for name, url in board.agent_urls.items())
    kept = "removed at the end" if board.temporary else "kept"
    policy = board.policy
    return [
        f"control plane {board.server_url} (trust domain spiffe://{TRUST_DOMAIN})",
        f"agents: {agents}",
        f"policy revision {policy.revision} in force (PolicyTest {policy.tests} cases passed; "
        f"manifests in {board.data_dir / 'policy'})",
        f"data dir: {board.data_dir} ({kept})",
    ]


def summary_line(board: Scoreboard) -> str:
    t = board.totals()
    mesh = ""
    if board.mesh is not None:
        m = board.mesh.totals()
        mesh = (
            f"; mesh: {m['calls']} calls over mTLS ({m['allowed']} allowed, {m['denied']} "
            f"denied, {m['failed']} failed, {m['cut_off']} refused after the cut-off)"
        )
    return (
        f"summary at {board.elapsed():.1f} s: policy revision {board.policy.revision}; "
        f"{t['exchanges']} exchanges, {t['decisions']} decisions ({t['allowed']} allowed, "
        f"{t['denied']} denied, {t['unexpected']} unexpected), "
        f"{t['refused']} refused legitimate calls, {t['revoked']} refused as revoked "
        f"(expected), {t['errors']} errors, "
        f"{t['intruder_refused']}/{t['intruder_attempts']} intruder attempts refused{mesh}"
    )


# -- displays ------------------------------------------------------------------------------


class PlainDisplay:
    """One line per notable event and a summary line every few seconds."""

    def __init__(self, console: Console, board: Scoreboard) -> None:
        self.console, self.board = console, board
        self.next_summary = SUMMARY_INTERVAL
        self.last_summary = -SUMMARY_INTERVAL

    def __enter__(self) -> PlainDisplay:
        for line in header_lines(self.board):
            self.say(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.board.elapsed() - self.last_summary > 0.5:
            self.event(summary_line(self.board))

    def say(self, text: str) -> None:
        self.console.print(cell(text), soft_wrap=True)

    def event(self, text: str) -> None:
        self.say(f"[{self.board.elapsed():6.1f}s] {text}")

    def tick(self) -> None:
        if self.board.elapsed() >= self.next_summary:
            self.next_summary += SUMMARY_INTERVAL
            self.last_summary = self.board.elapsed()
            self.event(summary_line(self.board))


class LiveDisplay:
    """A live table, refreshed four times a second, with the last few events below it."""

    def __init__(self, console: Console, board: Scoreboard) -> None:
        self.console, self.board = console, board
        self.events: deque[str] = deque(maxlen=6)
        self.live = Live(
            console=console, refresh_per_second=4, get_renderable=self.render, transient=True
        )

    def __enter__(self) -> LiveDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def event(self, text: str) -> None:
        self.events.append(printable(f"[{self.board.elapsed():6.1f}s] {text}"))

    def tick(self) -> None:
        pass  # Live refreshes on its own thread

    def render(self) -> RenderableType:
        board = self.board
        head = Text("\n".join(printable(line) for line in header_lines(board)), style="bold")
        stop = f"stops after {board.duration:.0f} s; " if board.duration else ""
        foot = Text.assemble(
            (printable(policy_line(board)) + "\n", "magenta"),
            (printable(revocation_line(board)) + "\n", "yellow"),
            (printable(rotation_line(board)) + "\n", "cyan"),
            *((printable(line) + "\n", "blue") for line in mesh_lines(board)),
            (printable(summary_line(board)) + "\n", ""),
            ("\n".join(self.events) + "\n", "dim"),
            (f"{stop}Ctrl-C to stop", "bold"),
        )
        tables: list[RenderableType] = [stats_table(board)]
        if board.mesh is not None:
            tables.append(mesh_table(board.mesh))
        return Group(head, *tables, foot)


class Display(Events, Protocol):
    def tick(self) -> None: ...
    def __enter__(self) -> Display: ...
    def __exit__(self, *exc: object) -> None: ...


# -- the final summary ---------------------------------------------------------------------


def print_final(console: Console, board: Scoreboard) -> None:
    console.print(stats_table(board, title="trustmesh demo: final summary"))
    if board.mesh is not None:
        console.print(mesh_table(board.mesh, title="the mesh: mTLS through Envoys"))
    lines = (
        policy_line(board),
        revocation_line(board),
        rotation_line(board),
        lifecycle_line(board),
    )
    for line in lines:
        console.print(cell(line), soft_wrap=True)
    for line in mesh_lines(board) if board.mesh is not None else []:  # skipped: said once
        console.print(cell(line), soft_wrap=True)
    for line in board.audit.lines if board.audit is not None else []:
        console.print(cell(line), soft_wrap=True)
    problems = board.problems()
    if problems:
        console.print(cell("PROBLEMS: " + "; ".join(problems), style="bold red"), soft_wrap=True)
        return
    console.print(cell(ok_line(board), style="bold green"), soft_wrap=True)


def ok_line(board: Scoreboard) -> str:
    t = board.totals()
    revisions = ", ".join(f"{n} at revision {rev}" for rev, n in sorted(board.by_revision.items()))
    return (
        f"OK: every decision matched the policy in force ({t['allowed']} allowed, "
        f"{t['denied']} denied; {revisions or 'none'}); every refusal was expected: "
        f"{revoked_summary(board)}all {t['intruder_attempts']} intruder attempts; "
        f"no other legitimate call was refused ({t['decisions']} calls after "
        f"{t['exchanges']} token exchanges)"
    )


def revoked_summary(board: Scoreboard) -> str:
    run = board.revocation
    if run is None or run.revoked_at is None:
        return ""
    refusals = sum(p.revoked for p in board.pairs)
    return (
        f"{refusals} calls with {run.workload}'s token after its revocation (cut off at "
        f"{len(run.cut_off)}/{len(run.targets)} clusters, accepted again with a new token at "
        f"{len(run.resumed)}/{len(run.targets)}), "
    )
