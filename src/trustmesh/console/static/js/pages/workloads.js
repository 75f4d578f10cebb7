// The Workloads page: every identity the registry gives — explicit Workloads and the
// identities WorkloadTemplates gave (as observed at their first credential) — with when
// each last received a credential and was last seen in a decision, paged and filtered
// on the server (GET /v1/workloads?limit&after&source&cluster&q&staleDays), and the
// pending service accounts (refused for want of a Workload: GET /v1/pending).
import { h, clear, table, pager, timeAgo, errorBox } from "../dom.js";

const PAGE_SIZE = 50;

let state = null;

function idOf(prefix) {
  return `workloads-${prefix}`;
}

function sourceCell(item) {
  const template = item.status && item.status.template;
  return template
    ? h("span", {}, h("span", { class: "badge" }, "template"), " ", h("code", {}, template))
    : h("span", { class: "badge" }, "explicit");
}

function account(item) {
  const selector = (item.spec && item.spec.selector) || {};
  return h("code", {}, `${selector.namespace || "?"}/${selector.serviceAccount || "?"}`);
}

function lastCredential(item) {
  const usage = (item.status && item.status.usage) || {};
  if (!usage.lastCredentialAt) return h("span", { class: "muted" }, "never");
  const kind = usage.lastCredentialKind ? ` (${usage.lastCredentialKind})` : "";
  return h("span", {}, timeAgo(usage.lastCredentialAt), kind);
}

function lastDecision(item) {
  const usage = (item.status && item.status.usage) || {};
  if (!usage.lastDecisionAt) return h("span", { class: "muted" }, "never");
  const where = usage.lastDecisionCluster ? ` on ${usage.lastDecisionCluster}` : "";
  return h("span", {}, timeAgo(usage.lastDecisionAt), where);
}

function suspended(item) {
  const found = item.status && item.status.suspended;
  return found
    ? h("span", { class: "badge bad", title: found.reason || "" }, "suspended")
    : h("span", { class: "muted" }, "no");
}

const COLUMNS = [
  { key: "name", label: "Name", render: (i) => h("code", { class: "name" }, i.metadata.name) },
  { key: "source", label: "Source", render: sourceCell },
  { key: "cluster", label: "Cluster", render: (i) => (i.spec && i.spec.selector && i.spec.selector.cluster) || "—" },
  { key: "account", label: "Namespace/service account", render: account },
  { key: "spiffeId", label: "SPIFFE ID", render: (i) => h("code", {}, (i.status && i.status.spiffeId) || "—") },
  { key: "credential", label: "Last credential", render: lastCredential },
  { key: "decision", label: "Last seen in a decision", render: lastDecision },
  { key: "suspended", label: "Suspended", render: suspended },
];

const PENDING_COLUMNS = [
  { key: "cluster", label: "Cluster" },
  { key: "namespace", label: "Namespace", render: (p) => h("code", {}, p.namespace) },
  { key: "serviceAccount", label: "Service account", render: (p) => h("code", {}, p.serviceAccount) },
  { key: "count", label: "Refusals" },
  { key: "firstSeen", label: "First refused", render: (p) => timeAgo(p.firstSeen) },
  { key: "lastSeen", label: "Last refused", render: (p) => timeAgo(p.lastSeen) },
];

