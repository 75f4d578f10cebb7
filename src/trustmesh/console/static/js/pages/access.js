// Access requests (DESIGN §11, issue 16): the list (paged on the server, filtered by
// state), the request form (what `trustmesh access request` takes), approve / deny with a
// reason for approvers, and a live countdown to the expiry of granted ones.
// Everything the server sends is hostile: text goes in with textContent (dom.js's h) only.
// The page hides what a role cannot do; the server refuses it anyway (403), and the page
// shows the server's message.

import {
  absoluteTime,
  countdown,
  failureText,
  h,
  pager,
  showStatus,
  table,
  timeAgo,
} from "../dom.js";

const STATES = ["pending", "approved", "denied", "expired"];
const PAGE = 20;
const UNITS = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };

let api = null;
let role = null;
let person = null;
let statusEl = null;
let listEl = null;
let stops = []; // the running countdowns' stop functions
let state = "";
let cursors = [""]; // the `after` of each page seen, the current one last

// `90s`, `30m`, `2h`, `1d`, `2w` or a number of seconds -> seconds (null when not one)
export function parseDuration(text) {
  const match = /^([0-9]{1,9})([smhdw]?)$/.exec(text.trim());
  if (!match) return null;
  return Number(match[1]) * UNITS[match[2] || "s"];
}

export function humanDuration(seconds) {
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size && seconds % size === 0) return `${seconds / size}${unit}`;
  }
  return `${seconds}s`;
}

function subjectText(subject) {
  return Object.entries(subject || {}).map(([k, v]) => `${k}=${v}`).join(",");
}

function show(message, kind = "info") {
  showStatus(statusEl, message, kind);
}

const failure = failureText;

function stopTimers() {
  for (const stop of stops) stop();
  stops = [];
}

function expiresIn(item) {
  if (item.state === "expired") return "expired";
  if (item.state !== "approved" || !item.expiresAt) return "—";
  const el = h("span", { class: "countdown", "data-countdown": item.id,
    title: `expires ${absoluteTime(item.expiresAt)}` });
  stops.push(countdown(el, item.expiresAt));
  return el;
}

// Approve or deny request `id` as the signed-in person; the outcome (or the server's
// refusal, e.g. 403 for an auditor) is shown in the page. Returns {ok, status, message}.
export async function decide(id, verb, reason) {
  const body = reason ? { reason } : {};
  try {
    const done = await api.post(`/v1/access/${encodeURIComponent(id)}/${verb}`, body);
    const until = done.expiresAt ? `, expires ${absoluteTime(done.expiresAt)}` : "";
    const message = `access request ${done.id} ${done.state} by ${done.decidedBy}${until}`;
    show(message);
    await load();
    return { ok: true, status: 200, message };
  } catch (error) {
    show(`${verb} refused: ${failure(error)}`, "error");
    return { ok: false, status: error.status || 0, message: error.message || String(error) };
  }
}

function actions(item) {
  if (role !== "approver" || item.state !== "pending") return "";
  if (item.requester === `user:${person}`) return h("span", { class: "muted" }, "yours: another approver decides");
  const label = `Reason for the decision on ${item.id}`;
  const reason = h("input", { type: "text", maxlength: "1000", "aria-label": label,
    placeholder: "reason (required to deny)", "data-reason": item.id });
  const approve = h("button", { type: "button", "data-approve": item.id }, "Approve");
  const deny = h("button", { type: "button", class: "danger", "data-deny": item.id }, "Deny");
  approve.addEventListener("click", () => decide(item.id, "approve", reason.value.trim()));
  deny.addEventListener("click", () => {
    if (!reason.value.trim()) {
      show("a denial needs a reason", "error");
      reason.focus();
      return;
    }
    decide(item.id, "deny", reason.value.trim());
  });
  return h("div", { class: "decide" }, reason, approve, deny);
}

const COLUMNS = [
  { label: "ID", render: (i) => h("code", {}, i.id) },
  { label: "State", render: (i) => h("span", { class: `state state-${i.state}` }, i.state) },
  { label: "Access", render: (i) => [
      h("strong", {}, i.role), ` for ${subjectText(i.subject)}`, h("br"),
      h("small", { class: "muted" }, `on ${(i.clusters || []).join(", ")}` +
        (i.namespaces ? ` in ${i.namespaces.join(", ")}` : "") +
        ` for ${humanDuration(i.duration)}`)] },
  { label: "Requested", render: (i) => [i.requester, h("br"), h("small", {}, timeAgo(i.createdAt))] },
  { label: "Reason", key: "reason" },
  { label: "Decided by", render: (i) => i.decidedBy
      ? [i.decidedBy, i.decisionReason ? h("small", { class: "muted" }, ` (${i.decisionReason})`) : ""]
      : "—" },
  { label: "Expires in", render: expiresIn },
  { label: "Decision", render: actions },
];

