"""``trustmesh bench rotation``: requests failed while every X.509-SVID of a fleet of
sidecars rotates under load (goal, issue 12: none).

The set-up, every part but the upstream a process of its own on loopback
(``bench/_federation.py``):

    client-0..N-1 (cluster east) ── py-spiffe X509Source ◀── trustmesh sidecar (each its own)
        │ mTLS, a fresh connection per request
        ▼
    Envoy (cluster west; ``trustmesh envoy config``) ◀── SDS ── trustmesh sidecar (orders)
        │ ext_authz, x-forwarded-client-cert        │
        ▼                                           ▼
    agent of west, --trust-xfcc                  upstream (this process): counts, per
                                                 SPIFFE ID, the certificates in XFCC

* a control plane (``trustmesh server``) and two simulated clusters (real OIDC issuers
  of service-account tokens): ``east`` runs the N client workloads, ``west`` the
  receiving one; every Workload has ``maxTokenTTL`` = ``ttl``, which caps its
  X.509-SVIDs, so each sidecar renews at half-life (± 10 %) several times in the run;
* per client workload a ``trustmesh sidecar`` (Workload API socket) with the workload's
  projected SA token; one for the receiving workload, serving Envoy over SDS;
* the receiving Envoy (``--concurrency 1``), configured by ``trustmesh envoy config``
  (mTLS with the sidecar's SVID and bundle, ``SANITIZE_SET`` XFCC, ext_authz to the
  agent of ``west`` started with ``--trust-xfcc``), in front of a small upstream that
  runs as a thread of this process;
* the load generator, a process of its own (``bench/_rotationload.py``): py-spiffe
  ``X509Source`` per workload, a closed loop per workload, a new mTLS connection per
  request.

Counted: requests sent, succeeded (2xx), failed by reason; rotations per client
workload as the upstream saw them (distinct certificate serials per SPIFFE ID in the
XFCC of the window's requests) and as the Workload API streams delivered them; the
receiving side's certificates as the clients saw them in their handshakes; p50/p99 of
a request (connect and handshake included) and of the handshake. The run proves the
point only if every client SVID and the receiving side's rotated during the window;
``ok`` only if that holds and no request failed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from trustmesh.agent.xfcc import HEADER as XFCC_HEADER
from trustmesh.agent.xfcc import XfccHeader, client_certificate
from trustmesh.bench._envoy import envoy_binary, start_envoy
from trustmesh.bench._federation import (
    TRUST_DOMAIN,
    Federation,
    binding_doc,
    cluster_doc,
    federation,
    role_doc,
    workload_doc,
)
from trustmesh.bench._procs import Child, start, tree_cpu_seconds
from trustmesh.bench._rotationload import PHASE_HEADER, READY_LINE, LoadConfig
from trustmesh.bench._stats import Distribution, row, summarise, verdict
from trustmesh.common.errors import InvalidToken
from trustmesh.sim import SimulatedCluster
from trustmesh.spiffeid import workload_spiffe_id

__all__ = ["run"]

ORIGIN, TARGET = "east", "west"
CLIENT_NAMESPACE = "load"
RECEIVER_NAMESPACE, RECEIVER_SA = "shop", "orders"
SERVICE_HOST = "orders.internal"
PATH = "/api/orders"
MIN_TTL = 10  # DESIGN §9: maxTokenTTL caps X.509-SVIDs with no floor above 10 s
MAX_TTL = 3600
READY_TIMEOUT = 120.0
SPIFFE_ID_HEADER = "x-trustmesh-spiffe-id"


def client_id(i: int) -> str:
    return workload_spiffe_id(TRUST_DOMAIN, ORIGIN, CLIENT_NAMESPACE, f"client-{i}")


RECEIVER_ID = workload_spiffe_id(TRUST_DOMAIN, TARGET, RECEIVER_NAMESPACE, RECEIVER_SA)


def _manifests(east_issuer: str, west_issuer: str, sidecars: int, ttl: int) -> list[dict[str, Any]]:
    claims = {"project": "load", "environment": "prod", "tier": "gold"}
    clients = [
        workload_doc(
            f"client-{i}",
            cluster=ORIGIN,
            namespace=CLIENT_NAMESPACE,
            service_account=f"client-{i}",
            claims=claims,
            maxTokenTTL=ttl,
        )
        for i in range(sidecars)
    ]
    receiver = workload_doc(
        "orders",
        cluster=TARGET,
        namespace=RECEIVER_NAMESPACE,
        service_account=RECEIVER_SA,
        claims=claims,
        maxTokenTTL=ttl,
    )
    reader = role_doc(
        "orders-reader", [{"services": [SERVICE_HOST], "paths": ["/api/**"], "methods": ["GET"]}]
    )
    binding = binding_doc("load-reads-orders", "orders-reader", [{"claims": {"project": "load"}}])
    return [
        cluster_doc(ORIGIN, east_issuer),
        cluster_doc(TARGET, west_issuer),
        *clients,
        receiver,
        reader,
        binding,
    ]


# -- the upstream ----------------------------------------------------------------------------


class Upstream:
    """What reached the service behind Envoy during the window (requests carrying
    ``x-bench-phase: load``): per SPIFFE ID, the serials of the client certificates in
    XFCC; and how many requests came without XFCC, or with an identity from the agent
    (``x-trustmesh-spiffe-id``) that is not the certificate's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parsed: dict[str, tuple[str, int] | None] = {}  # XFCC line -> (URI, serial)
        self.serials: dict[str, Counter[int]] = {}
        self.requests = 0
        self.without_xfcc = 0
        self.mismatched = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def _identify(self, line: str) -> tuple[str, int] | None:
        if line not in self.parsed:
            try:
                found = client_certificate(XfccHeader((line.encode("latin-1"),)))
                serial = x509.load_der_x509_certificate(found.leaf).serial_number
                self.parsed[line] = (found.uri, serial)
            except (InvalidToken, ValueError, UnicodeEncodeError):
                self.parsed[line] = None
        return self.parsed[line]

    def record(self, xfcc: str | None, spiffe_id: str | None) -> None:
        with self.lock:
            self.requests += 1
            identified = self._identify(xfcc) if xfcc else None
            if identified is None:
                self.without_xfcc += 1
                return
            uri, serial = identified
            self.serials.setdefault(uri, Counter())[serial] += 1
            if spiffe_id != uri:
                self.mismatched += 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: Envoy pools its upstream connections
            # The head and the body are two writes: without TCP_NODELAY the body waits
            # for Envoy's delayed ACK (40 ms a request).
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                if self.headers.get(PHASE_HEADER) == "load":
                    upstream.record(
                        self.headers.get(XFCC_HEADER), self.headers.get(SPIFFE_ID_HEADER)
                    )
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    @contextmanager
    def serving(self) -> Iterator[Upstream]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


