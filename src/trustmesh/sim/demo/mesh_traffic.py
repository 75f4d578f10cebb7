"""The mesh act's traffic: every round, each mesh caller sends its calls in plain HTTP
to its own Envoy, which takes them to orders' Envoy over mutual TLS with the caller's
X.509-SVID; the agent behind orders' Envoy decides from the client certificate, and the
orders service answers with what reached it (``upstream.py``). Each answer is checked
against what the policy says (200 or 403), and, after the suspended workload's cut-off,
against "refused". Also: the serials of the SVIDs each sidecar serves (its credential
folder), the projected service-account token files renewed as the kubelet does, and the
probes that time the cut-off without counting as traffic."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from trustmesh.common.files import write_atomically
from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo._http import json_body
from trustmesh.sim.demo.display import (
    Events,
    mesh_allowed_text,
    mesh_held_rotation_text,
    mesh_seen_rotation_text,
    short_serial,
)
from trustmesh.sim.demo.scenario import MESH_BY_NAME, MeshRoute
from trustmesh.sim.demo.scoreboard import MeshCutOff, MeshFlow, MeshRun
from trustmesh.sim.demo.traffic import RENEW_AT, SA_TOKEN_TTL
from trustmesh.sim.demo.upstream import serial_hex

SVID_FILE = "svid.pem"  # the SPIFFE credential folder's certificate chain, leaf first


@dataclass(frozen=True)
class MeshEndpoints:
    """Where the mesh act's parts listen, and the files of its sidecars."""

    egress: dict[str, str]  # caller -> base URL of its Envoy's egress listener (plain HTTP)
    ingress: str  # orders' Envoy (mutual TLS)
    agent_url: str  # the agent behind orders' Envoy, --trust-xfcc
    folders: dict[str, Path]  # workload -> its sidecar's credential folder
    token_files: dict[str, Path]  # workload -> its projected service-account token


@dataclass(frozen=True)
class MeshAnswer:
    """What a mesh call got: ``allowed`` (the upstream's answer), ``denied`` (403 from
    ext_authz), ``refused`` (401 from the agent, or 5xx from an Envoy: no decision was
    made), or ``error`` (no answer at all)."""

    kind: str
    status: int
    text: str  # "200", "403 forbidden", "401 revoked", "503 TLS handshake refused"…
    seen: dict[str, Any] = field(default_factory=dict)  # the upstream's JSON (allowed)

    @property
    def authenticated(self) -> bool:
        return self.kind in ("allowed", "denied")


def answer_of(response: httpx.Response) -> MeshAnswer:
    status = response.status_code
    if status == 200:
        return MeshAnswer("allowed", status, "200", json_body(response))
    if status == 403:
        return MeshAnswer("denied", status, f"403 {json_body(response).get('error') or ''}")
    if status == 401:
        return MeshAnswer("refused", status, f"401 {json_body(response).get('reason') or ''}")
    return MeshAnswer("refused", status, f"{status} {envoy_failure(response.text)}")


def envoy_failure(body: str) -> str:
    """Why an Envoy answered without a decision, in a few words: its local reply says
    ``upstream connect error or disconnect/reset before headers. reset reason: …``."""
    if "TLS" in body:
        return "TLS handshake refused"
    reset = re.search(r"reset reason: ([a-z ]+)", body)
    if reset:
        return f"connection to orders' Envoy reset ({reset.group(1).strip()})"
    return body.strip()[:60]


def held_certificate(folder: Path) -> x509.Certificate | None:
    """The leaf of the SVID a sidecar serves, from its credential folder (replaced
    atomically on rotation); None when there is none yet."""
    try:
        return x509.load_pem_x509_certificate((folder / SVID_FILE).read_bytes())
    except (OSError, ValueError):
        return None