export async function load() {
  if (!listEl) return;
  const params = { limit: PAGE, state, after: cursors[cursors.length - 1] };
  let answer;
  try {
    answer = await api.get("/v1/access", params);
  } catch (error) {
    show(`the list could not be read: ${failure(error)}`, "error");
    return;
  }
  if (!listEl) return;
  stopTimers();
  const onPage = (n) => {
    if (n > cursors.length) cursors.push(answer.next);
    else cursors.pop();
    load();
  };
  listEl.replaceChildren(
    table(role === "approver" ? COLUMNS : COLUMNS.slice(0, -1), answer.items, {
      caption: `Access requests${state ? ` (${state})` : ""}, newest first`,
      empty: `No ${state ? `${state} ` : ""}access requests.`,
    }),
    pager({ page: cursors.length, hasNext: Boolean(answer.next), onPage }));
  listEl.querySelector("table").classList.add("stack"); // one card a row on a phone
}

function field(label, input, hint) {
  const id = `access-${input.getAttribute("name")}`;
  input.id = id;
  if (hint) input.setAttribute("aria-describedby", `${id}-hint`);
  return h("div", { class: "field" }, h("label", { for: id }, label), input,
    hint ? h("small", { id: `${id}-hint` }, hint) : "");
}

function requestForm(roles, clusters) {
  const roleIn = h("input", { name: "role", required: true, list: "access-role-choices",
    autocomplete: "off" });
  const kindIn = h("select", { name: "kind" },
    ...["workload", "spiffeId", "user"].map((k) => h("option", { value: k }, k)));
  const subjectIn = h("input", { name: "subject", required: true, autocomplete: "off" });
  const clustersIn = h("input", { name: "clusters", required: true, list: "access-cluster-choices",
    autocomplete: "off" });
  const namespacesIn = h("input", { name: "namespaces", autocomplete: "off" });
  const durationIn = h("input", { name: "duration", required: true, value: "1h",
    autocomplete: "off" });
  const reasonIn = h("input", { name: "reason", required: true, maxlength: "1000",
    autocomplete: "off" });
  const form = h("form", { class: "request", "aria-label": "Request access" },
    h("h2", {}, "Request access"),
    h("datalist", { id: "access-role-choices" }, ...roles.map((r) => h("option", { value: r }))),
    h("datalist", { id: "access-cluster-choices" }, ...clusters.map((c) => h("option", { value: c }))),
    field("Role", roleIn, "a GlobalRole of the current policy"),
    field("Subject kind", kindIn),
    field("Subject", subjectIn, "workload name, SPIFFE ID or person"),
    field("Clusters", clustersIn, "comma-separated"),
    field("Namespaces", namespacesIn, "comma-separated; empty: every namespace"),
    field("Duration", durationIn, "30m, 2h, 1d; at most the role's maximum"),
    field("Reason", reasonIn, "recorded in the audit log"),
    h("button", { type: "submit" }, "Request"));
  const names = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const seconds = parseDuration(durationIn.value);
    if (seconds === null) {
      show(`duration must be such as 90s, 30m, 2h or 1d, not ${durationIn.value}`, "error");
      durationIn.focus();
      return;
    }
    const body = {
      role: roleIn.value.trim(),
      subject: { [kindIn.value]: subjectIn.value.trim() },
      clusters: names(clustersIn.value),
      duration: seconds,
      reason: reasonIn.value.trim(),
    };
    if (names(namespacesIn.value).length) body.namespaces = names(namespacesIn.value);
    show("sending the request…");
    try {
      const made = await api.post("/v1/access", body);
      show(`access request ${made.id} is pending: ${made.role} for ${subjectText(made.subject)}` +
        ` on ${made.clusters.join(", ")} for ${humanDuration(made.duration)}; an approver decides`);
      reasonIn.value = "";
      cursors = [""];
      await load();
    } catch (error) {
      show(`request refused: ${failure(error)}`, "error");
    }
  });
  return form;
}

async function choices() {
  // best effort: the form works without them (free text)
  const [policy, clusters] = await Promise.allSettled([
    api.get("/v1/policy/versions/current"), api.get("/v1/clusters")]);
  const roles = policy.status === "fulfilled"
    ? (policy.value.documents || []).filter((d) => d.kind === "GlobalRole")
        .map((d) => d.metadata.name) : [];
  const names = clusters.status === "fulfilled"
    ? (clusters.value.items || []).map((c) => c.metadata.name) : [];
  return [roles, names];
}

export async function render(root, ctx) {
  api = ctx.api;
  role = ctx.role;
  person = ctx.person;
  state = "";
  cursors = [""];
  statusEl = h("p", { class: "notice", role: "status", "aria-live": "polite",
    "data-status": "access" });
  listEl = h("div", { class: "access-list" });
  const filter = h("select", { name: "state", "aria-label": "Show requests in state" },
    h("option", { value: "" }, "all"), ...STATES.map((s) => h("option", { value: s }, s)));
  filter.addEventListener("change", () => {
    state = filter.value;
    cursors = [""];
    load();
  });
  const note = role === "approver"
    ? "You may approve or deny requests you neither made nor gain access from."
    : "Only a person with the approver role approves or denies requests.";
  root.replaceChildren(
    h("section", { class: "page access", "aria-labelledby": "access-title" },
      h("h1", { id: "access-title" }, "Access requests"),
      h("p", { class: "muted" }, note),
      statusEl,
      h("div", { class: "toolbar" }, h("label", {}, "State ", filter)),
      listEl,
      requestForm(...(await choices()))));
  await load();
}

export function cleanup() {
  stopTimers();
  statusEl = null;
  listEl = null;
}
