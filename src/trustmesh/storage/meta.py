"""Named values and revision counters in the ``meta`` table."""

from __future__ import annotations

from sqlalchemy import Connection, Integer, Text, select, update
from sqlalchemy.exc import IntegrityError

from trustmesh.storage.schema import meta

REGISTRY_REVISION = "registry_revision"
KEYS_REVISION = "keys_revision"
POLICY_REVISION = "policy_revision"
REVOCATION_REVISION = "revocation_revision"
SUSPENSION_REVISION = "suspension_revision"
CA_REVISION = "ca_revision"
FEDERATION_REVISION = "federation_revision"
COUNTERS = (
    REGISTRY_REVISION,
    KEYS_REVISION,
    POLICY_REVISION,
    REVOCATION_REVISION,
    SUSPENSION_REVISION,
    CA_REVISION,
    FEDERATION_REVISION,
)


def get(conn: Connection, name: str) -> str | None:
    value: str | None = conn.execute(select(meta.c.value).where(meta.c.name == name)).scalar()
    return value


def put(conn: Connection, name: str, value: str) -> None:
    if conn.execute(update(meta).where(meta.c.name == name).values(value=value)).rowcount == 0:
        conn.execute(meta.insert().values(name=name, value=value))


def insert_if_absent(conn: Connection, name: str, value: str) -> str:
    """Store ``value`` unless the name exists; return what is stored. Safe under races:
    the loser of a concurrent insert fails its transaction and retries from the top."""
    current = get(conn, name)
    if current is not None:
        return current
    try:
        with conn.begin_nested():  # a savepoint: losing the race leaves the transaction usable
            conn.execute(meta.insert().values(name=name, value=value))
    except IntegrityError:
        stored = get(conn, name)
        assert stored is not None
        return stored
    return value


def published_name(counter: str) -> str:
    """The meta row holding when ``counter`` last moved (epoch seconds, as text)."""
    return counter + "_published_at"


def published_at(conn: Connection, counter: str) -> float | None:
    """When ``counter`` last moved, if a :func:`bump` given ``at`` recorded it."""
    value = get(conn, published_name(counter))
    return None if value is None else float(value)


def bump(conn: Connection, name: str, at: float | None = None) -> int:
    """Increment a revision counter inside the caller's transaction; returns the new value.
    The UPDATE takes the row lock, so concurrent replicas get distinct revisions. The
    counters' rows are created by the first migration. ``at``: record it as the time
    the new revision was published (the ``publishedAt`` of policy bundles)."""
    if at is not None:
        put(conn, published_name(name), repr(float(at)))
    result = conn.execute(
        update(meta)
        .where(meta.c.name == name)
        .values(value=(meta.c.value.cast(Integer) + 1).cast(Text))
    )
    if result.rowcount != 1:
        raise LookupError(f"revision counter {name} does not exist")
    return int(get(conn, name) or 0)


def revisions(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(meta.c.name, meta.c.value).where(meta.c.name.in_(COUNTERS)))
    return {name: int(value) for name, value in rows}
