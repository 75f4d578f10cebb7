"""``trustmesh server --workers 2`` on SQLite and PostgreSQL, over real HTTP: the
workers share one port and sequence one audit log (every token audited, indices
without a hole, checkpoints that verify); a worker killed in the middle of the load is
replaced and the log stays whole; SIGTERM stops every worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_token_endpoint import (
    assert_each_token_audited,
    assert_log_consistent,
    form,
    issued_events,
)

from helpers import Federation, Server, register_federation, start_server
from trustmesh.sim import SimulatedCluster


@pytest.fixture
def workers_server(tmp_path: Path, db_url: str | None) -> Iterator[Server]:
    server = start_server(tmp_path / "data", db_url, "--workers", "2")
    yield server
    if server.process.proc.poll() is None:
        assert server.stop() == 0, server.process.stderr()


def worker_pids(server: Server) -> set[int]:
    """The server's workers (not multiprocessing's resource tracker)."""
    pid = server.process.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(child) for child in f.read().split()]
    workers = set()
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(child)
        except OSError:  # gone meanwhile
            continue
    return workers


def exchange(fed: Federation) -> httpx.Response:
    """On a connection of its own: the kernel picks the worker."""
    return httpx.post(fed.server.url + "/oauth2/token", data=form(fed), timeout=30)


def known_to_every_worker(fed: Federation) -> None:
    """A change made through one worker reaches the others within a second or so:
    wait until 20 exchanges in a row, each on a new connection, succeed."""
    deadline, streak = time.monotonic() + 60, 0
    while streak < 20:
        assert time.monotonic() < deadline, "a worker never learned the registered cluster"
        streak = streak + 1 if exchange(fed).status_code == 200 else 0


def test_workers_serve_one_port_and_sequence_one_log(
    workers_server: Server, sim_cluster: SimulatedCluster
) -> None:
    assert len(worker_pids(workers_server)) == 2
    fed = register_federation(workers_server, sim_cluster)
    known_to_every_worker(fed)
    answers = [exchange(fed) for _ in range(60)]
    assert [a.status_code for a in answers] == [200] * 60
    assert_each_token_audited(workers_server, answers)
    sources = {e["source"]["id"] for e in issued_events(workers_server)}
    assert len(sources) == 2  # both workers issued, each under its own audit source
    assert_log_consistent(workers_server)


def test_a_worker_killed_under_load_is_replaced_and_the_log_stays_whole(
    workers_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(workers_server, sim_cluster)
    known_to_every_worker(fed)
    before = worker_pids(workers_server)
    assert len(before) == 2

    answered: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                response = exchange(fed)
            except httpx.TransportError:  # a connection of the killed worker
                continue
            answered.append(response)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    while len(answered) < 40:
        time.sleep(0.05)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        now = worker_pids(workers_server)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no worker replaced {victim}: {now}"
        time.sleep(0.1)
    count = len(answered)
    while len(answered) < count + 40:  # exchanges go on, sequenced from the log's end
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()

    assert {a.status_code for a in answered} == {200}
    assert_each_token_audited(workers_server, answered)
    assert len(issued_events(workers_server)) >= len(answered) + 20  # the probes too
    assert_log_consistent(workers_server)
    assert "exited with -9; starting another" in workers_server.process.stderr()


def test_sigterm_stops_every_worker(workers_server: Server) -> None:
    pids = worker_pids(workers_server)
    assert len(pids) == 2
    assert workers_server.stop() == 0, workers_server.process.stderr()
    assert not any(running(pid) for pid in pids)


def test_workers_stop_when_their_supervisor_is_killed(workers_server: Server) -> None:
    pids = worker_pids(workers_server)
    assert len(pids) == 2
    workers_server.process.proc.kill()
    workers_server.process.proc.wait()
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.1)


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
