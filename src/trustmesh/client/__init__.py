"""The trustmesh Python SDK (DESIGN §1, §5).

* :class:`TokenSource` / :class:`AsyncTokenSource` — a lease on a federated JWT-SVID:
  exchanges the workload's Kubernetes service-account token at the control plane,
  refreshes before expiry with jitter, fails over between control-plane URLs, backs
  off, never hands out an expired token (:class:`TokenUnavailable`).
* :class:`AuthorizationMiddleware` — pure ASGI middleware that authorizes every
  incoming HTTP request through the cluster's local agent.

See docs/sdk.md.
"""

from trustmesh.client._middleware import Authorization, AuthorizationMiddleware
from trustmesh.client._tokens import (
    AsyncTokenSource,
    ExchangeRejected,
    Lease,
    SubjectToken,
    TokenSource,
    TokenUnavailable,
)

__all__ = [
    "AsyncTokenSource",
    "Authorization",
    "AuthorizationMiddleware",
    "ExchangeRejected",
    "Lease",
    "SubjectToken",
    "TokenSource",
    "TokenUnavailable",
]
