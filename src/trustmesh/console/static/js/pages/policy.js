// The Policy page: the history of policy versions (GET /v1/policy/versions), the
// effective diff between any two revisions with its escalation flags (GET
// /v1/policy/diff, computed by the control plane as `trustmesh policy diff` prints it),
// and "explain this decision" (POST /v1/policy/explain): pick a cluster, an identity
// and a request, and see the engine's decision and the bindings that decide it.
import { h, clear, table, timeAgo, absoluteTime, errorBox } from "../dom.js";

const MAX_DIFF_ROWS = 500;

let alive = false;

function id(name) {
  return `policy-${name}`;
}

function field(labelText, control, help) {
  const helpId = help ? `${control.id}-help` : undefined;
  if (helpId) control.setAttribute("aria-describedby", helpId);
  return h(
    "div",
    { class: "field" },
    h("label", { for: control.id }, labelText),
    control,
    help ? h("span", { id: helpId, class: "muted small" }, help) : null,
  );
}

function options(select, values, chosen) {
  clear(select);
  for (const [value, text] of values) select.appendChild(h("option", { value }, text));
  if (chosen !== undefined) select.value = String(chosen);
}

// --- history and diff -------------------------------------------------------------------

const HISTORY_COLUMNS = (compare) => [
  { key: "revision", label: "Revision", render: (v) => h("strong", {}, String(v.revision)) },
  { key: "createdAt", label: "Published", render: (v) => timeAgo(v.createdAt) },
  {
    key: "author",
    label: "Author",
    render: (v) => h("span", {}, v.author, v.claimedAuthor ? h("span", { class: "muted" }, ` (claims ${v.claimedAuthor})`) : null),
  },
  { key: "message", label: "Message", render: (v) => v.message || h("span", { class: "muted" }, "—") },
  { key: "source", label: "Source" },
  {
    key: "changes",
    label: "Changes",
    render: (v) =>
      h(
        "ul",
        { class: "compact" },
        (v.changes || []).slice(0, 6).map((c) => h("li", {}, `${c.action} ${c.kind} `, h("code", {}, c.name))),
        (v.changes || []).length > 6 ? h("li", { class: "muted" }, `… ${v.changes.length - 6} more`) : null,
      ),
  },
  {
    key: "compare",
    label: "Diff",
    render: (v) =>
      h(
        "button",
        { type: "button", class: "secondary", onclick: () => compare(v.revision - 1, v.revision) },
        `${v.revision - 1} → ${v.revision}`,
      ),
  },
];

function flagText(flags) {
  return flags.length ? `Escalation: ${flags.join(", ")}` : "";
}

function grantRows(diff) {
  const flagged = new Map();
  for (const entry of diff.escalations || []) flagged.set(JSON.stringify(entry.grant), entry.flags);
  const rows = [];
  for (const grant of diff.appeared || []) {
    rows.push({ change: "+", grant, flags: flagged.get(JSON.stringify(grant)) || [] });
  }
  for (const grant of diff.disappeared || []) rows.push({ change: "-", grant, flags: [] });
  return rows;
}

const DIFF_COLUMNS = [
  {
    key: "change",
    label: "Change",
    render: (r) =>
      r.change === "+"
        ? h("span", { class: "change added" }, h("span", { "aria-hidden": "true" }, "+ "), "appeared")
        : h("span", { class: "change removed" }, h("span", { "aria-hidden": "true" }, "− "), "disappeared"),
  },
  { key: "workload", label: "Subject", render: (r) => h("code", {}, r.grant.workload) },
  { key: "cluster", label: "Cluster", render: (r) => r.grant.cluster },
  { key: "namespace", label: "Namespace", render: (r) => h("code", {}, r.grant.namespace) },
  { key: "action", label: "Action", render: (r) => h("code", {}, r.grant.action) },
  { key: "target", label: "Target", render: (r) => h("code", {}, r.grant.target) },
  { key: "kind", label: "Kind", render: (r) => r.grant.kind },
  { key: "expires", label: "Expires", render: (r) => (r.grant.expires ? absoluteTime(r.grant.expires) : "—") },
  {
    key: "flags",
    label: "Escalation flags",
    render: (r) =>
      r.flags.length
        ? h(
            "span",
            { class: "flags" },
            h("span", { class: "flag-mark", "aria-hidden": "true" }, "⚠ "),
            h("strong", {}, "Escalation: "),
            r.flags.map((f) => h("span", { class: "badge bad flag" }, f)),
          )
        : h("span", { class: "muted" }, "—"),
  },
];

