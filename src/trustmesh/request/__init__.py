"""What an authorization question is about (DESIGN §3, §4).

Three shapes, told apart by their fields:

* a Kubernetes resource request — ``verb``, ``resource``, optional ``apiGroup`` (core
  ``""`` by default), ``subresource``, ``name``, ``namespace`` (the attributes of a
  SubjectAccessReview's ``resourceAttributes``);
* a Kubernetes non-resource request — ``verb``, ``nonResourceURL``;
* a service request — ``host``, ``path``, ``method``, optional ``namespace`` (what
  Envoy's ext_authz sees).

:func:`parse_request` is the one way in: every field is bounded and free of control
characters, and paths and hosts are canonical (``canonical.py``, DESIGN §3 "Canonical
requests"), so the engine only ever matches the canonical form. The Cluster-dependent
step (``<svc>.<ns>.svc.<clusterDomain>``) and the readings of an ambiguous short host
are the engine's, which knows its cluster (``policy/engine.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.common.errors import RequestError
from trustmesh.request.canonical import (
    canonical_host,
    canonical_path,
    check_namespace,
    refuse_controls,
    service_host,
)

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,32}$")  # RFC 9110 §5.6.2 token
MAX_FIELD = 1024


@dataclass(frozen=True, slots=True)
class KubernetesRequest:
    verb: str
    api_group: str
    resource: str
    subresource: str
    name: str
    namespace: str

    def to_json(self) -> dict[str, str]:
        out = {"verb": self.verb, "apiGroup": self.api_group, "resource": self.resource}
        for key, value in (
            ("subresource", self.subresource),
            ("name", self.name),
            ("namespace", self.namespace),
        ):
            if value:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class NonResourceRequest:
    verb: str
    path: str
    namespace: str = ""

    def to_json(self) -> dict[str, str]:
        return {"verb": self.verb, "nonResourceURL": self.path}


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """Canonical when built by :func:`parse_request`: ``host`` without port or
    trailing dot, ``path`` without query, ``namespace`` the destination namespace
    (given, or read from a ``<svc>.<ns>.svc`` host; ``""`` when unknown)."""

    host: str
    path: str
    method: str
    namespace: str = ""

    def to_json(self) -> dict[str, str]:
        out = {"host": self.host, "path": self.path, "method": self.method}
        if self.namespace:
            out["namespace"] = self.namespace
        return out


Request = KubernetesRequest | NonResourceRequest | ServiceRequest

_KUBERNETES = frozenset({"verb", "apiGroup", "resource", "subresource", "name", "namespace"})
_NON_RESOURCE = frozenset({"verb", "nonResourceURL"})
_SERVICE = frozenset({"host", "path", "method", "namespace"})


def _text(data: Mapping[str, Any], key: str, required: bool) -> str:
    value = data.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f"request.{key} must be a string")
    if required and not value:
        raise RequestError(f"request.{key} is required")
    if len(value) > MAX_FIELD:
        raise RequestError(f"request.{key} is longer than {MAX_FIELD} characters")
    refuse_controls(value, f"request.{key}")
    return value


def parse_request(data: Any) -> Request:
    if not isinstance(data, Mapping):
        raise RequestError("request must be an object")
    keys = set(data)
    if "method" in keys or "host" in keys:
        unknown = keys - _SERVICE
        if unknown:
            raise RequestError(
                f"request.{sorted(unknown)[0]} is not a service-request field (host, path, method, namespace)"
            )
        method = _text(data, "method", True).upper()
        if not _TOKEN.match(method):
            raise RequestError("request.method is not an HTTP method")
        path = canonical_path(_text(data, "path", True), "request.path")
        host = canonical_host(_text(data, "host", True), "request.host")
        namespace = check_namespace(_text(data, "namespace", False), "request.namespace")
        host, namespace = service_host(host, namespace)
        return ServiceRequest(host=host, path=path, method=method, namespace=namespace)
    if "nonResourceURL" in keys:
        unknown = keys - _NON_RESOURCE
        if unknown:
            raise RequestError(
                f"request.{sorted(unknown)[0]} is not a non-resource field (verb, nonResourceURL)"
            )
        path = canonical_path(_text(data, "nonResourceURL", True), "request.nonResourceURL")
        return NonResourceRequest(verb=_text(data, "verb", True).lower(), path=path)
    unknown = keys - _KUBERNETES
    if unknown:
        raise RequestError(
            f"request.{sorted(unknown)[0]} is unknown: a request has verb/apiGroup/resource/"
            "subresource/name/namespace, verb/nonResourceURL, or host/path/method"
        )
    if not keys:
        raise RequestError(
            "request is empty: give verb and resource, verb and nonResourceURL, or host, path and method"
        )
    return KubernetesRequest(
        verb=_text(data, "verb", True).lower(),
        api_group=_text(data, "apiGroup", False),
        resource=_text(data, "resource", True),
        subresource=_text(data, "subresource", False),
        name=_text(data, "name", False),
        namespace=_text(data, "namespace", False),
    )
