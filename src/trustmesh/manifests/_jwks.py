"""Inline JWKS of a ``Cluster`` (DESIGN §3; RFC 7517 §4-5, RFC 7518 §6).

Only *public* RSA and EC keys are accepted: a JWKS is published to every agent, so
a private member (``d``, ``p``, ``q``, ``dp``, ``dq``, ``qi``, ``oth``) or a symmetric
``oct`` key (``k``) in it would leak a secret.
"""

from __future__ import annotations

import re
from typing import Any

from ._errors import Sink
from ._nodes import MapNode, Node, ScalarNode, SeqNode, join
from ._schema import INVALID, Checker, Field, check, choice, list_of, obj, refused, string
from ._schema import type_problem as _type_problem

EC_CURVES = ("P-256", "P-384", "P-521")
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_PRIVATE_MESSAGE = "is a private-key member; a JWKS must hold only public keys"
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def _base64url(value: str) -> None:
    if not _B64URL.match(value):
        raise ValueError("must be base64url without padding (RFC 7515 §2)")


_B64 = string(_base64url)

_COMMON = (
    Field("kty", string(), required=True),
    Field("kid", string()),
    Field("use", string(choice("sig", "enc"))),
    Field("alg", string()),
    Field("key_ops", list_of(string())),
    Field("x5u", string()),
    Field("x5c", list_of(string())),
    Field("x5t", string(_base64url)),
    Field("x5t#S256", string(_base64url)),
    *(refused(m, f"{m!r} {_PRIVATE_MESSAGE}", suggest=False) for m in _PRIVATE_MEMBERS),
)

_BY_KTY: dict[str, Checker] = {
    "RSA": obj(*_COMMON, Field("n", _B64, required=True), Field("e", _B64, required=True)),
    "EC": obj(
        *_COMMON,
        Field("crv", string(choice(*EC_CURVES)), required=True),
        Field("x", _B64, required=True),
        Field("y", _B64, required=True),
    ),
}
_REFUSED_KTY = {
    "oct": "symmetric keys (kty 'oct') are secrets and cannot be published in a JWKS",
}


def _jwk(node: Node, path: str, sink: Sink) -> Any:
    if not isinstance(node, MapNode):
        return _type_problem(node, path, sink, "a mapping (a JWK)")
    kty_node = node.entries.get("kty")
    if kty_node is None:
        sink.add(node.line, join(path, "kty"), "required field is missing")
        return INVALID
    kty = check(string(), kty_node, join(path, "kty"), sink)
    if kty is INVALID:
        return INVALID
    if kty in _REFUSED_KTY:
        sink.add(kty_node.line, join(path, "kty"), _REFUSED_KTY[kty])
        return INVALID
    table = _BY_KTY.get(kty)
    if table is None:
        supported = ", ".join(sorted(_BY_KTY))
        sink.add(kty_node.line, join(path, "kty"), f"unsupported key type {kty!r}; use {supported}")
        return INVALID
    return table(node, path, sink)


def _unique_kids(node: MapNode, result: dict[str, Any], path: str, sink: Sink) -> bool:
    keys = node.entries.get("keys")
    if "keys" not in result or not isinstance(keys, SeqNode):
        return True
    seen: dict[str, int] = {}
    ok = True
    for i, (key, item) in enumerate(zip(result["keys"], keys.items, strict=True)):
        kid = key.get("kid")
        if kid is None:
            continue
        if kid in seen:
            kid_node = item.entries["kid"] if isinstance(item, MapNode) else item
            line = kid_node.line if isinstance(kid_node, ScalarNode) else item.line
            sink.add(
                line, f"{path}.keys[{i}].kid", f"duplicate kid {kid!r} (also keys[{seen[kid]}])"
            )
            ok = False
        else:
            seen[kid] = i
    return ok


JWKS = obj(Field("keys", list_of(_jwk, min_items=1), required=True), rules=(_unique_kids,))
"""Checker for an inline ``{"keys": [...]}`` JWKS of public keys."""
