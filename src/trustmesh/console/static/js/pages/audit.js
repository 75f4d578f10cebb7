// The audit explorer (DESIGN §12): filtered pages of the log (newest first, paged on the
// server), an entry's detail with its inclusion proof and signed checkpoint verified here
// with WebCrypto (js/verify.js), and the trace of an entry: every entry of its trace_id.
// Everything from the server is text (textContent), never markup.

import { h } from "../dom.js";
import { verifyIndex } from "../verify.js";

const PAGE = 50;
const TYPES = [
  "token.issued", "token.exchange_failed", "svid.issued", "authz.decision", "admission.reviewed",
  "policy.published", "policy.rejected", "revocation.created", "key.rotated",
  "federation.bundle_updated", "federation.bundle_dropped", "cluster.keys_expired",
  "workload.retired", "workload.restored", "access.requested", "access.approved",
  "access.denied", "access.expired", "anomaly.detected", "audit.gap_detected",
  "audit.refusals_folded", "audit.origin_started", "user.login",
  "admin.console_signed_in", "admin.console_signed_out", "admin.console_signin_refused",
];

let state = null;

function text(value) {
  return value === undefined || value === null ? "" : String(value);
}

function subjectOf(event) {
  const identity = event.identity || {};
  return text(identity.spiffe_id || event.actor);
}

function decisionOf(event) {
  const decision = event.decision;
  if (!decision || typeof decision.allowed !== "boolean") return "";
  return decision.allowed ? "allow" : "deny";
}

// datetime-local (read as UTC) -> the log's time format, 2026-11-30T12:00:00.000Z
function logTime(value) {
  if (!value) return "";
  const full = value.length === 16 ? `${value}:00` : value.slice(0, 19);
  return `${full}.000Z`;
}

function button(label, onClick, attrs = {}) {
  const b = h("button", { type: "button", ...attrs }, label);
  b.addEventListener("click", onClick);
  return b;
}

function field(id, label, input) {
  return h("div", { class: "audit-field" }, h("label", { for: id }, label), input);
}

// compact: without the time and identity columns (the trace lists them above its table)
function entryTable(entries, caption, onOpen, compact = false) {
  const columns = compact ? ["Index", "Type", "Cluster", "Decision", ""] : ["Index", "Time", "Type", "Cluster", "Identity", "Decision", ""];
  const head = h("tr", {}, ...columns.map((c) => h("th", { scope: "col" }, c)));
  const rows = entries.map((entry) => {
    const e = entry.event || {};
    const decision = decisionOf(e);
    return h(
      "tr",
      { "data-index": String(entry.index) },
      h("td", { "data-label": "Index" }, String(entry.index)),
      compact ? null : h("td", { "data-label": "Time" }, text(e.time)),
      h("td", { "data-label": "Type", class: "audit-type" }, text(e.type)),
      h("td", { "data-label": "Cluster", class: "audit-cluster" }, text(e.cluster)),
      compact ? null : h("td", { "data-label": "Identity", class: "audit-subject" }, subjectOf(e)),
      h("td", { "data-label": "Decision", class: decision ? `audit-decision audit-${decision}` : "audit-decision" }, decision),
      h("td", {}, button("Open", () => onOpen(entry), { "aria-label": `Open entry ${entry.index}` })),
    );
  });
  return h("div", { class: "table-wrap" },
    h("table", { class: "audit-table stack" }, h("caption", {}, caption), h("thead", {}, head), h("tbody", {}, ...rows)));
}

