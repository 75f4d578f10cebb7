// Anomalies (DESIGN §11, issue 16): the findings, filtered by detector and state and
// paged on the server; acknowledge and resolve with a note (admin, approver); each
// finding's evidence entries linked to the audit explorer; re-read live on the
// `anomalies` server-sent event, without a reload. Everything the server sends is
// hostile: text goes in with textContent (dom.js's h) only.

import { absoluteTime, failureText, h, pager, showStatus, timeAgo } from "../dom.js";

export const DETECTORS = ["new_edge", "denial_burst", "refusal_burst", "wrong_cluster",
  "escalation", "dormant_use", "concurrent_use"];
const STATES = ["open", "acknowledged", "resolved"];
const PAGE = 20;

let api = null;
let role = null;
let statusEl = null;
let listEl = null;
let unsubscribe = null;
let filters = { detector: "", state: "" };
let cursors = [""];
let drafts = new Map(); // anomaly id -> the note being typed, kept across live re-reads
let loading = null;
let again = false;

const when = absoluteTime;

function show(message, kind = "info") {
  showStatus(statusEl, message, kind);
}

const failure = failureText;

function mayAct() {
  return role === "admin" || role === "approver";
}

// Acknowledge or resolve anomaly `id` with an optional note; the outcome, or the
// server's refusal, is shown in the page. Returns {ok, status, message}.
export async function move(id, action, note) {
  const body = note ? { note } : {};
  try {
    const done = await api.post(`/v1/anomalies/${encodeURIComponent(id)}/${action}`, body);
    const by = done.state === "resolved" ? done.resolvedBy : done.acknowledgedBy;
    const message = `anomaly ${done.id} ${done.state} by ${by}`;
    drafts.delete(id);
    show(message);
    await load();
    return { ok: true, status: 200, message };
  } catch (error) {
    show(`${action} refused: ${failure(error)}`, "error");
    return { ok: false, status: error.status || 0, message: error.message || String(error) };
  }
}

function subjectText(subject) {
  return Object.entries(subject || {}).map(([k, v]) => `${k}=${v}`).join(", ");
}

function quarantineText(found) {
  if (!found) return "";
  if (found.created || !("error" in found)) return `${found.kind} ${found.value} suspended`;
  return `not quarantined: ${found.error}`;
}

function evidence(item) {
  const indexes = item.evidence || [];
  if (!indexes.length) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "evidence", "aria-label": `Evidence of ${item.id}` },
    ...indexes.map((index) => h("li", {},
      h("a", { href: `#/audit?index=${Number(index)}`, "data-evidence": String(index) },
        `entry ${Number(index)}`))));
}

function controls(item) {
  if (!mayAct() || item.state === "resolved") return "";
  const note = h("input", { type: "text", maxlength: "2000", "data-note": item.id,
    "aria-label": `Note on anomaly ${item.id}`, placeholder: "note (optional)" });
  note.value = drafts.get(item.id) || "";
  note.addEventListener("input", () => drafts.set(item.id, note.value));
  const buttons = [];
  if (item.state === "open") {
    const ack = h("button", { type: "button", "data-acknowledge": item.id }, "Acknowledge");
    ack.addEventListener("click", () => move(item.id, "acknowledge", note.value.trim()));
    buttons.push(ack);
  }
  const resolve = h("button", { type: "button", "data-resolve": item.id }, "Resolve");
  resolve.addEventListener("click", () => move(item.id, "resolve", note.value.trim()));
  buttons.push(resolve);
  return h("div", { class: "decide" }, note, ...buttons);
}