class MeshTraffic:
    """The mesh callers' calls through the Envoys, and what the sidecars hold."""

    def __init__(
        self,
        run: MeshRun,
        http: httpx.Client,
        endpoints: MeshEndpoints,
        clusters: dict[str, SimulatedCluster],
        events: Events,
    ) -> None:
        self.run, self.http, self.endpoints = run, http, endpoints
        self.clusters, self.events = clusters, events
        self.tokens_renew_at = time.time() + RENEW_AT * SA_TOKEN_TTL

    def run_round(self) -> None:
        self.renew_tokens()
        for flow in self.run.flows:
            self.call(flow)
        self.observe_held()

    # -- calls

    def send(self, route: MeshRoute) -> MeshAnswer:
        """The call, as the workload makes it: plain HTTP to its own Envoy."""
        try:
            response = self.http.request(
                route.call.method,
                self.endpoints.egress[route.workload] + route.call.path,
                headers={"host": route.call.host},
            )
        except httpx.HTTPError as exc:
            return MeshAnswer("error", 0, f"no answer from its Envoy ({exc!r})")
        return answer_of(response)

    def probe(self, route: MeshRoute) -> MeshAnswer:
        """The same call, not counted as traffic (the operator times the cut-off)."""
        return self.send(route)

    def call(self, flow: MeshFlow) -> None:
        answer = self.send(flow.route)
        flow.calls += 1
        flow.last = answer.text
        cut = self.run.cut
        # The suspended workload: refusals are expected from its suspension on; before
        # the cut-off (while the agent has yet to take the revocation) it may get through.
        if (
            cut is not None
            and cut.revoked_at is not None
            and flow.route.workload == cut.workload
            and (cut.cut_off is not None or not answer.authenticated)
        ):
            self.after_cut_off(flow, cut, answer)
            return
        if not answer.authenticated:
            flow.failed += 1
            flow.last_failure = answer.text
            self.outcome(
                flow, f"failed {answer.text}", f"mesh: {flow.name}: FAILED ({answer.text})"
            )
            return
        problem = self.mismatch(flow.route, answer)
        if problem:
            flow.unexpected += 1
            self.outcome(
                flow, f"unexpected {answer.text}", f"mesh: UNEXPECTED: {flow.name}: {problem}"
            )
            return
        if answer.kind == "allowed":
            flow.allowed += 1
            self.seen(flow, answer.seen)
            self.outcome(flow, "allowed", mesh_allowed_text(flow, answer.seen))
        else:
            flow.denied += 1
            self.outcome(
                flow,
                "denied",
                f"mesh: {flow.name}: DENIED ({answer.text}): no RoleBinding allows it for the "
                f"identity in its client certificate, {MESH_BY_NAME[flow.route.workload].spiffe_id}",
            )

    def mismatch(self, route: MeshRoute, answer: MeshAnswer) -> str:
        """Why an answer is not what the policy says, or who the upstream saw is not the
        caller; empty when all is as it should be."""
        if answer.status != route.status:
            return f"got {answer.text}, the policy says {route.expect}"
        if answer.kind != "allowed":
            return ""
        expected = MESH_BY_NAME[route.workload].spiffe_id
        seen = answer.seen
        certificate = seen.get("client_certificate") or {}
        if seen.get("spiffe_id") != expected or certificate.get("uri") != expected:
            return (
                f"the upstream saw {seen.get('spiffe_id')!r} (certificate "
                f"{certificate.get('uri')!r}), not {expected}"
            )
        return ""

    def after_cut_off(self, flow: MeshFlow, cut: MeshCutOff, answer: MeshAnswer) -> None:
        """The suspended workload's calls: every refusal is expected; an answer that
        authenticated it is a problem; no answer at all is a failure."""
        if answer.authenticated:
            cut.accepted_after += 1
            self.outcome(
                flow,
                f"accepted {answer.text}",
                f"mesh: {flow.name}: AUTHENTICATED after its cut-off ({answer.text})",
            )
            return
        if answer.kind == "error":
            flow.failed += 1
            flow.last_failure = answer.text
            self.outcome(
                flow, f"failed {answer.text}", f"mesh: {flow.name}: FAILED ({answer.text})"
            )
            return
        flow.cut_off += 1
        cut.refusals[answer.text] += 1
        self.outcome(
            flow,
            f"cut off {answer.text}",
            f"mesh: {flow.name}: refused as expected, {cut.workload} is suspended ({answer.text})",
        )

    def seen(self, flow: MeshFlow, body: dict[str, Any]) -> None:
        """Note the serial of the client certificate the upstream saw; a new one is a
        rotation seen live, calls going on."""
        self.run.claims = {str(k): str(v) for k, v in (body.get("claims") or {}).items()}
        serial = str((body.get("client_certificate") or {}).get("serial") or "")
        serials = self.run.seen.setdefault(flow.route.workload, [])
        if not serial or (serials and serials[-1] == serial):
            return
        serials.append(serial)
        if len(serials) > 1:
            self.events.event(mesh_seen_rotation_text(self.run, flow.route.workload))

    def outcome(self, flow: MeshFlow, outcome: str, text: str) -> None:
        """Report a flow's outcome when it changes."""
        if outcome != flow.outcome:
            flow.outcome = outcome
            self.events.event(text)

    # -- what the sidecars hold

    def held(self, workload: str) -> x509.Certificate | None:
        return held_certificate(self.endpoints.folders[workload])

    def observe_held(self) -> None:
        """The serial each sidecar serves now; a renewal of a workload whose calls never
        reach the upstream (orders answers, crawler is denied) is reported from here."""
        upstream_sees = {f.route.workload for f in self.run.flows if f.route.status == 200}
        cut = self.run.cut
        for workload in self.endpoints.folders:
            leaf = self.held(workload)
            if leaf is None:
                continue
            serial = serial_hex(leaf.serial_number)
            serials = self.run.held.setdefault(workload, [])
            if serials and serials[-1] == serial:
                continue
            serials.append(serial)
            if (
                cut is not None
                and cut.revoked_at is not None
                and workload == cut.workload
                and leaf.not_valid_before_utc.timestamp() > cut.revoked_at
                and not cut.new_svid
            ):
                cut.new_svid = (
                    f"{workload}'s sidecar got a new X.509-SVID (serial {short_serial(serial)}) "
                    "after its suspension"
                )
                self.events.event(cut.new_svid)
            elif len(serials) == 2 and workload not in upstream_sees:
                # The first renewal of each is an event; the next ones are counted
                # (mesh_rotations_line), not printed every few seconds for ever.
                self.events.event(mesh_held_rotation_text(self.run, workload, leaf))

    # -- the pods' service-account tokens

    def renew_tokens(self) -> None:
        """Write each sidecar's projected service-account token again at 80 % of its
        lifetime, as the kubelet does: the sidecar reads the file before every renewal."""
        if time.time() < self.tokens_renew_at:
            return
        for name, path in self.endpoints.token_files.items():
            write_mesh_token(self.clusters, name, path)
        self.tokens_renew_at = time.time() + RENEW_AT * SA_TOKEN_TTL


def write_mesh_token(clusters: dict[str, SimulatedCluster], workload: str, path: Path) -> Path:
    """The projected service-account token of a mesh workload's pod (0600)."""
    wl = MESH_BY_NAME[workload]
    token = clusters[wl.cluster].mint(wl.namespace, wl.service_account, ttl=SA_TOKEN_TTL)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, token)
    return path
