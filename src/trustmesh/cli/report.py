"""``trustmesh report [--since T] [--until T] [-o table|json|html] [--out FILE]`` (DESIGN
§11): the control plane computes the report (``GET /v1/report``,
``analytics/report.py``); this module renders it — a table summary for people, JSON for
scripts, or one self-contained HTML file (inline CSS, inline SVG charts drawn here:
decisions over time, denials by cluster, the cross-cluster call graph; every text
escaped; no external fetch; ``@media print`` for paper)."""

from __future__ import annotations

import json
import math
from enum import StrEnum
from html import escape
from pathlib import Path
from typing import Any

import typer

from trustmesh.cli._common import (
    ApiClient,
    ServerOption,
    TokenFileOption,
    fail,
    print_facts,
    print_json,
    print_line,
    print_table,
    resolve_server,
    resolve_token,
)
from trustmesh.common.files import write_atomically


class ReportOutput(StrEnum):
    table = "table"
    json = "json"
    html = "html"


def report(
    ctx: typer.Context,
    since: str | None = typer.Option(
        None, "--since", help="Start: RFC 3339 (2026-11-30T00:00:00Z) or a time ago (24h, 7d)."
    ),
    until: str | None = typer.Option(None, "--until", help="End (default now), same forms."),
    stale_days: int = typer.Option(
        30, "--stale-days", min=0, max=36500, help="Idle days that make an identity stale."
    ),
    output: ReportOutput = typer.Option(
        ReportOutput.table, "--output", "-o", help="table, json, or html (one file)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the report to this file."),
    server: str | None = ServerOption,
    token_file: Path | None = TokenFileOption,
) -> None:
    """Policy coverage, least-privilege suggestions with their evidence, audit
    completeness, access-request fulfilment, stale identities and anomalies over a
    window (default the last 7 days). ``report stale`` lists stale identities alone."""
    if ctx.invoked_subcommand is not None:
        return
    params = {"stale_days": str(stale_days)}
    if since:
        params["since"] = since
    if until:
        params["until"] = until
    client = ApiClient(resolve_server(server), resolve_token(token_file))
    body = client.request("GET", "/v1/report", params=params)
    if output is ReportOutput.json:
        text = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    elif output is ReportOutput.html:
        text = render_html(body)
    else:
        if out is not None:
            fail("--out writes json or html; add -o json or -o html")
        _print_summary(body)
        return
    if out is None:
        if output is ReportOutput.json:
            print_json(body)
        else:
            typer.echo(text, nl=False)
        return
    try:
        write_atomically(out, text, mode=0o644)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}")
    print_line(f"report written to {out}")


# -- table ----------------------------------------------------------------------------------


def _print_summary(body: dict[str, Any]) -> None:
    win, cov, dec = body["window"], body["coverage"], body["decisions"]
    comp, acc, lp = body["completeness"], body["access"], body["leastPrivilege"]
    checkpoint = comp["checkpoint"]
    print_facts(
        [
            ("window", f"{win['since']} .. {win['until']} ({win['entriesRead']} entries read)"),
            (
                "coverage",
                f"{cov['covered']}/{cov['workloads']} workloads have a binding ({cov['percent']}%)",
            ),
            ("uncovered", ", ".join(cov["uncovered"]) or "none"),
            (
                "tested bindings",
                f"{len(cov['exercised'])} exercised by PolicyTests; untested: "
                + (", ".join(cov["unexercised"]) or "none"),
            ),
            ("decisions", f"{dec['total']} ({dec['allowed']} allowed, {dec['denied']} denied)"),
            ("unused grants", ", ".join(lp["unused"]) or "none"),
            ("narrowable", ", ".join(lp["narrowable"]) or "none"),
            (
                "audit",
                f"{len(comp['sources'])} agent sources, {comp['gapsInWindow']} gaps in window "
                f"({comp['missingInWindow']} events missing), folded {_sum(comp['folded'])}, "
                f"dropped {_sum(comp['dropped'])}",
            ),
            (
                "checkpoint",
                f"size {checkpoint['size']} of {checkpoint['treeSize']}, "
                f"age {checkpoint['ageSeconds']} s",
            ),
            (
                "access requests",
                f"{acc['fulfilled']} fulfilled, p50 {acc['p50Seconds']} s, "
                f"p95 {acc['p95Seconds']} s",
            ),
            ("stale identities", str(len(body["stale"]["items"]))),
            ("anomalies", _counts(body["anomalies"]["byDetector"])),
        ]
    )
    rows = [
        [
            i["binding"],
            i["decisions"],
            "unused: remove" if i["unused"] else ", ".join(i.get("narrower", [])) or "as used",
            " ".join(str(n) for n in i["evidence"]),
        ]
        for i in lp["bindings"]
    ]
    if rows:
        print_table(["BINDING", "ALLOWED", "NARROWER IN", "EVIDENCE"], rows)