function card(item) {
  const people = [];
  if (item.acknowledgedBy) {
    people.push(h("li", { "data-acknowledged-by": item.id },
      `acknowledged by ${item.acknowledgedBy} at ${when(item.acknowledgedAt)}`));
  }
  if (item.resolvedBy) {
    people.push(h("li", { "data-resolved-by": item.id },
      `resolved by ${item.resolvedBy} at ${when(item.resolvedAt)}`));
  }
  if (item.note) people.push(h("li", {}, `note: ${item.note}`));
  const quarantine = quarantineText(item.quarantined);
  return h("article", { class: `anomaly severity-${item.severity}`, "data-anomaly": item.id,
      "aria-labelledby": `anomaly-${item.id}` },
    h("h2", { id: `anomaly-${item.id}` },
      h("span", { class: `badge severity-${item.severity}` }, item.severity), " ",
      item.detector, " ",
      h("span", { class: `state state-${item.state}`, "data-state": item.id }, item.state)),
    h("p", { class: "summary" }, item.summary),
    h("dl", {},
      h("dt", {}, "Subject"), h("dd", {}, subjectText(item.subject)),
      h("dt", {}, "Detected"), h("dd", {}, timeAgo(item.detectedAt)),
      h("dt", {}, "Window"),
      h("dd", {}, `${when((item.window || [])[0])} – ${when((item.window || [])[1])}`),
      h("dt", {}, "Evidence"), h("dd", {}, evidence(item)),
      ...(quarantine ? [h("dt", {}, "Quarantine"), h("dd", {}, quarantine)] : []),
      h("dt", {}, "Id"), h("dd", {}, h("code", {}, item.id))),
    people.length ? h("ul", { class: "people" }, ...people) : "",
    controls(item));
}

async function fetchAndDraw() {
  const params = { limit: PAGE, ...filters, after: cursors[cursors.length - 1] };
  let answer;
  try {
    answer = await api.get("/v1/anomalies", params);
  } catch (error) {
    show(`the anomalies could not be read: ${failure(error)}`, "error");
    return;
  }
  if (!listEl) return;
  const focused = document.activeElement && listEl.contains(document.activeElement)
    ? document.activeElement.dataset.note : null;
  const onPage = (n) => {
    if (n > cursors.length) cursors.push(answer.next);
    else cursors.pop();
    load();
  };
  listEl.replaceChildren(
    answer.items.length
      ? h("div", { class: "anomaly-cards" }, ...answer.items.map(card))
      : h("p", { class: "empty muted" }, "No anomalies match."),
    pager({ page: cursors.length, hasNext: Boolean(answer.next), onPage }));
  if (focused) {
    const input = listEl.querySelector(`input[data-note="${CSS.escape(focused)}"]`);
    if (input) input.focus();
  }
}

// Re-read the current page; a read asked for while one runs is done once after it.
export async function load() {
  if (loading) {
    again = true;
    return loading;
  }
  loading = (async () => {
    do {
      again = false;
      await fetchAndDraw();
    } while (again && listEl);
  })();
  try {
    await loading;
  } finally {
    loading = null;
  }
}

function select(name, label, values) {
  const el = h("select", { name, "aria-label": label },
    h("option", { value: "" }, "all"), ...values.map((v) => h("option", { value: v }, v)));
  el.addEventListener("change", () => {
    filters = { ...filters, [name]: el.value };
    cursors = [""];
    load();
  });
  return h("label", {}, `${label} `, el);
}

export async function render(root, ctx) {
  api = ctx.api;
  role = ctx.role;
  filters = { detector: "", state: "" };
  cursors = [""];
  drafts = new Map();
  statusEl = h("p", { class: "notice", role: "status", "aria-live": "polite",
    "data-status": "anomalies" });
  listEl = h("div", { class: "anomaly-list", "aria-live": "polite" });
  const note = mayAct()
    ? "Acknowledge a finding you are looking at; resolve it when it is dealt with."
    : "Auditors read findings; admins and approvers acknowledge and resolve them.";
  root.replaceChildren(
    h("section", { class: "page anomalies", "aria-labelledby": "anomalies-title" },
      h("h1", { id: "anomalies-title" }, "Anomalies"),
      h("p", { class: "muted" }, note),
      statusEl,
      h("div", { class: "toolbar" }, select("detector", "Detector", DETECTORS),
        select("state", "State", STATES)),
      listEl));
  if (ctx.live && ctx.live.subscribe) {
    unsubscribe = ctx.live.subscribe(["anomalies"], () => load());
  }
  await load();
}

export function cleanup() {
  if (typeof unsubscribe === "function") unsubscribe();
  unsubscribe = null;
  statusEl = null;
  listEl = null;
}
