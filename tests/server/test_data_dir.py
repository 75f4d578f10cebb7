"""Data directory trust (issue 10, finding 8), with real processes on real files: a
data dir that is not ours, is writable by others or is a symlink is refused with one
line; files trustmesh writes are never written through a symlink; the master key is
created once and exclusively, and an existing one is used only if it is a regular
file, ours, open to no one else; ``--master-key-file`` is only read and may be a
symlink (a Kubernetes Secret mount) but not writable by others; every state file,
the SQLite database with its WAL and shared memory included, is 0600. The agent's and
a simulated cluster's data dirs follow the same rules."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import TRUST_DOMAIN, start_server, trustmesh_cmd
from trustmesh.common.errors import ConfigError
from trustmesh.common.files import read_private_file
from trustmesh.identity.sealing import MasterKey
from trustmesh.sim import SimulatedCluster

KEY = "q" * 43 + "\n"  # 32 bytes, base64url


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def server_args(data_dir: Path, *extra: str) -> list[str]:
    return trustmesh_cmd(
        "server", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--trust-domain", TRUST_DOMAIN, *extra,
    )  # fmt: skip


def refused(args: list[str], fragment: str, env: dict[str, str] | None = None) -> str:
    """The command exits non-zero within 20 s with one ``error:`` line naming the
    problem (a process still running then, e.g. serving, is killed: a failure)."""
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after 20 s (not refused): {out} {err}") from None
    assert process.returncode != 0, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def someone_elses(path: Path) -> Path:
    """``path`` owned by another user: chowned to nobody when we are root, else a
    file or directory root owns."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        return path
    return Path("/etc/passwd") if path.is_file() else Path("/")


# -- the server's data dir -------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702, 0o720])
def test_a_data_dir_writable_by_others_is_refused(tmp_path: Path, bits: int) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(bits)
    refused(server_args(data_dir), "writable by group or others")
    assert list(data_dir.iterdir()) == []  # nothing written into it
    assert mode(data_dir) == bits


def test_a_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir = someone_elses(data_dir)
    refused(server_args(data_dir), "owned by uid")


def test_a_symlinked_data_dir_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    link = tmp_path / "data"
    link.symlink_to(target)
    refused(server_args(link), "is a symlink")
    assert mode(target) == 0o755 and list(target.iterdir()) == []


# -- the master key --------------------------------------------------------------------------
def planted_key(data_dir: Path, bits: int = 0o600) -> Path:
    data_dir.mkdir(mode=0o700)
    key = data_dir / "master.key"
    key.write_text(KEY)
    key.chmod(bits)
    return key


@pytest.mark.parametrize("bits", [0o644, 0o640, 0o604, 0o660])
def test_a_master_key_open_to_others_is_refused(tmp_path: Path, bits: int) -> None:
    planted_key(tmp_path / "data", bits)
    refused(server_args(tmp_path / "data"), "open to group or others")


def test_a_master_key_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.key"
    outside.write_text(KEY)
    outside.chmod(0o600)
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "master.key").symlink_to(outside)
    refused(server_args(data_dir), "is a symlink")


def test_a_master_key_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO: reading it used to block the start for ever."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    os.mkfifo(data_dir / "master.key", 0o600)
    refused(server_args(data_dir), "not a regular file")


def test_a_master_key_of_another_user_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "master.key"
    key.write_text(KEY)
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="owned by uid"):
        read_private_file(someone_elses(key), "master key")


def test_master_key_file_is_read_never_written_and_may_be_a_secret_mount(
    tmp_path: Path,
) -> None:
    """A Kubernetes Secret volume: ``key -> ..data/key``, ``..data -> ..2026_…``,
    files 0644 (readable by others is fine for a mount, writable is not)."""
    mount = tmp_path / "secret"
    (mount / "..2026_11_30").mkdir(parents=True)
    (mount / "..2026_11_30" / "master.key").write_text(KEY)
    (mount / "..2026_11_30" / "master.key").chmod(0o644)
    (mount / "..data").symlink_to("..2026_11_30")
    (mount / "master.key").symlink_to("..data/master.key")
    before = (mount / "..2026_11_30" / "master.key").stat()

    data_dir = tmp_path / "data"
    server = start_server(data_dir, None, "--master-key-file", str(mount / "master.key"))
    try:
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        assert not (data_dir / "master.key").exists()
    finally:
        assert server.stop() == 0
    after = (mount / "..2026_11_30" / "master.key").stat()
    assert (after.st_mtime_ns, after.st_ino, stat.S_IMODE(after.st_mode)) == (
        before.st_mtime_ns,
        before.st_ino,
        0o644,
    )
    # The same key through the environment variable: the sealed keys open.
    server = start_server(data_dir, env={"TRUSTMESH_MASTER_KEY_FILE": str(mount / "master.key")})
    assert server.stop() == 0


