"""Canonical requests (DESIGN §3 "Canonical requests"): the one spelling of a path, a
host and a destination namespace that every surface — ``/v1/authorize``, Envoy
ext_authz, the Kubernetes webhooks — and every PolicyTest hands to the engine.

Paths follow RFC 3986 §6.2.2 (syntax-based normalisation) with refusals where the
meaning of a path depends on who reads it:

* percent-encodings of unreserved characters (§2.3: ``A-Z a-z 0-9 - . _ ~``) are
  decoded, every other percent-encoding is kept with upper-case hex digits (§6.2.2.1),
  and characters that may not appear raw in a path (space, ``"``, ``<``, non-ASCII…)
  are percent-encoded as UTF-8;
* refused, never matched: dot segments (``.``, ``..``, also encoded: §5.2.4 would
  remove them, an upstream may or may not), empty segments (``//``: merged by some
  servers), path parameters (``;``: stripped by some servers), an encoded ``/`` or
  ``\\`` (``%2F``, ``%5C``), an encoded ``?``, ``#`` or ``;``, a double encoding
  (``%25`` followed by two hex digits), a raw ``\\`` or ``#``, control characters (C0,
  DEL, C1, raw or encoded), malformed percent-encodings, encodings that are not UTF-8,
  and a segment ending in a dot or a space (dropped by some file systems and servers).

The query (after the first ``?``) is not part of the canonical path: rules match
paths only. A trailing ``/`` (one empty last segment) is kept: ``/a/`` and ``/a`` are
different resources.

Hosts: lower-cased (ASCII only: an internationalised name is given in its ``xn--``
form), the port and one trailing dot removed; ``<svc>.<ns>.svc.<clusterDomain>``
becomes ``<svc>.<ns>.svc`` (:func:`strip_cluster_domain`, with the cluster's
``clusterDomain``, default ``cluster.local``). The short forms ``<svc>.<ns>`` and
``<svc>`` are ambiguous (``admin.shop`` may be a public name): with a known
destination namespace they expand to ``<svc>.<ns>.svc`` (:func:`expand_short`); without
one the engine evaluates every reading (:func:`readings`) and a deny under any
reading wins.

The destination namespace of a service request is its ``namespace`` (the request's
field, or the one Envoy's route sets), else the ``<ns>`` of a canonical service host
``<svc>.<ns>.svc`` (:func:`host_namespace`), else none.

Test vectors, good and bad side by side: ``tests/request/testdata/canonical/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from trustmesh.common.errors import RequestError

DEFAULT_CLUSTER_DOMAIN = "cluster.local"
SERVICE_SUFFIX = ".svc"
UNNAMED_NAMESPACE = "*"
"""Stands for "a namespace no rule names" in a reading's host (``admin.*.svc``): what
a ``*.svc`` rule matches and no other can."""

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What may stand raw in a canonical path: unreserved, sub-delims except ";", ":", "@"
# (RFC 3986 §3.3 pchar) and the separator "/".
_RAW_OK = _UNRESERVED | frozenset("!$&'()*+,=:@/")
_HEX = frozenset("0123456789ABCDEFabcdef")
# Encoded bytes refused with the reason: separators and delimiters whose meaning changes
# with the reader's decoding.
_REFUSED_ENCODED = {
    0x2F: "an encoded / (%2F)",
    0x5C: "an encoded \\ (%5C)",
    0x3F: "an encoded ? (%3F)",
    0x23: "an encoded # (%23)",
    0x3B: "an encoded ; (%3B)",
}
_DOUBLE_ENCODING = re.compile("%25[0-9A-Fa-f]{2}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]{2,45}\]$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PORT = re.compile(r"^[0-9]{1,5}$")
MAX_HOST = 253


def refuse_controls(value: str, what: str) -> None:
    """Control characters (C0, DEL, C1) have no place in any request field: they would
    reach logs, audit records and terminals as they are."""
    found = _CONTROL.search(value)
    if found is not None:
        raise RequestError(f"{what} contains a control character (U+{ord(found.group()):04X})")


# --- paths -----------------------------------------------------------------------------


def _encode(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))


def _normalise_encodings(path: str, what: str) -> str:
    """RFC 3986 §6.2.2.1 and §6.2.2.2 on ``path`` (no query): unreserved characters
    decoded, other encodings upper-cased, raw characters outside pchar encoded."""
    out: list[str] = []
    i, size = 0, len(path)
    while i < size:
        char = path[i]
        if char != "%":
            out.append(char if char in _RAW_OK else _encode(char))
            i += 1
            continue
        digits = path[i + 1 : i + 3]
        if len(digits) != 2 or not all(d in _HEX for d in digits):
            raise RequestError(
                f"{what} has a malformed percent-encoding (% not followed by two hex digits)"
            )
        byte = int(digits, 16)
        if byte in _REFUSED_ENCODED:
            raise RequestError(f"{what} contains {_REFUSED_ENCODED[byte]}")
        if byte < 0x20 or byte == 0x7F:
            raise RequestError(f"{what} contains an encoded control character (%{byte:02X})")
        decoded = chr(byte)
        out.append(decoded if decoded in _UNRESERVED else f"%{byte:02X}")
        i += 3
    return "".join(out)


def canonical_path(value: str, what: str = "path") -> str:
    """The canonical path of a request target (``/a/b?q`` -> ``/a/b``); RequestError,
    naming ``what`` and the problem, for anything refused (module docstring)."""
    refuse_controls(value, what)
    path = value.split("?", 1)[0]
    if not path.startswith("/"):
        raise RequestError(f"{what} must start with /")
    if "#" in path:
        raise RequestError(f"{what} contains a fragment (#)")
    if "\\" in path:
        raise RequestError(f"{what} contains a backslash")
    if ";" in path:
        raise RequestError(f"{what} contains a path parameter (;)")
    canonical = path if _RAW_OK.issuperset(path) else _normalise_encodings(path, what)
    # On the canonical form: "%252%66" only becomes "%252f" once %66 is decoded.
    if _DOUBLE_ENCODING.search(canonical):
        raise RequestError(f"{what} is percent-encoded twice (%25 followed by two hex digits)")
    if "%" in canonical:
        try:
            decoded = unquote(canonical, errors="strict")
        except UnicodeDecodeError:
            raise RequestError(f"{what} is not valid UTF-8 once percent-decoded") from None
        if _CONTROL.search(decoded):
            raise RequestError(f"{what} contains an encoded control character")
    segments = canonical.split("/")
    last = len(segments) - 1
    for index, segment in enumerate(segments[1:], start=1):
        if not segment:
            if index != last:
                raise RequestError(f"{what} contains an empty segment (//)")
        elif segment in (".", ".."):
            raise RequestError(f"{what} contains a dot segment ({segment})")
        elif segment.endswith("."):
            raise RequestError(f"{what} has a segment ending in a dot ({segment})")
        elif segment.endswith("%20"):
            raise RequestError(f"{what} has a segment ending in a space")
    return canonical


def match_form(path: str, fold_case: bool = False) -> str:
    """What a path glob is matched against: the canonical path fully percent-decoded
    (a canonical path decodes unambiguously: every encoding that could add a separator
    or a control character was refused), case-folded for ``pathCase: insensitive``.
    An upstream that decodes ``%2B`` to ``+`` then sees what the rule names."""
    if "%" in path:
        path = unquote(path)
    return path.casefold() if fold_case else path


def check_path_pattern(pattern: str, what: str) -> None:
    """A rule's path glob or URL prefix must not name a path the canonicalisation
    refuses (``/a/../b``, ``/a//b``, ``/a;x``, ``/a%2Fb``…): such a rule could never
    match. Any spelling of an accepted path will do — rules are matched in
    :func:`match_form`, so ``/%7Ea`` and ``/~a`` name the same paths. ``*`` stands
    for any text here (a wildcard in globs and prefixes)."""
    canonical_path(pattern.replace("*", "x"), what)


# --- hosts -----------------------------------------------------------------------------


def canonical_host(value: str, what: str = "host") -> str:
    """Lower-cased, without its port and one trailing dot; RequestError for anything
    that is not a host name or an IP literal."""
    refuse_controls(value, what)
    if not value:
        raise RequestError(f"{what} is required")
    if not value.isascii():
        raise RequestError(f"{what} is not ASCII: give an internationalised name in its xn-- form")
    host = value.lower()
    if host.startswith("["):
        literal, _, rest = host.partition("]")
        literal += "]"
        if not _IPV6.match(literal):
            raise RequestError(f"{what} is not a valid IPv6 literal")
        if rest:
            _check_port(rest, what)
        return literal
    if host.count(":") > 1:
        raise RequestError(f"{what} has more than one ':' (an IPv6 address goes in brackets)")
    if ":" in host:
        host, _, port = host.partition(":")
        _check_port(":" + port, what)
    if host.endswith("."):
        host = host[:-1]
        if host.endswith("."):
            raise RequestError(f"{what} ends in more than one dot")
    if not host:
        raise RequestError(f"{what} has no name")
    if len(host) > MAX_HOST:
        raise RequestError(f"{what} is longer than {MAX_HOST} characters")
    for label in host.split("."):
        if not label:
            raise RequestError(f"{what} has an empty label (..)")
        if not _LABEL.match(label):
            raise RequestError(
                f"{what} has a label that is not a host name label ({label!r}: letters, "
                "digits, '-' and '_', at most 63)"
            )
    return host


def _check_port(text: str, what: str) -> None:
    port = text[1:]
    if not text.startswith(":") or not _PORT.match(port) or int(port) > 65535:
        raise RequestError(f"{what} has an invalid port")


def check_namespace(value: str, what: str = "namespace") -> str:
    """A destination namespace is a Kubernetes namespace name (DNS-1123 label)."""
    refuse_controls(value, what)
    if value and not _NAMESPACE.match(value):
        raise RequestError(f"{what} {value!r} is not a Kubernetes namespace name (DNS-1123 label)")
    return value


def _is_name(host: str) -> bool:
    """A DNS name, not an IP literal (its last label is not all digits)."""
    return not host.startswith("[") and not host.rsplit(".", 1)[-1].isdigit()


def is_short(host: str) -> bool:
    """``<svc>`` or ``<svc>.<ns>``: a name that may be a service of the cluster."""
    return host.count(".") <= 1 and _is_name(host)


def host_namespace(host: str) -> str:
    """The ``<ns>`` of a canonical service host ``<svc>.<ns>.svc`` (also of a pod's
    ``<pod>.<subdomain>.<ns>.svc``), else ``""``."""
    if host.endswith(SERVICE_SUFFIX) and host.count(".") >= 2:
        return host[: -len(SERVICE_SUFFIX)].rsplit(".", 1)[1]
    return ""


def expand_short(host: str, namespace: str) -> str:
    """A short form read in a known destination namespace: ``<svc>`` ->
    ``<svc>.<namespace>.svc``, ``<svc>.<ns>`` -> ``<svc>.<ns>.svc``."""
    if "." in host:
        return host + SERVICE_SUFFIX
    return f"{host}.{namespace}{SERVICE_SUFFIX}"


def domain_suffix(cluster_domain: str) -> str:
    """What :func:`strip_cluster_domain` removes: ``.svc.<clusterDomain>``."""
    return f"{SERVICE_SUFFIX}.{cluster_domain}"


def strip_cluster_domain(host: str, suffix: str) -> str:
    """``<svc>.<ns>.svc.<clusterDomain>`` -> ``<svc>.<ns>.svc`` (``suffix`` from
    :func:`domain_suffix`); other hosts as they are."""
    if host.endswith(suffix) and host.count(".") - suffix.count(".") >= 1:
        return host[: len(host) - len(suffix) + len(SERVICE_SUFFIX)]
    return host


def service_host(host: str, namespace: str) -> tuple[str, str]:
    """(host, namespace) of a service request once its destination is read: a short
    form expanded in a known namespace, the namespace taken from a service host when
    the request names none. Ambiguous short forms (no namespace) stay as they are."""
    if namespace:
        if is_short(host):
            return expand_short(host, namespace), namespace
        return host, namespace
    return host, host_namespace(host)


def rule_host_problem(host: str) -> str | None:
    """Why a rule's service host can never equal a canonical request host, or None: a
    port (removed from every request), or the cluster domain after ``.svc``."""
    name, colon, _ = host.partition(":")
    if colon:
        return (
            f"service host {host!r} has a port: rules name hosts, and the port is removed "
            f"from every request before matching (write {name!r})"
        )
    labels = host.split(".")
    if "svc" in labels[1:-1]:
        at = labels.index("svc", 1)
        return (
            f"service host {host!r}: name a service as <svc>.<ns>.svc (the cluster domain "
            f"is removed from requests before matching: write {'.'.join(labels[: at + 1])!r})"
        )
    return None


def rule_host(host: str, suffix: str) -> str:
    """A rule's service host as canonical requests are matched against it. Applies
    refuse a port or a cluster domain in a rule host (:func:`rule_host_problem`), but a
    version stored before they did may carry one: it is read without it, so a deny it
    names still denies."""
    if ":" in host:
        host = host.partition(":")[0]
    if host.endswith("."):
        host = host[:-1]
    return strip_cluster_domain(host, suffix)


def readings(
    host: str,
    by_service: Mapping[str, Iterable[str]],
    wildcard_namespaces: Iterable[str],
    any_service: bool,
) -> list[tuple[str, str]]:
    """Every (host, namespace) an ambiguous short host may stand for, the host as
    written first: ``<svc>.<ns>`` also as ``<svc>.<ns>.svc`` and ``<svc>`` as each
    ``<svc>.<x>.svc``, for the namespaces ``x`` a rule names — by the service's own
    name (``by_service``: service name -> namespaces of rule hosts naming it), by a
    wildcard in a namespace or a namespaced binding (``wildcard_namespaces``) — and, if
    a rule names every service (``*.svc``: ``any_service``), one namespace no rule
    names. A reading no rule names decides as the host as written does."""
    out = [(host, "")]
    if "." in host:
        service, namespace = host.split(".")
        if (
            any_service
            or namespace in wildcard_namespaces
            or namespace in by_service.get(service, ())
        ):
            out.append((host + SERVICE_SUFFIX, namespace))
        return out
    named = sorted({*by_service.get(host, ()), *wildcard_namespaces})
    out.extend((f"{host}.{namespace}{SERVICE_SUFFIX}", namespace) for namespace in named)
    if any_service:
        out.append((f"{host}.{UNNAMED_NAMESPACE}{SERVICE_SUFFIX}", ""))
    return out
