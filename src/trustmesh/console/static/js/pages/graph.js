// Who calls whom (DESIGN §12): the call graph of a window of the audit log
// (GET /v1/audit/graph, the same code as `trustmesh report`'s cross-cluster section),
// drawn as SVG — clusters as columns, workloads and the services they call as nodes,
// edges with their calls and denials — and the same edges as a table, the keyboard's
// and screen reader's way through it. Every label is set with textContent.

import { h } from "../dom.js";

const SVG = "http://www.w3.org/2000/svg";
const COLUMN = 390;
const ROW = 34;
const TOP = 56;
const NODE_W = 220;
const NODE_H = 24;
const MAX_PER_CLUSTER = 40;
const MAX_DRAWN_EDGES = 400;
const WINDOWS = [["1h", "last hour"], ["24h", "last 24 hours"], ["7d", "last 7 days"]];

let alive = false;

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  for (const child of children) el.append(child);
  return el;
}

function title(textValue) {
  const t = document.createElementNS(SVG, "title");
  t.textContent = textValue;
  return t;
}

function short(name, room = 30) {
  return name.length > room ? `…${name.slice(name.length - room + 1)}` : name;
}

function draw(graph) {
  const columns = graph.clusters.map((c) => c.name);
  const place = new Map();
  let rows = 0;
  const groups = [];
  columns.forEach((cluster, col) => {
    const keys = graph.clusters[col].nodes;
    const shown = keys.slice(0, MAX_PER_CLUSTER);
    rows = Math.max(rows, shown.length + (keys.length > shown.length ? 1 : 0));
    const x = 20 + col * COLUMN;
    const members = shown.map((key, i) => {
      const node = graph.nodes.find((n) => n.id === key);
      const y = TOP + i * ROW;
      place.set(key, { x, y });
      return s(
        "g",
        { class: `graph-node graph-${node.kind}`, "data-node": key },
        title(`${node.name} (${node.kind === "workload" ? "caller" : node.kind === "service" ? "callee" : "caller and callee"}) in ${cluster}`),
        s("rect", { x, y, width: NODE_W, height: NODE_H, rx: 5 }),
        Object.assign(s("text", { x: x + 8, y: y + 16 }), { textContent: short(node.name) }),
      );
    });
    if (keys.length > shown.length) {
      members.push(Object.assign(s("text", { x: x + 8, y: TOP + shown.length * ROW + 16, class: "graph-more" }), { textContent: `+${keys.length - shown.length} more (see the table)` }));
    }
    groups.push(
      s(
        "g",
        { class: "graph-cluster", "data-cluster": cluster },
        title(`cluster ${cluster}`),
        s("rect", { x: x - 10, y: 10, width: NODE_W + 20, height: 0, class: "graph-cluster-box" }),
        Object.assign(s("text", { x, y: 34, class: "graph-cluster-name" }), { textContent: short(cluster, 28) }),
        ...members,
      ),
    );
  });
  const height = TOP + Math.max(1, rows) * ROW + 20;
  const width = Math.max(640, 40 + (columns.length - 1) * COLUMN + NODE_W);
  for (const g of groups) g.querySelector("rect").setAttribute("height", String(height - 20));
  const edges = graph.edges.slice(0, MAX_DRAWN_EDGES).flatMap((edge) => {
    const a = place.get(edge.from);
    const b = place.get(edge.to);
    if (!a || !b) return [];
    const forward = b.x >= a.x;
    const x1 = a.x + (forward ? NODE_W : 0);
    const x2 = b.x + (forward ? 0 : NODE_W);
    const same = a.x === b.x;
    const y1 = a.y + NODE_H / 2;
    const y2 = b.y + NODE_H / 2;
    const bend = same ? 70 : Math.abs(x2 - x1) / 2;
    const d = same
      ? `M ${a.x + NODE_W} ${y1} C ${a.x + NODE_W + bend} ${y1}, ${a.x + NODE_W + bend} ${y2}, ${a.x + NODE_W} ${y2}`
      : `M ${x1} ${y1} C ${x1 + (forward ? bend : -bend)} ${y1}, ${x2 - (forward ? bend : -bend)} ${y2}, ${x2} ${y2}`;
    const widthPx = Math.min(6, 1 + Math.log2(edge.calls));
    const label = `${edge.calls}${edge.denied ? ` (${edge.denied} denied)` : ""}`;
    return [
      s(
        "g",
        { class: `graph-edge${edge.denied ? " graph-denied" : ""}${edge.crossCluster ? " graph-cross" : ""}` },
        title(`${edge.from.replace("|", ": ")} → ${edge.to.replace("|", ": ")}: ${edge.calls} calls, ${edge.denied} denied`),
        s("path", { d, "stroke-width": widthPx, fill: "none", "marker-end": "url(#graph-arrow)" }),
        Object.assign(s("text", { x: (x1 + x2) / 2 + (same ? bend : 0), y: (y1 + y2) / 2 - 6, "text-anchor": "middle", class: "graph-edge-label" }), { textContent: label }),
      ),
    ];
  });
  const summary = `${graph.calls} calls between ${graph.nodes.length} workloads and services in ${columns.length} clusters`;
  return s(
    "svg",
    { id: "graph-svg", class: "graph-svg", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": summary },
    title(summary),
    s("defs", {}, s("marker", { id: "graph-arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" }, s("path", { d: "M 0 0 L 10 5 L 0 10 z" }))),
    ...groups,
    ...edges,
  );
}

function edgeTable(graph) {
  const names = new Map(graph.nodes.map((n) => [n.id, n]));
  const head = h("tr", {}, ...["From cluster", "Caller", "To cluster", "Callee", "Calls", "Denied", "Across clusters"].map((c) => h("th", { scope: "col" }, c)));
  const rows = graph.edges.map((edge) => {
    const a = names.get(edge.from);
    const b = names.get(edge.to);
    return h(
      "tr",
      { class: edge.denied ? "graph-row-denied" : "" },
      h("td", { "data-label": "From cluster" }, a.cluster), h("td", { "data-label": "Caller" }, a.name),
      h("td", { "data-label": "To cluster" }, b.cluster), h("td", { "data-label": "Callee" }, b.name),
      h("td", { "data-label": "Calls" }, String(edge.calls)), h("td", { "data-label": "Denied" }, String(edge.denied)),
      h("td", { "data-label": "Across clusters" }, edge.crossCluster ? "yes" : "no"),
    );
  });
  return h("div", { class: "table-wrap" },
    h("table", { id: "graph-table", class: "graph-table stack" }, h("caption", {}, "Calls, most first"), h("thead", {}, head), h("tbody", {}, ...rows)));
}

export async function render(root, ctx) {
  alive = true;
  const status = h("p", { id: "graph-status", role: "status", "aria-live": "polite" });
  const picture = h("div", { id: "graph-picture", class: "graph-picture" });
  const listing = h("div", { id: "graph-listing" });
  const select = h("select", { id: "graph-window" }, ...WINDOWS.map(([value, label]) => h("option", { value }, label)));
  select.value = "24h";

  async function load() {
    status.textContent = "Loading…";
    try {
      const graph = await ctx.api.get("/v1/audit/graph", { since: select.value });
      if (!alive) return;
      const more = graph.truncated ? ` (the newest ${graph.read} decisions of the window)` : "";
      status.textContent = graph.edges.length
        ? `${graph.calls} calls from ${graph.decisions} decisions${more}.`
        : `No calls in the ${select.options[select.selectedIndex].textContent}.`;
      picture.replaceChildren(graph.edges.length ? draw(graph) : h("p", {}, "Nothing to draw."));
      listing.replaceChildren(edgeTable(graph));
    } catch (err) {
      status.textContent = `Could not load the graph: ${err.message}`;
    }
  }

  select.addEventListener("change", load);
  root.replaceChildren(
    h("h1", {}, "Who calls whom"),
    h("p", {}, "Drawn from the audit log's decisions: each workload (caller) in the cluster its identity is from, each service it called in the cluster that decided; red edges had denials. The table below lists the same calls."),
    h("div", { class: "graph-controls" }, h("label", { for: "graph-window" }, "Window"), select),
    status,
    picture,
    h("h2", {}, "Calls"),
    listing,
  );
  await load();
}

export function cleanup() {
  alive = false;
}
