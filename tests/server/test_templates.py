"""WorkloadTemplate with real processes (DESIGN §11): a control plane, a simulated
cluster minting projected service-account tokens, and an agent of the target cluster
with ``--trust-xfcc``. A namespace no Workload names is onboarded by a template alone:
its service account exchanges its token, the JWT-SVID is authorized by its templated
claims, it gets an X.509-SVID, and the agent derives the same claims for that
certificate's SPIFFE ID from the bundle's templates (XFCC). An explicit Workload wins
over the template; overlapping templates and bad placeholders are refused at apply,
naming what is wrong, with nothing of the apply written."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import (
    TRUST_DOMAIN,
    Agent,
    Server,
    cluster_yaml,
    serve_cluster,
    start_agent,
    start_server,
    trustmesh_cmd,
    unique,
    workload_yaml,
)
from trustmesh.identity.keys import generate_private_key, public_jwk
from trustmesh.identity.x509svid import csr_pem
from trustmesh.sim.cluster import SimulatedCluster

HOST = "orders.internal"
REQUEST = {"host": HOST, "path": "/api/orders", "method": "GET"}
CATCH_UP = 30.0  # seconds: bounds a poll for the agent's next bundle, never asserted


def template_yaml(name: str, clusters: str, namespaces: str, accounts: str, extra: str = "") -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata:
  name: {name}
spec:
  clusters: {clusters}
  namespaces: {namespaces}
  serviceAccounts: {accounts}
  claims:
    project: "{{namespace}}"
    environment: prod
    owner: "team-{{serviceAccount}}"
  maxTokenTTL: 10m
{extra}"""


POLICY = f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata:
  name: orders-reader
spec:
  rules:
    - services: [{HOST}]
      paths: ["/api/**"]
      methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata:
  name: pod-reader
spec:
  rules:
    - apiGroups: [""]
      resources: [pods]
      verbs: [get, list]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata:
  name: team-a-reads
spec:
  role: orders-reader
  subjects:
    - claims: {{project: team-a, environment: prod}}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata:
  name: team-a-pods
spec:
  role: pod-reader
  subjects:
    - claims: {{project: team-a}}
