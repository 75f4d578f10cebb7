"""Kubernetes admission webhooks (DESIGN §9 "Admission"): AdmissionReview
``admission.k8s.io/v1`` at ``POST /k8s/admission/mutate`` and
``POST /k8s/admission/validate``, and the webhook configurations that point the API
server at them (``trustmesh admission config``).

**Mutate** answers a pod CREATE with an RFC 6902 JSON Patch (base64 in
``response.patch``, ``patchType: JSONPatch``) that adds what a pod needs to get its
X.509-SVID from a ``trustmesh sidecar``:

* a projected service-account token volume (``trustmesh-token``: audience = the
  Cluster's ``audience``, which the control plane tells the agent, expirationSeconds
  3600), mounted read-only in the sidecar only;
* a shared ``emptyDir`` for the Workload API socket (``trustmesh-workload-api``, at
  ``/run/trustmesh``);
* the ``trustmesh-sidecar`` container (``trustmesh sidecar --server … --sa-token-file
  … --socket /run/trustmesh/workload-api.sock --socket-mode 0666``: the socket is open
  to every uid because the workload's uid is not known here, and the directory it is
  in exists only in this pod, whose containers share one identity anyway);
* ``SPIFFE_ENDPOINT_SOCKET=unix:///run/trustmesh/workload-api.sock`` and a read-only
  mount of the socket directory in every container (not in ``initContainers``: they
  run before the sidecar starts, and a SPIFFE client in one would wait for ever);
* the annotation ``trustmesh.io/injected: "true"``.

Each piece is added only when missing (an array created when the pod has none), so
applying the patch twice changes nothing, and a pod with every piece is "already
injected" and left alone; so is a pod annotated ``trustmesh.io/inject: "false"``. A
container that sets ``SPIFFE_ENDPOINT_SOCKET`` itself keeps its value; one that mounts
something else at ``/run/trustmesh`` is left alone with a warning.

**Validate** denies (``--admission deny``, the default) or allows with a warning
(``--admission warn``) a pod whose (namespace, service account — ``default`` when
unset) matches no Workload of this agent's cluster in the verified policy bundle, and
says which selector is missing. (DESIGN §11 templates do not exist yet.)

**Strict parsing, never failing a pod by our own fault.** A body that is not a
well-formed AdmissionReview (not JSON, a member twice, another ``apiVersion`` or
``kind``, no ``request.uid``, over ``MAX_ADMISSION_BODY``) is a 4xx JSON error. A
well-formed review of something else than a pod CREATE is allowed unchanged. A review
the webhook cannot decide by its own fault — no configuration or bundle from the
control plane yet, a pod object it cannot read — is answered ``allowed: true`` with a
warning, or refused with ``--admission-failure-policy fail``
(:class:`~trustmesh.common.errors.AdmissionFailed`). Every answer is an
``admission.reviewed`` event in the spool before it leaves (503 ``audit_unavailable``
otherwise, which the API server treats by the configuration's ``failurePolicy``).
Nothing here waits on the network: a review costs its parsing (bounded by the body
limit; at most ``CONCURRENT_REVIEWS`` at once) and a spool append."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from trustmesh import __version__
from trustmesh.agent.controlplane import ControlPlaneState
from trustmesh.agent.spool import AuditSpool, LineTooLong
from trustmesh.audit.events import ADMISSION_REVIEWED, new_event
from trustmesh.common.addresses import check_fetch_url
from trustmesh.common.clock import Clock, system_clock
from trustmesh.common.errors import (
    AdmissionFailed,
    AuditUnavailable,
    ConfigError,
    RequestTimeout,
    ReviewError,
    SpoolError,
    Unavailable,
)
from trustmesh.common.failover import normalise_urls
from trustmesh.common.strictjson import loads_strict
from trustmesh.common.tracing import Span, Tracing
from trustmesh.manifests import dns_label, dns_subdomain
from trustmesh.policy.engine import Engine

ADMISSION_API = "admission.k8s.io/v1"
ADMISSION_REVIEW = "AdmissionReview"
MUTATE_PATH = "/k8s/admission/mutate"
VALIDATE_PATH = "/k8s/admission/validate"
WEBHOOKS = ("mutate", "validate")

MAX_ADMISSION_BODY = 2 * 1024 * 1024
"""etcd stores objects of at most 1.5 MiB (its default ``--max-request-bytes``): any pod
the API server can create fits in a review of this size."""
CONCURRENT_REVIEWS = 8
"""Reviews read and decided at once (bounds their memory: a slot holds one body)."""
SLOT_WAIT = 1.0
"""Seconds a review waits for a slot before it is answered 503."""
REVIEW_DEADLINE = 10.0
"""Seconds from a slot to the end of the review's body (the API server waits at most
``timeoutSeconds``, 30 at most, default 10; ``trustmesh admission config`` sets 5)."""
MAX_UID = 128
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
MAX_WARNING = 240  # the API server may truncate warnings longer than 256 characters

INJECT_ANNOTATION = "trustmesh.io/inject"
INJECTED_ANNOTATION = "trustmesh.io/injected"
SIDECAR_NAME = "trustmesh-sidecar"
TOKEN_VOLUME = "trustmesh-token"  # noqa: S105 (a volume name)
SOCKET_VOLUME = "trustmesh-workload-api"
CA_VOLUME = "trustmesh-ca"
SOCKET_DIR = "/run/trustmesh"
SOCKET_PATH = f"{SOCKET_DIR}/workload-api.sock"
TOKEN_DIR = "/var/run/secrets/trustmesh"  # noqa: S105 (a mount path)
TOKEN_FILE = "token"  # noqa: S105 (a file name)
CA_DIR = "/etc/trustmesh/ca"
CA_KEY = "ca.crt"
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
ENDPOINT = f"unix://{SOCKET_PATH}"
TOKEN_EXPIRATION = 3600
SIDECAR_UID = 65532
DEFAULT_SIDECAR_IMAGE = f"trustmesh:{__version__}"
VALIDATION_MODES = ("deny", "warn")
FAILURE_POLICIES = ("ignore", "fail")


@dataclass(frozen=True)
class AdmissionConfig:
    """The agent's admission flags (docs/admission.md)."""

    sidecar_image: str = DEFAULT_SIDECAR_IMAGE
    sidecar_servers: tuple[str, ...] = ()
    """Control-plane URLs the injected sidecars use; empty: the agent's own."""
    sidecar_ca_configmap: str | None = None
    """A ConfigMap (key ``ca.crt``) in the pod's namespace holding the control plane's
    CA, mounted for the sidecar's ``--ca-file``; None: the public roots."""
    validation: str = "deny"
    failure_policy: str = "ignore"
    unusable: str | None = None
    """Why no sidecar can be injected (the agent's control-plane URLs are plain http
    and no --sidecar-server was given): said in every mutate answer."""

    def checked(self, agent_servers: Sequence[str]) -> AdmissionConfig:
        """This configuration with the sidecar's URLs filled in; ConfigError (one line)
        for a value that cannot work."""
        if self.validation not in VALIDATION_MODES:
            raise ConfigError(f"--admission must be one of {', '.join(VALIDATION_MODES)}")
        if self.failure_policy not in FAILURE_POLICIES:
            raise ConfigError(
                f"--admission-failure-policy must be one of {', '.join(FAILURE_POLICIES)}"
            )
        image = self.sidecar_image
        if not image or len(image) > 512 or not image.isprintable() or " " in image:
            raise ConfigError(f"--sidecar-image {image!r} is not an image reference")
        if self.sidecar_ca_configmap is not None:
            try:
                dns_subdomain(self.sidecar_ca_configmap)
            except ValueError as exc:
                raise ConfigError(f"--sidecar-ca-configmap: {exc}") from None
        try:
            servers = normalise_urls(list(self.sidecar_servers or agent_servers))
            for url in servers:
                # the sidecar sends the pod's SA token there, and refuses plain http
                check_fetch_url(url, "the sidecar's control-plane URL")
        except ValueError as exc:
            if self.sidecar_servers:
                raise ConfigError(f"--sidecar-server: {exc}") from None
            # the agent's own URLs: an agent that injects nothing must still start
            problem = f"{exc}: give the sidecars theirs with --sidecar-server https://…"
            return replace(self, sidecar_servers=(), unusable=problem)
        return replace(self, sidecar_servers=tuple(servers))