export async function render(root, ctx) {
  state = { ctx, cursors: [], filters: {}, alive: true };
  const status = h("p", { id: "audit-status", role: "status", "aria-live": "polite" });
  const results = h("div", { id: "audit-results" });
  const detail = h("section", { id: "audit-detail", "aria-label": "Entry", hidden: true });
  const trace = h("section", { id: "audit-trace", "aria-label": "Trace", hidden: true });

  const typeInput = h("input", { id: "audit-type", name: "type", list: "audit-types", autocomplete: "off" });
  const types = h("datalist", { id: "audit-types" }, ...TYPES.map((t) => h("option", { value: t })));
  const identity = h("input", { id: "audit-identity", name: "identity", autocomplete: "off", placeholder: "spiffe://… or user:name" });
  const cluster = h("input", { id: "audit-cluster", name: "cluster", autocomplete: "off" });
  const decision = h(
    "select",
    { id: "audit-decision", name: "decision" },
    h("option", { value: "" }, "any"),
    h("option", { value: "allow" }, "allow"),
    h("option", { value: "deny" }, "deny"),
  );
  const since = h("input", { id: "audit-since", name: "since", type: "datetime-local", step: "1" });
  const until = h("input", { id: "audit-until", name: "until", type: "datetime-local", step: "1" });
  const apply = h("button", { type: "submit", id: "audit-apply" }, "Apply filters");
  const form = h(
    "form",
    { id: "audit-filters", class: "audit-filters", "aria-label": "Filters" },
    field("audit-type", "Type", typeInput),
    types,
    field("audit-identity", "Identity", identity),
    field("audit-cluster", "Cluster", cluster),
    field("audit-decision", "Decision", decision),
    field("audit-since", "Since (UTC)", since),
    field("audit-until", "Until (UTC)", until),
    h("div", { class: "audit-field" }, apply),
  );

  const older = button("Older", () => {
    if (state.next === null || state.next === undefined) return;
    state.cursors.push(state.next);
    load();
  }, { id: "audit-older" });
  const newer = button("Newer", () => {
    state.cursors.pop();
    load();
  }, { id: "audit-newer" });
  const pager = h("nav", { class: "audit-pager", "aria-label": "Pages" }, newer, older);

  async function load() {
    const params = { ...state.filters, order: "desc", limit: PAGE };
    const after = state.cursors[state.cursors.length - 1];
    if (after !== undefined) params.after = after;
    status.textContent = "Loading…";
    try {
      const page = await ctx.api.get("/v1/audit/query", params);
      if (!state.alive) return;
      state.next = page.next;
      const shown = page.entries.length;
      status.textContent = shown ? `${shown} entries, newest first${state.cursors.length ? ` (page ${state.cursors.length + 1})` : ""}` : "No entries match.";
      results.replaceChildren(entryTable(page.entries, "Audit entries", openEntry));
      newer.disabled = state.cursors.length === 0;
      older.disabled = page.next === null || page.next === undefined;
    } catch (err) {
      status.textContent = `Could not load entries: ${err.message}`;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const filters = {};
    if (typeInput.value.trim()) filters.type = typeInput.value.trim();
    if (identity.value.trim()) filters.identity = identity.value.trim();
    if (cluster.value.trim()) filters.cluster = cluster.value.trim();
    if (decision.value) filters.decision = decision.value;
    if (since.value) filters.since = logTime(since.value);
    if (until.value) filters.until = logTime(until.value);
    state.filters = filters;
    state.cursors = [];
    load();
  });

  function openEntry(entry) {
    const e = entry.event || {};
    const steps = h("ol", { id: "audit-steps", class: "audit-steps" });
    const result = h("p", { id: "audit-result", role: "status", "aria-live": "polite" });
    const verify = button("Verify inclusion", async () => {
      verify.disabled = true;
      steps.replaceChildren();
      result.className = "";
      result.textContent = "Verifying in this browser…";
      try {
        const outcome = await verifyIndex(ctx.api, entry.index, e);
        steps.replaceChildren(
          ...outcome.steps.map((s) =>
            h("li", { class: s.ok ? "audit-step-ok" : "audit-step-failed", "data-step": s.step },
              h("strong", {}, `${s.step}: ${s.ok ? "ok" : "FAILED"}`), " ", s.detail)),
        );
        result.className = outcome.ok ? "audit-verified" : "audit-failed";
        const failedStep = outcome.steps.find((s) => !s.ok);
        result.textContent = outcome.ok
          ? `Verified: entry ${entry.index} is in the log of size ${outcome.checkpoint.size} signed by ${outcome.checkpoint.origin}.`
          : `FAILED at step "${outcome.failed}": ${failedStep ? failedStep.detail : ""}`;
      } catch (err) {
        result.className = "audit-failed";
        result.textContent = `FAILED: ${err.message}`;
      } finally {
        verify.disabled = false;
      }
    }, { id: "audit-verify" });
    const actions = [verify];
    if (e.trace_id) {
      actions.push(button("Show trace", () => openTrace(String(e.trace_id)), { id: "audit-trace-open" }));
    }
    detail.replaceChildren(
      h("h2", {}, `Entry ${entry.index}`),
      h("dl", { class: "audit-facts" },
        h("dt", {}, "Type"), h("dd", {}, text(e.type)),
        h("dt", {}, "Time"), h("dd", {}, text(e.time)),
        h("dt", {}, "Cluster"), h("dd", {}, text(e.cluster)),
        h("dt", {}, "Identity"), h("dd", {}, subjectOf(e)),
        h("dt", {}, "Trace"), h("dd", {}, text(e.trace_id))),
      h("pre", { id: "audit-event", class: "audit-event", tabindex: "0", "aria-label": "The event" }, JSON.stringify(e, null, 2)),
      h("div", { class: "audit-actions" }, ...actions),
      result,
      steps,
    );
    detail.hidden = false;
    verify.focus();
  }

  async function openTrace(traceId) {
    trace.replaceChildren(h("h2", {}, `Trace ${traceId}`), h("p", { role: "status" }, "Loading…"));
    trace.hidden = false;
    try {
      const entries = [];
      let after;
      for (let page = 0; page < 10; page++) {
        const params = { trace_id: traceId, limit: 1000 };
        if (after !== undefined) params.after = after;
        const found = await ctx.api.get("/v1/audit/query", params);
        entries.push(...found.entries);
        if (found.next === null || found.next === undefined) break;
        after = found.next;
      }
      const story = entries.map((entry) => {
        const e = entry.event || {};
        const what = e.type === "token.issued" ? "issuance" : e.type === "authz.decision" ? "decision" : text(e.type);
        return h("li", {}, `${text(e.time)} · ${what} · ${text(e.cluster)} · ${subjectOf(e)}${decisionOf(e) ? ` · ${decisionOf(e)}` : ""}`);
      });
      trace.replaceChildren(
        h("h2", {}, `Trace ${traceId}`),
        h("ol", { class: "audit-story", "aria-label": "In order" }, ...story),
        entryTable(entries, `${entries.length} entries, in log order`, openEntry, true),
      );
      trace.querySelector("h2").setAttribute("tabindex", "-1");
      trace.querySelector("h2").focus();
    } catch (err) {
      trace.replaceChildren(h("h2", {}, `Trace ${traceId}`), h("p", { role: "alert" }, `Could not load the trace: ${err.message}`));
    }
  }

  root.replaceChildren(
    h("h1", {}, "Audit"),
    h("p", { class: "audit-intro" }, "The log's entries, newest first. Open one to verify its inclusion proof and the signed checkpoint in this browser, as an outside auditor would, or to follow its trace."),
    form,
    status,
    results,
    pager,
    h("div", { class: "audit-panels" }, detail, trace),
  );
  await load();
}

export function cleanup() {
  if (state) state.alive = false;
  state = null;
}
