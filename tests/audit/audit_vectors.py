"""Loading the audit test vectors in testdata/ (see testdata/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

TESTDATA = Path(__file__).parent / "testdata"


def load(relative: str) -> Any:
    return json.loads((TESTDATA / relative).read_text(encoding="utf-8"))


def probes(kind: str) -> list[Any]:
    """Every probe file under testdata/<kind>/, as pytest params named by their path."""
    files = sorted((TESTDATA / kind).rglob("*.json"))
    assert files, f"no vectors under testdata/{kind}"
    return [
        pytest.param(json.loads(f.read_text(encoding="utf-8")), id=str(f.relative_to(TESTDATA)))
        for f in files
    ]


def tree8_leaves() -> list[bytes]:
    return [bytes.fromhex(x) for x in load("rfc6962/tree8.json")["leaves"]]


def tree8_roots() -> list[bytes]:
    return [bytes.fromhex(x) for x in load("rfc6962/tree8.json")["roots"]]
