"""The demo's processes: the control plane and one agent per cluster as ``trustmesh``
subprocesses, and the simulated clusters' issuers; for the mesh act, a ``trustmesh
sidecar`` per mesh workload and Envoys (waited for on their admin ``/ready``). Started in
order, each waited for until it is ready, and stopped (SIGTERM, then SIGKILL after a
timeout) by the ExitStack that started them, so none outlives the demo."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from trustmesh.common.files import write_atomically
from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo.errors import DemoError
from trustmesh.sim.demo.scenario import CLUSTERS, TRUST_DOMAIN

READY_TIMEOUT = 30.0  # seconds a subprocess may take to print its ready line
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL

SERVER_READY = re.compile(r"trustmesh server listening on (\S+) \(")
AGENT_READY = re.compile(r"trustmesh agent for cluster (\S+) ready on (\S+) \(")
SIDECAR_READY = re.compile(r"trustmesh sidecar ready: (\S+) ")


class Child:
    """A ``trustmesh`` subprocess whose stdout and stderr go to files in ``log_dir``.

    It runs in its own process group, so a Ctrl-C in the terminal reaches the demo only
    and the demo stops its children in order (agents first, then the control plane)."""

    def __init__(self, name: str, argv: list[str | Path], log_dir: Path) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(arg) for arg in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                process_group=0,
            )

    def wait_ready(self, pattern: re.Pattern[str], deadline: float) -> re.Match[str]:
        """Wait for the ready line on stdout; a clear error if the process dies or stays
        silent (with the end of its stderr)."""
        while True:
            text = self.stdout_path.read_text(encoding="utf-8", errors="replace")
            for line in text.splitlines(keepends=True):
                match = pattern.search(line)
                if match is not None and line.endswith("\n"):
                    return match
            self.check_running()
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{self.name} was not ready within {READY_TIMEOUT:.0f} s{self._stderr_tail()}"
                )
            time.sleep(0.05)

    def check_running(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise DemoError(
                f"{self.name} exited with code {code} before it was ready{self._stderr_tail()}"
            )

    def _stderr_tail(self) -> str:
        try:
            lines = (
                self.stderr_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            )
        except OSError:
            return ""
        return f": {lines[-1].strip()}" if lines else ""

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = STOP_TIMEOUT) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stop_children(children: list[Child]) -> None:
    """SIGTERM to all of them at once, then wait for each (SIGKILL after a timeout)."""
    for child in children:
        child.terminate()
    for child in children:
        child.wait_stopped()


def trustmesh_argv(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "trustmesh.cli.main", *args]


def start_server(stack: ExitStack, root: Path, logs: Path) -> str:
    argv = trustmesh_argv(
        "server", "--data-dir", root / "control-plane", "--listen", "127.0.0.1:0",
        "--trust-domain", TRUST_DOMAIN,
    )  # fmt: skip
    children: list[Child] = []
    stack.callback(stop_children, children)
    children.append(Child("control-plane", argv, logs))
    return children[0].wait_ready(SERVER_READY, time.monotonic() + READY_TIMEOUT).group(1)


def start_clusters(stack: ExitStack, root: Path) -> dict[str, SimulatedCluster]:
    clusters = {}
    for spec in CLUSTERS:
        cluster = SimulatedCluster(spec.name, data_dir=root / "clusters" / spec.name)
        stack.enter_context(cluster.serve())
        clusters[spec.name] = cluster
    return clusters


def write_credential(path: Path, credential: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, credential + "\n")  # 0600: a credential
    return path


def agent_argv(cluster: str, server_url: str, data_dir: Path, token_file: Path) -> list[str | Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return trustmesh_argv(
        "agent", "--cluster", cluster, "--server", server_url, "--listen", "127.0.0.1:0",
        "--data-dir", data_dir, "--token-file", token_file,
    )  # fmt: skip


def start_agents(
    stack: ExitStack,
    root: Path,
    logs: Path,
    credential: Callable[[str], str],
    server_url: str,
    agents: list[Child],
) -> dict[str, str]:
    """Start every agent (into ``agents``), each with the credential ``credential``
    gives for its cluster, then wait for all of them (they start in parallel)."""
    stack.callback(stop_children, agents)  # all at once, before the control plane stops
    for spec in CLUSTERS:
        token_file = write_credential(root / "agents" / f"{spec.name}.token", credential(spec.name))
        argv = agent_argv(spec.name, server_url, root / "agents" / spec.name, token_file)
        agents.append(Child(f"agent-{spec.name}", argv, logs))
    deadline = time.monotonic() + READY_TIMEOUT
    return {
        spec.name: agent.wait_ready(AGENT_READY, deadline).group(2)
        for spec, agent in zip(CLUSTERS, agents, strict=True)
    }


# -- the mesh act: sidecars and Envoys ------------------------------------------------------


def sidecar_argv(
    server_url: str, token_file: Path, socket: Path, sds_socket: Path, folder: Path
) -> list[str | Path]:
    return trustmesh_argv(
        "sidecar", "--server", server_url, "--sa-token-file", token_file, "--socket", socket,
        "--sds-socket", sds_socket, "--credential-dir", folder,
    )  # fmt: skip


class EnvoyChild(Child):
    """An Envoy started from a configuration file; ready once its admin interface
    answers ``/ready`` (its TLS listeners warm until SDS has sent both secrets)."""

    def __init__(
        self, name: str, envoy: Path, config: dict[str, Any], directory: Path, logs: Path
    ) -> None:
        self.config_path = directory / f"{name}.json"
        self.config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
        self.admin_path = directory / f"{name}.admin-address"
        self.admin_path.unlink(missing_ok=True)
        argv: list[str | Path] = [
            envoy, "--config-path", self.config_path, "--admin-address-path", self.admin_path,
            "--disable-hot-restart", "--concurrency", "1", "--log-level", "warning",
        ]  # fmt: skip
        super().__init__(name, argv, logs)
        self.admin = ""

    def wait_envoy_ready(self, http: httpx.Client, deadline: float) -> None:
        while True:
            self.check_running()
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{self.name} was not ready within {READY_TIMEOUT:.0f} s{self._stderr_tail()}"
                )
            admin = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            if admin:
                try:
                    if http.get(f"http://{admin}/ready", timeout=1).status_code == 200:
                        self.admin = admin
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)

    def listener_port(self, http: httpx.Client, name: str) -> int:
        listeners = http.get(f"http://{self.admin}/listeners?format=json", timeout=2).json()
        for status in listeners.get("listener_statuses") or []:
            if status.get("name") == name:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise DemoError(f"{self.name} has no listener {name}")
