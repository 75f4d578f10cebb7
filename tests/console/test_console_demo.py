"""``trustmesh demo`` with its web console, in one real run (the suite's only long
interrupted demo run; ``tests/sim/test_demo.py`` runs it to the end): the demo prints
the console's address and demo-admin's credential; a real browser signs in with them,
sees the demo's three clusters with their agents reporting, and sees the demo's
traffic live — the events each cluster's agent shipped grow on the open page without
a reload. Then SIGINT stops everything cleanly: the mesh and the agents stop, the
audit log is proven, nothing is left running. Writes docs/console/demo-overview.png."""

from __future__ import annotations

import contextlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from console_support import open_page, problems, screenshot
from playwright.sync_api import Browser, Page, expect

from helpers import kill_leftovers, processes_mentioning
from trustmesh.sim.demo import CLUSTERS

DEMO = [sys.executable, "-m", "trustmesh.cli.main", "demo"]
CONSOLE_LINE = re.compile(
    r"^web console: (http://127\.0\.0\.1:\d+/console/) \(sign in as (\S+) with (tmu_\S+)\)$"
)
SHIPPED = re.compile(r"\((\d+) events\)")


def read_lines(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def shipped(page: Page, cluster: str) -> int:
    """The events the overview says ``cluster``'s agents shipped (0: none yet)."""
    found = SHIPPED.search(page.locator(f'tr[data-cluster="{cluster}"]').inner_text())
    return int(found.group(1)) if found else 0


def watch_the_console(browser: Browser, url: str, person: str, credential: str) -> None:
    """Sign in as the demo says, see its clusters and agents, and its traffic live."""
    page = open_page(browser)
    try:
        page.goto(url)
        page.get_by_label("Personal credential").fill(credential)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#who-person")).to_have_text(person)
        expect(page.locator("#who-role")).to_have_text("admin")
        expect(page.get_by_role("heading", name="Clusters and agents")).to_be_visible()
        names = [c.name for c in CLUSTERS]
        for name in names:
            row = page.locator(f'tr[data-cluster="{name}"]')
            expect(row.locator("li[data-agent]").first).to_be_visible()  # agents report
            expect(row.locator("li[data-agent] .warn")).to_have_count(0)  # none stale
            expect(row).to_contain_text(SHIPPED)  # and have shipped audit events
        # every agent the control plane knows is reporting ("N / N")
        expect(page.locator(".card").nth(1).locator(".value")).to_have_text(
            re.compile(r"^([1-9]\d*) / \1$")
        )
        page.evaluate("() => { window.__notReloaded = true; }")
        before = {name: shipped(page, name) for name in names}
        # the demo's calls keep being decided and shipped: the page follows (live
        # events, /console/events), every cluster's count grows without a reload
        for name in names:
            row = page.locator(f'tr[data-cluster="{name}"]')
            expect(row).not_to_contain_text(f"({before[name]} events)")
            assert shipped(page, name) > before[name], name
        assert page.evaluate("() => window.__notReloaded") is True
        screenshot(page, "demo-overview")
        wrong = problems(page)
        assert not wrong, "the page reported problems:\n" + "\n".join(wrong)
    finally:
        page.context.close()  # before the demo stops: its stream would fail to reconnect


def test_the_demo_shows_its_traffic_in_the_console_then_sigint_stops_everything(
    browser: Browser, tmp_path: Path
) -> None:
    data_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*DEMO, "--duration", "120", "--plain", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 45
        while not any("authenticated as" in line for line in seen):
            assert time.monotonic() < deadline, "no traffic within 45 s:\n" + "".join(seen)
            assert proc.poll() is None, "demo exited early:\n" + "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        assert sum(line.startswith("agent for") and "ready on" in line for line in seen) == 3
        assert any(line.startswith("mesh: Envoys (") for line in seen), "".join(seen)
        assert processes_mentioning(str(data_dir)), "the agents and server should be running"
        printed = [m for m in map(CONSOLE_LINE.match, (s.rstrip("\n") for s in seen)) if m]
        assert len(printed) == 1, "".join(seen)
        url, person, credential = printed[0].groups()
        assert person == "demo-admin"

        watch_the_console(browser, url, person, credential)

        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        time.sleep(0.2)  # let the reader thread drain the pipe
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert code == 0, output + stderr
        assert "interrupted: stopping the mesh and the agents, then proving the audit log" in output
        assert "audit: every agent's events arrived, no sequence gaps" in output
        assert "OK: every decision matched the policy in force" in output
        assert processes_mentioning(str(data_dir)) == []
        assert (data_dir / "policy" / "accepted-change.yaml").exists()
        assert (data_dir / "control-plane" / "admin.token").exists(), "a given data dir is kept"
        assert oct((data_dir / "agents" / "eu-west.token").stat().st_mode & 0o777) == "0o600"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(str(data_dir))
