"""The agent's admission webhooks (DESIGN §9 "Admission", ``agent/admission.py``) over
real HTTPS: a control plane and two agents that serve TLS with a certificate of a
private CA made here with ``cryptography`` (the agents trust the control plane with
``--ca-file``), spoken to the way the API server speaks.

Pods, their containers, volumes and the requester's ``UserInfo`` are the official
``kubernetes`` client models, serialised by its ``ApiClient``; the client has no model
of the ``AdmissionReview`` envelope itself (the API server never serves one), so the
envelope is the plain ``admission.k8s.io/v1`` JSON around them. Returned patches are
applied with the ``jsonpatch`` library and the result is read back into a ``V1Pod``.
The printed webhook configurations are read with the client's own deserializer."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import pytest
import yaml
from kubernetes import client as k8s

from helpers import Agent, Server, cluster_yaml, start_agent, start_server, trustmesh_cmd
from tls_support import Tls, make_tls
from trustmesh.agent.admission import pointer

API = k8s.ApiClient()
AUDIENCE = "kube-target"  # the Cluster's audience: what its SA tokens must carry
IMAGE = "registry.example/trustmesh:test"
SOCKET = "unix:///run/trustmesh/workload-api.sock"
REGISTRY = f"""
{cluster_yaml("target", "http://127.0.0.1:9/target", audience=AUDIENCE)}
---
{cluster_yaml("other", "http://127.0.0.1:9/other")}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: payments}}
spec:
  selector: {{cluster: target, namespace: shop, serviceAccount: payments}}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: ledger}}
spec:
  selector: {{cluster: other, namespace: billing, serviceAccount: ledger}}
---
apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata: {{name: teams}}
spec:
  clusters: {{names: [target]}}
  namespaces: ["team-*"]
  serviceAccounts: ["*"]
"""


def serialise(model: Any) -> Any:
    return API.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]


def as_pod(document: dict[str, Any]) -> Any:
    """A pod document read into ``V1Pod`` by the client's own deserializer."""
    return API.deserialize(json.dumps(document), "V1Pod", "application/json")


@dataclass
class Webhooks:
    server: Server
    deny: Agent  # defaults: --admission deny, --admission-failure-policy ignore
    warn: Agent  # --admission warn --admission-failure-policy fail
    tls: Tls
    http: httpx.Client

    def post(self, agent: Agent, webhook: str, body: Any, **kw: Any) -> httpx.Response:
        if "content" not in kw:
            kw["json"] = body
        return self.http.post(f"{agent.url}/k8s/admission/{webhook}", **kw)

    def answer(self, agent: Agent, webhook: str, review: dict[str, Any]) -> dict[str, Any]:
        response = self.post(agent, webhook, review)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["apiVersion"] == "admission.k8s.io/v1"
        assert body["kind"] == "AdmissionReview"
        answer: dict[str, Any] = body["response"]
        assert answer["uid"] == review["request"]["uid"]
        return answer


@pytest.fixture(scope="module")
def webhooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhooks]:
    base = tmp_path_factory.mktemp("admission")
    tls = make_tls(base / "tls")
    trust = ssl.create_default_context(cafile=str(tls.ca))
    server = start_server(base / "server", None, *tls.flags(), verify=trust)
    agents: list[Agent] = []
    try:
        server.apply(REGISTRY, "registry.yaml")
        common = ("--ca-file", str(tls.ca), *tls.flags(), "--sidecar-image", IMAGE)
        for name, extra in (
            ("deny", ()),
            ("warn", ("--admission", "warn", "--admission-failure-policy", "fail")),
        ):
            credential = server.credential("target")
            agents.append(
                start_agent("target", [server.url], base / name, credential, *common, *extra)
            )
        with httpx.Client(verify=trust, timeout=10) as http:
            yield Webhooks(server, agents[0], agents[1], tls, http)
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.process.stderr()
        server.stop()


def pod(
    name: str = "web",
    service_account: str | None = "payments",
    containers: list[k8s.V1Container] | None = None,
    annotations: dict[str, str] | None = None,
    volumes: list[k8s.V1Volume] | None = None,
    init_containers: list[k8s.V1Container] | None = None,
) -> k8s.V1Pod:
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(name=name, namespace="shop", annotations=annotations),
        spec=k8s.V1PodSpec(
            service_account_name=service_account,
            containers=containers or [k8s.V1Container(name="app", image="shop/web:1")],
            init_containers=init_containers,
            volumes=volumes,
        ),
    )