def test_master_key_file_writable_by_others_or_missing_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "mounted.key"
    key.write_text(KEY)
    key.chmod(0o666)
    refused(server_args(tmp_path / "a", "--master-key-file", str(key)), "writable by others")
    refused(
        server_args(tmp_path / "b"),
        "writable by others",
        env={"TRUSTMESH_MASTER_KEY_FILE": str(key)},
    )
    missing = tmp_path / "no" / "such.key"
    refused(server_args(tmp_path / "c", "--master-key-file", str(missing)), "cannot read")
    assert not missing.exists() and not missing.parent.exists()  # never created


def _race(path: str, go: Any, results: Any) -> None:
    go.wait()
    results.put(MasterKey.load_or_create(Path(path)).seal(b"probe", b"race"))


def test_replicas_starting_at_once_agree_on_one_master_key(tmp_path: Path) -> None:
    """Eight processes create the data dir's master key at the same moment: each ends
    up with the key on disk (before, each wrote its own and all but the last lost)."""
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"data{attempt}" / "master.key"
        path.parent.mkdir(mode=0o700)
        go, results = context.Event(), context.Queue()
        workers = [context.Process(target=_race, args=(str(path), go, results)) for _ in range(8)]
        for worker in workers:
            worker.start()
        go.set()
        sealed = [results.get(timeout=30) for _ in workers]
        for worker in workers:
            worker.join(30)
        on_disk = MasterKey.load_or_create(path)
        assert all(on_disk.open(s, b"race") == b"probe" for s in sealed)
        assert mode(path) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temporary left


# -- state files -----------------------------------------------------------------------------
def test_every_state_file_is_0600_and_the_data_dir_0700(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)  # tightened, not refused: no one else can write it
    server = start_server(data_dir)
    try:
        response = server.admin.post("/v1/revocations", json={"kind": "jti", "value": "x"})
        assert response.status_code == 201, response.text
        names = {p.name for p in data_dir.iterdir()}
        assert {"trustmesh.db", "trustmesh.db-wal", "trustmesh.db-shm"} <= names
        assert {"master.key", "admin.token"} <= names
        for path in data_dir.iterdir():
            assert mode(path) == 0o600, (path.name, oct(mode(path)))
        assert mode(data_dir) == 0o700
    finally:
        assert server.stop() == 0


def test_a_database_open_to_others_is_tightened_and_a_symlinked_one_refused(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    start_server(data_dir).stop()
    for name in ("trustmesh.db", "master.key"):
        assert mode(data_dir / name) == 0o600
    (data_dir / "trustmesh.db").chmod(0o644)  # as versions before this one created it
    server = start_server(data_dir)
    assert mode(data_dir / "trustmesh.db") == 0o600
    assert server.stop() == 0

    moved = tmp_path / "moved.db"
    (data_dir / "trustmesh.db").rename(moved)
    (data_dir / "trustmesh.db").symlink_to(moved)
    refused(server_args(data_dir), "is a symlink")


def test_admin_token_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "admin.token").symlink_to(victim)
    server = start_server(data_dir)
    assert server.stop() == 0
    assert victim.read_text() == "untouched\n"
    assert not (data_dir / "admin.token").is_symlink() and mode(data_dir / "admin.token") == 0o600


# -- the agent's and a simulated cluster's ---------------------------------------------------
def test_the_agent_refuses_a_data_dir_writable_by_others(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    token = tmp_path / "credential"
    token.write_text("tmc_x_y\n")
    args = trustmesh_cmd(
        "agent", "--cluster", "c", "--server", "http://127.0.0.1:9", "--listen", "127.0.0.1:0",
        "--data-dir", str(data_dir), "--token-file", str(token),
    )  # fmt: skip
    refused(args, "writable by group or others")
    link = tmp_path / "agent-link"
    link.symlink_to(data_dir)
    data_dir.chmod(0o700)
    refused([*args[:-4], "--data-dir", str(link), "--token-file", str(token)], "is a symlink")


def test_a_simulated_cluster_keeps_its_keys_privately(tmp_path: Path) -> None:
    data_dir = tmp_path / "cluster"
    cluster = SimulatedCluster("c", data_dir=data_dir)
    cluster.set_issuer("http://127.0.0.1:9/c")
    assert mode(data_dir) == 0o700
    for path in data_dir.iterdir():
        assert mode(path) == 0o600, path.name
    assert SimulatedCluster("c", data_dir=data_dir).signing_kid == cluster.signing_kid

    (data_dir / "keys.pem").chmod(0o644)
    with pytest.raises(ConfigError, match="open to group or others"):
        SimulatedCluster("c", data_dir=data_dir)
    (data_dir / "keys.pem").rename(tmp_path / "keys.pem")
    (tmp_path / "keys.pem").chmod(0o600)
    (data_dir / "keys.pem").symlink_to(tmp_path / "keys.pem")
    with pytest.raises(ConfigError, match="is a symlink"):
        SimulatedCluster("c", data_dir=data_dir)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        SimulatedCluster("c", data_dir=open_dir)
