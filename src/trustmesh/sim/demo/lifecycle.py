"""The life cycle act (DESIGN §11), stepped between traffic rounds like the operator's
actions, so nothing of it runs beside them:

1. **people**: demo-admin (the web console's person, whom the bootstrap ``admin.token``
   added at start, ``federation.py``) adds alice (admin), who adds bob (approver) and
   carol (auditor); from then on the demo's changes are alice's, and the bootstrap
   token is refused;
2. **onboarding**: alice applies a WorkloadTemplate for eu-west's ``analytics-*``
   namespaces (and a Workload, ``legacy-export``, that nobody will use); a service
   account of the new namespace ``analytics-etl`` exchanges its token and gets an
   identity with no Workload of its own; a service account of ``billing`` in us-east,
   which nothing matches, is refused;
3. **pending**: the refused service account shows in ``get pending``; alice applies the
   Workload the control plane suggests for it, and its next exchange succeeds;
4. **access request** (once the operator's policy change is done, so that nothing
   publishes a policy between the approval and the expiry): carol asks for
   ``orders-reader`` on us-east for the onboarded identity, for a few seconds; her own
   approval is refused; bob approves, and the act times until us-east's agent allows
   the identity's call, then, at the expiry, until it denies it again — with no publish
   in between;
5. **retirement**: ``legacy-export``, unused for its ``retireAfterUnused``, is retired
   by the control plane, and its exchange is refused.

Each step is short; a step that waits on the control plane (the pending list, the
expiry, the retirement) looks once per round until its deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import yaml

from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo.admin import Admin
from trustmesh.sim.demo.display import Events
from trustmesh.sim.demo.errors import ApiError, DemoError
from trustmesh.sim.demo.scenario import (
    ACCESS_CALL,
    ACCESS_CLUSTER,
    ACCESS_REASON,
    ACCESS_ROLE,
    APPROVER,
    ONBOARDED,
    ONBOARDING_TEMPLATE,
    OPERATOR_PERSON,
    PENDING,
    PEOPLE,
    REQUESTER,
    RETIRE_AFTER,
    RETIRING,
    RETIRING_WORKLOAD,
    ServiceAccount,
    onboarded_workload,
    onboarding_manifest,
)
from trustmesh.sim.demo.scoreboard import LifecycleRun, Scoreboard
from trustmesh.sim.demo.traffic import Refused, Traffic, unverified_claims

ACCESS_DURATION = 5  # seconds the access request asks for
PROBE_TIMEOUT = 3.0  # seconds the agent has to take up an approval, or drop an expiry
PROBE_POLL = 0.005
PENDING_DEADLINE = 10.0  # seconds for a refusal to show in the pending list
RETIREMENT_DEADLINE = 15.0  # seconds after the onboarding apply for the retirement

Step = Callable[[], bool]


class LifecycleAct:
    """The act's steps, in order; :meth:`step` runs the current one (a step returns
    True when done, False to be tried again next round)."""

    def __init__(
        self,
        board: Scoreboard,
        admin: Admin,
        http: httpx.Client,
        traffic: Traffic,
        clusters: dict[str, SimulatedCluster],
        events: Events,
    ) -> None:
        self.board, self.admin, self.http, self.traffic = board, admin, http, traffic
        self.clusters, self.events = clusters, events
        self.run = LifecycleRun()
        board.lifecycle = self.run
        self.people: dict[str, Admin] = {}
        self.steps: list[tuple[str, Step]] = [
            ("people", self.add_people),
            ("onboarding", self.onboard),
            ("pending", self.admit_pending),
            ("access request", self.request_access),
            ("access expiry", self.expire_access),
            ("retirement", self.retire),
        ]
        self.access: dict[str, Any] = {}
        self.onboarded_at = 0.0
        self.expires_at = 0.0  # the access request's expiresAt (epoch seconds)

    @property
    def done(self) -> bool:
        return not self.steps

    def step(self) -> None:
        """Run the current step once; a failure ends the act as a problem."""
        if not self.steps:
            return
        name, step = self.steps[0]
        try:
            finished = step()
        except (DemoError, Refused, httpx.HTTPError) as exc:
            self.fail(f"life cycle act, {name}: {exc}")
            return
        if finished:
            self.steps.pop(0)
            self.run.completed.append(name)

    def finish(self, deadline: float) -> None:
        """After the traffic: the remaining steps, a round at a time, until ``deadline``
        (monotonic); what is left then is a problem."""
        while self.steps and time.monotonic() < deadline:
            self.step()
            time.sleep(0.1)
        if self.steps:
            self.fail(f"life cycle act did not finish: {self.steps[0][0]} was still waiting")

    def fail(self, text: str) -> None:
        self.run.errors.append(text)
        self.events.event(text)
        self.steps.clear()

    # -- 1. people

    def add_people(self) -> bool:
        bootstrap = Admin(self.http, self.admin.url, self.admin.first_token)
        first = Admin(self.http, self.admin.url, self.admin.token)  # the console's admin
        tokens = {}
        for name, role in PEOPLE:
            acting = self.people.get(OPERATOR_PERSON, first)
            tokens[name] = acting.add_person(name, role)
            self.people[name] = Admin(self.http, self.admin.url, tokens[name])
        self.admin.act_as(tokens[OPERATOR_PERSON])  # the operator's changes are alice's now
        try:
            bootstrap.call("/v1/workloads", method="GET")
        except ApiError as exc:
            refused = f"{exc.answer_status} ({exc.answer_description})"
        else:
            raise DemoError("the bootstrap admin.token still works after an admin was added")
        shown = ", ".join(f"{name} ({role})" for name, role in PEOPLE)
        self.events.event(
            f"people: {shown} added with personal credentials; the demo's changes are "
            f"{OPERATOR_PERSON}'s from now on; the bootstrap admin.token is refused: {refused}"
        )
        return True

    # -- 2. onboarding

    def onboard(self) -> bool:
        self.admin.apply(
            {"onboarding.yaml": onboarding_manifest()},
            f"WorkloadTemplate {ONBOARDING_TEMPLATE}, Workload {RETIRING_WORKLOAD}",
        )
        self.onboarded_at = time.monotonic()
        token, _ = self.exchange(ONBOARDED, ACCESS_CLUSTER)
        spiffe_id = str(self.traffic_claims(token).get("sub"))
        self.run.onboarded = spiffe_id
        self.events.event(
            f"onboarding: WorkloadTemplate {ONBOARDING_TEMPLATE} applied (eu-west, namespaces "
            f"analytics-*); {ONBOARDED} exchanged its service-account token for {spiffe_id} "
            f"(workload {onboarded_workload()}) with no Workload of its own; "
            f"{RETIRING_WORKLOAD} registered with retireAfterUnused {RETIRE_AFTER} s"
        )
        try:
            self.exchange(PENDING, ACCESS_CLUSTER)
        except Refused as exc:
            self.events.event(
                f"onboarding: {PENDING}, matched by no Workload or template, refused: "
                f"{exc.error} ({exc.description})"
            )
            return True
        raise DemoError(f"{PENDING} was given an identity before anyone onboarded it")

    # -- 3. pending

    def admit_pending(self) -> bool:
        items = self.admin.call("/v1/pending", method="GET")["items"]
        found = next(
            (
                i
                for i in items
                if (i["cluster"], i["namespace"], i["serviceAccount"])
                == (PENDING.cluster, PENDING.namespace, PENDING.name)
            ),
            None,
        )
        if found is None:
            if time.monotonic() - self.onboarded_at > PENDING_DEADLINE:
                raise DemoError(f"{PENDING} never showed in get pending")
            return False
        manifest = found["manifest"]
        name = manifest["metadata"]["name"]
        self.admin.apply(
            {"pending.yaml": yaml.safe_dump(manifest, sort_keys=False)},
            f"onboard {PENDING} from get pending",
        )
        token, _ = self.exchange(PENDING, ACCESS_CLUSTER)
        self.run.pending_admitted = name
        self.events.event(
            f"pending: get pending listed {PENDING} ({found['count']} refusal(s)); "
            f"Workload {name} applied from its suggested manifest; its next exchange got "
            f"{self.traffic_claims(token).get('sub')}"
        )
        return True

    # -- 4. the access request

    def request_access(self) -> bool:
        change = self.board.policy.change
        if change is None or not self.board.by_revision.get(change.new_revision or -1):
            # after the operator's policy change, once traffic was decided under it: then
            # nothing publishes a policy until the expiry
            return False
        token, _ = self.exchange(ONBOARDED, ACCESS_CLUSTER)
        before = self.traffic.authorize(ACCESS_CLUSTER, token, ACCESS_CALL.request())
        if before.get("allowed") is True:
            raise DemoError(f"{onboarded_workload()} was allowed {ACCESS_CALL} before any access")
        requester, approver = self.people[REQUESTER], self.people[APPROVER]
        asked = time.monotonic()
        request = requester.request_access(
            ACCESS_ROLE,
            f"spiffeId={self.run.onboarded}",
            [ACCESS_CLUSTER],
            ACCESS_DURATION,
            ACCESS_REASON,
        )
        ident = str(request["id"])
        try:
            requester.decide_access(ident, "approve", "")
        except ApiError as exc:
            own = f"{exc.answer_status} ({exc.answer_description})"
        else:
            raise DemoError(f"{REQUESTER} approved her own access request {ident}")
        approved = approver.decide_access(ident, "approve", "for the Q4 audit")
        approved_at = time.monotonic()
        revision = int(approved["policyRevision"])
        policy = self.board.policy
        policy.stages[revision] = policy.stages.get(policy.revision, 0)  # routes: unchanged
        policy.revision = revision
        self.run.fulfilled_s = approved_at - asked
        in_force = self.probe(token, allowed=True)
        self.run.in_force_ms = (in_force - approved_at) * 1000
        self.access = {**approved, "id": ident, "revision": revision}
        self.expires_at = float(approved["expiresAt"])  # wall clock, whole seconds
        self.events.event(
            f"access request {ident}: {REQUESTER} asked for {ACCESS_ROLE} on "
            f"{ACCESS_CLUSTER} for {onboarded_workload()}, {ACCESS_DURATION} s; her own "
            f"approval refused: {own}; {APPROVER} approved it (policy revision {revision}): "
            f"in force at {ACCESS_CLUSTER}'s agent {self.run.in_force_ms:.0f} ms later"
        )
        return True

    def expire_access(self) -> bool:
        if time.time() < self.expires_at:
            return False
        if self.run.gone_ms is None:
            token, _ = self.exchange(ONBOARDED, ACCESS_CLUSTER)
            self.probe(token, allowed=False)
            self.run.gone_ms = max(0.0, (time.time() - self.expires_at) * 1000)
        revision = self.admin.policy_revision()
        if revision != self.access["revision"]:
            raise DemoError(
                f"the policy moved from revision {self.access['revision']} to {revision} "
                "between the approval and the expiry"
            )
        shown = self.people[REQUESTER].call(f"/v1/access/{self.access['id']}", method="GET")
        if shown.get("state") != "expired":
            raise DemoError(
                f"access request {self.access['id']} is {shown.get('state')} past expiry"
            )
        self.events.event(
            f"access request {self.access['id']} expired: gone at {ACCESS_CLUSTER}'s agent "
            f"{self.run.gone_ms:.0f} ms after its expiry, with no publish (policy revision "
            f"still {revision}); trustmesh access list shows it expired"
        )
        return True

    def probe(self, token: str, *, allowed: bool) -> float:
        """Ask the agent until its decision on the onboarded identity's call is
        ``allowed``; when it was (monotonic)."""
        deadline = time.monotonic() + PROBE_TIMEOUT
        while time.monotonic() < deadline:
            body = self.traffic.authorize(ACCESS_CLUSTER, token, ACCESS_CALL.request())
            if (body.get("allowed") is True) == allowed:
                return time.monotonic()
            time.sleep(PROBE_POLL)
        state = "allowed" if allowed else "denied"
        raise DemoError(
            f"{ACCESS_CLUSTER}'s agent never {state} {ACCESS_CALL} in {PROBE_TIMEOUT} s"
        )

    # -- 5. retirement

    def retire(self) -> bool:
        workloads = self.admin.call("/v1/workloads", method="GET")["items"]
        entry = next(w for w in workloads if w["metadata"]["name"] == RETIRING_WORKLOAD)
        suspended = (entry.get("status") or {}).get("suspended") or {}
        if not suspended.get("retired"):
            if time.monotonic() - self.onboarded_at > RETIREMENT_DEADLINE:
                raise DemoError(f"{RETIRING_WORKLOAD} was never retired")
            return False
        try:
            self.exchange(RETIRING, ACCESS_CLUSTER)
        except Refused as exc:
            self.run.retired = f"{exc.error} ({exc.description})"
            self.events.event(
                f"retirement: {RETIRING_WORKLOAD}, unused for {RETIRE_AFTER} s, retired by the "
                f"control plane; its exchange is refused: {self.run.retired}"
            )
            return True
        raise DemoError(f"the retired {RETIRING_WORKLOAD} still got a JWT-SVID")

    # -- helpers

    def exchange(self, account: ServiceAccount, target: str) -> tuple[str, float]:
        sa_token = self.clusters[account.cluster].mint(account.namespace, account.name, ttl=600)
        return self.traffic.exchange(sa_token, target)

    @staticmethod
    def traffic_claims(token: str) -> dict[str, Any]:
        return unverified_claims(token)
