"""The identifiers both sides of the RFC 8693 token exchange name: the control plane
(``oauth/rfc8693.py``) and every client of it (SDK, CLI, demo, benchmarks)."""

from __future__ import annotations

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 (RFC 8693 §2.1)
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (RFC 8693 §3, not a secret)