"""


@dataclass
class Setup:
    server: Server
    origin: SimulatedCluster
    origin_name: str
    target_name: str
    agent: Agent

    @property
    def audience(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/cluster/{self.target_name}"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    server = start_server(tmp_path / "cp")
    origin = serve_cluster("tpl")
    agent: Agent | None = None
    try:
        origin_name, target_name = unique("origin-"), unique("target-")
        server.apply(
            "---\n".join(
                [
                    cluster_yaml(origin_name, origin.issuer, labels="{environment: prod}"),
                    cluster_yaml(target_name, f"http://127.0.0.1:9/{target_name}"),
                    template_yaml(
                        "teams",
                        "{selector: {matchLabels: {environment: prod}}}",
                        '["team-*"]',
                        '["*"]',
                    ),
                    POLICY,
                ]
            )
        )
        agent = start_agent(
            target_name,
            [server.url],
            tmp_path / "agent",
            server.credential(target_name),
            "--trust-xfcc",
        )
        yield Setup(server, origin, origin_name, target_name, agent)
    finally:
        if agent is not None:
            agent.stop()
        origin.stop()
        assert server.stop() == 0


class OddIssuer:
    """A registered cluster (label environment: prod, inline JWKS) whose issuer signs
    whatever names it is given, as a misbehaving API server could."""

    def __init__(self, server: Server, audience: str) -> None:
        self.server, self.audience = server, audience
        self.key = generate_private_key("ES256")
        self.jwk = public_jwk(self.key, "ES256")
        self.name = unique("odd-")
        self.issuer = f"https://{self.name}.example"
        server.apply(
            cluster_yaml(
                self.name,
                self.issuer,
                labels="{environment: prod}",
                jwks=json.dumps({"keys": [self.jwk]}),
            )
        )

    def exchange(self, namespace: str, account: str) -> httpx.Response:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": ["trustmesh"],
            "sub": f"system:serviceaccount:{namespace}:{account}",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account}},
        }
        token = jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.jwk["kid"]})
        return self.server.exchange(token, self.audience)


def exchange(setup: Setup, namespace: str, account: str) -> httpx.Response:
    return setup.server.exchange(setup.origin.mint(namespace, account), setup.audience)


def authorize_until(setup: Setup, token: str, allowed: bool) -> dict[str, Any]:
    """The agent's answer, polled until it is ``allowed`` (an apply reaches the agent
    with its next bundle); the bound only stops a test that would hang."""
    deadline = time.monotonic() + CATCH_UP
    while True:
        answer: dict[str, Any] = setup.agent.authorize(token, REQUEST).json()
        if answer.get("allowed") is allowed or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "TRUSTMESH_CONFIG": "/nonexistent",
            "TRUSTMESH_SERVER": server.url,
            "TRUSTMESH_TOKEN": server.admin_token,
            "COLUMNS": "300",
        },
    )


def test_a_template_onboards_a_namespace_with_no_workload_manifest(setup: Setup) -> None:
    """team-a/api matches the template: its first exchange gets the templated SPIFFE ID
    and claims, the agent allows it by those claims, its X.509-SVID carries the same
    SPIFFE ID, and through XFCC the agent derives the same claims and allows it too.
    ``get workloads`` lists the identity with its template once it was issued."""
    server = setup.server
    answer = exchange(setup, "team-a", "api")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["expires_in"] == 300  # default TTL, below the template's 10m maximum
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/cluster/{setup.origin_name}/ns/team-a/sa/api"
    assert claims["sub"] == spiffe_id
    assert claims["project"] == "team-a" and claims["owner"] == "team-api"
    assert claims["workload_id"] == f"teams/{setup.origin_name}/team-a/api"
    assert (claims["cluster"], claims["namespace"], claims["service_account"]) == (
        setup.origin_name,
        "team-a",
        "api",
    )
    decision = authorize_until(setup, body["access_token"], True)
    assert decision["allowed"] is True, decision
    assert "team-a-reads" in str(decision)

    # a namespace the template matches but the binding does not: denied, not unknown
    other = exchange(setup, "team-b", "api")
    assert other.status_code == 200, other.text
    assert setup.agent.authorize(other.json()["access_token"], REQUEST).json()["allowed"] is False

    # a namespace the template does not match: no identity at all
    refused = exchange(setup, "payments", "api")
    assert refused.status_code == 400 and refused.json()["error"] == "unauthorized_client"
    assert "no WorkloadTemplate matches it" in refused.json()["error_description"]
    # names as Kubernetes never spells them, from an issuer that signs anything, match
    # no glob ("team-*" would match the text) and never reach a SPIFFE ID
    odd = OddIssuer(server, setup.audience)
    for namespace, account in (("team-a.x", "api"), ("team-A", "api"), ("team-a", "a/../b")):
        answer = odd.exchange(namespace, account)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "unauthorized_client", answer.text
    assert odd.exchange("team-a", "api").status_code == 200  # its canonical names do match

    # SubjectAccessReview of the derived SPIFFE ID: the agent derives its claims
    def sar(user: str) -> dict[str, Any]:
        review = httpx.post(
            setup.agent.url + "/k8s/authorize",
            json={
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user,
                    "resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "x"},
                },
            },
            timeout=10,
        )
        assert review.status_code == 200, review.text
        status: dict[str, Any] = review.json()["status"]
        return status

    assert sar(spiffe_id)["allowed"] is True
    stranger = f"spiffe://{TRUST_DOMAIN}/cluster/{setup.origin_name}/ns/payments/sa/api"
    assert sar(stranger)["allowed"] is False and "denied" not in sar(stranger)  # no opinion

    # the X.509-SVID of the same service account, through the sidecar's endpoint
    issued = httpx.post(
        server.url + "/v1/x509-svid",
        json={
            "subject_token": setup.origin.mint("team-a", "api"),
            "csr": csr_pem(ec.generate_private_key(ec.SECP256R1())),
        },
        timeout=10,
    )
    assert issued.status_code == 200, issued.text
    leaf = issued.json()["svid"][0]
    certificate = x509.load_pem_x509_certificate(leaf.encode())
    [uri] = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uri == spiffe_id
    header = f'Cert="{quote(leaf, safe="")}";URI={uri}'
    xfcc = httpx.get(
        setup.agent.url + "/ext_authz/api/orders",
        headers={"host": HOST, "x-forwarded-client-cert": header},
        timeout=10,
    )
    assert xfcc.status_code == 200, xfcc.text

    # audit names the template; get workloads lists the observed identity with it
    events = server.audit_events_until(
        "token.issued", lambda found: any(e["actor"] == spiffe_id for e in found)
    )
    [first, *_] = [e for e in events if e["actor"] == spiffe_id]
    assert first["identity"]["template"] == "teams"
    assert first["identity"]["workload"] == f"teams/{setup.origin_name}/team-a/api"
    listed = cli(server, "get", "workloads", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    derived = {
        item["metadata"]["name"]: item
        for item in json.loads(listed.stdout)
        if item["status"].get("template") == "teams"
    }
    assert set(derived) == {
        f"teams/{setup.origin_name}/team-a/api",
        f"teams/{setup.origin_name}/team-b/api",
        f"teams/{odd.name}/team-a/api",
    }
    item = derived[f"teams/{setup.origin_name}/team-a/api"]
    assert item["status"]["spiffeId"] == spiffe_id
    assert item["spec"]["claims"]["project"] == "team-a"
    table = cli(server, "get", "workloads")
    assert table.returncode == 0 and "TEMPLATE" in table.stdout and "teams" in table.stdout


def test_an_explicit_workload_wins_over_the_template(setup: Setup) -> None:
    """team-a/special matches the template, but a Workload selects it: the exchange
    gives the Workload's SPIFFE ID and claims, and the agent no longer reads the
    template's SPIFFE ID for that service account as an identity."""
    server = setup.server
    before = exchange(setup, "team-a", "special")
    assert before.status_code == 200, before.text
    template_id = jwt.decode(before.json()["access_token"], options={"verify_signature": False})[
        "sub"
    ]
    explicit = workload_yaml(
        "special",
        setup.origin_name,
        "team-a",
        "special",
        f'  spiffeId: "spiffe://{TRUST_DOMAIN}/explicit/special"\n',
    )
    server.apply(explicit)
    after = exchange(setup, "team-a", "special")
    assert after.status_code == 200, after.text
    claims = jwt.decode(after.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == f"spiffe://{TRUST_DOMAIN}/explicit/special"
    assert claims["workload_id"] == "special" and claims["project"] == "shop"
    assert claims["sub"] != template_id
    # the Workload's claims (project shop) are not team-a's: denied by the agent
    decision = authorize_until(setup, after.json()["access_token"], False)
    assert decision["allowed"] is False, decision


def test_overlapping_templates_are_refused_naming_both_and_nothing_is_written(
    setup: Setup,
) -> None:
    """A second template whose globs can match a service account the first matches is
    refused (409) naming both and an example; the Workload in the same apply is not
    created and the registry revision does not move."""
    server = setup.server
    revision = server.admin.get("/v1/workloads").json()
    overlapping = template_yaml(
        "api-everywhere", f"{{names: [{setup.origin_name}]}}", '["*-prod"]', '["api*"]'
    )
    bystander = workload_yaml("bystander", setup.origin_name, "misc", "bystander")
    refused = server.apply("---\n".join([overlapping, bystander]), expect=409)
    text = str(refused)
    assert "WorkloadTemplate api-everywhere and WorkloadTemplate teams" in text
    assert "namespace team-prod" in text and "serviceAccount api" in text
    assert server.admin.get("/v1/workloads").json() == revision
    assert exchange(setup, "misc", "bystander").status_code == 400
    # disjoint globs are accepted
    disjoint = template_yaml(
        "payments", f"{{names: [{setup.origin_name}]}}", '["payments"]', '["*"]'
    ).replace('owner: "team-{serviceAccount}"', 'owner: "{serviceAccount}"')
    server.apply(
        disjoint.replace(
            "maxTokenTTL: 10m",
            f'maxTokenTTL: 10m\n  spiffeIdTemplate: "spiffe://{TRUST_DOMAIN}/pay/{{cluster}}/{{namespace}}/{{serviceAccount}}"',
        )
    )
    paid = exchange(setup, "payments", "ledger")
    assert paid.status_code == 200, paid.text
    sub = jwt.decode(paid.json()["access_token"], options={"verify_signature": False})["sub"]
    assert sub == f"spiffe://{TRUST_DOMAIN}/pay/{setup.origin_name}/payments/ledger"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        (
            "spiffe://{td}/x/{{cluster}}/{{namespace}}/{{serviceAccount}}/{{pod}}",
            "unknown placeholder {pod}",
        ),
        (
            "spiffe://{td}/ns/{{namespace}}/sa/{{serviceAccount}}",
            "must hold {cluster} exactly once",
        ),
        (
            "spiffe://{td}/{{cluster}}/{{namespace}}-{{serviceAccount}}",
            "must be a whole path segment",
        ),
        (
            "spiffe://{td}/{{cluster}}/{{namespace}}/{{serviceAccount}}/..",
            "does not give a valid SPIFFE ID",
        ),
        (
            "spiffe://other.example/{{cluster}}/{{namespace}}/{{serviceAccount}}",
            "outside trust domain",
        ),
    ],
)
def test_bad_placeholders_are_refused_at_apply(setup: Setup, template: str, problem: str) -> None:
    server = setup.server
    spiffe = template.format(td=TRUST_DOMAIN)
    bad = template_yaml("bad", f"{{names: [{setup.origin_name}]}}", '["bad-ns"]', '["*"]').replace(
        "maxTokenTTL: 10m", f'maxTokenTTL: 10m\n  spiffeIdTemplate: "{spiffe}"'
    )
    bystander = workload_yaml("bystander2", setup.origin_name, "misc", "bystander2")
    answer = server.admin.post(
        "/v1/apply",
        json={"files": [{"path": "bad.yaml", "content": "---\n".join([bad, bystander])}]},
    )
    assert answer.status_code in (400, 409, 422), answer.text
    assert problem in answer.text
    assert exchange(setup, "bad-ns", "x").status_code == 400
    assert exchange(setup, "misc", "bystander2").status_code == 400


