"""Revocation (DESIGN §5): what is revoked, the O(1) check every decision makes, and
the change list agents follow. Nothing here imports the web framework or the database."""

from trustmesh.revocation.model import (
    KINDS,
    Revocation,
    RevocationError,
    RevocationSet,
    revocation_expiry,
)

__all__ = ["KINDS", "Revocation", "RevocationError", "RevocationSet", "revocation_expiry"]
