"""``trustmesh bench console``: the web console's first render in a real browser (issue 16
"Measure"): the overview of a federation of ``clusters`` clusters and ``workloads``
workloads (goal < 1 s on 2 cores), and the audit explorer's first page over a log of
``entries`` entries, unfiltered and filtered by type (goal < 1 s).

The set-up, every part a real process on loopback:

- **the log** is written before the control plane starts, into its data dir, by
  ``bench report``'s filler (``report._fill``: ``bench audit``'s agents'
  ``authz.decision`` events over four clusters and a day, an access request and its
  approval every 10,000 entries) through the sequencer (``AuditLog.append``) with the
  master key the server then loads; not timed;
- **the control plane** is ``trustmesh server`` (SQLite) on that data dir;
- **the federation** is applied through ``POST /v1/apply`` as ``trustmesh apply`` does:
  ``clusters`` Clusters and ``workloads`` Workloads spread evenly over them, in files
  of at most ``APPLY_CHUNK`` documents;
- **the agents' reports** are each cluster's agent poll, the request a running agent
  makes (``GET /v1/agent/bundle?after=P.R`` with that cluster's own credential), one per
  cluster, which records the agent in ``agent_status`` as applying the current revision.
  No agent process runs: the overview reads those rows, not the agents;
- **the person** is an auditor (``POST /v1/people``) signed in once through the sign-in
  form in Chromium: the page then holds the session cookie, as a person's browser does;
- **the browser** is Debian's ``chromium`` driven by Playwright (headless, 1280x800).

**What is timed in the page.** An init script (Playwright's ``add_init_script``, run in
every new document before the console's own scripts) watches the DOM with a
``MutationObserver`` and notes ``performance.now()`` (milliseconds since the
navigation started, the document's time origin) when the page first holds what was
asked: the overview's clusters table with a row for every cluster, the audit
explorer's table with the first page of entries (as many rows as the API gives for
the same query). Beside it the start of the next animation frame (the frame that
paints it) and, from the Resource Timing API, the page's own call to ``/v1/…``.
Each trial loads ``about:blank`` and then ``/console/#/…`` anew: the whole shell, its
modules (served ``no-store``, so never from the HTTP cache), the session check, the
API call and the drawing. The filtered page is timed from the filter form's submit
(the type already typed in) to the new table with only that type's entries.

**Server-side time.** The same API calls (``GET /v1/overview``, ``GET
/v1/audit/query?order=desc&limit=50`` with and without ``type``) from a separate
HTTP client (httpx, the person's bearer credential, keep-alive), ``api_trials`` each
after one warm-up: the wall time of each request, so the page's figure can be split
into server and browser."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from trustmesh.audit.log import AuditLog
from trustmesh.bench._extra import require
from trustmesh.bench._federation import cluster_doc, workload_doc
from trustmesh.bench._procs import Child, cpu_seconds, start, stop_all
from trustmesh.bench._stats import percentile, verdict
from trustmesh.bench.audit import TRUST_DOMAIN
from trustmesh.bench.report import DAY, _fill
from trustmesh.common.errors import ConfigError
from trustmesh.identity.sealing import MasterKey
from trustmesh.storage.db import open_database

__all__ = ["GOAL_MS", "PAGE", "run"]

GOAL_MS = 1000.0
PAGE = 50  # the audit explorer's page size (js/pages/audit.js)
APPLY_CHUNK = 1000
PERSON = "bench-auditor"
NAV_TIMEOUT_MS = 60_000
CHROMIUM_MISSING = (
    "this benchmark drives Debian's chromium, which is not installed: apt-get install "
    "chromium (or give --chromium PATH)"
)

# The page's clock (see the module docstring). WATCH maps a route to the selector and
# count that mean "rendered"; __benchArm times a change on a page already shown.
_WATCHER = """
(() => {
  const WATCH = %s;
  const bench = (window.__bench = { marks: {}, frames: {} });
  const watches = [];
  function note(name) {
    if (name in bench.marks) return;
    bench.marks[name] = performance.now();
    requestAnimationFrame(() => { bench.frames[name] = performance.now(); });
  }
  function check() {
    for (let i = watches.length - 1; i >= 0; i--) {
      if (watches[i].done()) { note(watches[i].name); watches.splice(i, 1); }
    }
    if (!watches.length) observer.disconnect();
  }
  const observer = new MutationObserver(check);
  const wanted = WATCH[location.hash];
  if (wanted) {
    const [selector, count] = wanted;
    watches.push({ name: "load", done: () => document.querySelectorAll(selector).length >= count });
    observer.observe(document, { childList: true, subtree: true, attributes: true });
  }
  window.__benchArm = (name, done) => {
    watches.push({ name, done });
    observer.observe(document, { childList: true, subtree: true, attributes: true });
  };
})();
"""

OVERVIEW_ROWS = "#page tbody tr[data-cluster]"
AUDIT_ROWS = "#audit-results tbody tr[data-index]"

# In the page: arm the filter's watch, note the time, submit the form.
_FILTER = """
([type, count]) => {
  const old = document.querySelector("#audit-results table");
  window.__benchArm("filter", () => {
    const table = document.querySelector("#audit-results table");
    if (!table || table === old) return false;
    const cells = table.querySelectorAll("tbody tr[data-index] .audit-type");
    return cells.length === count && [...cells].every((c) => c.textContent === type);
  });
  window.__bench.marks.submit = performance.now();
  document.getElementById("audit-filters").requestSubmit();
}
"""

_TIMES = """
(api) => {
  const resource = performance.getEntriesByType("resource").filter((e) => e.name.includes(api));
  const last = resource[resource.length - 1];
  return {
    marks: window.__bench.marks,
    frames: window.__bench.frames,
    api: last ? last.duration : null,
  };
}
"""


def _chromium(path: str | None) -> str:
    found = path or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not os.access(found, os.X_OK):
        raise ConfigError(CHROMIUM_MISSING)
    return found


def _ms(values: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(values)
    as_ns = [round(v * 1e6) for v in ordered]
    return {
        "n": len(ordered),
        "p50_ms": round(percentile(as_ns, 50) / 1e6, 1),
        "p95_ms": round(percentile(as_ns, 95) / 1e6, 1),
        "max_ms": round(ordered[-1], 1),
        "all_ms": [round(v, 1) for v in values],
    }


def _fill_log(data: Path, entries: int, seed: int) -> float:
    """``bench report``'s log of ``entries`` entries in ``data``'s database, sealed with
    the master key the server will load from ``data/master.key``; seconds taken."""
    started = time.perf_counter()
    master = MasterKey.load_or_create(data / "master.key")
    db = open_database(None, data)
    try:
        log = AuditLog(db, master, TRUST_DOMAIN, "bench-filler")
        log.open()
        _fill(log, entries, time.time() - DAY, seed)
        log.checkpoint_now()
    finally:
        db.dispose()
    return time.perf_counter() - started


def _federation_docs(clusters: int, workloads: int) -> tuple[list[str], list[dict[str, Any]]]:
    names = [f"cluster-{i:03d}" for i in range(clusters)]
    docs = [cluster_doc(name) for name in names]
    for i in range(workloads):
        cluster = names[i % clusters]
        docs.append(
            workload_doc(
                f"svc-{i:05d}",
                cluster=cluster,
                namespace=f"ns-{i // clusters}",
                service_account=f"sa-{i:05d}",
                claims={"project": f"project-{i % 40}", "environment": "prod"},
            )
        )
    return names, docs


def _check(response: httpx.Response, what: str, ok: tuple[int, ...] = (200,)) -> httpx.Response:
    if response.status_code not in ok:
        raise RuntimeError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    return response


def _apply(http: httpx.Client, admin: dict[str, str], docs: list[dict[str, Any]]) -> None:
    for first in range(0, len(docs), APPLY_CHUNK):
        chunk = docs[first : first + APPLY_CHUNK]
        content = "\n---\n".join(json.dumps(doc) for doc in chunk) + "\n"
        files = [{"path": f"federation-{first // APPLY_CHUNK}.yaml", "content": content}]
        _check(http.post("/v1/apply", headers=admin, json={"files": files}), "apply")


def _agent_reports(http: httpx.Client, admin: dict[str, str], names: list[str]) -> None:
    """Each cluster's agent poll, as a running agent sends it: its version first, then
    ``after=`` that version (recorded as applied; 304 at once with ``wait=0``)."""
    for name in names:
        token = _check(
            http.post(f"/v1/clusters/{name}/credentials", headers=admin), "credential"
        ).json()["token"]
        agent = {"Authorization": f"Bearer {token}"}
        version = _check(http.get("/v1/agent/bundle", headers=agent), "bundle").json()["version"]
        after = f"{version[0]}.{version[1]}"
        _check(
            http.get("/v1/agent/bundle", headers=agent, params={"after": after, "wait": "0"}),
            "agent report",
            (200, 304),
        )


def _api_times(
    http: httpx.Client, headers: dict[str, str], path: str, params: dict[str, str], trials: int
) -> tuple[list[float], dict[str, Any]]:
    """``trials`` timed GETs after one warm-up; (milliseconds each, the last body)."""
    body = _check(http.get(path, headers=headers, params=params), path).json()
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        response = http.get(path, headers=headers, params=params)
        times.append((time.perf_counter() - started) * 1000)
        body = _check(response, path).json()
    return times, body


def _browse(
    chromium: str,
    base: str,
    credential: str,
    clusters: int,
    audit_rows: int,
    filter_type: str,
    filter_rows: int,
    trials: int,
) -> dict[str, Any]:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    watch = {"#/overview": [OVERVIEW_ROWS, clusters], "#/audit": [AUDIT_ROWS, audit_rows]}
    out: dict[str, Any] = {"overview": [], "audit": [], "filter": [], "page_errors": []}
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=args)
        except PlaywrightError as exc:
            first = (str(exc).strip().splitlines() or ["?"])[0]
            raise ConfigError(f"chromium ({chromium}) did not start: {first}") from None
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(NAV_TIMEOUT_MS)
            context.add_init_script(_WATCHER % json.dumps(watch))
            page = context.new_page()
            page.on("pageerror", lambda e: out["page_errors"].append(str(e)[:200]))
            page.goto(base + "/console/")
            page.get_by_label("Personal credential").fill(credential)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_function(
                "(name) => document.getElementById('who-person').textContent === name",
                arg=PERSON,
            )

            def visit(route: str, api: str) -> dict[str, Any]:
                page.goto("about:blank")
                page.goto(base + "/console/" + route, wait_until="commit")
                page.wait_for_function("() => window.__bench && 'load' in window.__bench.frames")
                times: dict[str, Any] = page.evaluate(_TIMES, api)
                return times

            for _ in range(trials):
                seen = visit("#/overview", "/v1/overview")
                out["overview"].append(seen)
                out["overview_rows"] = page.locator(OVERVIEW_ROWS).count()
                out["overview_workloads"] = (
                    page.locator(".card", has_text="workloads").locator(".value").inner_text()
                )
            for _ in range(trials):
                seen = visit("#/audit", "/v1/audit/query")
                out["audit_rows"] = page.locator(AUDIT_ROWS).count()
                page.fill("#audit-type", filter_type)
                page.evaluate(_FILTER, [filter_type, filter_rows])
                page.wait_for_function("() => 'filter' in window.__bench.frames")
                filtered = page.evaluate(_TIMES, "type=")
                seen["filter"] = filtered["marks"]["filter"] - filtered["marks"]["submit"]
                seen["filter_frame"] = filtered["frames"]["filter"] - filtered["marks"]["submit"]
                seen["filter_api"] = filtered["api"]
                out["audit"].append(seen)
                out["filter_rows"] = page.locator(AUDIT_ROWS).count()
            context.close()
        finally:
            browser.close()
    return out


def _row(name: str, ms: dict[str, Any], note: str) -> dict[str, Any]:
    return {
        "name": name,
        "p50_us": round(ms["p50_ms"] * 1000),
        "p99_us": "",
        "per_s": "",
        "note": f"p50 {ms['p50_ms']} ms, p95 {ms['p95_ms']} ms" + (f"; {note}" if note else ""),
        **ms,
    }


def run(
    clusters: int = 50,
    workloads: int = 10_000,
    entries: int = 1_000_000,
    trials: int = 20,
    api_trials: int = 20,
    filter_type: str = "access.approved",
    chromium: str | None = None,
    seed: int = 16,
) -> dict[str, Any]:
    """Fill, start, apply, sign in; then ``trials`` page loads of each page in Chromium
    and ``api_trials`` requests of each API call from httpx."""
    if min(clusters, workloads, entries, trials, api_trials) < 1:
        raise ValueError("clusters, workloads, entries, trials and api_trials must be positive")
    require(
        ["playwright.sync_api"], "trustmesh bench console drives a real browser with Playwright"
    )
    browser_path = _chromium(chromium)
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="trustmesh-bench-console-") as tmp:
        root = Path(tmp)
        data = root / "server"
        data.mkdir(mode=0o700)
        try:
            fill_s = _fill_log(data, entries, seed)
            server = start("server", [sys.executable, "-m", "trustmesh.cli.main", "server",
                                      "--data-dir", str(data), "--listen", "127.0.0.1:0",
                                      "--trust-domain", TRUST_DOMAIN], root / "logs")  # fmt: skip
            children.append(server)
            url = server.wait_ready("trustmesh server listening on ", timeout=600).split()[4]
            admin_token = (data / "admin.token").read_text(encoding="utf-8").strip()
            admin = {"Authorization": f"Bearer {admin_token}"}
            with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
                started = time.perf_counter()
                names, docs = _federation_docs(clusters, workloads)
                _apply(http, admin, docs)
                _agent_reports(http, admin, names)
                person = _check(
                    http.post(
                        "/v1/people", headers=admin, json={"name": PERSON, "role": "auditor"}
                    ),
                    "people",
                ).json()["token"]
                setup_s = time.perf_counter() - started
                reader = {"Authorization": f"Bearer {person}"}
                first = {"order": "desc", "limit": str(PAGE)}
                filtered = {**first, "type": filter_type}
                api: dict[str, tuple[list[float], dict[str, Any]]] = {
                    "overview": _api_times(http, reader, "/v1/overview", {}, api_trials),
                    "audit": _api_times(http, reader, "/v1/audit/query", first, api_trials),
                    "filter": _api_times(http, reader, "/v1/audit/query", filtered, api_trials),
                }
            overview = api["overview"][1]
            audit_rows = len(api["audit"][1]["entries"])
            filter_rows = len(api["filter"][1]["entries"])
            if filter_rows == 0:
                raise ConfigError(
                    f"--filter-type {filter_type[:64]!r} matches no entry of the log "
                    "(access.approved needs at least 10,002 entries; authz.decision is in every log)"
                )
            cpu_before = cpu_seconds(server.proc.pid)
            browsed = _browse(
                browser_path,
                url,
                person,
                clusters,
                audit_rows,
                filter_type,
                filter_rows,
                trials,
            )
            cpu_after = cpu_seconds(server.proc.pid)
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited during the run: {server.tail()}")
        finally:
            stop_all(children)
    return _report(
        clusters=clusters,
        workloads=workloads,
        entries=entries,
        filter_type=filter_type,
        fill_s=fill_s,
        setup_s=setup_s,
        overview=overview,
        audit_rows=audit_rows,
        filter_rows=filter_rows,
        api={k: v[0] for k, v in api.items()},
        browsed=browsed,
        server_cpu_s=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
    )


def _report(
    *,
    clusters: int,
    workloads: int,
    entries: int,
    filter_type: str,
    fill_s: float,
    setup_s: float,
    overview: dict[str, Any],
    audit_rows: int,
    filter_rows: int,
    api: dict[str, list[float]],
    browsed: dict[str, Any],
    server_cpu_s: float | None,
) -> dict[str, Any]:
    def of(trials: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float | None]) -> Any:
        values = [v for v in (pick(t) for t in trials) if v is not None]
        return _ms(values) if values else None

    ov, au = browsed["overview"], browsed["audit"]
    page = {
        "overview": of(ov, lambda t: t["marks"]["load"]),
        "overview_frame": of(ov, lambda t: t["frames"]["load"]),
        "overview_api_in_page": of(ov, lambda t: t["api"]),
        "audit": of(au, lambda t: t["marks"]["load"]),
        "audit_frame": of(au, lambda t: t["frames"]["load"]),
        "audit_api_in_page": of(au, lambda t: t["api"]),
        "filter": of(au, lambda t: t["filter"]),
        "filter_frame": of(au, lambda t: t["filter_frame"]),
        "filter_api_in_page": of(au, lambda t: t["filter_api"]),
    }
    server = {name: _ms(times) for name, times in api.items()}
    rendered = {
        "overview_rows": browsed["overview_rows"],
        "overview_workloads": int(browsed["overview_workloads"].replace(",", "") or 0),
        "api_clusters": len(overview["clusters"]),
        "api_workloads": overview["totals"]["workloads"],
        "api_agents_reporting": overview["totals"]["agentsReporting"],
        "audit_rows": browsed["audit_rows"],
        "filter_rows": browsed["filter_rows"],
        "api_audit_rows": audit_rows,
        "api_filter_rows": filter_rows,
    }
    goals = {
        "overview_ms": GOAL_MS,
        "audit_ms": GOAL_MS,
        "overview_met": page["overview"]["p95_ms"] < GOAL_MS,
        "audit_met": page["audit"]["p95_ms"] < GOAL_MS,
        "filter_met": page["filter"]["p95_ms"] < GOAL_MS,
    }
    trials = page["overview"]["n"]
    results = [
        _row(
            f"overview, {clusters} clusters / {workloads:,} workloads: navigation → table",
            page["overview"],
            f"goal p95 < {GOAL_MS:.0f} ms: {verdict(goals['overview_met'])}",
        ),
        _row(
            "  of which GET /v1/overview as the page saw it",
            page["overview_api_in_page"],
            "Resource Timing",
        ),
        _row("  GET /v1/overview from httpx", server["overview"], "server side"),
        _row(
            f"audit, {entries:,} entries: navigation → first page",
            page["audit"],
            f"goal p95 < {GOAL_MS:.0f} ms: {verdict(goals['audit_met'])}",
        ),
        _row(
            "  of which GET /v1/audit/query as the page saw it",
            page["audit_api_in_page"],
            "Resource Timing",
        ),
        _row("  GET /v1/audit/query (first page) from httpx", server["audit"], "server side"),
        _row(
            f"audit, filter type={filter_type}: submit → first page",
            page["filter"],
            f"goal p95 < {GOAL_MS:.0f} ms: {verdict(goals['filter_met'])}",
        ),
        _row(
            "  of which GET /v1/audit/query?type= as the page saw it",
            page["filter_api_in_page"],
            "Resource Timing",
        ),
        _row("  GET /v1/audit/query?type= from httpx", server["filter"], "server side"),
    ]
    summary = [
        f"page times: performance.now() when a MutationObserver first sees the rendered rows "
        f"(ms from navigation start; the filter from its submit), {trials} trials each; "
        f"the next frame adds p50 {page['overview_frame']['p50_ms'] - page['overview']['p50_ms']:.1f} ms "
        "(overview)",
        f"rendered: {rendered['overview_rows']} cluster rows and {rendered['overview_workloads']:,} "
        f"workloads on the overview; {rendered['audit_rows']} entries on the audit page, "
        f"{rendered['filter_rows']} of type {filter_type} once filtered",
        f"set-up (not timed): log of {entries:,} entries filled in {fill_s:.1f} s "
        f"(bench report's filler); federation applied and {clusters} agents' polls in {setup_s:.1f} s "
        f"(no agent process; {rendered['api_agents_reporting']} agents reporting)",
        "server CPU over the browser trials: "
        + ("n/a" if server_cpu_s is None else f"{server_cpu_s:.2f} s")
        + (f"; page errors: {len(browsed['page_errors'])}" if browsed["page_errors"] else ""),
    ]
    return {
        "title": (
            f"Web console first render in Chromium: overview ({clusters} clusters, "
            f"{workloads:,} workloads), audit explorer ({entries:,} entries)"
        ),
        "clusters": clusters,
        "workloads": workloads,
        "entries": entries,
        "filter_type": filter_type,
        "page": page,
        "server": server,
        "rendered": rendered,
        "page_errors": browsed["page_errors"],
        "fill_seconds": round(fill_s, 2),
        "setup_seconds": round(setup_s, 2),
        "server_cpu_seconds": None if server_cpu_s is None else round(server_cpu_s, 2),
        "goals": goals,
        "results": results,
        "summary": summary,
    }