# -- the processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sidecar:
    spiffe_id: str
    child: Child
    socket: Path
    sds_socket: Path | None


def _sidecars(
    fed: Federation, west: SimulatedCluster, sockets: Path, count: int, token_ttl: int
) -> list[Sidecar]:
    """The receiving workload's sidecar (with SDS) first, then one per client; all
    started at once, then each first SVID awaited."""
    wanted = [(RECEIVER_ID, west, RECEIVER_NAMESPACE, RECEIVER_SA, "orders")]
    wanted += [
        (client_id(i), fed.cluster, CLIENT_NAMESPACE, f"client-{i}", f"c{i}") for i in range(count)
    ]
    started = []
    for spiffe_id, cluster, namespace, sa, name in wanted:
        token = sockets / f"{name}.token"
        token.write_text(cluster.mint(namespace, sa, ttl=token_ttl), encoding="ascii")
        token.chmod(0o600)
        socket = sockets / f"{name}.sock"
        sds = sockets / f"{name}-sds.sock" if spiffe_id == RECEIVER_ID else None
        argv = [sys.executable, "-m", "trustmesh.cli.main", "sidecar", "--server", fed.url,
                "--sa-token-file", str(token), "--socket", str(socket),
                *(["--sds-socket", str(sds)] if sds is not None else [])]  # fmt: skip
        child = start(f"sidecar-{name}", argv, fed.root / "logs")
        fed.children.append(child)
        started.append(Sidecar(spiffe_id, child, socket, sds))
    deadline = time.monotonic() + READY_TIMEOUT
    for sidecar in started:
        line = sidecar.child.wait_ready(
            "trustmesh sidecar ready: ", timeout=max(1.0, deadline - time.monotonic())
        )
        if line.split()[3] != sidecar.spiffe_id:
            raise RuntimeError(
                f"{sidecar.child.name} serves {line.split()[3]}, not {sidecar.spiffe_id}"
            )
    return started


