"""Without the ``bench`` extra, a benchmark that needs it says so in one line: the real
CLI in a subprocess, with a peer engine made unimportable by a module of the same name
earlier on ``PYTHONPATH``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trustmesh.bench import engine
from trustmesh.common.errors import ConfigError

MESSAGE = (
    "error: trustmesh bench engine compares against Cedar and Casbin: "
    "pip install 'trustmesh[bench]'"
)


def _without(module: str, shim: Path) -> dict[str, str]:
    """The environment of a child in which ``import module`` raises ImportError, as it
    does where the package is not installed."""
    shim.mkdir()
    (shim / f"{module}.py").write_text(
        f"raise ImportError({f'No module named {module!r}'!r}, name={module!r})\n"
    )
    paths = [str(shim), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.mark.parametrize("module", ["casbin", "cedarpy"])
def test_bench_engine_without_a_peer_names_the_extra(module: str, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "trustmesh.cli.main", "bench", "engine", "--requests", "10"],
        env=_without(module, tmp_path / "shim"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.strip() == MESSAGE
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_the_engine_alone_needs_no_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers are imported when they are measured: without them, ``peers=()`` still runs
    and asking for one fails with the same line."""
    monkeypatch.setitem(sys.modules, "casbin", None)
    monkeypatch.setitem(sys.modules, "trustmesh.bench._casbin", None)
    sizes = {"clusters": 2, "workloads": 20, "projects": 4, "roles": 6, "bindings": 12}
    result = engine.run(requests=50, seed=3, peers=(), **sizes)
    assert [r["name"] for r in result["results"]] == ["trustmesh"]
    with pytest.raises(
        ConfigError, match=r"compares against Casbin: pip install 'trustmesh\[bench\]'"
    ):
        engine.run(requests=50, seed=3, peers=("casbin",), **sizes)