def _sum(counts: dict[str, int]) -> int:
    return sum(counts.values())


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "0"


# -- HTML -----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#1d2430;margin:2em auto;max-width:62em;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ccd;
margin-top:1.8em}table{border-collapse:collapse;width:100%;margin:.6em 0}
th,td{border:1px solid #ccd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef1f6}.num{text-align:right}.muted{color:#667}.figure{margin:.8em 0}
.kpi{display:inline-block;border:1px solid #ccd;border-radius:4px;padding:.4em .8em;
margin:.2em .4em .2em 0}.kpi b{display:block;font-size:1.3em}
pre{background:#f6f7f9;padding:.5em;white-space:pre-wrap;font-size:12px}
svg text{font:11px system-ui,sans-serif}
@media print{body{margin:0;max-width:none;font-size:11pt}h2{break-after:avoid}
table,.figure,pre{break-inside:avoid}a{color:inherit;text-decoration:none}
.kpi{border-color:#999}}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(v)}</td>' if isinstance(v, int | float) else f"<td>{_e(v)}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kpi(label: str, value: Any) -> str:
    return f'<span class="kpi"><b>{_e(value)}</b>{_e(label)}</span>'


def decisions_chart(buckets: list[dict[str, Any]]) -> str:
    """Stacked bars per time bucket: allowed (bottom) and denied (top)."""
    width, height, pad = 720, 200, 30
    top = max([b["allowed"] + b["denied"] for b in buckets] + [1])
    bar = (width - 2 * pad) / max(1, len(buckets))
    parts = []
    for i, b in enumerate(buckets):
        x = pad + i * bar
        h_allowed = (height - 2 * pad) * b["allowed"] / top
        h_denied = (height - 2 * pad) * b["denied"] / top
        y = height - pad - h_allowed
        title = f"{b['start']}: {b['allowed']} allowed, {b['denied']} denied"
        parts.append(
            f'<g><title>{_e(title)}</title><rect x="{x:.1f}" y="{y:.1f}" '
            f'width="{max(bar - 1, 1):.1f}" height="{h_allowed:.1f}" fill="#4a8f5c"/>'
            f'<rect x="{x:.1f}" y="{y - h_denied:.1f}" width="{max(bar - 1, 1):.1f}" '
            f'height="{h_denied:.1f}" fill="#c0392b"/></g>'
        )
    first = buckets[0]["start"] if buckets else ""
    last = buckets[-1]["start"] if buckets else ""
    return (
        f'<svg id="decisions-over-time" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="decisions over time">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'stroke="#889"/>{"".join(parts)}'
        f'<text x="{pad}" y="{height - 8}">{_e(first)}</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{_e(last)}</text>'
        f'<text x="{pad}" y="16">max {top} per bucket; green allowed, red denied</text></svg>'
    )


def denials_chart(by_cluster: dict[str, int]) -> str:
    """Horizontal bars: denials per cluster."""
    items = sorted(by_cluster.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    row, label, width = 22, 160, 720
    height = max(1, len(items)) * row + 10
    top = max([n for _, n in items] + [1])
    parts = []
    for i, (cluster, count) in enumerate(items):
        y = 5 + i * row
        length = (width - label - 60) * count / top
        parts.append(
            f'<text x="{label - 6}" y="{y + 14}" text-anchor="end">{_e(cluster)}</text>'
            f'<rect x="{label}" y="{y + 3}" width="{length:.1f}" height="{row - 6}" '
            f'fill="#c0392b"/><text x="{label + length + 4:.1f}" y="{y + 14}">{count}</text>'
        )
    if not items:
        parts.append(f'<text x="{label}" y="18">no denials in the window</text>')
    return (
        f'<svg id="denials-by-cluster" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="denials by cluster">{"".join(parts)}</svg>'
    )


def call_graph(edges: list[dict[str, Any]]) -> str:
    """Clusters on a circle, an arrow per (caller's cluster → deciding cluster), its
    width by call count."""
    edges = edges[:60]
    nodes = sorted({e["from"] for e in edges} | {e["to"] for e in edges})
    size, radius = 420, 150
    centre = size / 2
    where = {
        n: (
            centre + radius * math.cos(2 * math.pi * i / max(1, len(nodes)) - math.pi / 2),
            centre + radius * math.sin(2 * math.pi * i / max(1, len(nodes)) - math.pi / 2),
        )
        for i, n in enumerate(nodes)
    }
    top = max([e["count"] for e in edges] + [1])
    parts = [
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0L10,5L0,10z" fill="#2c5d8a"/></marker>'
        "</defs>"
    ]
    for e in edges:
        (x1, y1), (x2, y2) = where[e["from"]], where[e["to"]]
        dx, dy = x2 - x1, y2 - y1
        length = math.hypot(dx, dy) or 1.0
        shrink = 18 / length  # stop at the node's circle
        x1, y1 = x1 + dx * shrink, y1 + dy * shrink
        x2, y2 = x2 - dx * shrink, y2 - dy * shrink
        stroke = 1 + 5 * e["count"] / top
        title = f"{e['from']} -> {e['to']}: {e['count']} decisions"
        parts.append(
            f'<g><title>{_e(title)}</title><line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
            f'y2="{y2:.1f}" stroke="#2c5d8a" stroke-opacity=".7" stroke-width="{stroke:.1f}" '
            f'marker-end="url(#arrow)"/></g>'
        )
    for name, (x, y) in where.items():
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="16" fill="#eef1f6" stroke="#2c5d8a"/>'
            f'<text x="{x:.1f}" y="{y + 30:.1f}" text-anchor="middle">{_e(name)}</text>'
        )
    if not nodes:
        parts.append(
            f'<text x="{centre}" y="{centre}" text-anchor="middle">no cross-cluster '
            "calls in the window</text>"
        )
    return (
        f'<svg id="cross-cluster-calls" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {size} {size}" width="60%" role="img" '
        f'aria-label="cross-cluster call graph">{"".join(parts)}</svg>'
    )


def render_html(body: dict[str, Any]) -> str:
    """The report as one self-contained HTML document."""
    win, cov, dec = body["window"], body["coverage"], body["decisions"]
    comp, acc, lp = body["completeness"], body["access"], body["leastPrivilege"]
    checkpoint = comp["checkpoint"]
    sections = [
        f'<h1>trustmesh report</h1><p class="muted">{_e(win["since"])} to '
        f"{_e(win['until'])}, generated {_e(win['generatedAt'])}, policy revision "
        f"{_e(win['policyRevision'])}, {_e(win['entriesRead'])} entries read</p>",
        "<h2>Policy coverage</h2>"
        + _kpi("workloads with a binding", f"{cov['covered']}/{cov['workloads']}")
        + _kpi("coverage", f"{cov['percent']}%")
        + _kpi("bindings exercised by PolicyTests", len(cov["exercised"]))
        + _kpi("allow bindings no test exercises", len(cov["unexercised"]))
        + "<h3>Workloads without a binding</h3>"
        + _table(["workload"], [[w] for w in cov["uncovered"]])
        + "<h3>Bindings and the PolicyTest cases that hit them</h3>"
        + _table(
            ["binding", "effect", "role", "subjects", "tested by"],
            [
                [
                    b["name"],
                    b["effect"],
                    b["role"],
                    ", ".join(b["subjects"]),
                    ", ".join(f"{t['test']}/{t['case']}" for t in b["testedBy"]) or "untested",
                ]
                for b in cov["bindings"]
            ],
        ),
        "<h2>Decisions</h2>"
        + _kpi("decisions", dec["total"])
        + _kpi("allowed", dec["allowed"])
        + _kpi("denied", dec["denied"])
        + f'<div class="figure"><h3>Decisions over time</h3>{decisions_chart(dec["buckets"])}'
        + "</div>"
        + '<div class="figure"><h3>Denials by cluster</h3>'
        + f"{denials_chart(dec['deniedByCluster'])}</div>"
        + '<div class="figure"><h3>Cross-cluster calls (caller\'s cluster to deciding '
        + f"cluster)</h3>{call_graph(dec['crossCluster'])}</div>",
        "<h2>Least privilege</h2><p>Grants never used in the window, and grants used "
        "narrower than written: each suggestion allows every decision observed, and cites "
        "sample log entries as evidence (<code>trustmesh audit proof --index N</code> proves each).</p>"
        + _table(
            ["binding", "role", "allowed", "suggestion", "evidence (log indexes)"],
            [
                [
                    i["binding"],
                    i["role"],
                    i["decisions"],
                    "unused: remove"
                    if i["unused"]
                    else ("narrower in " + ", ".join(i["narrower"]))
                    if i["narrower"]
                    else "already as used",
                    " ".join(str(n) for n in i["evidence"]),
                ]
                for i in lp["bindings"]
            ],
        )
        + "".join(
            f"<h3>Suggested for {_e(i['binding'])}</h3><pre>"
            f"{_e(json.dumps(i['manifests'], indent=2, sort_keys=True))}</pre>"
            for i in lp["bindings"]
            if i.get("narrower")
        ),
        "<h2>Audit completeness</h2>"
        + _kpi("agent sources", len(comp["sources"]))
        + _kpi("gaps in window", comp["gapsInWindow"])
        + _kpi("events missing", comp["missingInWindow"])
        + _kpi("refusals folded", _sum(comp["folded"]))
        + _kpi("refusals dropped", _sum(comp["dropped"]))
        + _kpi("checkpoint age (s)", checkpoint["ageSeconds"])
        + _kpi("entries past checkpoint", checkpoint["treeSize"] - checkpoint["size"])
        + _table(
            ["source", "cluster", "agent", "next seq", "silent (s)", "gaps"],
            [
                [
                    s["source"],
                    s["cluster"],
                    s["agent"],
                    s["nextSeq"],
                    s["silentSeconds"],
                    ", ".join(
                        f"{g['firstSeq']}-{g['lastSeq']}"
                        for g in comp["gaps"]
                        if g["source"] == s["source"]
                    ),
                ]
                for s in comp["sources"]
            ],
        ),
        "<h2>Access requests</h2>"
        + _kpi("requested", acc["requested"])
        + _kpi("approved", acc["approved"])
        + _kpi("denied", acc["denied"])
        + _kpi("fulfilment p50 (s)", acc["p50Seconds"] if acc["p50Seconds"] is not None else "-")
        + _kpi("fulfilment p95 (s)", acc["p95Seconds"] if acc["p95Seconds"] is not None else "-"),
        f"<h2>Stale identities (unused {_e(body['stale']['days'])} days)</h2>"
        + _table(
            ["workload", "cluster", "SPIFFE ID", "idle days"],
            [
                [i["name"], i["cluster"], i["spiffeId"], i["idleDays"]]
                for i in body["stale"]["items"]
            ],
        ),
        "<h2>Anomalies by kind</h2>"
        + _kpi("anomalies", body["anomalies"]["total"])
        + _table(
            ["detector", "count"], [[k, v] for k, v in body["anomalies"]["byDetector"].items()]
        ),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>trustmesh report</title><style>"
        + _CSS
        + "</style></head><body>"
        + "".join(sections)
        + "</body></html>\n"
    )