def _envoy_config(agent_url: str, upstream: int, sds_socket: Path) -> dict[str, Any]:
    """What ``trustmesh envoy config`` prints for the receiving side."""
    printed = subprocess.run(
        [sys.executable, "-m", "trustmesh.cli.main", "envoy", "config", "--cluster", TARGET,
         "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--agent", agent_url,
         "--upstream", f"127.0.0.1:{upstream}", "--sds-socket", str(sds_socket),
         "--trust-domain", TRUST_DOMAIN],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if printed.returncode != 0:
        raise RuntimeError(f"trustmesh envoy config failed: {printed.stderr.strip()}")
    config: dict[str, Any] = yaml.safe_load(printed.stdout)
    return config


class _Usage:
    """CPU seconds of every part, sampled at the edges of the window."""

    def __init__(
        self, fed: Federation, agent: Child, envoy: Child, sidecars: list[Sidecar]
    ) -> None:
        self.parts = {
            "control_plane": [fed.server],
            "agent": [agent],
            "envoy": [envoy],
            "sidecars": [s.child for s in sidecars],
        }

    def sample(self) -> dict[str, float]:
        out = {
            name: sum(tree_cpu_seconds(child.proc.pid) or 0.0 for child in children)
            for name, children in self.parts.items()
        }
        out["upstream"] = time.process_time()  # this process: the upstream's threads
        return out


def _load(
    fed: Federation, config: LoadConfig, usage: _Usage
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the load generator to its end -> (its result, CPU % of one core per part
    over the window)."""
    path = fed.root / "load.json"
    config.dump(path)
    child = start("load", [sys.executable, "-m", "trustmesh.bench._rotationload", str(path)],
                  fed.root / "logs")  # fmt: skip
    fed.children.append(child)
    try:
        child.wait_ready(READY_LINE, timeout=READY_TIMEOUT + config.ready_timeout)
    except RuntimeError:
        raise RuntimeError(
            f"the load generator failed before the window: {_last_line(child)}"
        ) from None
    before, opened = usage.sample(), time.monotonic()
    code = child.proc.wait(timeout=config.seconds + 2 * config.timeout + 60)
    after, window = usage.sample(), time.monotonic() - opened
    result = _result_of(child, code)
    cpu = {name: round(100 * (after[name] - before[name]) / window, 1) for name in before}
    cpu["load"] = round(100 * result["cpu_s"] / result["window_s"], 1)
    return result, cpu


def _last_line(child: Child) -> str:
    lines = child.stdout.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return lines[-1] if lines else child.tail()


def _result_of(child: Child, code: int) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(_last_line(child))
    except ValueError:
        raise RuntimeError(f"the load generator exited with {code}: {child.tail()}") from None
    if code != 0 or "error" in result:
        raise RuntimeError(f"the load generator failed: {result.get('error', code)}")
    return result


def run(
    sidecars: int = 20, ttl: int = 20, seconds: float = 60.0, timeout: float = 10.0
) -> dict[str, Any]:
    """The whole run; starts and always stops its own processes."""
    if sidecars < 1 or not MIN_TTL <= ttl <= MAX_TTL or seconds <= 0 or timeout <= 0:
        raise ValueError(
            f"sidecars must be at least 1, ttl within {MIN_TTL}..{MAX_TTL} s, "
            "seconds and timeout positive"
        )
    envoy_binary()  # before any process starts: a missing Envoy is one line, not half a run
    token_ttl = int(max(3600, 2 * (seconds + READY_TIMEOUT)))
    sockets = Path(tempfile.mkdtemp(prefix="tm-rot-", dir="/tmp"))  # a socket path fits 108 bytes
    try:
        with federation(ORIGIN) as fed:
            west = fed.add_cluster(TARGET)
            fed.apply(_manifests(fed.cluster.issuer, west.issuer, sidecars, ttl))
            (agent,) = fed.start_agents([TARGET], extra_args=["--trust-xfcc"])
            fleet = _sidecars(fed, west, sockets, sidecars, token_ttl)
            receiver, clients = fleet[0], fleet[1:]
            assert receiver.sds_socket is not None
            with Upstream().serving() as upstream:
                config = _envoy_config(
                    f"http://{agent.host}:{agent.port}", upstream.port, receiver.sds_socket
                )
                envoy = start_envoy(
                    "envoy", fed.root / "envoy", config, fed.children, fed.root / "logs"
                )
                load = LoadConfig(
                    host="127.0.0.1",
                    port=envoy.listener_port("ingress"),
                    authority=SERVICE_HOST,
                    path=PATH,
                    peer_id=RECEIVER_ID,
                    workloads=[(c.spiffe_id, str(c.socket)) for c in clients],
                    seconds=seconds,
                    timeout=timeout,
                )
                result, cpu = _load(fed, load, _Usage(fed, agent.child, envoy.child, fleet))
                with upstream.lock:
                    seen = {uri: len(serials) for uri, serials in upstream.serials.items()}
                    counts = (upstream.requests, upstream.without_xfcc, upstream.mismatched)
            dead = [c.name for c in fed.children if c.name != "load" and c.proc.poll() is not None]
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    return _report(result, cpu, seen, counts, dead, sidecars, ttl, seconds)


# -- the report ------------------------------------------------------------------------------


def _ms(figure: Distribution | None) -> str:
    if figure is None:
        return "no request succeeded"
    return f"p50 {figure.p50_us / 1000:.2f} ms, p99 {figure.p99_us / 1000:.2f} ms"


def _report(
    result: dict[str, Any],
    cpu: dict[str, float],
    seen: dict[str, int],
    upstream: tuple[int, int, int],
    dead: list[str],
    sidecars: int,
    ttl: int,
    seconds: float,
) -> dict[str, Any]:
    workloads = result["workloads"]
    sent = sum(w["sent"] for w in workloads)
    succeeded = sum(w["succeeded"] for w in workloads)
    failures: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for w in workloads:
        failures.update(w["failures"])
        for category, text in w["examples"].items():
            examples.setdefault(category, text)
    failed = sum(failures.values())
    latencies = [ns for w in workloads for ns in w["latencies_ns"]]
    handshakes = [ns for w in workloads for ns in w["handshakes_ns"]]
    window = result["window_s"]
    per_workload = [
        {
            "spiffe_id": w["spiffe_id"],
            "sent": w["sent"],
            "succeeded": w["succeeded"],
            "failed": sum(w["failures"].values()),
            "failures": w["failures"],
            "certificates_seen_upstream": seen.get(w["spiffe_id"], 0),
            "rotations": max(0, seen.get(w["spiffe_id"], 0) - 1),
            "svids_received_on_stream": len(w["svids_received"]),
            "svid_problems": w["svid_problems"],
            "source_closed": w["source_closed"],
        }
        for w in workloads
    ]
    not_rotated = [w["spiffe_id"] for w in per_workload if w["rotations"] < 1]
    receiver_serials = len(result["peer_serials"])
    receiver_rotated = receiver_serials >= 2
    proved = not not_rotated and receiver_rotated
    goal_met = failed == 0 and sent > 0
    rotations = [w["rotations"] for w in per_workload]
    streamed = [w["svids_received_on_stream"] - 1 for w in per_workload]
    upstream_requests, without_xfcc, mismatched = upstream

    request = summarise(latencies, int(window * 1e9)) if latencies else None
    handshake = summarise(handshakes, int(window * 1e9)) if handshakes else None
    results = []
    if request is not None and handshake is not None:
        results += [
            row(
                "mTLS request, fresh connection",
                p50_us=request.p50_us,
                p99_us=request.p99_us,
                per_s=succeeded / window,
                note=f"{sidecars} workloads, one in flight each; {sent:,} sent, {failed:,} failed",
            ),
            row(
                "  connect + TLS handshake",
                p50_us=handshake.p50_us,
                p99_us=handshake.p99_us,
                note="both certificates checked",
            ),
        ]
    results += [
        row(
            "client SVIDs rotated",
            note=f"{sidecars - len(not_rotated)} of {sidecars}; rotations "
            f"per workload {min(rotations)}..{max(rotations)} (upstream, XFCC)",
        ),
        row(
            "receiving SVID rotated",
            note=f"{receiver_serials} certificates presented to the clients",
        ),
    ]

    reasons = ", ".join(f"{category} {n:,}" for category, n in failures.most_common())
    first = "; ".join(f"{category}: {text}" for category, text in sorted(examples.items()))
    problems = []
    if failed:
        problems.append(f"{failed:,} of {sent:,} requests failed ({reasons})")
    if sent == 0:
        problems.append("no request was sent")
    if not_rotated:
        problems.append(
            f"{len(not_rotated)} client SVID(s) did not rotate during the window "
            f"({', '.join(not_rotated[:3])}{'…' if len(not_rotated) > 3 else ''})"
        )
    if not receiver_rotated:
        problems.append("the receiving side's SVID did not rotate during the window")
    if upstream_requests != succeeded:
        problems.append(
            f"the upstream counted {upstream_requests:,} requests of the window, "
            f"the load {succeeded:,} successes"
        )
    if without_xfcc or mismatched:
        problems.append(
            f"the upstream got {without_xfcc} requests without a client certificate and "
            f"{mismatched} whose identity was not the certificate's"
        )
    troubled = [w for w in per_workload if w["svid_problems"] or w["source_closed"]]
    if troubled:
        first_trouble = troubled[0]
        problems.append(
            f"the Workload API went wrong for {len(troubled)} workload(s) (first: "
            f"{first_trouble['spiffe_id']}: {first_trouble['svid_problems'][:1] or 'stream ended'})"
        )
    if dead:
        problems.append(f"processes ended during the run: {', '.join(dead)}")
    summary = [
        f"requests: {sent:,} sent, {succeeded:,} succeeded, {failed:,} failed"
        + (f" ({reasons}; first of each: {first})" if failed else ""),
        f"latency, a fresh mTLS connection per request: {_ms(request)} "
        f"(connect + handshake {_ms(handshake)}); {succeeded / window:,.0f} requests/s "
        f"over {window:.1f} s",
        f"client SVIDs (maxTokenTTL {ttl} s, renewed at half-life): "
        + (
            f"every one of {sidecars} rotated during the window"
            if not not_rotated
            else f"{len(not_rotated)} of {sidecars} did NOT rotate during the window"
        )
        + f" — rotations per workload seen by the upstream {min(rotations)}..{max(rotations)}, "
        f"received on the Workload API streams {min(streamed)}..{max(streamed)}",
        f"receiving side's SVID (Envoy over SDS): {receiver_serials} certificates presented to "
        f"the clients ({'rotated' if receiver_rotated else 'did NOT rotate'})",
        f"upstream: {upstream_requests:,} requests of the window (the load counted {succeeded:,} "
        f"successes), {without_xfcc} without a client certificate, {mismatched} whose identity "
        "was not the certificate's",
        "CPU, % of one core over the window: "
        + ", ".join(f"{name} {share:.0f}" for name, share in cpu.items()),
        f"goal 0 failed requests while every SVID rotates: {verdict(goal_met)}"
        + (
            ""
            if proved
            else " — but the run did not prove the point: not every SVID rotated "
            "(make --duration longer than --ttl)"
        ),
    ]
    return {
        "title": f"Requests while every X.509-SVID of {sidecars} sidecars (and the receiver's) rotates",
        "results": results,
        "summary": summary,
        "sent": sent,
        "succeeded": succeeded,
        "failed": failed,
        "failures": dict(failures),
        "failure_examples": examples,
        "p50_us": None if request is None else round(request.p50_us, 1),
        "p99_us": None if request is None else round(request.p99_us, 1),
        "handshake_p50_us": None if handshake is None else round(handshake.p50_us, 1),
        "handshake_p99_us": None if handshake is None else round(handshake.p99_us, 1),
        "requests_per_s": round(succeeded / window, 1),
        "window_s": round(window, 2),
        "workloads": per_workload,
        "every_client_svid_rotated": not not_rotated,
        "receiver": {
            "spiffe_id": RECEIVER_ID,
            "certificates_seen": receiver_serials,
            "rotated": receiver_rotated,
        },
        "every_svid_rotated": proved,
        "upstream_requests": upstream_requests,
        "upstream_without_xfcc": without_xfcc,
        "upstream_identity_mismatches": mismatched,
        "cpu_percent": cpu,
        "event_loop": result["event_loop"],
        "processes_ended": dead,
        "goal_met": goal_met,
        "ok": not problems,
        "problems": problems,
        "sidecars": sidecars,
        "ttl": ttl,
        "seconds": seconds,
    }
