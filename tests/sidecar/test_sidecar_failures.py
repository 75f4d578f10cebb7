"""A sidecar when things go wrong: a service-account token that is expired, a workload
suspended before start and while running (the last valid SVID is served until it
expires, then nothing, and the log says so), a dead control-plane URL before a live one,
and start-up flags that cannot work (one line, exit 1)."""

from __future__ import annotations

import queue
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from sidecar_support import (
    TTL,
    WORKLOAD_HEADER,
    Sidecar,
    our_id,
    short_dir,
    start_sidecar,
    write_token,
)
from spiffe._proto import workload_pb2, workload_pb2_grpc

from helpers import Federation, Server, trustmesh_cmd, unique, workload_yaml

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens


def x509_stream(sidecar: Sidecar) -> grpc.Call:
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(sidecar.channel())
    return stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=WORKLOAD_HEADER, timeout=90)


def refusal(sidecar: Sidecar) -> grpc.RpcError:
    """The error a FetchX509SVID stream ends with (it waits for the first attempt)."""
    stream = x509_stream(sidecar)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    return caught.value


def printed(sidecar: Sidecar) -> list[str]:
    """The stdout lines the sidecar has printed so far."""
    lines = []
    while True:
        try:
            line = sidecar.process.lines.get_nowait()
        except queue.Empty:
            return lines
        if line is not None:
            lines.append(line)


def new_workload(server: Server, federation: Federation, service_account: str) -> str:
    name = unique("wl-")
    server.apply(
        workload_yaml(
            name, federation.origin_name, "shop", service_account, f"  maxTokenTTL: {TTL}s\n"
        )
    )
    return name


def test_an_expired_service_account_token_gets_nothing_and_the_sidecar_says_why(
    federation: Federation,
) -> None:
    with short_dir() as directory:
        token = write_token(
            directory / "sa.token",
            federation.origin,
            "shop",
            "payments",
            now=time.time() - 7200,
            ttl=3600,
        )
        sidecar = start_sidecar(
            [federation.server.url], token, directory, credential_dir=True, wait_ready=False
        )
        try:
            error = refusal(sidecar)
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(sidecar.channel())
            with pytest.raises(grpc.RpcError) as jwt_refused:
                stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=[federation.audience]),
                    metadata=WORKLOAD_HEADER,
                    timeout=10,
                )
        finally:
            assert sidecar.stop() == 0
        log = sidecar.log()
        assert sidecar.credential_dir is not None
        written = list(sidecar.credential_dir.iterdir())
        secret = token.read_text()
    assert written == []
    assert secret not in log  # the token itself is never logged
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "invalid_grant" in (error.details() or "")
    assert "expired" in (error.details() or "")
    assert jwt_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "X.509-SVID renewal failed" in log and "invalid_grant" in log
    assert "no X.509-SVID to serve" in log
    assert not any(line.startswith("trustmesh sidecar ready") for line in printed(sidecar))


def test_a_suspended_workload_gets_nothing_until_resumed(
    server: Server, federation: Federation
) -> None:
    workload = new_workload(server, federation, "audit")
    target = {"kind": "workload", "value": workload}
    answer = server.admin.post("/v1/suspensions", json={**target, "reason": "test"})
    assert answer.status_code == 201, answer.text
    with short_dir() as directory:
        token = write_token(directory / "sa.token", federation.origin, "shop", "audit")
        sidecar = start_sidecar([server.url], token, directory, wait_ready=False)
        try:
            error = refusal(sidecar)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "suspended" in (error.details() or "")
            resumed = server.admin.post("/v1/suspensions/resume", json=target)
            assert resumed.status_code == 200, resumed.text
            ready = sidecar.wait_ready(timeout=60)  # the next retry, within the backoff's cap
        finally:
            assert sidecar.stop() == 0
    assert "/ns/shop/sa/audit" in ready


@pytest.mark.slow
def test_a_workload_suspended_while_running_keeps_its_svid_until_expiry_then_has_none(
    server: Server, federation: Federation
) -> None:
    workload = new_workload(server, federation, "billing")
    with short_dir() as directory:
        token = write_token(directory / "sa.token", federation.origin, "shop", "billing")
        sidecar = start_sidecar([server.url], token, directory, credential_dir=True)
        try:
            stream = x509_stream(sidecar)
            first = next(stream).svids[0]
            answer = server.admin.post(
                "/v1/suspensions", json={"kind": "workload", "value": workload, "reason": "test"}
            )
            assert answer.status_code == 201, answer.text
            # the stream carries nothing new until the SVID in service expires; then it ends
            with pytest.raises(grpc.RpcError) as ended:
                while True:
                    latest = next(stream).svids[0]  # a renewal before the suspension took
                    first = latest
            files = sorted(p.name for p in sidecar.credential_dir.iterdir())  # type: ignore[union-attr]
        finally:
            assert sidecar.stop() == 0
        log = sidecar.log()
    assert first.spiffe_id.endswith("/ns/shop/sa/billing")
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = ended.value.details() or ""
    assert "expired" in details and "suspended" in details
    assert "keeping the current X.509-SVID, which expires at" in log
    assert "serving no X.509 identity until a renewal succeeds" in log
    assert files == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]


def test_a_dead_control_plane_url_is_skipped(server: Server, federation: Federation) -> None:
    with short_dir() as directory:
        token = write_token(directory / "sa.token", federation.origin, "shop", "payments")
        sidecar = start_sidecar([DEAD, server.url], token, directory)
        try:
            with sidecar.client() as client:
                svid = client.fetch_x509_svid()
                jwt_svid = client.fetch_jwt_svid({federation.audience})
        finally:
            assert sidecar.stop() == 0
        log = sidecar.log()
    assert str(svid.spiffe_id) == our_id(federation)
    assert str(jwt_svid.spiffe_id) == our_id(federation)
    assert f"from {server.url} (serial" in log


def run_sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd("sidecar", *args), capture_output=True, text=True, timeout=60
    )


def test_flags_that_cannot_work_are_refused_in_one_line(tmp_path: Path) -> None:
    token = tmp_path / "sa.token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    with short_dir() as directory:
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(str(directory / "busy.sock"))
        listening.listen()
        (directory / "file").write_text("")
        cases = {
            "plain http": (
                ["--server", "http://10.0.0.1:8443", "--socket", str(directory / "a.sock")]
            ),
            "does not exist": (["--server", DEAD, "--socket", str(directory / "nope" / "a.sock")]),
            "longer than": (["--server", DEAD, "--socket", str(directory / ("x" * 120))]),
            "in use by another process": (
                ["--server", DEAD, "--socket", str(directory / "busy.sock")]
            ),
            "exists and is not a socket": (["--server", DEAD, "--socket", str(directory / "file")]),
            "must differ": (
                [
                    "--server",
                    DEAD,
                    "--socket",
                    str(directory / "a.sock"),
                    "--sds-socket",
                    str(directory / "a.sock"),
                ]
            ),
            "not an octal mode": (
                ["--server", DEAD, "--socket", str(directory / "a.sock"), "--socket-mode", "rw"]
            ),
        }
        results = {
            name: run_sidecar(*args, "--sa-token-file", str(token)) for name, args in cases.items()
        }
        listening.close()
    for expected, result in results.items():
        assert result.returncode == 1, (expected, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (expected, result.stderr)
        assert expected in lines[0], (expected, lines[0])