def review(
    obj: Any,
    *,
    namespace: str = "shop",
    operation: str = "CREATE",
    kind: tuple[str, str, str] = ("", "v1", "Pod"),
) -> dict[str, Any]:
    """An ``admission.k8s.io/v1`` AdmissionReview as the API server sends it for ``obj``
    (a model, or a document)."""
    group, version, kind_name = kind
    document = obj if isinstance(obj, dict) else serialise(obj)
    user = k8s.V1UserInfo(
        username="system:serviceaccount:kube-system:replicaset-controller",
        uid=str(uuid.uuid4()),
        groups=["system:serviceaccounts", "system:authenticated"],
    )
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind_name},
            "resource": {"group": group, "version": version, "resource": "pods"},
            "requestKind": {"group": group, "version": version, "kind": kind_name},
            "requestResource": {"group": group, "version": version, "resource": "pods"},
            "name": (document.get("metadata") or {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": serialise(user),
            "object": document,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patched(document: dict[str, Any], answer: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """``document`` with the answer's JSON Patch applied (jsonpatch), and the patch."""
    assert answer["allowed"] is True
    assert answer["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(answer["patch"], validate=True))
    result = jsonpatch.JsonPatch(operations).apply(document)
    return result, operations


def env_of(container: Any) -> dict[str, str]:
    return {item.name: item.value for item in container.env or []}


def mounts_of(container: Any) -> dict[str, Any]:
    return {mount.mount_path: mount for mount in container.volume_mounts or []}


# -- mutate ------------------------------------------------------------------------------------
def test_mutate_injects_the_sidecar_volumes_and_socket_env_into_every_container(
    webhooks: Webhooks,
) -> None:
    secret = k8s.V1EnvVar(name="DB_PASSWORD", value="hunter2-do-not-log")
    original = pod(
        containers=[
            k8s.V1Container(name="app", image="shop/web:1", env=[secret]),
            k8s.V1Container(name="metrics", image="shop/metrics:1"),  # no env, no mounts
        ],
        init_containers=[k8s.V1Container(name="migrate", image="shop/migrate:1")],
        annotations={"example.com/owner": "shop"},
        volumes=[k8s.V1Volume(name="cache", empty_dir=k8s.V1EmptyDirVolumeSource())],
    )
    document = serialise(original)
    answer = webhooks.answer(webhooks.deny, "mutate", review(document))
    result, _ = patched(document, answer)
    injected = as_pod(result)

    volumes = {volume.name: volume for volume in injected.spec.volumes}
    assert set(volumes) == {"cache", "trustmesh-token", "trustmesh-workload-api"}
    token = volumes["trustmesh-token"].projected.sources[0].service_account_token
    assert (token.audience, token.expiration_seconds, token.path) == (AUDIENCE, 3600, "token")
    assert volumes["trustmesh-workload-api"].empty_dir is not None

    names = [container.name for container in injected.spec.containers]
    assert names == ["app", "metrics", "trustmesh-sidecar"]
    sidecar = injected.spec.containers[-1]
    assert sidecar.image == IMAGE
    assert sidecar.command == ["trustmesh"]
    assert sidecar.args == [
        "sidecar",
        "--server",
        webhooks.server.url,
        "--sa-token-file",
        "/var/run/secrets/trustmesh/token",
        "--socket",
        "/run/trustmesh/workload-api.sock",
        "--socket-mode",
        "0666",
    ]
    sidecar_mounts = mounts_of(sidecar)
    assert sidecar_mounts["/var/run/secrets/trustmesh"].name == "trustmesh-token"
    assert sidecar_mounts["/var/run/secrets/trustmesh"].read_only is True
    assert sidecar_mounts["/run/trustmesh"].name == "trustmesh-workload-api"
    assert sidecar.security_context.run_as_non_root is True
    assert sidecar.security_context.allow_privilege_escalation is False

    for container in injected.spec.containers[:2]:
        assert env_of(container)["SPIFFE_ENDPOINT_SOCKET"] == SOCKET
        mount = mounts_of(container)["/run/trustmesh"]
        assert (mount.name, mount.read_only) == ("trustmesh-workload-api", True)
        assert "/var/run/secrets/trustmesh" not in mounts_of(container)  # no SA token for it
    assert env_of(injected.spec.containers[0])["DB_PASSWORD"] == "hunter2-do-not-log"
    assert injected.spec.init_containers[0].env is None  # runs before the sidecar exists
    assert injected.metadata.annotations == {
        "example.com/owner": "shop",
        "trustmesh.io/injected": "true",
    }

    again = webhooks.answer(webhooks.deny, "mutate", review(result))
    assert again["allowed"] is True
    assert "patch" not in again and "patchType" not in again  # applying twice changes nothing


def test_a_pod_without_volumes_env_or_annotations_gets_the_arrays_created(
    webhooks: Webhooks,
) -> None:
    document = serialise(pod(service_account=None))
    assert "volumes" not in document["spec"] and "annotations" not in document["metadata"]
    answer = webhooks.answer(webhooks.deny, "mutate", review(document))
    result, operations = patched(document, answer)
    created = {op["path"]: op["value"] for op in operations}
    assert [v["name"] for v in created["/spec/volumes"]] == [
        "trustmesh-token",
        "trustmesh-workload-api",
    ]
    assert created["/spec/containers/0/env"] == [
        {"name": "SPIFFE_ENDPOINT_SOCKET", "value": SOCKET}
    ]
    assert created["/metadata/annotations"] == {"trustmesh.io/injected": "true"}
    injected = as_pod(result)
    assert env_of(injected.spec.containers[0]) == {"SPIFFE_ENDPOINT_SOCKET": SOCKET}
    assert len(injected.spec.volumes) == 2


def test_an_annotation_key_is_escaped_as_a_json_pointer(webhooks: Webhooks) -> None:
    document = serialise(pod(annotations={"a~b/c": "kept"}))
    answer = webhooks.answer(webhooks.deny, "mutate", review(document))
    result, operations = patched(document, answer)
    paths = [op["path"] for op in operations]
    assert "/metadata/annotations/trustmesh.io~1injected" in paths
    assert result["metadata"]["annotations"] == {"a~b/c": "kept", "trustmesh.io/injected": "true"}
    assert pointer("metadata", "annotations", "a~b/c") == "/metadata/annotations/a~0b~1c"
    escaped = jsonpatch.JsonPatch(
        [{"op": "replace", "path": pointer("metadata", "annotations", "a~b/c"), "value": "x"}]
    ).apply(result)
    assert escaped["metadata"]["annotations"]["a~b/c"] == "x"


def test_a_pod_that_opts_out_is_left_alone(webhooks: Webhooks) -> None:
    document = serialise(pod(annotations={"trustmesh.io/inject": "false"}))
    answer = webhooks.answer(webhooks.deny, "mutate", review(document))
    assert answer["allowed"] is True
    assert "patch" not in answer


def test_a_container_with_its_own_socket_setting_or_mount_is_respected(
    webhooks: Webhooks,
) -> None:
    own = k8s.V1Container(
        name="own-socket",
        image="x",
        env=[k8s.V1EnvVar(name="SPIFFE_ENDPOINT_SOCKET", value="unix:///elsewhere.sock")],
    )
    clash = k8s.V1Container(
        name="clash",
        image="y",
        volume_mounts=[k8s.V1VolumeMount(name="data", mount_path="/run/trustmesh/")],
    )
    document = serialise(
        pod(
            containers=[own, clash],
            volumes=[k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource())],
        )
    )
    answer = webhooks.answer(webhooks.deny, "mutate", review(document))
    result, _ = patched(document, answer)
    injected = as_pod(result)
    assert env_of(injected.spec.containers[0])["SPIFFE_ENDPOINT_SOCKET"] == "unix:///elsewhere.sock"
    assert mounts_of(injected.spec.containers[0])["/run/trustmesh"].name == "trustmesh-workload-api"
    assert injected.spec.containers[1].env is None
    assert [m.name for m in injected.spec.containers[1].volume_mounts] == ["data"]
    assert any("clash" in warning and "/run/trustmesh" in warning for warning in answer["warnings"])


def test_reviews_other_than_pod_create_are_allowed_unchanged(webhooks: Webhooks) -> None:
    document = serialise(pod())
    for webhook in ("mutate", "validate"):
        update = webhooks.answer(webhooks.deny, webhook, review(document, operation="UPDATE"))
        deployment = webhooks.answer(
            webhooks.warn, webhook, review(document, kind=("apps", "v1", "Deployment"))
        )
        for answer in (update, deployment):
            assert answer["allowed"] is True
            assert "patch" not in answer
            assert "pod CREATE only" in answer["warnings"][0]


# -- validate ----------------------------------------------------------------------------------
def test_validate_allows_a_pod_whose_service_account_has_a_workload(webhooks: Webhooks) -> None:
    answer = webhooks.answer(webhooks.deny, "validate", review(pod()))
    assert answer == {"uid": answer["uid"], "allowed": True}


def test_validate_denies_a_pod_without_a_workload_and_names_what_is_missing(
    webhooks: Webhooks,
) -> None:
    answer = webhooks.answer(webhooks.deny, "validate", review(pod(service_account="unknown")))
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 403
    message = answer["status"]["message"]
    assert (
        "no Workload of cluster target selects namespace shop, service account unknown" in message
    )
    assert "serviceAccount: unknown" in message

    default = webhooks.answer(webhooks.deny, "validate", review(pod(service_account=None)))
    assert "service account default" in default["status"]["message"]

    # a Workload of another cluster for the same (namespace, service account) does not count
    elsewhere = pod(service_account="ledger")
    elsewhere.metadata.namespace = "billing"
    other = webhooks.answer(webhooks.deny, "validate", review(elsewhere, namespace="billing"))
    assert other["allowed"] is False
    assert (
        "cluster target selects namespace billing, service account ledger"
        in other["status"]["message"]
    )


def test_validate_allows_a_pod_a_workload_template_gives_an_identity(
    webhooks: Webhooks,
) -> None:
    """No Workload names team-x/api, the template ``teams`` (cluster target, namespaces
    team-*) does: allowed, and its audit event says which template; a namespace the
    template does not match is still denied."""
    onboarded = pod(service_account="api")
    onboarded.metadata.namespace = "team-x"
    onboarding = review(onboarded, namespace="team-x")
    answer = webhooks.answer(webhooks.deny, "validate", onboarding)
    assert answer == {"uid": answer["uid"], "allowed": True}
    deadline = time.monotonic() + 30
    while True:
        response = webhooks.server.admin.get(
            "/v1/audit/query", params={"type": "admission.reviewed", "limit": "1000"}
        )
        assert response.status_code == 200, response.text
        found = [
            entry["event"]
            for entry in response.json()["entries"]
            if entry["event"]["request"]["uid"] == onboarding["request"]["uid"]
        ]
        if found:
            break
        assert time.monotonic() < deadline, "the agent's admission event was not shipped"
        time.sleep(0.2)
    assert found[0]["decision"] == {
        "allowed": True,
        "policy_revision": 0,
        "reason": "WorkloadTemplate teams (spiffe://corp.example/cluster/target/ns/team-x/sa/api)",
    }
    outside = pod(service_account="api")
    outside.metadata.namespace = "teamx"
    denied = webhooks.answer(webhooks.deny, "validate", review(outside, namespace="teamx"))
    assert denied["allowed"] is False
    assert "no Workload of cluster target selects namespace teamx" in denied["status"]["message"]


def test_validate_with_admission_warn_allows_with_a_warning(webhooks: Webhooks) -> None:
    answer = webhooks.answer(webhooks.warn, "validate", review(pod(service_account="unknown")))
    assert answer["allowed"] is True
    assert "status" not in answer
    (warning,) = answer["warnings"]
    assert (
        "no Workload of cluster target selects namespace shop, service account unknown" in warning
    )


def test_a_pod_the_webhook_cannot_read_is_allowed_unless_it_fails_closed(
    webhooks: Webhooks,
) -> None:
    broken = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}
    for webhook in ("mutate", "validate"):
        lenient = webhooks.answer(webhooks.deny, webhook, review(broken))
        assert lenient["allowed"] is True and "patch" not in lenient
        assert "could not decide" in lenient["warnings"][0]
        strict = webhooks.answer(webhooks.warn, webhook, review(broken))
        assert strict["allowed"] is False
        assert strict["status"]["code"] == 500
        assert "could not decide" in strict["status"]["message"]
        assert "spec.containers" in strict["status"]["message"]


# -- malformed reviews ---------------------------------------------------------------------------
def malformed_cases() -> list[tuple[str, Any, str]]:
    good = review(pod())
    wrong_version = {**good, "apiVersion": "admission.k8s.io/v1beta1"}
    wrong_kind = {**good, "kind": "TokenReview"}
    no_uid = {**good, "request": {k: v for k, v in good["request"].items() if k != "uid"}}
    no_request = {k: v for k, v in good.items() if k != "request"}
    bad_operation = {**good, "request": {**good["request"], "operation": "PATCH"}}
    return [
        ("another apiVersion", wrong_version, "expected apiVersion admission.k8s.io/v1"),
        ("another kind", wrong_kind, "kind AdmissionReview"),
        ("no uid", no_uid, "request.uid must be a non-empty string"),
        ("no request", no_request, "request must be an object"),
        ("an operation", bad_operation, "request.operation must be"),
        ("a list", [good], "must be a JSON object"),
    ]


@pytest.mark.parametrize("webhook", ["mutate", "validate"])
def test_malformed_reviews_are_clear_400s(webhooks: Webhooks, webhook: str) -> None:
    for what, body, expected in malformed_cases():
        response = webhooks.post(webhooks.deny, webhook, body)
        assert response.status_code == 400, (what, response.text)
        assert response.json()["error"] == "invalid_request"
        assert expected in response.json()["error_description"], (what, response.text)
    for what, raw, expected in (
        ("not JSON", b"{not json", "not valid JSON"),
        ("a member twice", b'{"apiVersion": "a", "apiVersion": "b"}', "appears twice"),
        ("NaN", b'{"apiVersion": NaN}', "NaN"),
    ):
        headers = {"Content-Type": "application/json"}
        response = webhooks.post(webhooks.deny, webhook, None, content=raw, headers=headers)
        assert response.status_code == 400, (what, response.text)
        assert expected in response.json()["error_description"], (what, response.text)
    form = webhooks.post(
        webhooks.deny, webhook, None, content=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert form.status_code == 400
    assert "Content-Type must be application/json" in form.json()["error_description"]


def test_an_oversized_review_is_refused_413(webhooks: Webhooks) -> None:
    huge = review(pod(annotations={"big": "x" * (2 * 1024 * 1024)}))
    response = webhooks.post(webhooks.deny, "mutate", huge)
    assert response.status_code == 413, response.text[:300]
    assert "larger than 2097152 bytes" in response.json()["error_description"]
    fits = review(pod(annotations={"big": "x" * (1024 * 1024)}))  # a 1 MiB annotation fits
    assert webhooks.answer(webhooks.deny, "mutate", fits)["allowed"] is True


# -- audit -------------------------------------------------------------------------------------------
def test_every_admission_decision_is_audited_without_the_pod_spec(webhooks: Webhooks) -> None:
    secret = k8s.V1EnvVar(name="API_KEY", value="s3cr3t-value-never-audited")
    injected = review(
        pod(name="audited", containers=[k8s.V1Container(name="a", image="i", env=[secret])])
    )
    denied = review(pod(name="refused", service_account="nobody"))
    webhooks.answer(webhooks.deny, "mutate", injected)
    webhooks.answer(webhooks.deny, "validate", denied)
    wanted = {injected["request"]["uid"], denied["request"]["uid"]}
    deadline = time.monotonic() + 30
    while True:
        response = webhooks.server.admin.get(
            "/v1/audit/query", params={"type": "admission.reviewed", "limit": "1000"}
        )
        assert response.status_code == 200, response.text
        found = {
            entry["event"]["request"]["uid"]: entry["event"]
            for entry in response.json()["entries"]
            if entry["event"]["request"]["uid"] in wanted
        }
        if len(found) == 2:
            break
        assert time.monotonic() < deadline, "the agent's admission events were not shipped"
        time.sleep(0.2)
    mutated = found[injected["request"]["uid"]]
    assert mutated["cluster"] == "target"
    assert mutated["source"]["kind"] == "agent"
    assert mutated["request"] == {
        "surface": "k8s.admission.mutate",
        "uid": injected["request"]["uid"],
        "user": "system:serviceaccount:kube-system:replicaset-controller",
        "namespace": "shop",
        "kind": "Pod",
        "operation": "CREATE",
        "name": "audited",
        "service_account": "payments",
    }
    assert mutated["decision"] == {"allowed": True, "reason": "injected"}
    assert mutated["detail"]["patched"] is True and mutated["detail"]["outcome"] == "patched"
    refused = found[denied["request"]["uid"]]
    assert refused["request"]["surface"] == "k8s.admission.validate"
    assert refused["decision"]["allowed"] is False
    assert "service account nobody" in refused["decision"]["reason"]
    assert isinstance(refused["decision"]["policy_revision"], int)
    assert refused["detail"] == {"outcome": "denied", "patched": False}
    for event in found.values():
        assert "s3cr3t-value-never-audited" not in json.dumps(event)
        assert "API_KEY" not in json.dumps(event)
    metrics = webhooks.http.get(webhooks.deny.url + "/metrics").text
    assert 'trustmesh_agent_admission_reviews_total{outcome="patched",webhook="mutate"}' in metrics


# -- trustmesh admission config ------------------------------------------------------------------------
def admission_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd("admission", "config", *args), capture_output=True, text=True, timeout=60
    )


def test_admission_config_prints_webhook_configurations_the_client_reads(
    webhooks: Webhooks,
) -> None:
    printed = admission_config(
        "--cluster", "target", "--agent-url", webhooks.deny.url, "--ca-file", str(webhooks.tls.ca)
    )
    assert printed.returncode == 0, printed.stderr
    documents = list(yaml.safe_load_all(printed.stdout))
    kinds = [document["kind"] for document in documents]
    assert kinds == ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
    mutating = API.deserialize(
        json.dumps(documents[0]), "V1MutatingWebhookConfiguration", "application/json"
    )
    validating = API.deserialize(
        json.dumps(documents[1]), "V1ValidatingWebhookConfiguration", "application/json"
    )
    ca_bundle = base64.b64encode(webhooks.tls.ca.read_bytes()).decode()
    for configuration, path in ((mutating, "mutate"), (validating, "validate")):
        (hook,) = configuration.webhooks
        assert hook.client_config.url == f"{webhooks.deny.url}/k8s/admission/{path}"
        assert hook.client_config.ca_bundle == ca_bundle
        assert base64.b64decode(hook.client_config.ca_bundle) == webhooks.tls.ca.read_bytes()
        assert hook.admission_review_versions == ["v1"]
        assert hook.side_effects == "None"
        assert hook.failure_policy == "Ignore"
        assert hook.timeout_seconds == 5
        (rule,) = hook.rules
        assert (rule.api_groups, rule.api_versions, rule.operations, rule.resources) == (
            [""],
            ["v1"],
            ["CREATE"],
            ["pods"],
        )
        (expression,) = hook.namespace_selector.match_expressions
        assert (expression.key, expression.operator) == ("kubernetes.io/metadata.name", "NotIn")
        assert expression.values == ["kube-system", "trustmesh"]
    assert mutating.webhooks[0].reinvocation_policy == "IfNeeded"

    # the caBundle printed is the CA the agent's certificate chains to: the API server's
    # TLS client, given it, trusts the agent
    trust = ssl.create_default_context(cadata=base64.b64decode(ca_bundle).decode())
    assert httpx.get(webhooks.deny.url + "/healthz", verify=trust, timeout=10).status_code == 200


def test_admission_config_for_a_service_and_its_refusals(tmp_path: Path) -> None:
    printed = admission_config(
        "--cluster",
        "beta",
        "--namespace",
        "mesh",
        "--failure-policy",
        "Fail",
        "--exclude-namespace",
        "kube-public",
    )
    assert printed.returncode == 0, printed.stderr
    mutating = API.deserialize(
        json.dumps(next(yaml.safe_load_all(printed.stdout))),
        "V1MutatingWebhookConfiguration",
        "application/json",
    )
    (hook,) = mutating.webhooks
    service = hook.client_config.service
    assert (service.namespace, service.name, service.path, service.port) == (
        "mesh",
        "trustmesh-agent",
        "/k8s/admission/mutate",
        443,
    )
    assert hook.client_config.ca_bundle is None
    assert hook.failure_policy == "Fail"
    assert hook.namespace_selector.match_expressions[0].values == [
        "kube-system",
        "mesh",
        "kube-public",
    ]
    assert mutating.metadata.name == "trustmesh-beta"

    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    for args, expected in (
        (
            ("--cluster", "beta", "--agent-url", "http://agent:8181"),
            "must be an absolute https:// URL",
        ),
        (
            ("--cluster", "beta", "--ca-file", str(not_pem)),
            f"--ca-file {not_pem} holds no PEM certificate",
        ),
        (("--cluster", "Beta"), "--cluster: 'Beta' is not a DNS-1123 label"),
        (
            ("--cluster", "beta", "--failure-policy", "Maybe"),
            "--failure-policy must be one of Ignore, Fail",
        ),
    ):
        refused = admission_config(*args)
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], refused.stderr
