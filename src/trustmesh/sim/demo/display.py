"""Everything the demo prints: the live table or the plain event lines, the header and
summary lines, the lines about the policy change, the revocation and the rotation, the
event texts the traffic and the operator report, and the final summary.

Rendering only: it reads the scoreboard and never changes it. What the servers answered
(decision reasons, key ids, error messages) is printed as plain ``Text`` with every
character that is not printable escaped (``common/terminal.py``): never as markup, never
as terminal escapes."""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from trustmesh.common.terminal import printable
from trustmesh.sim.demo.scenario import REVOKED_WORKLOAD, ROGUE_CLUSTER, TRUST_DOMAIN
from trustmesh.sim.demo.scoreboard import PolicyChange, RevocationRun, Scoreboard

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
    return (
        f"summary at {board.elapsed():.1f} s: policy revision {board.policy.revision}; "
        f"{t['exchanges']} exchanges, {t['decisions']} decisions ({t['allowed']} allowed, "
        f"{t['denied']} denied, {t['unexpected']} unexpected), "
        f"{t['refused']} refused legitimate calls, {t['revoked']} refused as revoked "
        f"(expected), {t['errors']} errors, "
        f"{t['intruder_refused']}/{t['intruder_attempts']} intruder attempts refused"
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
            (printable(summary_line(board)) + "\n", ""),
            ("\n".join(self.events) + "\n", "dim"),
            (f"{stop}Ctrl-C to stop", "bold"),
        )
        return Group(head, stats_table(board), foot)


class Display(Events, Protocol):
    def tick(self) -> None: ...
    def __enter__(self) -> Display: ...
    def __exit__(self, *exc: object) -> None: ...


# -- the final summary ---------------------------------------------------------------------


def print_final(console: Console, board: Scoreboard) -> None:
    console.print(stats_table(board, title="trustmesh demo: final summary"))
    for line in (policy_line(board), revocation_line(board), rotation_line(board)):
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
