"""Revocation (DESIGN §5): what is revoked, the O(1) check every decision makes, and
the change list agents follow (``model``), and the list in the database (``store``).
Nothing here imports the web framework."""

from trustmesh.common.errors import RevocationError
from trustmesh.revocation.model import KINDS, Revocation, RevocationSet, revocation_expiry

__all__ = ["KINDS", "Revocation", "RevocationError", "RevocationSet", "revocation_expiry"]
