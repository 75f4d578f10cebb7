"""``trustmesh sidecar`` as a real subprocess beside a real control plane, and the
clients tests talk to it with: py-spiffe's ``WorkloadApiClient`` and raw gRPC stubs
(the generated ones py-spiffe and xds-protos ship)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from spiffe import WorkloadApiClient, X509Source, X509Svid

from helpers import TRUST_DOMAIN, Federation, Process, trustmesh_cmd
from trustmesh.sim import SimulatedCluster
from trustmesh.spiffeid import workload_spiffe_id

WORKLOAD_HEADER = (("workload.spiffe.io", "true"),)
TTL = 20
"""The Workload's maxTokenTTL in these tests: its X.509-SVIDs rotate every ~10 s."""


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent`` signed ``child``."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def our_id(federation: Federation) -> str:
    return workload_spiffe_id(TRUST_DOMAIN, federation.origin_name, "shop", "payments")


@contextmanager
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path must fit in 108 bytes, and
    pytest's temporary directories can be longer."""
    path = Path(tempfile.mkdtemp(prefix="tm-sc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_token(
    path: Path, cluster: SimulatedCluster, namespace: str, sa: str, **kw: object
) -> Path:
    """A projected service-account token file, as kubelet writes it."""
    path.write_text(cluster.mint(namespace, sa, **kw))  # type: ignore[arg-type]
    path.chmod(0o600)
    return path


@dataclass
class Sidecar:
    process: Process
    directory: Path
    token_file: Path
    socket: Path
    sds_socket: Path | None
    credential_dir: Path | None
    ready_line: str | None = None

    def client(self) -> WorkloadApiClient:
        return WorkloadApiClient(f"unix:{self.socket}", default_timeout=10)

    def channel(self, sds: bool = False) -> grpc.Channel:
        path = self.sds_socket if sds else self.socket
        assert path is not None
        return grpc.insecure_channel(f"unix:{path}")

    def wait_ready(self, timeout: float = 30.0) -> str:
        self.ready_line = self.process.wait_line("trustmesh sidecar ready: ", timeout)
        return self.ready_line

    def log(self) -> str:
        """Everything the sidecar wrote to stderr so far (also after it stopped)."""
        return self.process.log_path.read_text()

    def stop(self) -> int:
        return self.process.stop()


def start_sidecar(
    servers: list[str],
    token_file: Path,
    directory: Path,
    *extra: str,
    sds: bool = False,
    credential_dir: bool = False,
    wait_ready: bool = True,
    name: str = "sidecar",
) -> Sidecar:
    """Start ``trustmesh sidecar`` with its sockets in ``directory`` (short), wait for
    the line that says it serves, and (``wait_ready``) for its first SVID."""
    socket = directory / f"{name}.sock"
    sds_socket = directory / f"{name}-sds.sock" if sds else None
    folder = directory / f"{name}-creds" if credential_dir else None
    args = ["sidecar", "--server", ",".join(servers), "--sa-token-file", str(token_file)]
    args += ["--socket", str(socket)]
    if sds_socket is not None:
        args += ["--sds-socket", str(sds_socket)]
    if folder is not None:
        args += ["--credential-dir", str(folder)]
    process = Process(trustmesh_cmd(*args, *extra), directory / f"{name}.log")
    process.wait_line("trustmesh sidecar serving ")
    sidecar = Sidecar(process, directory, token_file, socket, sds_socket, folder)
    if wait_ready:
        sidecar.wait_ready()
    return sidecar


def next_rotation(sidecar: Sidecar, after_serial: int | None = None) -> tuple[X509Svid, X509Svid]:
    """Through py-spiffe's ``X509Source`` (its stream): the SVID it starts with, and the
    first SVID it receives whose serial is not ``after_serial`` (default: the first's)."""
    with sidecar.client() as client:
        source = X509Source(workload_api_client=client, timeout_in_seconds=30)
        try:
            first = source.get_x509_context().default_svid
            serial = first.leaf.serial_number if after_serial is None else after_serial
            rotated = threading.Event()

            def on_update() -> None:
                if source.get_x509_context().default_svid.leaf.serial_number != serial:
                    rotated.set()

            source.subscribe_for_updates(on_update)
            on_update()
            assert rotated.wait(TTL + 30), sidecar.log()
            return first, source.get_x509_context().default_svid
        finally:
            source.close()
