"""The agent's Kubernetes webhooks against a real control plane and agent, spoken with
the official ``kubernetes`` client models: requests are built from ``V1TokenReview`` /
``V1SubjectAccessReview`` and serialised the way the client does, answers are
deserialised back into those models, so the shapes are the API server's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_support import client_of, local_agent
from kubernetes import client as k8s

from helpers import TRUST_DOMAIN, Agent, Server, cluster_yaml, start_agent, start_server
from trustmesh.sim import SimulatedCluster

AUDIENCE = f"spiffe://{TRUST_DOMAIN}/cluster/target"

WORKLOADS = """
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: payments}
spec:
  selector: {cluster: origin, namespace: shop, serviceAccount: payments}
  claims: {project: shop, environment: prod, tier: gold}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {name: reports}
spec:
  selector: {cluster: origin, namespace: shop, serviceAccount: reports}
  claims: {project: shop, environment: prod, tier: bronze}
"""

POLICY = """
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: pod-reader}
spec:
  rules:
  - apiGroups: [""]
    resources: [pods, pods/log]
    verbs: [get, list, watch]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: scaler}
spec:
  rules:
  - apiGroups: [apps]
    resources: [deployments/scale]
    verbs: [update, patch]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: secret-reader}
spec:
  rules:
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: health-reader}
spec:
  rules:
  - nonResourceURLs: [/healthz, /metrics/*]
    verbs: [get]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: orders-reader}
spec:
  rules:
  - services: [orders.internal]
    paths: [/api/**]
    methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: shop-reads-pods}
spec:
  role: pod-reader
  subjects: [{claims: {project: shop}}]
  namespaces: [shop]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: payments-scales}
spec:
  role: scaler
  subjects: [{workload: payments}]
  namespaces: [shop]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: shop-reads-secrets}
spec:
  role: secret-reader
  subjects: [{claims: {project: shop}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: bronze-no-secrets}
spec:
  role: secret-reader
  effect: deny
  subjects: [{claims: {tier: bronze}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: shop-health}
spec:
  role: health-reader
  subjects: [{claims: {project: shop}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: shop-reads-orders}
spec:
  role: orders-reader
  subjects: [{claims: {project: shop}}]
---
apiVersion: trustmesh.io/v1alpha1
kind: PolicyTest
metadata: {name: secrets}
spec:
  cases:
  - {subject: {workload: payments}, cluster: target, request: {verb: get, resource: secrets, namespace: shop}, expect: allow}
  - {subject: {workload: reports}, cluster: target, request: {verb: get, resource: secrets, namespace: shop}, expect: deny}
"""

API = k8s.ApiClient()


def serialise(model: Any) -> dict[str, Any]:
    body: dict[str, Any] = API.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
    return body


def deserialise(response: httpx.Response, kind: str) -> Any:
    """The client's own decoding of an API response (kubernetes >= 35 takes the text and
    the Content-Type; older releases took an object with ``.data``)."""
    return API.deserialize(response.text, kind, response.headers["content-type"])


def spiffe_id(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/cluster/origin/ns/shop/sa/{service_account}"


@dataclass
class Cluster:
    server: Server
    agent: Agent
    origin: SimulatedCluster

    def svid(self, service_account: str, audience: str = AUDIENCE) -> str:
        response = self.server.exchange(self.origin.mint("shop", service_account), audience)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.agent.url + path, json=body, timeout=10)

    def token_review(self, token: str, audiences: list[str] | None = None) -> Any:
        review = k8s.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=k8s.V1TokenReviewSpec(token=token, audiences=audiences),
        )
        response = self.post("/k8s/authenticate", serialise(review))
        assert response.status_code == 200, response.text
        assert response.json()["apiVersion"] == "authentication.k8s.io/v1"
        assert response.json()["kind"] == "TokenReview"
        assert token not in response.text
        return deserialise(response, "V1TokenReview")

    def access_review(
        self,
        user: str,
        resource: k8s.V1ResourceAttributes | None = None,
        non_resource: k8s.V1NonResourceAttributes | None = None,
        groups: list[str] | None = None,
        extra: dict[str, list[str]] | None = None,
    ) -> Any:
        review = k8s.V1SubjectAccessReview(
            api_version="authorization.k8s.io/v1",
            kind="SubjectAccessReview",
            spec=k8s.V1SubjectAccessReviewSpec(
                user=user,
                groups=groups,
                extra=extra,
                resource_attributes=resource,
                non_resource_attributes=non_resource,
            ),
        )
        response = self.post("/k8s/authorize", serialise(review))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["apiVersion"] == "authorization.k8s.io/v1"
        assert body["kind"] == "SubjectAccessReview"
        if not body["status"]["allowed"] and "denied" in body["status"]:
            assert body["status"]["denied"] is True  # only ever present as true
        answer = deserialise(response, "V1SubjectAccessReview")
        assert answer.spec.user == user
        return answer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("k8s")
    server = start_server(base / "server")
    try:
        with SimulatedCluster("origin") as origin:
            server.apply(
                "---\n".join(
                    [
                        cluster_yaml("origin", origin.issuer),
                        cluster_yaml("target", "http://127.0.0.1:9/target"),
                        WORKLOADS,
                    ]
                ),
                "inventory.yaml",
            )
            server.apply(POLICY, "policy.yaml")
            agent = start_agent("target", [server.url], base / "agent", server.credential("target"))
            try:
                yield Cluster(server, agent, origin)
            finally:
                assert agent.stop() == 0, agent.process.stderr()
    finally:
        server.stop()


def pods(
    verb: str = "get",
    namespace: str = "shop",
    subresource: str | None = None,
    name: str | None = None,
) -> k8s.V1ResourceAttributes:
    return k8s.V1ResourceAttributes(
        verb=verb,
        group="",
        version="v1",
        resource="pods",
        subresource=subresource,
        name=name,
        namespace=namespace,
    )


def secrets(namespace: str = "shop") -> k8s.V1ResourceAttributes:
    return k8s.V1ResourceAttributes(
        verb="get", group="", version="v1", resource="secrets", namespace=namespace, name="db"
    )


def no_opinion(answer: Any) -> None:
    assert answer.status.allowed is False
    assert not answer.status.denied
    assert "no opinion" in answer.status.reason


# --- TokenReview ---------------------------------------------------------------------


def test_token_review_authenticates_a_federated_token(cluster: Cluster) -> None:
    answer = cluster.token_review(cluster.svid("payments"))
    status = answer.status
    assert status.authenticated is True
    assert status.error is None
    assert status.audiences is None
    assert status.user.username == spiffe_id("payments")
    assert status.user.uid == "payments"
    assert status.user.groups == [
        "trustmesh:cluster:origin",
        "trustmesh:environment:prod",
        "trustmesh:project:shop",
        "trustmesh:tier:gold",
        "trustmesh:workload_id:payments",
    ]
    extra = status.user.extra
    assert extra["project"] == ["shop"]
    assert extra["namespace"] == ["shop"]
    assert extra["service_account"] == ["payments"]
    assert extra["sub"] == [spiffe_id("payments")]
    assert len(extra["jti"]) == 1
    assert "exp" not in extra and "aud" not in extra  # only string claims


def test_token_review_is_audience_aware(cluster: Cluster) -> None:
    token = cluster.svid("reports")
    answer = cluster.token_review(token, ["https://kubernetes.default.svc", AUDIENCE])
    assert answer.status.authenticated is True
    assert answer.status.audiences == [AUDIENCE]
    assert answer.spec.audiences == ["https://kubernetes.default.svc", AUDIENCE]
    assert answer.spec.token == ""  # never echoed
    refused = cluster.token_review(token, ["https://kubernetes.default.svc"])
    assert refused.status.authenticated is False
    assert refused.status.user is None
    assert "--api-audiences" in refused.status.error


@pytest.mark.parametrize("kind", ["garbage", "other-cluster", "tampered"])
def test_token_review_refuses_bad_tokens(cluster: Cluster, kind: str) -> None:
    if kind == "garbage":
        token = "not.a.jwt"
    elif kind == "other-cluster":
        token = cluster.svid("payments", f"spiffe://{TRUST_DOMAIN}/cluster/origin")
    else:
        header, payload, signature = cluster.svid("payments").split(".")
        token = f"{header}.{payload}.{signature[:-4]}AAAA"
    answer = cluster.token_review(token)
    assert answer.status.authenticated is False
    assert answer.status.user is None
    assert answer.status.error


# --- SubjectAccessReview --------------------------------------------------------------


def test_allows_what_a_binding_grants(cluster: Cluster) -> None:
    answer = cluster.access_review(spiffe_id("payments"), pods("list"))
    assert answer.status.allowed is True
    assert not answer.status.denied
    assert "shop-reads-pods" in answer.status.reason
    assert "policy revision" in answer.status.reason


def test_subresources_are_their_own_resources(cluster: Cluster) -> None:
    user = spiffe_id("payments")
    assert cluster.access_review(user, pods(subresource="log", name="web-0")).status.allowed
    no_opinion(cluster.access_review(user, pods("create", subresource="exec", name="web-0")))
    scale = k8s.V1ResourceAttributes(
        verb="patch",
        group="apps",
        version="v1",
        resource="deployments",
        subresource="scale",
        name="web",
        namespace="shop",
    )
    assert cluster.access_review(user, scale).status.allowed is True
    no_opinion(cluster.access_review(spiffe_id("reports"), scale))  # bound to payments only
    whole = k8s.V1ResourceAttributes(
        verb="patch", group="apps", version="v1", resource="deployments", namespace="shop"
    )
    no_opinion(cluster.access_review(user, whole))


def test_namespaces_of_a_binding_limit_it(cluster: Cluster) -> None:
    no_opinion(cluster.access_review(spiffe_id("payments"), pods(namespace="kube-system")))
    no_opinion(cluster.access_review(spiffe_id("payments"), pods(namespace="")))


def test_an_explicit_deny_answers_denied(cluster: Cluster) -> None:
    answer = cluster.access_review(spiffe_id("reports"), secrets())
    assert answer.status.allowed is False
    assert answer.status.denied is True
    assert "bronze-no-secrets" in answer.status.reason
    assert cluster.access_review(spiffe_id("payments"), secrets()).status.allowed is True


def test_non_resource_urls(cluster: Cluster) -> None:
    user = spiffe_id("payments")

    def ask(verb: str, path: str) -> Any:
        return cluster.access_review(
            user, non_resource=k8s.V1NonResourceAttributes(path=path, verb=verb)
        )

    assert ask("get", "/healthz").status.allowed is True
    assert ask("get", "/metrics/slis").status.allowed is True
    no_opinion(ask("post", "/healthz"))
    no_opinion(ask("get", "/healthz/etcd"))
    no_opinion(ask("get", "/api"))


@pytest.mark.parametrize(
    "user",
    [
        "system:serviceaccount:kube-system:default",
        "alice@example.com",
        f"spiffe://{TRUST_DOMAIN}/cluster/origin/ns/shop/sa/stranger",
        "",
    ],
)
def test_unknown_users_get_no_opinion(cluster: Cluster, user: str) -> None:
    answer = cluster.access_review(
        user,
        pods(),
        groups=["trustmesh:project:shop"],
        extra={"project": ["shop"], "tier": ["gold"]},
    )
    no_opinion(answer)
    assert "not a registered trustmesh identity" in answer.status.reason


def test_groups_and_extra_never_become_claims(cluster: Cluster) -> None:
    """An impersonator can set groups and extra; the registered claims decide."""
    answer = cluster.access_review(
        spiffe_id("reports"),
        secrets(),
        groups=["trustmesh:tier:gold", "system:masters"],
        extra={"tier": ["gold"], "workload_id": ["payments"]},
    )
    assert answer.status.denied is True


def test_token_review_then_access_review_like_the_api_server(cluster: Cluster) -> None:
    """The API server authenticates with the first webhook and passes the user it got
    to the second."""
    user = cluster.token_review(cluster.svid("reports")).status.user
    answer = cluster.access_review(user.username, secrets(), groups=user.groups, extra=user.extra)
    assert answer.status.denied is True
    answer = cluster.access_review(
        user.username, pods("watch"), groups=user.groups, extra=user.extra
    )
    assert answer.status.allowed is True


# --- malformed requests --------------------------------------------------------------


def sar_body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        (
            "/k8s/authenticate",
            {
                "apiVersion": "authentication.k8s.io/v1beta1",
                "kind": "TokenReview",
                "spec": {"token": "x"},
            },
            "apiVersion",
        ),
        (
            "/k8s/authenticate",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"},
            "spec",
        ),
        (
            "/k8s/authenticate",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}},
            "spec.token",
        ),
        (
            "/k8s/authenticate",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": "x", "audiences": "a"},
            },
            "spec.audiences",
        ),
        ("/k8s/authenticate", [1, 2], "object"),
        (
            "/k8s/authorize",
            {
                **sar_body(user="u", nonResourceAttributes={"path": "/", "verb": "get"}),
                "kind": "TokenReview",
            },
            "kind",
        ),
        ("/k8s/authorize", sar_body(user="u"), "exactly one"),
        (
            "/k8s/authorize",
            sar_body(
                user="u",
                resourceAttributes={"verb": "get", "resource": "pods"},
                nonResourceAttributes={"path": "/", "verb": "get"},
            ),
            "exactly one",
        ),
        ("/k8s/authorize", sar_body(user="u", resourceAttributes={"resource": "pods"}), "verb"),
        ("/k8s/authorize", sar_body(user="u", resourceAttributes={"verb": "get"}), "resource"),
        (
            "/k8s/authorize",
            sar_body(user="u", nonResourceAttributes={"path": "healthz", "verb": "get"}),
            "path",
        ),
        (
            "/k8s/authorize",
            sar_body(user=7, nonResourceAttributes={"path": "/", "verb": "get"}),
            "user",
        ),
        (
            "/k8s/authorize",
            sar_body(user="u", groups="g", nonResourceAttributes={"path": "/", "verb": "get"}),
            "groups",
        ),
        ("/k8s/authorize", sar_body(user="u", resourceAttributes=["get"]), "resourceAttributes"),
        # the one canonicalisation of DESIGN §3 (issue 10)
        (
            "/k8s/authorize",
            sar_body(user="u", nonResourceAttributes={"path": "//debug/pprof", "verb": "get"}),
            "spec.nonResourceAttributes.path contains an empty segment",
        ),
        (
            "/k8s/authorize",
            sar_body(user="u", nonResourceAttributes={"path": "/debug/../pprof", "verb": "get"}),
            "spec.nonResourceAttributes.path contains a dot segment",
        ),
        (
            "/k8s/authorize",
            sar_body(
                user="u",
                resourceAttributes={"verb": "get", "resource": "pods", "name": "web\u001b[2J"},
            ),
            "spec.resourceAttributes.name contains a control character",
        ),
    ],
)
def test_malformed_reviews_are_refused(
    cluster: Cluster, path: str, body: Any, fragment: str
) -> None:
    response = cluster.post(path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert fragment in response.json()["error_description"]


@pytest.mark.parametrize("path", ["/k8s/authenticate", "/k8s/authorize"])
def test_bodies_that_are_not_json_objects_or_too_large(cluster: Cluster, path: str) -> None:
    url = cluster.agent.url + path
    headers = {"content-type": "application/json"}
    assert httpx.post(url, content=b"{not json", headers=headers).status_code == 400
    assert httpx.post(url, content=b"{}", headers={"content-type": "text/plain"}).status_code == 400
    huge = json.dumps(sar_body(user="u" * 70_000)).encode()
    response = httpx.post(url, content=huge, headers=headers)
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"
    assert httpx.get(url).status_code == 405


# --- before the agent has anything ---------------------------------------------------


def test_not_ready_agent_answers_503(tmp_path: Path) -> None:
    """An agent with neither keys nor bundle: the webhooks say so instead of guessing."""
    agent = local_agent(tmp_path, "target")
    token = serialise(
        k8s.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=k8s.V1TokenReviewSpec(token="a.b.c"),
        )
    )
    access = sar_body(user="u", nonResourceAttributes={"path": "/", "verb": "get"})

    async def ask() -> list[int]:
        async with client_of(agent) as http:
            answers = [
                await http.post("/k8s/authenticate", json=token),
                await http.post("/k8s/authorize", json=access),
                await http.request(
                    "PATCH",
                    "/ext_authz/api",
                    headers={"host": "orders", "authorization": "Bearer x"},
                ),
            ]
        await agent.client.aclose()
        return [a.status_code for a in answers]

    assert asyncio.run(ask()) == [503, 503, 503]