def test_policy_diff_and_policy_tests_see_template_identities(setup: Setup) -> None:
    """A PolicyTest may name a template-derived identity by its workload name
    (TEMPLATE/CLUSTER/NAMESPACE/SA) even before it was issued, and gates the apply like
    any case; ``policy diff`` lists the grants of the identities templates gave (as
    observed), under that name."""
    server = setup.server
    team_a = f"teams/{setup.origin_name}/team-a/api"
    team_b = f"teams/{setup.origin_name}/team-b/api"

    def policy_test(name: str, workload: str, expect: str) -> str:
        return f"""apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata:
  name: {name}
spec:
  cases:
    - name: reads orders
      subject: {{workload: {workload}}}
      cluster: {setup.target_name}
      request: {{host: {HOST}, path: /api/orders, method: GET}}
      expect: {expect}
"""

    server.apply(policy_test("team-a-reads-orders", team_a, "allow"))
    failed = server.apply(policy_test("team-b-reads-orders", team_b, "allow"), expect=422)
    assert "team-b-reads-orders" in str(failed) and "expected allow, got deny" in str(failed)
    unknown = server.apply(
        policy_test("nobody", f"teams/{setup.origin_name}/payments/api", "deny"), expect=409
    )
    assert "nor an identity a WorkloadTemplate gives" in str(unknown)

    # team-b/api is issued once (observed), then a binding names it
    assert exchange(setup, "team-b", "api").status_code == 200
    revision = server.admin.get("/v1/policy/versions/current").json()["revision"]
    server.apply(
        f"""apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata:
  name: team-b-reads
spec:
  role: orders-reader
  subjects:
    - workload: {team_b}
"""
    )
    diff = cli(server, "policy", "diff", str(revision), "current", "-o", "json")
    assert diff.returncode == 0, diff.stderr
    appeared = json.loads(diff.stdout)["appeared"]
    assert {(g["workload"], g["cluster"], g["target"]) for g in appeared} == {
        (team_b, setup.target_name, f"{HOST} /api/**"),
        (team_b, setup.origin_name, f"{HOST} /api/**"),
    }
    listed = cli(server, "get", "workloadtemplates")
    assert listed.returncode == 0 and "teams" in listed.stdout and "team-*" in listed.stdout


