"""The RFC 8693 token-exchange request as every client sends it — SDK, CLI, demo,
benchmarks — and the identifiers both sides name (the control plane's side is
``oauth/rfc8693.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 (RFC 8693 §2.1)
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (RFC 8693 §3, not a secret)
TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path, not a secret)


def exchange_form(
    subject_token: str, audience: str | Sequence[str], lifetime: int | None = None
) -> dict[str, Any]:
    """The form of an RFC 8693 §2.1 exchange of a service-account token (a JWT) for a
    JWT-SVID for ``audience`` (one or several), for ``lifetime`` seconds if given."""
    form: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE_GRANT,
        "subject_token": subject_token,
        "subject_token_type": JWT_TOKEN_TYPE,
        "audience": audience if isinstance(audience, str) else list(audience),
    }
    if lifetime is not None:
        form["lifetime"] = str(lifetime)
    return form
