"""Bearer credentials for the control plane's own APIs.

* the **admin** credential (written to ``<data-dir>/admin.token`` on first start);
* **cluster** credentials (``trustmesh cluster credential NAME``), each letting one
  cluster's agent fetch what that cluster needs and nothing else.

Secrets are 256 random bits; only their SHA-256 is stored, so the database never
holds a usable credential. Comparison happens on the hash through an indexed lookup."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, select

from trustmesh.common.files import write_atomically
from trustmesh.storage import Database
from trustmesh.storage.schema import credentials

ADMIN = "admin"
CLUSTER = "cluster"
_PREFIX = {ADMIN: "tma", CLUSTER: "tmc"}


@dataclass(frozen=True)
class Principal:
    """Who called an admin or agent endpoint."""

    kind: str
    credential_id: str
    cluster: str | None = None

    @property
    def name(self) -> str:
        return "admin" if self.kind == ADMIN else f"cluster:{self.cluster}"

    @property
    def is_admin(self) -> bool:
        return self.kind == ADMIN

    def may_act_for(self, cluster: str) -> bool:
        return self.is_admin or self.cluster == cluster


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class CredentialStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        kind: str,
        created_by: str,
        cluster: str | None = None,
        on_commit: Callable[[Connection, str], None] | None = None,
    ) -> str:
        """A new credential; only its hash is stored. ``on_commit(conn, secret)`` runs
        inside the transaction (the audit event, which holds a hash, is written with it)."""
        credential_id = secrets.token_hex(8)
        secret = f"{_PREFIX[kind]}_{credential_id}_{secrets.token_urlsafe(32)}"
        with self.db.engine.begin() as conn:
            conn.execute(
                credentials.insert().values(
                    id=credential_id,
                    kind=kind,
                    cluster=cluster,
                    secret_hash=_hash(secret),
                    created_at=time.time(),
                    created_by=created_by,
                )
            )
            if on_commit is not None:
                on_commit(conn, secret)
        return secret

    def authenticate(self, secret: str) -> Principal | None:
        if len(secret) > 200:
            return None
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(credentials.c.id, credentials.c.kind, credentials.c.cluster).where(
                    credentials.c.secret_hash == _hash(secret), credentials.c.revoked_at.is_(None)
                )
            ).first()
        if row is None:
            return None
        return Principal(kind=row.kind, credential_id=row.id, cluster=row.cluster)

    def ensure_admin(self, token_path: Path) -> bool:
        """On first start, create the admin credential and write it (mode 0600). Returns
        whether one was created. Later starts (and other replicas) leave it alone."""
        with self.db.engine.connect() as conn:
            exists = conn.execute(
                select(credentials.c.id).where(credentials.c.kind == ADMIN)
            ).first()
        if exists is not None:
            return False
        write_atomically(token_path, self.create(ADMIN, created_by="first start") + "\n")
        return True
