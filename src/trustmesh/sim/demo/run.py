"""``run_demo``: the wiring. Bring the federation up, then the mesh act (when an Envoy
is installed), drive the traffic in rounds with the operator's actions on schedule
(policy change at a third, revocation at half time, key rotation at two thirds, the
mesh workload's suspension at five sixths), prove the audit log once the agents have
stopped, print the final summary; Ctrl-C or SIGTERM ends it the same way, with
everything stopped and the temporary data dir removed."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from trustmesh.sim.demo.anomalies import count_anomalies
from trustmesh.sim.demo.display import Display, LiveDisplay, PlainDisplay, cell, print_final
from trustmesh.sim.demo.errors import DemoError
from trustmesh.sim.demo.federation import Federation, data_root, start_federation
from trustmesh.sim.demo.finale import run_finale
from trustmesh.sim.demo.lifecycle import LifecycleAct
from trustmesh.sim.demo.mesh import NO_ENVOY, Mesh, start_mesh
from trustmesh.sim.demo.mesh_traffic import MeshTraffic
from trustmesh.sim.demo.operator import Operator
from trustmesh.sim.demo.processes import stop_children
from trustmesh.sim.demo.scenario import (
    DEFAULT_SVID_TTL,
    MESH_ROUTES,
    ROGUE_CLUSTER,
    ROUTES,
    WORKLOAD_BY_NAME,
)
from trustmesh.sim.demo.scoreboard import IntruderStats, MeshFlow, MeshRun, PairStats, Scoreboard
from trustmesh.sim.demo.traffic import Traffic

ROUND_INTERVAL = 0.3  # seconds between traffic rounds (~3 rounds per second)
HTTP_TIMEOUT = 3.0
INTERACTIVE_POLICY_CHANGE = 8.0  # seconds into the traffic when running until Ctrl-C
INTERACTIVE_REVOCATION = 12.0
INTERACTIVE_ROTATION = 16.0
INTERACTIVE_SUSPENSION = 20.0  # after the first rotation of the mesh's 20 s X.509-SVIDs
MIN_SVID_TTL = 10  # the shortest X.509-SVID lifetime the demo asks for
# Shorter runs cannot show a certificate rotation before the suspension (the first
# renewal comes at about half of MIN_SVID_TTL): they say so instead of failing.
MIN_ROTATION_DURATION = 10.0
# JWT-SVID lifetime until Ctrl-C: renewed every 4.8 s, between those three, so the
# traffic presents the revoked token and the retired key's tokens before renewing them,
# and tokens signed by the new key show within ~3 s of the rotation, the last event.
INTERACTIVE_LEASE = 6
ACT_GRACE = 20.0  # seconds the life cycle act may take after the traffic ends


# -- signals ---------------------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the demo as Ctrl-C does (KeyboardInterrupt), so cleanup runs."""
    if not _in_main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """While shutting down, a second Ctrl-C must not cut the shutdown short."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the schedule, and the run --------------------------------------------------------------


def lease_seconds(duration: float) -> int:
    """JWT-SVID lifetime the workloads ask for: short enough that renewals (and tokens
    signed by the new key after the rotation) show within the demo."""
    return INTERACTIVE_LEASE if duration <= 0 else max(2, min(15, int(duration / 5)))


def policy_change_time(duration: float) -> float:
    return INTERACTIVE_POLICY_CHANGE if duration <= 0 else duration / 3


def revocation_time(duration: float) -> float:
    return INTERACTIVE_REVOCATION if duration <= 0 else duration / 2


def rotation_time(duration: float) -> float:
    return INTERACTIVE_ROTATION if duration <= 0 else 2 * duration / 3


def suspension_time(duration: float) -> float:
    return INTERACTIVE_SUSPENSION if duration <= 0 else 5 * duration / 6


def svid_ttl(duration: float) -> int:
    """The mesh workloads' X.509-SVID lifetime (their maxTokenTTL): the sidecars renew at
    half of it, so the first rotation falls by about half of it, well before the
    suspension at five sixths of the run; never below 10 s."""
    if duration <= 0:
        return DEFAULT_SVID_TTL
    return max(MIN_SVID_TTL, min(DEFAULT_SVID_TTL, int(duration * 2 / 3)))


def drive(
    traffic: Traffic,
    display: Display,
    operator: Operator,
    duration: float,
    mesh: MeshTraffic | None = None,
    act: LifecycleAct | None = None,
) -> None:
    """Traffic rounds until ``duration`` (0: until Ctrl-C); the life cycle act's steps
    between rounds from the start; change the policy at a third, revoke a workload at
    half time, rotate the key at two thirds, suspend the mesh workload at five sixths.
    The act's steps left when the traffic ends run after it."""
    board = traffic.board
    change_at, rotate_at = policy_change_time(duration), rotation_time(duration)
    revoke_at, suspend_at = revocation_time(duration), suspension_time(duration)
    while duration <= 0 or board.elapsed() < duration:
        began = time.monotonic()
        if board.policy.change is None and board.elapsed() >= change_at:
            operator.change_policy()
        if board.revocation is None and board.elapsed() >= revoke_at:
            operator.revoke(traffic)
        if board.rotation is None and not board.rotation_error and board.elapsed() >= rotate_at:
            operator.rotate()
        if mesh is not None and mesh.run.cut is None and board.elapsed() >= suspend_at:
            operator.suspend(mesh)
        if act is not None:
            act.step()
        traffic.run_round()
        if mesh is not None:
            mesh.run_round()
        display.tick()
        time.sleep(max(0.0, ROUND_INTERVAL - (time.monotonic() - began)))
    if act is not None:
        act.finish(time.monotonic() + ACT_GRACE)


