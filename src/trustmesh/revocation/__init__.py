"""Revocation and suspension (DESIGN §5): what is revoked, the O(1) check every decision
makes, and the change list agents follow (``model``), the list in the database
(``store``), and suspensions, the state every issuer of credentials checks
(``suspension``). Nothing here imports the web framework."""

from trustmesh.common.errors import RevocationError
from trustmesh.revocation.model import KINDS, Revocation, RevocationSet, revocation_expiry

__all__ = ["KINDS", "Revocation", "RevocationError", "RevocationSet", "revocation_expiry"]
