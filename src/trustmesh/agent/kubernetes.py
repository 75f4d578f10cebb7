"""Kubernetes webhooks (DESIGN §4): TokenReview and SubjectAccessReview, ``v1`` shapes.

``POST /k8s/authenticate`` answers the kube-apiserver's token webhook
(``--authentication-token-webhook-config-file``, ``authentication.k8s.io/v1``):
username = the SPIFFE ID, uid = the workload id, groups from
:func:`trustmesh.policy.rbac.groups_for_claims`, extra = the token's string claims.

``POST /k8s/authorize`` answers the authorization webhook (``authorization.k8s.io/v1``
SubjectAccessReview): ``allowed: true`` when an allow binding covers the request,
``allowed: false, denied: true`` when a deny binding does (the API server stops
there), and ``allowed: false`` alone — "no opinion" — otherwise, so the API server's
other authorizers (RBAC, Node) may still allow.

Both answers are HTTP 200 whatever the outcome, as the API server expects; a body that
is not a review of the right ``apiVersion``/``kind`` gets a 400 JSON error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.policy.engine import Decision, Engine
from trustmesh.policy.rbac import groups_for_claims
from trustmesh.policy.request import Request, RequestError, parse_request

AUTHENTICATION_API = "authentication.k8s.io/v1"
AUTHORIZATION_API = "authorization.k8s.io/v1"
TOKEN_REVIEW = "TokenReview"  # noqa: S105 (a kind, not a secret)
SUBJECT_ACCESS_REVIEW = "SubjectAccessReview"
MAX_REVIEW_BODY = 64 * 1024


class ReviewError(ValueError):
    """A body that is not a well-formed review; the message names the field."""


def _check_kind(document: Mapping[str, Any], api_version: str, kind: str) -> Mapping[str, Any]:
    if document.get("apiVersion") != api_version or document.get("kind") != kind:
        raise ReviewError(f"expected apiVersion {api_version} and kind {kind}")
    spec = document.get("spec")
    if not isinstance(spec, Mapping):
        raise ReviewError("spec must be an object")
    return spec


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReviewError(f"{field} must be a list of strings")
    return tuple(value)


# --- TokenReview -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenReview:
    token: str
    audiences: tuple[str, ...]  # empty: the API server asked for no particular audience


def parse_token_review(document: Mapping[str, Any]) -> TokenReview:
    spec = _check_kind(document, AUTHENTICATION_API, TOKEN_REVIEW)
    token = spec.get("token")
    if not isinstance(token, str) or not token:
        raise ReviewError("spec.token must be a non-empty string")
    return TokenReview(token=token, audiences=_strings(spec.get("audiences"), "spec.audiences"))


def _token_review(review: TokenReview, status: dict[str, Any]) -> dict[str, Any]:
    # The spec is echoed as the API server's own TokenReview answers do, except the
    # token: never sent back, left at its zero value "" (strict clients, such as the
    # pydantic models of kubernetes-client/python, insist on the field being there).
    spec: dict[str, Any] = {"token": ""}
    if review.audiences:
        spec["audiences"] = list(review.audiences)
    return {"apiVersion": AUTHENTICATION_API, "kind": TOKEN_REVIEW, "spec": spec, "status": status}


def user_info(identity: VerifiedIdentity) -> dict[str, Any]:
    """``status.user``. The uid names the workload (stable across its tokens, as a
    Kubernetes uid should be); the token's ``jti`` is in ``extra``."""
    claims = identity.claims
    uid = claims.get("workload_id")
    return {
        "username": identity.spiffe_id,
        "uid": uid if isinstance(uid, str) and uid else identity.jti,
        "groups": groups_for_claims(claims),
        "extra": {key: [value] for key, value in sorted(claims.items()) if isinstance(value, str)},
    }


def token_authenticated(review: TokenReview, identity: VerifiedIdentity) -> dict[str, Any]:
    """The answer for a verified token. When the API server names audiences, the token
    must carry one of them (the webhook is audience-aware, so ``status.audiences`` is
    the intersection), else it does not authenticate."""
    status: dict[str, Any] = {"authenticated": True, "user": user_info(identity)}
    if review.audiences:
        carried = identity.claims.get("aud")
        token_audiences = [carried] if isinstance(carried, str) else list(carried or ())
        shared = [a for a in review.audiences if a in token_audiences]
        if not shared:
            return token_unauthenticated(
                review,
                f"the token is for {', '.join(token_audiences)}, not for any of the requested "
                f"audiences {', '.join(review.audiences)} (add the token's audience to the "
                "API server's --api-audiences)",
            )
        status["audiences"] = shared
    return _token_review(review, status)


