"""SPIFFE IDs and trust domains (SPIFFE-ID specification §2, §3), and the SPIFFE ID
patterns of RoleBinding subjects (``spiffe://partner.example/**``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def trust_domain_of(spiffe_id: str) -> str:
    """The trust domain of a SPIFFE ID already known to be valid (no checks)."""
    return spiffe_id[len("spiffe://") :].partition("/")[0]


WILDCARD_SEGMENT = "*"
WILDCARD_SEGMENTS = "**"


def is_spiffe_id_pattern(value: str) -> bool:
    """Whether a subject's ``spiffeId`` is a pattern (it holds a ``*``) rather than one ID."""
    return WILDCARD_SEGMENT in value


@dataclass(frozen=True)
class SpiffeIdPattern:
    """A SPIFFE ID pattern: the trust domain literally, then path segments, each a
    literal segment, ``*`` (exactly one segment) or ``**`` (any number of segments,
    none included). A pattern names one trust domain, never several, so a binding on
    ``spiffe://partner.example/**`` can only ever match identities that partner's keys
    vouch for (DESIGN §9)."""

    text: str
    trust_domain: str
    regex: re.Pattern[str]

    def matches(self, spiffe_id: str) -> bool:
        return self.regex.fullmatch(spiffe_id) is not None


def parse_spiffe_id_pattern(value: str) -> SpiffeIdPattern:
    """A pattern as :class:`SpiffeIdPattern` describes; SpiffeIdError naming what is
    wrong otherwise (a wildcard in the trust domain or inside a segment)."""
    if not value.startswith("spiffe://"):
        raise SpiffeIdError(f"SPIFFE ID pattern {value!r} must start with spiffe://")
    domain, slash, path = value[len("spiffe://") :].partition("/")
    if WILDCARD_SEGMENT in domain:
        raise SpiffeIdError(
            f"SPIFFE ID pattern {value!r} must name its trust domain exactly (no wildcard)"
        )
    if not _TRUST_DOMAIN.match(domain):
        raise SpiffeIdError(f"SPIFFE ID pattern {value!r} has an invalid trust domain")
    if not slash or not path:
        raise SpiffeIdError(f"SPIFFE ID pattern {value!r} must have a path (e.g. /**)")
    parts = ["spiffe://", re.escape(domain)]
    for segment in path.split("/"):
        if segment == WILDCARD_SEGMENTS:
            parts.append("(?:/[A-Za-z0-9._-]+)*")
        elif segment == WILDCARD_SEGMENT:
            parts.append("/[A-Za-z0-9._-]+")
        elif WILDCARD_SEGMENT in segment:
            raise SpiffeIdError(
                f"SPIFFE ID pattern {value!r}: a wildcard is a whole path segment, "
                f"'*' (one segment) or '**' (any number), not part of {segment!r}"
            )
        elif not segment or segment in (".", "..") or not _SEGMENT.match(segment):
            raise SpiffeIdError(
                f"SPIFFE ID pattern {value!r} has an invalid path segment {segment!r}"
            )
        else:
            parts.append("/" + re.escape(segment))
    return SpiffeIdPattern(value, domain, re.compile("".join(parts)))


def workload_spiffe_id(
    trust_domain: str, cluster: str, namespace: str, service_account: str
) -> str:
    """The default SPIFFE ID of a workload (DESIGN §2)."""
    return f"spiffe://{trust_domain}/cluster/{cluster}/ns/{namespace}/sa/{service_account}"


def cluster_audience(trust_domain: str, cluster: str) -> str:
    """The audience an agent of ``cluster`` requires in every federated token."""
    return f"spiffe://{trust_domain}/cluster/{cluster}"