function filterForm(clusters, onApply) {
  const q = h("input", { id: idOf("q"), name: "q", type: "search", maxlength: 200, value: state.filters.q });
  const source = h(
    "select",
    { id: idOf("source"), name: "source" },
    h("option", { value: "" }, "All"),
    h("option", { value: "explicit" }, "Explicit Workloads"),
    h("option", { value: "template" }, "Template-derived"),
  );
  source.value = state.filters.source;
  const cluster = h(
    "select",
    { id: idOf("cluster"), name: "cluster" },
    h("option", { value: "" }, "All clusters"),
    clusters.map((name) => h("option", { value: name }, name)),
  );
  cluster.value = state.filters.cluster;
  const stale = h("input", {
    id: idOf("stale"),
    name: "staleDays",
    type: "number",
    min: 0,
    max: 36500,
    inputmode: "numeric",
    value: state.filters.staleDays,
    "aria-describedby": idOf("stale-help"),
  });
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter workloads" },
    h("div", { class: "field" }, h("label", { for: idOf("q") }, "Name or SPIFFE ID contains"), q),
    h("div", { class: "field" }, h("label", { for: idOf("source") }, "Source"), source),
    h("div", { class: "field" }, h("label", { for: idOf("cluster") }, "Cluster"), cluster),
    h(
      "div",
      { class: "field" },
      h("label", { for: idOf("stale") }, "Stale: idle for days"),
      stale,
      h("span", { id: idOf("stale-help"), class: "muted small" }, "Explicit Workloads unused that long; empty: any"),
    ),
    h("div", { class: "field actions" }, h("button", { type: "submit" }, "Apply filters")),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = { q: q.value.trim(), source: source.value, cluster: cluster.value, staleDays: stale.value.trim() };
    state.cursors = [null];
    state.page = 1;
    onApply();
  });
  return form;
}

async function loadPage(ctx, holder) {
  const f = state.filters;
  const params = {
    limit: PAGE_SIZE,
    after: state.cursors[state.page - 1] || undefined,
    q: f.q || undefined,
    source: f.source || undefined,
    cluster: f.cluster || undefined,
    staleDays: f.staleDays || undefined,
  };
  const mine = state;
  const turn = ++mine.generation;
  const stale = () => state !== mine || turn !== mine.generation;
  holder.setAttribute("aria-busy", "true");
  try {
    const answer = await ctx.api.get("/v1/workloads", params);
    if (stale()) return;
    clear(holder);
    const pages = Math.max(1, Math.ceil(answer.total / PAGE_SIZE));
    if (answer.next) state.cursors[state.page] = answer.next;
    const go = (n) => {
      state.page = n;
      loadPage(ctx, holder);
    };
    holder.appendChild(
      h("p", { class: "muted", id: idOf("count") }, answer.total === 1 ? "1 identity matches" : `${answer.total} identities match`),
    );
    holder.appendChild(
      table(COLUMNS, answer.items, {
        caption: "Workload identities",
        empty: "No identity matches these filters.",
      }),
    );
    holder.appendChild(pager({ page: state.page, pages, hasNext: Boolean(answer.next), onPage: go }));
  } catch (error) {
    if (stale()) return;
    clear(holder);
    holder.appendChild(errorBox(error));
  } finally {
    holder.removeAttribute("aria-busy");
  }
}

async function loadPending(ctx, holder) {
  try {
    const answer = await ctx.api.get("/v1/pending");
    clear(holder);
    const limits = answer.limits || {};
    holder.appendChild(
      h(
        "p",
        { class: "muted" },
        "Service accounts that asked for a credential and were refused because no Workload or template admits them",
        limits.total ? ` (at most ${limits.total} kept, ${limits.perCluster} per cluster).` : ".",
      ),
    );
    holder.appendChild(table(PENDING_COLUMNS, answer.items || [], { caption: "Pending service accounts", empty: "None pending." }));
  } catch (error) {
    clear(holder);
    holder.appendChild(errorBox(error));
  }
}

export async function render(root, ctx) {
  state = {
    filters: { q: "", source: "", cluster: "", staleDays: "" },
    cursors: [null], // cursors[n-1]: the `after` of page n
    page: 1,
    generation: 0,
  };
  root.appendChild(h("h1", {}, "Workloads"));
  let clusters = [];
  try {
    const answer = await ctx.api.get("/v1/clusters");
    clusters = (answer.items || []).map((c) => c.metadata.name).sort();
  } catch (error) {
    root.appendChild(errorBox(error));
  }
  const holder = h("section", { id: idOf("list"), "aria-label": "Workload identities" });
  root.appendChild(filterForm(clusters, () => loadPage(ctx, holder)));
  root.appendChild(holder);
  const pending = h("section", { id: idOf("pending"), "aria-labelledby": idOf("pending-title") });
  root.appendChild(h("h2", { id: idOf("pending-title") }, "Pending service accounts"));
  root.appendChild(pending);
  await Promise.all([loadPage(ctx, holder), loadPending(ctx, pending)]);
}

export function cleanup() {
  if (state) state.generation++;
  state = null;
}
