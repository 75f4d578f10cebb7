"""SPIFFE IDs and trust domains (SPIFFE-ID specification §2, §3)."""

from __future__ import annotations

import re

from trustmesh.common.errors import SpiffeIdError

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def normalize_trust_domain(value: str) -> str:
    """``corp.example`` or ``spiffe://corp.example`` -> ``corp.example`` (SPIFFE-ID §2.1:
    lowercase letters, digits, dots, dashes and underscores only)."""
    name = value.removeprefix("spiffe://").rstrip("/")
    if not _TRUST_DOMAIN.match(name):
        raise SpiffeIdError(
            f"trust domain {value!r} is invalid: use lowercase letters, digits, '.', '-', '_'"
        )
    return name


def parse_spiffe_id(value: str) -> tuple[str, str]:
    """-> (trust domain, path). SPIFFE-ID §2: scheme ``spiffe``, no port, user info, query
    or fragment; path segments non-empty, not ``.``/``..``, from ``[A-Za-z0-9._-]``."""
    if not value.startswith("spiffe://"):
        raise SpiffeIdError(f"SPIFFE ID {value!r} must start with spiffe://")
    rest = value[len("spiffe://") :]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.match(domain):
        raise SpiffeIdError(f"SPIFFE ID {value!r} has an invalid trust domain")
    if not slash or not path:
        raise SpiffeIdError(f"SPIFFE ID {value!r} must have a path")
    for segment in path.split("/"):
        if not segment or segment in (".", "..") or not _SEGMENT.match(segment):
            raise SpiffeIdError(f"SPIFFE ID {value!r} has an invalid path segment {segment!r}")
    return domain, "/" + path


def workload_spiffe_id(
    trust_domain: str, cluster: str, namespace: str, service_account: str
) -> str:
    """The default SPIFFE ID of a workload (DESIGN §2)."""
    return f"spiffe://{trust_domain}/cluster/{cluster}/ns/{namespace}/sa/{service_account}"


def cluster_audience(trust_domain: str, cluster: str) -> str:
    """The audience an agent of ``cluster`` requires in every federated token."""
    return f"spiffe://{trust_domain}/cluster/{cluster}"