function renderDiff(holder, diff) {
  clear(holder);
  const rows = grantRows(diff);
  const flaggedCount = (diff.escalations || []).length;
  holder.appendChild(
    h(
      "p",
      { id: id("diff-summary"), class: flaggedCount ? "summary flagged-summary" : "summary" },
      `Revision ${diff.from} → ${diff.to}: ${(diff.appeared || []).length} grant(s) appeared, ` +
        `${(diff.disappeared || []).length} disappeared, ${flaggedCount} flagged as escalation.`,
    ),
  );
  if (!rows.length) {
    holder.appendChild(h("p", { class: "muted" }, "No effective change: the two revisions grant the same."));
    return;
  }
  // flagged first, so an escalation is never below the fold of a long diff
  rows.sort((a, b) => (b.flags.length > 0) - (a.flags.length > 0));
  const shown = rows.slice(0, MAX_DIFF_ROWS);
  const built = table(DIFF_COLUMNS, shown, { caption: `Effective grants, revision ${diff.from} → ${diff.to}` });
  const body = built.querySelector("tbody");
  shown.forEach((row, i) => {
    const tr = body.children[i];
    if (row.flags.length) {
      tr.classList.add("flagged");
      tr.setAttribute("aria-label", `${flagText(row.flags)}: ${row.grant.workload} ${row.grant.action} ${row.grant.target}`);
    }
  });
  holder.appendChild(built);
  if (rows.length > shown.length) {
    holder.appendChild(h("p", { class: "muted" }, `Showing ${shown.length} of ${rows.length} changes (flagged first); use trustmesh policy diff for all.`));
  }
}

function historySection(ctx, versions) {
  const revisions = [[0, "0 (empty policy)"], ...versions.map((v) => [v.revision, `${v.revision} — ${v.message || v.author}`])];
  const from = h("select", { id: id("from"), name: "from" });
  const to = h("select", { id: id("to"), name: "to" });
  const newest = versions.length ? versions[0].revision : 0;
  options(from, revisions, Math.max(0, newest - 1));
  options(to, revisions, newest);
  const result = h("div", { id: id("diff"), "aria-live": "polite" });
  const compare = async (a, b) => {
    from.value = String(a);
    to.value = String(b);
    result.setAttribute("aria-busy", "true");
    try {
      const diff = await ctx.api.get("/v1/policy/diff", { from: a, to: b });
      if (alive) renderDiff(result, diff);
    } catch (error) {
      clear(result);
      result.appendChild(errorBox(error));
    } finally {
      result.removeAttribute("aria-busy");
    }
  };
  const form = h(
    "form",
    { class: "filters", "aria-label": "Compare two revisions" },
    field("From revision", from),
    field("To revision", to),
    h("div", { class: "field actions" }, h("button", { type: "submit" }, "Show diff")),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    compare(from.value, to.value);
  });
  return h(
    "section",
    { "aria-labelledby": id("history-title") },
    h("h2", { id: id("history-title") }, "History"),
    table(HISTORY_COLUMNS(compare), versions, { caption: "Policy versions, newest first", empty: "No policy has been applied yet." }),
    h("h2", { id: id("diff-title") }, "Effective diff"),
    h(
      "p",
      { class: "muted" },
      "What each workload may do that it could not before (or no longer), over today's inventory. Flags mark grants that deserve a second look: wildcard, secrets, bind, escalate, impersonate, cross-environment.",
    ),
    form,
    result,
  );
}

// --- explain --------------------------------------------------------------------------------

