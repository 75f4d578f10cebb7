"""The ``bench`` extra of ``pyproject.toml``: packages only the benchmarks import (the
peer engines ``bench engine`` compares against, a throwaway PostgreSQL for ``bench
audit``), so a plain ``pip install trustmesh`` stays lean.

A benchmark that needs one of them checks before it starts: a missing package is one
line naming the extra (the CLI prints ``error: …`` and exits 1), never a traceback and
never half a run."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from trustmesh.common.errors import ConfigError

__all__ = ["INSTALL", "require"]

INSTALL = "pip install 'trustmesh[bench]'"


def require(modules: Iterable[str], why: str) -> None:
    """Import each of ``modules``; if one cannot be imported, raise ``ConfigError``
    with ``"{why}: pip install 'trustmesh[bench]'"``."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{why}: {INSTALL}") from exc
