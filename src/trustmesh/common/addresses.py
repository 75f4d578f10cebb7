"""Parsing of ``HOST:PORT`` listen addresses and the loopback rule for plain-HTTP URLs."""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit

from trustmesh.common.numbers import parse_decimal


def parse_listen(value: str) -> tuple[str, int]:
    """``127.0.0.1:8443``, ``[::1]:8443`` or ``:8443`` -> (host, port). Port 0 picks a free port."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    number = parse_decimal(port, 5)
    if not sep or number is None or not 0 <= number <= 65535:
        raise ValueError(f"listen address {value!r} is not HOST:PORT")
    return (host or "127.0.0.1"), number


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_fetch_url(url: str, what: str) -> str:
    """URLs we fetch keys from must be https; plain http is allowed only to a loopback
    address (as RFC 8252 §7.3 allows for loopback redirects), never across a network."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an absolute http(s) URL")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(f"{what} {url!r} must use https (plain http is allowed only on loopback)")
    if parts.username or parts.password:
        raise ValueError(f"{what} {url!r} must not carry credentials")
    return url


def url_for(host: str, port: int, scheme: str = "http") -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"
    return f"{scheme}://{shown}:{port}"


MAX_ADDRESS_TEXT = 45
"""The longest text form of an IP address (IPv6 with an IPv4 tail)."""


def caller_address(value: object) -> str | None:
    """An IP address in its canonical text form (``ipaddress``: IPv6 compressed and
    lowercase, an IPv4-mapped IPv6 address as the IPv4 address), or None for anything
    else — not a string, longer than :data:`MAX_ADDRESS_TEXT`, a host name, an address
    with a port or an IPv6 zone (``%eth0``: text the sender chose). What a caller sent
    never passes through: only what ``ipaddress`` prints."""
    if not isinstance(value, str) or not value or len(value) > MAX_ADDRESS_TEXT:
        return None
    return _canonical_address(value)


@functools.lru_cache(maxsize=4096)
def _canonical_address(value: str) -> str | None:
    """:func:`caller_address` of a bounded string, remembered: an agent sees the same few
    peers again and again, and parsing one costs ~2 µs of a decision's few."""
    if "%" in value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