const REQUEST_KINDS = [
  ["resource", "Kubernetes resource"],
  ["nonResource", "Kubernetes non-resource URL"],
  ["service", "Service (HTTP)"],
];

const REQUEST_FIELDS = {
  resource: [
    ["verb", "Verb", "get"],
    ["apiGroup", "API group", ""],
    ["resource", "Resource", "pods"],
    ["subresource", "Subresource", ""],
    ["name", "Name", ""],
    ["namespace", "Namespace", ""],
  ],
  nonResource: [
    ["verb", "Verb", "get"],
    ["nonResourceURL", "URL", "/healthz"],
  ],
  service: [
    ["method", "Method", "GET"],
    ["host", "Host", ""],
    ["path", "Path", "/"],
    ["namespace", "Namespace", ""],
  ],
};

function explainForm(ctx, clusters, versions, workloads) {
  const cluster = h("select", { id: id("x-cluster"), name: "cluster", required: true });
  options(cluster, clusters.map((c) => [c, c]));
  const revision = h("select", { id: id("x-revision"), name: "revision" });
  options(revision, [["current", "current"], ...versions.map((v) => [v.revision, String(v.revision)]), [0, "0 (empty policy)"]]);
  const identityKind = h("select", { id: id("x-identity-kind"), name: "identityKind" });
  options(identityKind, [["workload", "Workload"], ["spiffeId", "SPIFFE ID"]]);
  const list = h("datalist", { id: id("x-workloads") }, workloads.map((w) => h("option", { value: w })));
  const identity = h("input", {
    id: id("x-identity"),
    name: "identity",
    required: true,
    maxlength: 2048,
    list: id("x-workloads"),
    autocomplete: "off",
    spellcheck: "false",
  });
  const kind = h("select", { id: id("x-kind"), name: "kind" });
  options(kind, REQUEST_KINDS);
  const fields = h("fieldset", { class: "request-fields" });
  const inputs = {};
  const drawFields = () => {
    clear(fields);
    fields.appendChild(h("legend", {}, "Request"));
    for (const key of Object.keys(inputs)) delete inputs[key];
    for (const [key, text, placeholder] of REQUEST_FIELDS[kind.value]) {
      const input = h("input", { id: id(`x-${key}`), name: key, placeholder, maxlength: 1024, spellcheck: "false" });
      inputs[key] = input;
      fields.appendChild(field(text, input));
    }
  };
  kind.addEventListener("change", drawFields);
  drawFields();
  const result = h("div", { id: id("explain-result"), "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Explain");
  const form = h(
    "form",
    { class: "explain form-grid", "aria-labelledby": id("explain-title") },
    field("Cluster", cluster),
    field("Policy revision", revision),
    field("Identity is a", identityKind),
    field("Identity", identity, "A Workload's name (or TEMPLATE/CLUSTER/NAMESPACE/SA), or a SPIFFE ID"),
    field("Request kind", kind),
    fields,
    h("div", { class: "field actions" }, button),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const request = {};
    for (const [key, input] of Object.entries(inputs)) {
      if (input.value.trim() !== "") request[key] = input.value.trim();
    }
    const body = {
      cluster: cluster.value,
      identity: { [identityKind.value]: identity.value.trim() },
      request,
    };
    if (revision.value !== "current") body.revision = Number(revision.value);
    button.disabled = true;
    result.setAttribute("aria-busy", "true");
    try {
      const answer = await ctx.api.post("/v1/policy/explain", body);
      if (alive) renderExplanation(result, answer);
    } catch (error) {
      clear(result);
      result.appendChild(errorBox(error));
    } finally {
      button.disabled = false;
      result.removeAttribute("aria-busy");
    }
  });
  return h(
    "section",
    { "aria-labelledby": id("explain-title") },
    h("h2", { id: id("explain-title") }, "Explain this decision"),
    h(
      "p",
      { class: "muted" },
      "The decision the cluster's agent makes for this identity and request, by the same engine over the cluster's bundle, and the bindings that decide it.",
    ),
    list,
    form,
    result,
  );
}

function json(value) {
  return h("code", { class: "json" }, JSON.stringify(value));
}

