"""People at a cluster's API server (issue 14 item 5), with a real control plane, two
real agents and the official ``kubernetes`` client models: ``POST /v1/login`` (and
``trustmesh login``) gives a person a token for one cluster; that cluster's agent
authenticates it in a TokenReview (the other cluster's refuses it: wrong audience),
no surface that takes JWT-SVIDs accepts it, SubjectAccessReviews of ``user:NAME`` are
decided by ``user`` bindings only, and ``trustmesh user remove`` cuts the tokens off."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from kubernetes import client as k8s

from helpers import (
    Agent,
    Server,
    cluster_yaml,
    eventually,
    start_agent,
    start_server,
    trustmesh_cmd,
)

POLICY = """
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: pod-reader}
spec:
  rules: [{apiGroups: [""], resources: [pods], verbs: [get, list]}]
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: secret-reader}
spec:
  rules: [{apiGroups: [""], resources: [secrets], verbs: [get]}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: ann-reads-pods}
spec:
  role: pod-reader
  namespaces: [shop]
  subjects: [{user: ann}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: ann-reads-secrets}
spec:
  role: secret-reader
  subjects: [{user: ann}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: ann-no-secrets}
spec:
  role: secret-reader
  effect: deny
  subjects: [{user: ann}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: anything-without-a-tier}
spec:
  role: pod-reader
  subjects: [{matchExpressions: [{key: tier, operator: DoesNotExist}]}]