def token_unauthenticated(review: TokenReview, error: str) -> dict[str, Any]:
    return _token_review(review, {"authenticated": False, "error": error})


# --- SubjectAccessReview -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessReview:
    spec: Mapping[str, Any]
    username: str
    request: Request


def _attributes(spec: Mapping[str, Any]) -> Request:
    resource = spec.get("resourceAttributes")
    non_resource = spec.get("nonResourceAttributes")
    if (resource is None) == (non_resource is None):
        raise ReviewError("spec needs exactly one of resourceAttributes and nonResourceAttributes")
    try:
        if resource is not None:
            if not isinstance(resource, Mapping):
                raise ReviewError("spec.resourceAttributes must be an object")
            # version, fieldSelector and labelSelector do not change what RBAC-style
            # rules grant (selectors only narrow a list/watch), so they are not read.
            return parse_request(
                {
                    "verb": resource.get("verb"),
                    "apiGroup": resource.get("group"),
                    "resource": resource.get("resource"),
                    "subresource": resource.get("subresource"),
                    "name": resource.get("name"),
                    "namespace": resource.get("namespace"),
                }
            )
        if not isinstance(non_resource, Mapping):
            raise ReviewError("spec.nonResourceAttributes must be an object")
        return parse_request(
            {"verb": non_resource.get("verb"), "nonResourceURL": non_resource.get("path")}
        )
    except RequestError as exc:
        field = "resourceAttributes" if resource is not None else "nonResourceAttributes"
        message = str(exc).replace("request.apiGroup", "request.group")
        message = message.replace("request.nonResourceURL", "request.path")
        raise ReviewError(message.replace("request.", f"spec.{field}.", 1)) from None


def parse_subject_access_review(document: Mapping[str, Any]) -> AccessReview:
    spec = _check_kind(document, AUTHORIZATION_API, SUBJECT_ACCESS_REVIEW)
    user = spec.get("user", "")
    if user is None:
        user = ""
    if not isinstance(user, str):
        raise ReviewError("spec.user must be a string")
    _strings(spec.get("groups"), "spec.groups")
    extra = spec.get("extra")
    if extra is not None and not isinstance(extra, Mapping):
        raise ReviewError("spec.extra must be an object")
    return AccessReview(spec=spec, username=user, request=_attributes(spec))


def registered_claims(engine: Engine, username: str) -> Mapping[str, Any] | None:
    """The claims the policy evaluates for a SubjectAccessReview's user: those of the
    registered identity whose SPIFFE ID is the username, from the bundle's inventory
    (what the compiler derived from the Workload entry), or None for anyone else.

    Only ``spec.user`` is trusted, and only as a key into the inventory. ``spec.groups``
    and ``spec.extra`` are never read as claims: the API server fills them from
    whatever authenticated the request, and a user allowed to impersonate can set them
    freely (``Impersonate-Group``, ``Impersonate-Extra-<key>`` headers) — taking
    ``project`` or ``environment`` from ``extra`` would let such a caller pick the
    claims its policy is evaluated with. The username alone is as strong as a native
    RBAC ``User`` subject; impersonating a user needs ``impersonate`` on that very
    user name."""
    entry = engine.identities.get(username) if username else None
    if entry is None:
        return None
    claims = entry.get("claims")
    return claims if isinstance(claims, Mapping) else {}


def _reason(text: str, engine: Engine | None, decision: Decision | None) -> str:
    if decision is not None:
        return f"trustmesh: {text} (policy revision {decision.revision}, decision {decision.decision_id})"
    if engine is not None:
        return f"trustmesh: {text} (policy revision {engine.revision})"
    return f"trustmesh: {text}"


def unknown_user_status(engine: Engine, username: str) -> dict[str, Any]:
    """No opinion: not a registered trustmesh identity (a service account, a person…)."""
    who = f"user {username!r}" if username else "a review without a user"
    return {
        "allowed": False,
        "reason": _reason(
            f"{who} is not a registered trustmesh identity, no opinion", engine, None
        ),
    }


def decision_status(decision: Decision) -> dict[str, Any]:
    if decision.denied:
        return {
            "allowed": False,
            "denied": True,
            "reason": _reason(decision.reason, None, decision),
        }
    if decision.allowed:
        return {"allowed": True, "reason": _reason(decision.reason, None, decision)}
    text = "no RoleBinding covers this request: no opinion, other authorizers decide"
    return {"allowed": False, "reason": _reason(text, None, decision)}


def access_review_response(review: AccessReview, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": AUTHORIZATION_API,
        "kind": SUBJECT_ACCESS_REVIEW,
        "spec": dict(review.spec),
        "status": status,
    }