const BINDING_COLUMNS = [
  { key: "name", label: "RoleBinding", render: (b) => h("code", {}, b.name) },
  {
    key: "effect",
    label: "Effect",
    render: (b) => h("span", { class: b.effect === "deny" ? "badge bad" : "badge ok" }, b.effect || "—"),
  },
  { key: "role", label: "Role", render: (b) => h("code", {}, b.role || "—") },
  { key: "namespaces", label: "Namespaces", render: (b) => (b.namespaces ? b.namespaces.join(", ") : "all") },
  { key: "subjects", label: "Subjects", render: (b) => json(b.subjects || []) },
  {
    key: "rules",
    label: "Rules that cover the request",
    render: (b) => h("ul", { class: "compact" }, (b.rules || []).map((r) => h("li", {}, json(r)))),
  },
  { key: "expiresAt", label: "Expires", render: (b) => (b.expiresAt ? absoluteTime(b.expiresAt) : "never") },
];

function renderExplanation(holder, answer) {
  clear(holder);
  const allowed = answer.decision === "allow";
  const verdict = allowed ? "ALLOW" : answer.explicitDeny ? "DENY (explicit deny)" : "DENY (no binding allows it)";
  holder.appendChild(
    h(
      "div",
      { class: `decision ${allowed ? "allowed" : "denied"}`, id: id("decision"), role: "status" },
      h("span", { class: "verdict" }, allowed ? "✔ " : "✖ ", verdict),
      h("p", { class: "reason" }, answer.reason),
    ),
  );
  const identity = answer.identity || {};
  holder.appendChild(
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Cluster"),
      h("dd", {}, answer.cluster),
      h("dt", {}, "Policy revision"),
      h("dd", {}, String(answer.revision)),
      h("dt", {}, "SPIFFE ID"),
      h("dd", {}, h("code", {}, identity.spiffeId || "—")),
      h("dt", {}, "Workload"),
      h("dd", {}, identity.workload ? h("code", {}, identity.workload) : h("span", { class: "muted" }, "not in the inventory (asked with no claims)")),
      h("dt", {}, "Claims"),
      h("dd", {}, json(identity.claims || {})),
      h("dt", {}, "Request as the cluster reads it"),
      h("dd", {}, json(answer.request || {})),
    ),
  );
  holder.appendChild(
    table(BINDING_COLUMNS, answer.bindings || [], {
      caption: "Bindings that decide it",
      empty: "None: no binding covers this request for this identity (default deny).",
    }),
  );
  const naming = answer.naming || {};
  const names = (list, count) =>
    list && list.length
      ? h("span", {}, list.map((n, i) => [i ? ", " : "", h("code", {}, n)]), count > list.length ? ` … ${count - list.length} more` : "")
      : h("span", { class: "muted" }, "none");
  holder.appendChild(
    h(
      "p",
      { class: "naming" },
      h("strong", {}, "Bindings naming this identity on this cluster — allow: "),
      names(naming.allow, naming.allowCount),
      h("strong", {}, "; deny: "),
      names(naming.deny, naming.denyCount),
    ),
  );
}

// --- the page ---------------------------------------------------------------------------------

export async function render(root, ctx) {
  alive = true;
  root.appendChild(h("h1", {}, "Policy"));
  let versions = [];
  let clusters = [];
  let workloads = [];
  try {
    const [history, clusterList, workloadPage] = await Promise.all([
      ctx.api.get("/v1/policy/versions"),
      ctx.api.get("/v1/clusters"),
      ctx.api.get("/v1/workloads", { limit: 200 }),
    ]);
    versions = history.versions || [];
    clusters = (clusterList.items || []).map((c) => c.metadata.name).sort();
    workloads = (workloadPage.items || []).map((w) => w.metadata.name);
  } catch (error) {
    root.appendChild(errorBox(error));
    return;
  }
  if (!alive) return;
  root.appendChild(historySection(ctx, versions));
  root.appendChild(explainForm(ctx, clusters, versions, workloads));
}

export function cleanup() {
  alive = false;
}
