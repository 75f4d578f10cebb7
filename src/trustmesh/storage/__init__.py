"""Storage: one schema on SQLAlchemy Core for SQLite (embedded default) and PostgreSQL.

The server owns all writes; every module that needs state goes through the
functions here, never through its own SQL."""

from trustmesh.storage.db import Database, open_database
from trustmesh.storage.schema import metadata

__all__ = ["Database", "metadata", "open_database"]