# -- the review ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Review:
    """What this webhook reads of an AdmissionReview's ``request``."""

    uid: str
    group: str
    version: str
    kind: str
    operation: str
    sub_resource: str
    namespace: str
    name: str
    user: str | None  # as the review says (unverified: anyone may post a review)
    dry_run: bool
    object: Mapping[str, Any] | None

    @property
    def pod_create(self) -> bool:
        return (self.group, self.version, self.kind, self.operation, self.sub_resource) == (
            "",
            "v1",
            "Pod",
            "CREATE",
            "",
        )


def _string(document: Mapping[str, Any], name: str, where: str, limit: int = 253) -> str:
    value = document.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ReviewError(f"{where}.{name} must be a string of at most {limit} characters")
    return value


def parse_review(body: bytes) -> Review:
    """The AdmissionReview in ``body``, strictly; ReviewError (400) naming the problem."""
    document = loads_strict(body)
    if not isinstance(document, dict):
        raise ReviewError("the body must be a JSON object (an AdmissionReview)")
    if document.get("apiVersion") != ADMISSION_API or document.get("kind") != ADMISSION_REVIEW:
        raise ReviewError(
            f"expected apiVersion {ADMISSION_API} and kind {ADMISSION_REVIEW} "
            "(configure the webhook with admissionReviewVersions [v1])"
        )
    request = document.get("request")
    if not isinstance(request, dict):
        raise ReviewError("request must be an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid must be a non-empty string")
    if len(uid) > MAX_UID or not _UID.fullmatch(uid):
        raise ReviewError(f"request.uid must be at most {MAX_UID} letters, digits, '-', '.', ':'")
    kind = request.get("kind")
    if not isinstance(kind, dict):
        raise ReviewError("request.kind must be an object {group, version, kind}")
    operation = request.get("operation")
    if operation not in ("CREATE", "UPDATE", "DELETE", "CONNECT"):
        raise ReviewError("request.operation must be CREATE, UPDATE, DELETE or CONNECT")
    user_info = request.get("userInfo") or {}
    if not isinstance(user_info, dict):
        raise ReviewError("request.userInfo must be an object")
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise ReviewError("request.dryRun must be a boolean")
    pod = request.get("object")
    if pod is not None and not isinstance(pod, dict):
        raise ReviewError("request.object must be an object")
    return Review(
        uid=uid,
        group=_string(kind, "group", "request.kind"),
        version=_string(kind, "version", "request.kind"),
        kind=_string(kind, "kind", "request.kind"),
        operation=operation,
        sub_resource=_string(request, "subResource", "request"),
        namespace=_string(request, "namespace", "request", 63),
        name=_string(request, "name", "request"),
        user=_string(user_info, "username", "request.userInfo", 512) or None,
        dry_run=dry_run,
        object=pod,
    )


