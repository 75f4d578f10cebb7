"""Names that more than one layer checks: a person's name (``user:NAME`` in the audit
log, in policy versions, and as a Kubernetes username at an agent; RoleBinding subjects
``user: NAME`` name people with it)."""

from __future__ import annotations

import re

PERSON_NAME = re.compile(r"^[a-z][a-z0-9._-]{0,62}[a-z0-9]$|^[a-z]$")
PERSON_NAME_RULE = (
    "1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter and ending "
    "with a letter or digit"
)
USER_PREFIX = "user:"  # a person as a principal, an audit actor and a Kubernetes username


def is_person_name(value: object) -> bool:
    return isinstance(value, str) and PERSON_NAME.fullmatch(value) is not None


def person_of(username: str) -> str | None:
    """NAME for the username ``user:NAME`` of a valid person name, else None."""
    if not username.startswith(USER_PREFIX):
        return None
    name = username[len(USER_PREFIX) :]
    return name if is_person_name(name) else None
