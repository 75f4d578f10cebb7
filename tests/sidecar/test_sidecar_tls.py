"""A sidecar and a control plane that serves HTTPS with a certificate of a private CA
(``--tls-cert``/``--tls-key``, made here with ``cryptography``): with ``--ca-file`` the
sidecar gets its X.509-SVID and serves it to py-spiffe; without, it gets nothing, and
its log says the control plane's certificate is not trusted and what to pass."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sidecar_support import short_dir, start_sidecar, write_token

from helpers import Federation, Server, register_federation, start_server
from tls_support import make_tls
from trustmesh.sim import SimulatedCluster
from trustmesh.spiffeid import workload_spiffe_id


@pytest.fixture(scope="module")
def https_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Federation, Path]]:
    base = tmp_path_factory.mktemp("sidecar-tls")
    tls = make_tls(base / "tls")
    server: Server = start_server(
        base / "cp", None, *tls.flags(), verify=ssl.create_default_context(cafile=str(tls.ca))
    )
    try:
        with SimulatedCluster("tls-east") as origin:
            yield register_federation(server, origin), tls.ca
    finally:
        server.stop()


def test_the_sidecar_gets_its_svid_from_an_https_control_plane_with_ca_file(
    https_federation: tuple[Federation, Path],
) -> None:
    federation, ca = https_federation
    with short_dir() as directory:
        token = write_token(directory / "sa.token", federation.origin, "shop", "payments")
        sidecar = start_sidecar([federation.server.url], token, directory, "--ca-file", str(ca))
        try:
            expected = workload_spiffe_id(
                "corp.example", federation.origin_name, "shop", "payments"
            )
            with sidecar.client() as client:
                svid = client.fetch_x509_svid()
            assert str(svid.spiffe_id) == expected
        finally:
            assert sidecar.stop() == 0, sidecar.log()


def test_a_sidecar_without_the_ca_says_the_certificate_is_not_trusted(
    https_federation: tuple[Federation, Path],
) -> None:
    federation, _ = https_federation
    with short_dir() as directory:
        token = write_token(directory / "sa.token", federation.origin, "shop", "payments")
        sidecar = start_sidecar([federation.server.url], token, directory, wait_ready=False)
        try:
            deadline = time.monotonic() + 30
            while "TLS certificate is not trusted" not in sidecar.log():
                assert time.monotonic() < deadline, sidecar.log()
                time.sleep(0.1)
            assert "--ca-file" in sidecar.log()
            assert sidecar.ready_line is None
        finally:
            assert sidecar.stop() == 0, sidecar.log()