def finish_with_audit(
    board: Scoreboard,
    fed: Federation,
    mesh: Mesh | None,
    http: httpx.Client,
    say: Callable[[str], None],
) -> None:
    """Stop the mesh's Envoys and sidecars, then the agents (they ship what their spools
    hold), then prove the log."""
    if board.audit is not None:
        return
    if mesh is not None:
        stop_children(mesh.children)
    stop_children(fed.agents)
    board.audit = run_finale(http, fed.server_url, fed.admin.token, board.sample_trace, say)
    analysed = count_anomalies(
        http, fed.server_url, fed.admin.token, board.audit.size, fed.rogue.issuer, say
    )
    board.audit.lines += analysed.lines
    board.audit.problems += analysed.problems


def make_board(fed: Federation, root: Path, temporary: bool, duration: float) -> Scoreboard:
    pairs = [
        PairStats(
            route, WORKLOAD_BY_NAME[route.workload], WORKLOAD_BY_NAME[route.workload].spiffe_id
        )
        for route in ROUTES
    ]
    return Scoreboard(
        server_url=fed.server_url,
        agent_urls=fed.agent_urls,
        data_dir=root,
        temporary=temporary,
        duration=duration,
        pairs=pairs,
        forged=IntruderStats(
            f"forged SA token from unregistered cluster {ROGUE_CLUSTER!r} (claims shop/payments)",
            "forged SA token",
            "server",
            "invalid_grant",
        ),
        tampered=IntruderStats(
            "JWT-SVID with rewritten payload (claims payments)",
            "tampered JWT-SVID",
            "-",
            "invalid_token",
        ),
        policy=fed.policy,
    )


def make_console(plain: bool) -> Console:
    console = Console()
    if plain and not console.is_terminal:
        return Console(width=max(console.width, 160))
    return console


def run_demo(duration: float = 0.0, data_dir: Path | None = None, plain: bool = False) -> None:
    """Run the demo for ``duration`` seconds (0: until Ctrl-C). Returns normally when every
    decision matched the policy in force, every refusal was expected (the revoked token
    after its revocation, the intruder's attempts) and no other legitimate call was
    refused, and the policy change, the revocation and the key rotation behaved; raises
    DemoError with one line otherwise, or when start-up failed."""
    console = make_console(plain)
    plain = plain or not console.is_terminal

    def say(text: str) -> None:
        console.print(cell(text), soft_wrap=True)

    board: Scoreboard | None = None
    stack = ExitStack()
    with sigterm_interrupts():
        try:
            root, temporary = data_root(stack, data_dir)
            http = stack.enter_context(httpx.Client(timeout=HTTP_TIMEOUT))
            ttl = svid_ttl(duration)
            fed = start_federation(stack, root, http, say, ttl)
            mesh = start_mesh(stack, root, fed, http, say, ttl)
            if mesh is None:
                say(NO_ENVOY)
            board = make_board(fed, root, temporary, duration)
            display: Display = (
                PlainDisplay(console, board) if plain else LiveDisplay(console, board)
            )
            traffic = Traffic(
                board, http, fed.clusters, fed.rogue, display, lease_seconds(duration)
            )
            mesh_traffic = None
            if mesh is None:
                board.mesh_skipped = NO_ENVOY
            else:
                board.mesh = MeshRun(
                    ttl,
                    [MeshFlow(route) for route in MESH_ROUTES],
                    rotation_due=duration <= 0 or duration >= MIN_ROTATION_DURATION,
                )
                mesh_traffic = MeshTraffic(board.mesh, http, mesh.endpoints, fed.clusters, display)
            operator = Operator(board, fed.admin, http, display)
            act = LifecycleAct(board, fed.admin, http, traffic, fed.clusters, display)
            with display:
                drive(traffic, display, operator, duration, mesh_traffic, act)
            finish_with_audit(board, fed, mesh, http, say)
        except KeyboardInterrupt:
            if board is not None:
                board.interrupted = True
                say("interrupted: stopping the mesh and the agents, then proving the audit log")
                with signals_ignored():
                    finish_with_audit(board, fed, mesh, http, say)
            say("stopping the control plane and simulated clusters")
        finally:
            with signals_ignored():
                stack.close()
    if board is None:
        say("stopped during start-up; nothing left running")
        return
    print_final(console, board)
    problems = board.problems()
    if problems:
        raise DemoError("demo finished with problems: " + "; ".join(problems))
