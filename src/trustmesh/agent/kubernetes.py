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
is not a review of the right ``apiVersion``/``kind`` gets a 400 JSON error. This module
parses reviews and renders outcomes; the decision itself is ``agent/decide.py``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.agent.decide import AccessOutcome, TokenOutcome, token_audiences
from trustmesh.common.errors import RequestError, ReviewError
from trustmesh.identity.login import PEOPLE_GROUP, is_person
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.policy.engine import Decision
from trustmesh.policy.rbac import groups_for_claims
from trustmesh.request import Request, parse_request

AUTHENTICATION_API = "authentication.k8s.io/v1"
AUTHORIZATION_API = "authorization.k8s.io/v1"
TOKEN_REVIEW = "TokenReview"  # noqa: S105 (a kind, not a secret)
SUBJECT_ACCESS_REVIEW = "SubjectAccessReview"
MAX_REVIEW_BODY = 64 * 1024


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
    Kubernetes uid should be); the token's ``jti`` is in ``extra``. A person (a login
    token): username and uid ``user:NAME``, group ``trustmesh:people``, no extra."""
    if is_person(identity):
        return {
            "username": identity.spiffe_id,
            "uid": identity.spiffe_id,
            "groups": [PEOPLE_GROUP],
        }
    claims = identity.claims
    uid = claims.get("workload_id")
    return {
        "username": identity.spiffe_id,
        "uid": uid if isinstance(uid, str) and uid else identity.jti,
        "groups": groups_for_claims(claims),
        "extra": {key: [value] for key, value in sorted(claims.items()) if isinstance(value, str)},
    }


def token_review_response(review: TokenReview, outcome: TokenOutcome) -> dict[str, Any]:
    """The answer. When the API server names audiences, the token must carry one of
    them (the webhook is audience-aware, so ``status.audiences`` is the intersection),
    else it does not authenticate."""
    identity = outcome.identity
    if identity is None:
        assert outcome.refusal is not None
        return _token_review(review, {"authenticated": False, "error": outcome.refusal.description})
    if not outcome.authenticated:
        error = (
            f"the token is for {', '.join(token_audiences(identity))}, not for any of the "
            f"requested audiences {', '.join(review.audiences)} (add the token's audience "
            "to the API server's --api-audiences)"
        )
        return _token_review(review, {"authenticated": False, "error": error})
    status: dict[str, Any] = {"authenticated": True, "user": user_info(identity)}
    if review.audiences:
        status["audiences"] = list(outcome.audiences)
    return _token_review(review, status)


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


def _reason(text: str, decision: Decision) -> str:
    return (
        f"trustmesh: {text} (policy revision {decision.policy_revision}, "
        f"decision {decision.decision_id})"
    )


def _status(review: AccessReview, outcome: AccessOutcome) -> dict[str, Any]:
    decision = outcome.decision
    if decision is None:  # not a registered trustmesh identity (a service account, a person…)
        who = f"user {review.username!r}" if review.username else "a review without a user"
        text = f"{who} is not a registered trustmesh identity, no opinion"
        return {
            "allowed": False,
            "reason": f"trustmesh: {text} (policy revision {outcome.policy_revision})",
        }
    if decision.denied:
        return {"allowed": False, "denied": True, "reason": _reason(decision.reason, decision)}
    if decision.allowed:
        return {"allowed": True, "reason": _reason(decision.reason, decision)}
    text = "no RoleBinding covers this request: no opinion, other authorizers decide"
    return {"allowed": False, "reason": _reason(text, decision)}


def access_review_response(review: AccessReview, outcome: AccessOutcome) -> dict[str, Any]:
    return {
        "apiVersion": AUTHORIZATION_API,
        "kind": SUBJECT_ACCESS_REVIEW,
        "spec": dict(review.spec),
        "status": _status(review, outcome),
    }