def test_a_template_identity_is_revoked_and_suspended_by_its_workload_name(setup: Setup) -> None:
    """``revoke --workload TEMPLATE/CLUSTER/NAMESPACE/SA`` revokes what that identity
    holds (the agent denies its token); ``suspend --workload`` stops new credentials."""
    server = setup.server
    name = f"teams/{setup.origin_name}/team-a/api"
    token = exchange(setup, "team-a", "api").json()["access_token"]
    assert authorize_until(setup, token, True)["allowed"] is True
    revoked = cli(server, "revoke", "--workload", name, "--reason", "test")
    assert revoked.returncode == 0, revoked.stderr
    answer = authorize_until(setup, token, False)
    assert answer["allowed"] is False and answer["reason"] == "revoked", answer
    suspended = cli(server, "suspend", "--workload", name, "--reason", "test")
    assert suspended.returncode == 0, suspended.stderr
    refused = exchange(setup, "team-a", "api")
    assert refused.status_code in (400, 403), refused.text
    unknown = cli(server, "revoke", "--workload", f"teams/{setup.origin_name}/other/api")
    assert unknown.returncode == 1 and "is not registered" in unknown.stderr


def test_policy_test_offline_names_template_identities(tmp_path: Path) -> None:
    """``trustmesh policy test DIR`` (no server) reads WorkloadTemplates too, so a CI
    pipeline checks what a namespace a template onboards will be allowed."""
    (tmp_path / "all.yaml").write_text(
        "---\n".join(
            [
                cluster_yaml("east", "https://east.example", labels="{environment: prod}"),
                cluster_yaml("west", "https://west.example"),
                template_yaml(
                    "teams", "{selector: {matchLabels: {environment: prod}}}", '["team-*"]', '["*"]'
                ),
                POLICY,
                f"""apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata:
  name: onboarded
spec:
  cases:
    - name: team-a reads orders
      subject: {{workload: teams/east/team-a/api}}
      cluster: west
      request: {{host: {HOST}, path: /api/orders, method: GET}}
      expect: allow
    - name: team-b does not
      subject: {{workload: teams/east/team-b/api}}
      cluster: west
      request: {{host: {HOST}, path: /api/orders, method: GET}}
      expect: allow
""",
            ]
        )
    )
    result = subprocess.run(
        trustmesh_cmd("policy", "test", str(tmp_path), "-o", "json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    results = {r["case"]: r for r in json.loads(result.stdout)["results"]}
    assert results["team-a reads orders"]["passed"] is True
    assert results["team-b does not"]["got"] == "deny"