# -- the pod ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pod:
    """The parts of a pod this webhook reads (from ``request.object``)."""

    namespace: str
    service_account: str
    name: str
    annotations: Mapping[str, str] | None
    containers: Sequence[Mapping[str, Any]]
    volumes: Sequence[Mapping[str, Any]] | None

    @property
    def opted_out(self) -> bool:
        return (self.annotations or {}).get(INJECT_ANNOTATION) == "false"


def _objects(value: Any, where: str) -> list[Mapping[str, Any]] | None:
    """A list of objects, or None when absent or null."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise AdmissionFailed(f"cannot read the pod: {where} is not a list of objects")
    return value


def read_pod(review: Review) -> Pod:
    """The pod of a pod CREATE review; AdmissionFailed for one that cannot be read
    (the API server never sends it: the review did not come from one)."""
    pod = review.object
    if pod is None:
        raise AdmissionFailed("cannot read the pod: the review holds no object")
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict):
        raise AdmissionFailed("cannot read the pod: metadata and spec must be objects")
    annotations = metadata.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values())
    ):
        raise AdmissionFailed("cannot read the pod: metadata.annotations must map to strings")
    containers = _objects(spec.get("containers"), "spec.containers")
    if not containers or not all(isinstance(c.get("name"), str) for c in containers):
        raise AdmissionFailed("cannot read the pod: spec.containers must name its containers")
    namespace = review.namespace or metadata.get("namespace") or ""
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    try:
        dns_label(namespace if isinstance(namespace, str) else "")
        dns_subdomain(account if isinstance(account, str) else "")
    except ValueError as exc:
        raise AdmissionFailed(
            f"cannot read the pod's namespace or service account: {exc}"
        ) from None
    name = metadata.get("name") or metadata.get("generateName") or review.name
    return Pod(
        namespace=namespace,
        service_account=account,
        name=name if isinstance(name, str) else "",
        annotations=annotations,
        containers=containers,
        volumes=_objects(spec.get("volumes"), "spec.volumes"),
    )


# -- mutate: the JSON Patch ---------------------------------------------------------------
def pointer(*tokens: str | int) -> str:
    """An RFC 6901 JSON Pointer: ``~`` is written ``~0`` and ``/`` is written ``~1`` in
    each reference token (in that order, §3)."""
    return "".join("/" + str(t).replace("~", "~0").replace("/", "~1") for t in tokens)


@dataclass(frozen=True)
class Sidecar:
    """What an injected pod gets, from the agent's configuration and its cluster."""

    image: str
    servers: tuple[str, ...]
    audience: str
    ca_configmap: str | None

    def volumes(self) -> list[dict[str, Any]]:
        token = {
            "serviceAccountToken": {
                "audience": self.audience,
                "expirationSeconds": TOKEN_EXPIRATION,
                "path": TOKEN_FILE,
            }
        }
        found = [
            {"name": TOKEN_VOLUME, "projected": {"sources": [token]}},
            {"name": SOCKET_VOLUME, "emptyDir": {}},
        ]
        if self.ca_configmap is not None:
            items = [{"key": CA_KEY, "path": CA_KEY}]
            found.append(
                {"name": CA_VOLUME, "configMap": {"name": self.ca_configmap, "items": items}}
            )
        return found

    def container(self) -> dict[str, Any]:
        args = ["sidecar", "--server", ",".join(self.servers)]
        args += ["--sa-token-file", f"{TOKEN_DIR}/{TOKEN_FILE}", "--socket", SOCKET_PATH]
        args += ["--socket-mode", "0666"]
        mounts: list[dict[str, Any]] = [
            {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ]
        if self.ca_configmap is not None:
            args += ["--ca-file", f"{CA_DIR}/{CA_KEY}"]
            mounts.append({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True})
        return {
            "name": SIDECAR_NAME,
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["trustmesh"],
            "args": args,
            "volumeMounts": mounts,
            "resources": {
                "requests": {"cpu": "10m", "memory": "64Mi"},
                "limits": {"memory": "256Mi"},
            },
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": SIDECAR_UID,
                "runAsGroup": SIDECAR_UID,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }


def _append(
    ops: list[dict[str, Any]], present: Any, path: tuple[str | int, ...], item: Any
) -> None:
    """Add ``item`` to the array at ``path``, creating the array when there is none."""
    if present is None:
        ops.append({"op": "add", "path": pointer(*path), "value": [item]})
    else:
        ops.append({"op": "add", "path": pointer(*path, "-"), "value": item})


def _names(items: Sequence[Mapping[str, Any]] | None) -> set[Any]:
    return {item.get("name") for item in items or ()}


def injection(pod: Pod, sidecar: Sidecar) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON Patch operations that inject ``pod`` (none when it has every piece),
    and warnings about containers left alone."""
    ops: list[dict[str, Any]] = []
    warnings: list[str] = []
    for index, container in enumerate(pod.containers):
        name = container["name"]
        if name == SIDECAR_NAME:
            continue
        mounts = _objects(container.get("volumeMounts"), f"container {name}'s volumeMounts")
        taken = {
            str(m.get("mountPath", "")).rstrip("/")
            for m in mounts or ()
            if m.get("name") != SOCKET_VOLUME
        }
        if SOCKET_DIR in taken:
            warnings.append(
                f"trustmesh: container {name[:63]} already mounts something at {SOCKET_DIR}; "
                "it gets no Workload API socket"
            )
            continue
        env = _objects(container.get("env"), f"container {name}'s env")
        if ENDPOINT_ENV not in _names(env):
            _append(
                ops,
                env,
                ("spec", "containers", index, "env"),
                {"name": ENDPOINT_ENV, "value": ENDPOINT},
            )
        if SOCKET_VOLUME not in _names(mounts):
            mount = {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR, "readOnly": True}
            _append(ops, mounts, ("spec", "containers", index, "volumeMounts"), mount)
    present = _names(pod.volumes)
    missing = [volume for volume in sidecar.volumes() if volume["name"] not in present]
    if pod.volumes is None:
        if missing:
            ops.append({"op": "add", "path": pointer("spec", "volumes"), "value": missing})
    else:
        ops += [{"op": "add", "path": pointer("spec", "volumes", "-"), "value": v} for v in missing]
    if SIDECAR_NAME not in _names(pod.containers):
        ops.append(
            {"op": "add", "path": pointer("spec", "containers", "-"), "value": sidecar.container()}
        )
    if ops and (pod.annotations or {}).get(INJECTED_ANNOTATION) != "true":
        if pod.annotations is None:
            ops.append(
                {
                    "op": "add",
                    "path": pointer("metadata", "annotations"),
                    "value": {INJECTED_ANNOTATION: "true"},
                }
            )
        else:
            ops.append(
                {
                    "op": "add",
                    "path": pointer("metadata", "annotations", INJECTED_ANNOTATION),
                    "value": "true",
                }
            )
    return ops, warnings


# -- validate: the registry ---------------------------------------------------------------
@dataclass(frozen=True)
class Workloads:
    """The Workloads of one cluster in a verified bundle, by (namespace, service
    account): what the engine's ``identities`` inventory holds."""

    engine: Engine
    by_account: Mapping[tuple[str, str], tuple[str, str]]  # -> (workload, SPIFFE ID)

    @classmethod
    def of(cls, engine: Engine, cluster: str) -> Workloads:
        found: dict[tuple[str, str], tuple[str, str]] = {}
        for spiffe_id, entry in engine.identities.items():
            claims = entry.get("claims") or {}
            if claims.get("cluster") == cluster:
                key = (str(claims.get("namespace")), str(claims.get("service_account")))
                found[key] = (str(entry.get("workload")), spiffe_id)
        return cls(engine, found)


def missing_workload(cluster: str, pod: Pod) -> str:
    return (
        f"trustmesh: no Workload of cluster {cluster} selects namespace {pod.namespace}, "
        f"service account {pod.service_account}; apply one with spec.selector {{cluster: "
        f"{cluster}, namespace: {pod.namespace}, serviceAccount: {pod.service_account}}}"
    )


# -- the answer ---------------------------------------------------------------------------
@dataclass
class Answer:
    """One webhook's answer to one review, and what its audit event says."""

    allowed: bool
    outcome: str  # the metric's label: patched, unchanged, allowed, denied, warned, failed_*
    reason: str
    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message: str | None = None  # shown to the client of a refused pod
    code: int = 403
    policy_revision: int | None = None

    def response(self, uid: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"uid": uid, "allowed": self.allowed}
        if self.patch:
            answer["patchType"] = "JSONPatch"
            answer["patch"] = base64.b64encode(orjson.dumps(self.patch)).decode("ascii")
        if self.warnings:
            answer["warnings"] = [w[:MAX_WARNING] for w in self.warnings]
        if not self.allowed:
            answer["status"] = {
                "code": self.code,
                "reason": "Forbidden" if self.code == 403 else "InternalError",
                "message": self.message or self.reason,
            }
        return {"apiVersion": ADMISSION_API, "kind": ADMISSION_REVIEW, "response": answer}


class Admission:
    """The two webhooks of one agent: ``review`` parses, decides, audits and renders.

    ``state`` and ``engine`` read the agent's current control-plane state (the
    cluster's SA-token audience) and verified bundle (its Workloads)."""

    def __init__(
        self,
        cluster: str,
        config: AdmissionConfig,
        state: Callable[[], ControlPlaneState | None],
        engine: Callable[[], Engine | None],
        spool: AuditSpool,
        agent: str,
        tracing: Tracing,
        registry: CollectorRegistry | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.state = state
        self.engine = engine
        self.spool = spool
        self.source = {"kind": "agent", "id": spool.source_id, "agent": agent}
        self.tracing = tracing
        self.clock = clock
        self._slots = asyncio.Semaphore(CONCURRENT_REVIEWS)
        self._workloads: Workloads | None = None
        self.reviews = Counter(
            "trustmesh_agent_admission_reviews",
            "AdmissionReviews answered, by webhook and outcome (patched, unchanged, "
            "allowed, denied, warned, failed_open, failed_closed)",
            ["webhook", "outcome"],
            registry=registry,
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of ``CONCURRENT_REVIEWS`` places to read and decide a review in, for at
        most ``REVIEW_DEADLINE`` s (408 beyond); 503 when none frees within
        ``SLOT_WAIT`` s."""
        try:
            await asyncio.wait_for(self._slots.acquire(), SLOT_WAIT)
        except TimeoutError:
            raise Unavailable(
                f"{CONCURRENT_REVIEWS} admission reviews are being decided; retry shortly",
                headers={"Retry-After": "1"},
            ) from None
        try:
            async with asyncio.timeout(REVIEW_DEADLINE):
                yield
        except TimeoutError:
            raise RequestTimeout(
                f"the AdmissionReview did not arrive within {REVIEW_DEADLINE:g} s"
            ) from None
        finally:
            self._slots.release()

    def review(self, webhook: str, body: bytes, traceparent: str | None = None) -> dict[str, Any]:
        """The AdmissionReview answering ``body`` for ``webhook`` (``mutate`` or
        ``validate``). Raises ReviewError (400) for a malformed review and
        AuditUnavailable (503) when the answer cannot be audited."""
        review = parse_review(body)
        with self.tracing.span(
            "admission.review", traceparent, {"trustmesh.surface": webhook}
        ) as span:
            pod: Pod | None = None
            try:
                if not review.pod_create:
                    answer = Answer(True, "unchanged", "not a pod CREATE: allowed unchanged")
                    answer.warnings.append(
                        f"trustmesh: the {webhook} webhook reviews pod CREATE only; allowed unchanged"
                    )
                else:
                    pod = read_pod(review)
                    answer = self._mutate(pod) if webhook == "mutate" else self._validate(pod)
            except AdmissionFailed as exc:
                answer = self._failed(exc)
            self._record(webhook, review, pod, answer, span)
        return answer.response(review.uid)

    def _mutate(self, pod: Pod) -> Answer:
        if pod.opted_out:
            return Answer(True, "unchanged", f'opted out ({INJECT_ANNOTATION}: "false")')
        config = self.config
        if config.unusable is not None:
            raise AdmissionFailed(config.unusable)
        state = self.state()
        audience = state.service_account_audience if state is not None else None
        if audience is None:
            raise AdmissionFailed(
                "the agent does not know its cluster's service-account audience yet (no "
                "configuration from the control plane)"
            )
        sidecar = Sidecar(
            config.sidecar_image, config.sidecar_servers, audience, config.sidecar_ca_configmap
        )
        patch, warnings = injection(pod, sidecar)
        if not patch:
            return Answer(True, "unchanged", "already injected", warnings=warnings)
        return Answer(True, "patched", "injected", patch=patch, warnings=warnings)

    def _validate(self, pod: Pod) -> Answer:
        engine = self.engine()
        if engine is None:
            raise AdmissionFailed(
                "the agent has no verified policy bundle yet: it cannot tell which service "
                "accounts have a Workload"
            )
        workloads = self._workloads
        if workloads is None or workloads.engine is not engine:
            workloads = self._workloads = Workloads.of(engine, self.cluster)
        found = workloads.by_account.get((pod.namespace, pod.service_account))
        if found is not None:
            reason = f"Workload {found[0]} ({found[1]})"
            return Answer(True, "allowed", reason, policy_revision=engine.revision)
        derived = engine.account_identity(self.cluster, pod.namespace, pod.service_account)
        if derived is not None:
            spiffe_id, entry = derived
            reason = f"WorkloadTemplate {entry['template']} ({spiffe_id})"
            return Answer(True, "allowed", reason, policy_revision=engine.revision)
        message = missing_workload(self.cluster, pod)
        if self.config.validation == "warn":
            return Answer(
                True, "warned", message, warnings=[message], policy_revision=engine.revision
            )
        return Answer(False, "denied", message, policy_revision=engine.revision)

    def _failed(self, exc: AdmissionFailed) -> Answer:
        """The webhook's own error: allowed unchanged (with a warning that says so), or
        refused with ``--admission-failure-policy fail``."""
        text = f"trustmesh admission could not decide: {exc.description}"
        if self.config.failure_policy == "fail":
            return Answer(False, "failed_closed", exc.description, message=text, code=500)
        warning = f"{text}; allowed unchanged"
        return Answer(True, "failed_open", exc.description, warnings=[warning])

    def _record(
        self, webhook: str, review: Review, pod: Pod | None, answer: Answer, span: Span
    ) -> None:
        """The ``admission.reviewed`` event, spooled before the answer leaves; of the pod
        only its name, namespace and service account."""
        self.reviews.labels(webhook, answer.outcome).inc()
        event = new_event(
            ADMISSION_REVIEWED,
            source=self.source,
            cluster=self.cluster,
            request={
                "surface": f"k8s.admission.{webhook}",
                "uid": review.uid,
                "user": review.user,
                "namespace": pod.namespace if pod is not None else review.namespace or None,
                "kind": review.kind or None,
                "operation": review.operation,
                "name": (pod.name if pod is not None else review.name) or None,
                "service_account": pod.service_account if pod is not None else None,
                "dry_run": review.dry_run or None,
            },
            decision={
                "allowed": answer.allowed,
                "reason": answer.reason[:512],
                "policy_revision": answer.policy_revision,
            },
            detail={
                "outcome": answer.outcome,
                "patched": bool(answer.patch),
                "patch_operations": len(answer.patch) or None,
                "warnings": len(answer.warnings) or None,
            },
            trace_id=span.trace_id,
            span_id=span.span_id,
            at=self.clock(),
        )
        try:
            self.spool.append(event)
        except (SpoolError, LineTooLong, orjson.JSONEncodeError):
            raise AuditUnavailable(
                "the admission review cannot be written to the audit spool; no answer is "
                "given without its audit record"
            ) from None


# -- the webhook configurations (trustmesh admission config) ------------------------------
@dataclass(frozen=True)
class WebhookTarget:
    """Where the API server reaches the agent: a URL, or a Service in the cluster."""

    url: str | None = None
    service_namespace: str = "trustmesh"
    service_name: str = "trustmesh-agent"
    service_port: int = 443

    def client_config(self, path: str, ca_bundle: bytes | None) -> dict[str, Any]:
        config: dict[str, Any]
        if self.url is not None:
            config = {"url": self.url.rstrip("/") + path}
        else:
            service = {
                "namespace": self.service_namespace,
                "name": self.service_name,
                "path": path,
                "port": self.service_port,
            }
            config = {"service": service}
        if ca_bundle is not None:
            config["caBundle"] = base64.b64encode(ca_bundle).decode("ascii")
        return config


def webhook_configurations(
    cluster: str,
    target: WebhookTarget,
    ca_bundle: bytes | None,
    excluded_namespaces: Sequence[str],
    failure_policy: str = "Ignore",
    timeout_seconds: int = 5,
) -> list[dict[str, Any]]:
    """The ``MutatingWebhookConfiguration`` and ``ValidatingWebhookConfiguration``
    (``admissionregistration.k8s.io/v1``) for the agent of ``cluster``."""
    common = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": failure_policy,
        "matchPolicy": "Equivalent",
        "timeoutSeconds": timeout_seconds,
        "rules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ],
        "namespaceSelector": {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": list(excluded_namespaces),
                }
            ]
        },
    }
    metadata = {
        "name": f"trustmesh-{cluster}",
        "labels": {"app.kubernetes.io/name": "trustmesh", "trustmesh.io/cluster": cluster},
    }
    mutate = {
        "name": "mutate.admission.trustmesh.io",
        "clientConfig": target.client_config(MUTATE_PATH, ca_bundle),
        **common,
        # a webhook after ours may add a container: we are called again to give it the
        # socket (what is already there is left alone)
        "reinvocationPolicy": "IfNeeded",
    }
    validate = {
        "name": "validate.admission.trustmesh.io",
        "clientConfig": target.client_config(VALIDATE_PATH, ca_bundle),
        **common,
    }
    api = "admissionregistration.k8s.io/v1"
    return [
        {
            "apiVersion": api,
            "kind": "MutatingWebhookConfiguration",
            "metadata": metadata,
            "webhooks": [mutate],
        },
        {
            "apiVersion": api,
            "kind": "ValidatingWebhookConfiguration",
            "metadata": metadata,
            "webhooks": [validate],
        },
    ]