"""

API = k8s.ApiClient()


def serialise(model: Any) -> dict[str, Any]:
    body: dict[str, Any] = API.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
    return body


def deserialise(response: httpx.Response, kind: str) -> Any:
    return API.deserialize(response.text, kind, response.headers["content-type"])


@dataclass
class World:
    server: Server
    target: Agent
    other: Agent
    people: dict[str, str]  # name -> personal credential
    bootstrap_login: httpx.Response  # asked before an admin person existed

    def admin(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """As carl, an admin person (the bootstrap admin.token stops working then)."""
        return httpx.post(
            self.server.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.people['carl']}"},
            timeout=10,
        )

    def login(self, person: str, body: dict[str, Any]) -> httpx.Response:
        secret = self.people[person]
        return httpx.post(
            self.server.url + "/v1/login",
            json=body,
            headers={"Authorization": f"Bearer {secret}"},
            timeout=10,
        )

    def token(self, person: str, cluster: str = "target") -> str:
        answer = self.login(person, {"cluster": cluster})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["token"])


def token_review(agent: Agent, token: str) -> Any:
    review = k8s.V1TokenReview(
        api_version="authentication.k8s.io/v1",
        kind="TokenReview",
        spec=k8s.V1TokenReviewSpec(token=token),
    )
    response = httpx.post(agent.url + "/k8s/authenticate", json=serialise(review), timeout=10)
    assert response.status_code == 200, response.text
    assert token not in response.text
    return deserialise(response, "V1TokenReview")


def access_review(agent: Agent, user: str, attributes: k8s.V1ResourceAttributes) -> Any:
    review = k8s.V1SubjectAccessReview(
        api_version="authorization.k8s.io/v1",
        kind="SubjectAccessReview",
        spec=k8s.V1SubjectAccessReviewSpec(
            user=user, groups=["trustmesh:people"], resource_attributes=attributes
        ),
    )
    response = httpx.post(agent.url + "/k8s/authorize", json=serialise(review), timeout=10)
    assert response.status_code == 200, response.text
    return deserialise(response, "V1SubjectAccessReview")


def resource(resource: str, verb: str = "get", namespace: str = "shop") -> k8s.V1ResourceAttributes:
    return k8s.V1ResourceAttributes(
        verb=verb, group="", version="v1", resource=resource, namespace=namespace
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("people")
    server = start_server(base / "server")
    agents: list[Agent] = []
    try:
        server.apply(
            "---\n".join(
                [
                    cluster_yaml("target", "http://127.0.0.1:9/target"),
                    cluster_yaml("other", "http://127.0.0.1:9/other"),
                ]
            ),
            "inventory.yaml",
        )
        server.apply(POLICY, "policy.yaml")
        bootstrap_login = server.admin.post("/v1/login", json={"cluster": "target"})
        credentials = {cluster: server.credential(cluster) for cluster in ("target", "other")}
        people = {}
        for name, role in (("ann", "approver"), ("bob", "auditor"), ("carl", "admin")):
            added = server.admin.post("/v1/people", json={"name": name, "role": role})
            assert added.status_code == 200, added.text
            people[name] = added.json()["token"]
        for cluster in ("target", "other"):
            agents.append(start_agent(cluster, [server.url], base / cluster, credentials[cluster]))
        yield World(server, agents[0], agents[1], people, bootstrap_login)
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.process.stderr()
        server.stop()


def test_login_token_shape_and_audit(world: World) -> None:
    answer = world.login("ann", {"cluster": "target", "ttl": 600})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["cluster"] == "target" and body["username"] == "user:ann"
    token = body["token"]
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["typ"] == "trustmesh-login+jwt"
    assert claims["sub"] == "user:ann" and claims["iss"] == world.server.url
    assert claims["aud"] == ["spiffe://corp.example/cluster/target"]
    assert claims["exp"] - claims["iat"] == 600 == body["expiresAt"] - claims["iat"]

    def logins() -> list[dict[str, Any]]:
        answer = httpx.get(
            world.server.url + "/v1/audit/query",
            params={"type": "user.login", "limit": 1000},
            headers={"Authorization": f"Bearer {world.people['bob']}"},  # an auditor
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return [entry["event"] for entry in answer.json()["entries"]]

    events = eventually(
        lambda: (
            (found := logins())
            and any(e["detail"]["jti"] == claims["jti"] for e in found)
            and found
        ),
        "the user.login event",
    )
    (event,) = [e for e in events if e["detail"]["jti"] == claims["jti"]]
    assert event["actor"] == "user:ann" and event["cluster"] == "target"
    assert event["detail"]["cluster"] == "target" and event["detail"]["expires_at"]
    assert token not in json.dumps(events)


def test_login_is_for_people_of_any_role(world: World) -> None:
    for person in ("ann", "bob", "carl"):  # approver, auditor, admin
        assert world.login(person, {"cluster": "target"}).status_code == 200
    bootstrap = world.bootstrap_login  # the admin.token names nobody at a cluster
    assert bootstrap.status_code == 403, bootstrap.text
    assert "bootstrap admin.token" in bootstrap.json()["error_description"]
    issued = world.admin("/v1/clusters/target/credentials", {})
    assert issued.status_code == 200, issued.text
    cluster = httpx.post(
        world.server.url + "/v1/login",
        json={"cluster": "target"},
        headers={"Authorization": f"Bearer {issued.json()['token']}"},
        timeout=10,
    )
    assert cluster.status_code == 403
    unknown = world.login("ann", {"cluster": "nowhere"})
    assert unknown.status_code == 404 and "nowhere" in unknown.json()["error_description"]
    for ttl in (0, 59, 3601, "900", True):
        bad = world.login("ann", {"cluster": "target", "ttl": ttl})
        assert bad.status_code == 400, (ttl, bad.text)
        assert "ttl" in bad.json()["error_description"]
    assert world.login("ann", {"cluster": "target", "extra": 1}).status_code == 400


def test_token_review_authenticates_a_person_at_their_cluster_only(world: World) -> None:
    token = world.token("ann")
    status = eventually(
        lambda: (s := token_review(world.target, token).status).authenticated and s,
        "the agent's keys",
    )
    assert status.user.username == "user:ann"
    assert status.user.uid == "user:ann"
    assert status.user.groups == ["trustmesh:people"]
    assert not status.user.extra
    elsewhere = token_review(world.other, token).status
    assert elsewhere.authenticated is not True
    assert "audience" in elsewhere.error
    assert token_review(world.other, world.token("ann", "other")).status.authenticated is True


def test_a_login_token_is_no_jwt_svid(world: World) -> None:
    token = world.token("ann")
    answer = world.target.authorize(token, {"host": "a.shop.svc", "path": "/", "method": "GET"})
    assert answer.status_code == 401, answer.text
    assert answer.json()["reason"] == "malformed"
    assert "trustmesh-login+jwt" in answer.json()["error_description"]
    check = httpx.get(
        world.target.url + "/ext_authz/api",
        headers={"host": "a.shop.svc", "authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert check.status_code == 401 and check.json()["error"] == "invalid_token"
    exchanged = world.server.exchange(token, "spiffe://corp.example/cluster/target")
    assert exchanged.status_code == 400, exchanged.text
    assert exchanged.json()["error"] == "invalid_grant"


def test_access_reviews_of_people(world: World) -> None:
    allowed = access_review(world.target, "user:ann", resource("pods")).status
    assert allowed.allowed is True and "ann-reads-pods" in allowed.reason
    denied = access_review(world.target, "user:ann", resource("secrets")).status
    assert denied.allowed is False and denied.denied is True
    assert "ann-no-secrets" in denied.reason
    # bob has no user binding; a workload binding matching every identity without a
    # tier claim (DoesNotExist) does not match a person
    for who, attributes in (
        ("user:bob", resource("pods")),
        ("user:ann", resource("pods", namespace="kube-system")),
    ):
        answer = access_review(world.target, who, attributes).status
        assert answer.allowed is False and not answer.denied
        assert "no opinion" in answer.reason


def test_user_remove_cuts_off_login_tokens(world: World) -> None:
    added = world.admin("/v1/people", {"name": "dora", "role": "auditor"})
    assert added.status_code == 200, added.text
    world.people["dora"] = added.json()["token"]
    token = world.token("dora")
    assert eventually(
        lambda: token_review(world.target, token).status.authenticated, "dora authenticated"
    )
    removed = world.admin("/v1/people/dora/remove", {"reason": "left"})
    assert removed.status_code == 200, removed.text
    status = eventually(
        lambda: (s := token_review(world.target, token).status).authenticated is not True and s,
        "the revocation of user:dora at the agent",
    )
    assert "revoked" in status.error
    assert world.login("dora", {"cluster": "target"}).status_code == 401


def test_cli_login_prints_a_token_or_an_exec_credential(world: World, tmp_path: Path) -> None:
    secret = tmp_path / "ann.token"
    secret.write_text(world.people["ann"])
    env = {**os.environ, "TRUSTMESH_SERVER": world.server.url}
    base = [*trustmesh_cmd("login", "--cluster", "target", "--token-file", str(secret))]
    plain = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert plain.returncode == 0, plain.stderr
    assert jwt.get_unverified_header(plain.stdout.strip())["typ"] == "trustmesh-login+jwt"
    assert "user:ann at cluster target" in plain.stderr
    run = subprocess.run(
        [*base, "--ttl", "5m", "-o", "exec-credential"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    credential = json.loads(run.stdout)
    assert credential["apiVersion"] == "client.authentication.k8s.io/v1"
    assert credential["kind"] == "ExecCredential"
    token = credential["status"]["token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300
    stamp = credential["status"]["expirationTimestamp"]
    assert stamp.endswith("Z") and time.time() < claims["exp"]
    bad = subprocess.run(
        [*base, "--ttl", "2h"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert bad.returncode != 0 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "ttl" in bad.stderr
