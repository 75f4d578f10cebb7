"""``watch_exchange`` (``trustmesh token exchange --watch --out FILE``): a sidecar that
keeps a fresh token in a file, as a real process stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from client_support import dead_url

from helpers import Federation
from trustmesh.cli._common import CliError
from trustmesh.cli._watch import watch_exchange

SCRIPT = """
import sys
from pathlib import Path
from trustmesh.cli._watch import watch_exchange
watch_exchange(sys.argv[1].split(","), Path(sys.argv[2]), [sys.argv[3]], Path(sys.argv[4]), 3)
"""


def wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_keeps_a_fresh_token_in_a_file_and_stops_on_sigterm(
    client_fed: Federation, sa_file: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    out = out_dir / "svid.token"
    log = tmp_path / "watch.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SCRIPT,
                f"{dead_url()},{client_fed.server.url}",
                str(sa_file),
                client_fed.audience,
                str(out),
            ],
            stderr=stderr,
        )
    try:
        wait_for(out.exists, 15)
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        first = out.read_text()
        claims = jwt.decode(first, options={"verify_signature": False})
        assert claims["aud"] == [client_fed.audience] and claims["exp"] - claims["iat"] == 3
        assert jwt.get_unverified_header(first)["typ"] == "JWT"

        wait_for(lambda: out.read_text() != first, 6)  # refreshed at about 2.4 s
        second = out.read_text()
        assert jwt.decode(second, options={"verify_signature": False})["jti"] != claims["jti"]
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
    lines = log.read_text().splitlines()
    assert code == 0, lines
    assert lines.count("token refreshed, expires in 3 s") >= 2, lines
    assert os.listdir(out_dir) == ["svid.token"]  # no temporary file left behind


def test_first_fetch_failure_is_one_clear_error(
    client_fed: Federation, sa_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "svid.token"
    with pytest.raises(CliError, match="cannot get a token: no control plane answered"):
        watch_exchange([dead_url()], sa_file, [client_fed.audience], out, None)
    sa_file.write_text("not-a-token")
    with pytest.raises(CliError, match="invalid_request"):
        watch_exchange([client_fed.server.url], sa_file, [client_fed.audience], out, None)
    with pytest.raises(CliError, match="give a file"):
        watch_exchange([client_fed.server.url], Path("-"), [client_fed.audience], out, None)
    sa_file.write_text(client_fed.sa_token())
    with pytest.raises(CliError, match="cannot write"):
        watch_exchange(
            [client_fed.server.url],
            sa_file,
            [client_fed.audience],
            tmp_path / "missing" / "svid.token",
            None,
        )
    assert not out.exists()
