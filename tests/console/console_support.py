"""What the console's browser tests share (issue 16), imported as ``console_support``
(``conftest`` names a module in many test folders, so import nothing from it):

* :func:`chromium_path`: Debian's ``chromium``, which Playwright drives (its own
  browser downloads are not used); missing, the tests FAIL, never skip.
* :class:`Console`: a real control plane (``helpers.start_server``) with three people
  added as ``trustmesh user add`` adds them (``POST /v1/people``): an admin, an
  approver and an auditor. ``tokens[role]`` is each one's credential, ``people[role]``
  their name; ``server.admin`` is an API client with the admin person's credential
  (the bootstrap token stops working once an admin person exists). Tests that change
  people or global state add their own (:meth:`Console.add_person`).
* :func:`open_page`: a page in a browser context of its own (1280 x 800 by default,
  ``PHONE`` for 390 x 844) collecting its console messages and errors;
  :func:`problems` lists the CSP violations and script errors among them.
* :func:`screenshot`: a 1280 x 800 picture of a page, written to docs/console/PAGE.png
  when ``TRUSTMESH_SCREENSHOTS=1`` (how the pictures in the docs are made), else to a
  temporary folder, so an ordinary test run leaves the work tree as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from helpers import Server

ROLES = ("admin", "approver", "auditor")
DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "console"
SHOTS = DOCS if os.environ.get("TRUSTMESH_SCREENSHOTS") == "1" else None
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# how long a page's element or state may take to appear: generous, since the suite runs
# three workers on two shared cores (Playwright's own default is 5 s)
WAIT_MS = 20_000
expect.set_options(timeout=WAIT_MS)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "Debian's chromium is not installed: apt-get install chromium (the README's "
            "test command does); the console's tests need a real browser"
        )
    return found


def screenshot(page: Page, name: str) -> Path:
    """Where the picture of ``page`` went (docs/console/NAME.png, or a temporary file)."""
    folder = SHOTS or Path(tempfile.gettempdir()) / "trustmesh-console-shots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 0
    return path


@dataclass
class Console:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    people: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url + "/console/"

    def add_person(self, name: str, role: str) -> str:
        """A person added through the API ``trustmesh user add`` uses; their credential."""
        answer = self.server.admin.post("/v1/people", json={"name": name, "role": role})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["token"])

    def client(self, role: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.tokens[role]}"},
            timeout=10,
        )

    def sign_in(self, page: Page, role: str, token: str | None = None) -> None:
        page.goto(self.url)
        page.get_by_label("Personal credential").fill(token or self.tokens[role])
        page.get_by_role("button", name="Sign in").click()
        if token is None:
            expect(page.locator("#who-person")).to_have_text(self.people[role])
            expect(page.locator("#who-role")).to_have_text(role)


def with_people(server: Server) -> Console:
    console = Console(server)
    bootstrap = server.admin_token
    for role in ROLES:
        name = f"console-{role}"
        console.people[role] = name
        console.tokens[role] = console.add_person(name, role)
        if role == "admin":  # from now on the bootstrap token is refused
            server.admin.close()
            server._client = None
            server.admin_token = console.tokens["admin"]
    assert bootstrap != server.admin_token
    return console


def open_page(browser: Browser, viewport: dict[str, int] = DESKTOP) -> Page:
    """A page in a context of its own, collecting its console messages and errors."""
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.console_messages = messages  # type: ignore[attr-defined]
    return page


# API refusals a page shows on purpose (a signed-out page's first look at its session,
# an auditor refused a change): Chromium logs each as a failed resource load.
REFUSALS = (401, 403)


def problems(page: Page) -> list[str]:
    """Script errors, CSP violations and failed loads the page reported, but for the
    API refusals of ``REFUSALS``."""
    messages: list[str] = page.console_messages  # type: ignore[attr-defined]
    return [
        m
        for m in messages
        if "Content Security Policy" in m
        or m.startswith("pageerror")
        or (m.startswith("error") and not any(f"status of {c}" in m for c in REFUSALS))
    ]
