""" "Explain this decision" (DESIGN §12, the console's policy page; ``POST
/v1/policy/explain``): the decision a cluster's agent would make for one identity and
one request, and the bindings that decide it.

The decision is the engine's (``Engine.decide`` over the cluster's compiled bundle,
the same call an agent makes), never a second evaluation. What is added is read from
the same engine and bundle: each deciding binding's body (effect, role, namespaces,
subjects, expiry) and the rules of its role that cover the request
(``Engine.covering_rules``), and the names of the bindings that name the identity on
this cluster at all — for a default deny, the ``reason`` already says which of those
came nearest and what it missed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trustmesh.policy.engine import Engine
from trustmesh.request import Request

MAX_NAMING = 50
"""Bindings listed as naming the identity (each kind); the count is always given."""


def _binding(
    engine: Engine, bundle: Mapping[str, Any], name: str, request: Request
) -> dict[str, Any]:
    body = next((b for b in bundle["bindings"] if b["name"] == name), None)
    if body is None:  # the engine decided with it, so the bundle has it
        return {"name": name}
    rules = bundle["roles"].get(body["role"], [])
    return {
        "name": name,
        "effect": body["effect"],
        "role": body["role"],
        "namespaces": body.get("namespaces"),
        "expiresAt": body.get("expiresAt"),
        "subjects": body["subjects"],
        "rules": [rules[i] for i in engine.covering_rules(name, request)],
    }


def explain(
    engine: Engine,
    bundle: Mapping[str, Any],
    spiffe_id: str,
    claims: Mapping[str, Any],
    request: Request,
) -> dict[str, Any]:
    """The decision on ``request`` for the identity (``spiffe_id`` with ``claims``, as a
    token of it carries them) and what decides it, as JSON."""
    decision = engine.decide(spiffe_id, claims, request)
    denies, allows = engine.applicable(spiffe_id, claims)
    resolved = engine.resolve(request)
    return {
        "decision": "allow" if decision.allowed else "deny",
        "allowed": decision.allowed,
        "explicitDeny": decision.denied,
        "reason": decision.reason,
        "request": resolved.to_json(),
        "bindings": [_binding(engine, bundle, name, resolved) for name in decision.bindings],
        "naming": {
            "allow": [b.name for b in allows[:MAX_NAMING]],
            "deny": [b.name for b in denies[:MAX_NAMING]],
            "allowCount": len(allows),
            "denyCount": len(denies),
        },
    }
