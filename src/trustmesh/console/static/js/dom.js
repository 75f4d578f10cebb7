// Building the page. Everything the server sends is data, and hostile: it is set with
// textContent or as attribute values, never parsed as HTML (no innerHTML with data).

const BOOLEAN_ATTRS = new Set(["hidden", "disabled", "checked", "selected", "required", "readonly"]);

// h("button", {class: "x", onclick: fn, "aria-label": "…"}, "text", child, [more])
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = String(value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "value" && "value" in el) {
      el.value = String(value);
    } else if (BOOLEAN_ATTRS.has(key)) {
      if (value) el.setAttribute(key, "");
    } else {
      if (/^(href|src|action)$/i.test(key) && /^\s*javascript:/i.test(String(value))) continue;
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

// columns: [{key, label, render?(row) -> Node|string, class?}]; rows: objects.
export function table(columns, rows, { caption, empty = "Nothing to show." } = {}) {
  const head = h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.label))));
  const body = h(
    "tbody",
    {},
    rows.length
      ? rows.map((row) =>
          h(
            "tr",
            {},
            columns.map((c) => h("td", { class: c.class, "data-label": c.label }, c.render ? c.render(row) : fmt(row[c.key]))),
          ),
        )
      : h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, empty)),
  );
  return h("div", { class: "table-wrap" }, h("table", {}, caption ? h("caption", {}, caption) : null, head, body));
}

function fmt(value) {
  if (value === undefined || value === null) return "—";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// A pager over server-side pages: {page, pages?, hasNext, onPage(n)}.
export function pager({ page, pages, hasNext, onPage }) {
  const prev = h("button", { type: "button", disabled: page <= 1, onclick: () => onPage(page - 1) }, "Previous");
  const next = h("button", { type: "button", disabled: !hasNext, onclick: () => onPage(page + 1) }, "Next");
  const label = pages ? `Page ${page} of ${pages}` : `Page ${page}`;
  return h("nav", { class: "pager", "aria-label": "Pages" }, prev, h("span", { "aria-live": "polite" }, label), next);
}

// t: epoch seconds (number) or an RFC 3339 string -> "12 s ago" / "in 3 min".
export function relativeTime(t) {
  const ms = typeof t === "number" ? t * 1000 : Date.parse(t);
  if (!Number.isFinite(ms)) return "—";
  const seconds = Math.round((ms - Date.now()) / 1000);
  const abs = Math.abs(seconds);
  const [value, unit] =
    abs < 60 ? [abs, "s"] : abs < 3600 ? [Math.round(abs / 60), "min"] : abs < 86400 ? [Math.round(abs / 3600), "h"] : [Math.round(abs / 86400), "d"];
  return seconds <= 0 ? `${value} ${unit} ago` : `in ${value} ${unit}`;
}

export function absoluteTime(t) {
  const ms = typeof t === "number" ? t * 1000 : Date.parse(t);
  return Number.isFinite(ms) ? new Date(ms).toISOString().replace(/\.\d+Z$/, "Z") : "—";
}

// A <time> showing "12 s ago", its title the absolute time.
export function timeAgo(t) {
  return h("time", { datetime: absoluteTime(t), title: absoluteTime(t) }, relativeTime(t));
}

// Counts down in el until `until` (epoch seconds); returns a function that stops it.
export function countdown(el, until, { expired = "expired" } = {}) {
  const tick = () => {
    const left = Math.round(until - Date.now() / 1000);
    if (left <= 0) {
      el.textContent = expired;
      stop();
      return;
    }
    const h_ = Math.floor(left / 3600);
    const m = Math.floor((left % 3600) / 60);
    const s = left % 60;
    el.textContent = h_ ? `${h_} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
  };
  const timer = setInterval(tick, 1000);
  const stop = () => clearInterval(timer);
  tick();
  return stop;
}

// A short message in the page's live region (errors from ApiError included).
export function announce(text) {
  const status = document.getElementById("status");
  if (status) status.textContent = String(text);
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error && error.message ? error.message : String(error));
}

// A page's status line: the message, its kind (info, ok, error) for the style, and the
// role that makes a screen reader say it (an error at once, the rest politely).
export function showStatus(el, message, kind = "info") {
  if (!el) return;
  el.textContent = message;
  el.dataset.kind = kind;
  el.setAttribute("role", kind === "error" ? "alert" : "status");
}

// What went wrong, as the server said it, with the HTTP status when there was one.
export function failureText(error) {
  const status = error && error.status ? ` (${error.status})` : "";
  return `${(error && error.message) || String(error)}${status}`;
}
