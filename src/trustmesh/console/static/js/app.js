// The console's shell: who is signed in, the navigation, and a router on location.hash
// (#/overview …) that loads one page module at a time (js/pages/NAME.js, exporting
// `async function render(root, ctx)` and optionally `cleanup()`).

import * as api from "./api.js";
import * as live from "./live.js";
import { h, clear, errorBox, announce } from "./dom.js";

const PAGES = ["overview", "workloads", "policy", "audit", "access", "anomalies", "graph"];
const TITLES = {
  overview: "Overview",
  workloads: "Workloads",
  policy: "Policy",
  audit: "Audit",
  access: "Access requests",
  anomalies: "Anomalies",
  graph: "Who calls whom",
};

const root = document.getElementById("page");
let session = null;
let current = null; // {name, module}
let generation = 0;

function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function pageName() {
  const name = (location.hash.match(/^#\/([a-z]+)/) || [])[1];
  return PAGES.includes(name) ? name : "overview";
}

function showShell(visible) {
  document.getElementById("nav").hidden = !visible;
  document.getElementById("who").hidden = !visible;
  if (visible) {
    document.getElementById("who-person").textContent = session.person;
    document.getElementById("who-role").textContent = session.role;
  }
}

function markNav(name) {
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#/${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function leave() {
  if (current && typeof current.module.cleanup === "function") {
    try {
      await current.module.cleanup();
    } catch (error) {
      console.error(error);
    }
  }
  current = null;
}

async function route() {
  if (!session) return;
  const name = pageName();
  const mine = ++generation;
  await leave();
  markNav(name);
  document.title = `${TITLES[name]} · trustmesh console`;
  clear(root);
  root.appendChild(h("p", { class: "muted" }, "Loading…"));
  try {
    const module = await import(`./pages/${name}.js`);
    if (mine !== generation) return;
    current = { name, module };
    clear(root);
    // each visit renders into an element of its own: a page's fetch that finishes after
    // the person moved on writes into a detached element, never over the next page
    const view = h("div", { class: "view" });
    root.appendChild(view);
    const ctx = { person: session.person, role: session.role, api, live, navigate };
    await module.render(view, ctx);
  } catch (error) {
    if (mine !== generation) return;
    clear(root);
    root.appendChild(h("h1", {}, TITLES[name]));
    root.appendChild(errorBox(error));
  }
}

function signInForm(message) {
  showShell(false);
  document.title = "Sign in · trustmesh console";
  clear(root);
  const input = h("input", {
    id: "credential",
    name: "credential",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "credential-help",
  });
  const error = h("p", { class: "error", role: "alert", id: "sign-in-error" }, message || "");
  error.hidden = !message;
  const button = h("button", { type: "submit" }, "Sign in");
  const form = h(
    "form",
    { class: "sign-in", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    h("label", { for: "credential" }, "Personal credential"),
    input,
    h(
      "p",
      { id: "credential-help", class: "muted" },
      "The credential an admin gave you (trustmesh user add). It is sent once; the browser keeps only a session cookie.",
    ),
    error,
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    error.hidden = true;
    try {
      const answer = await api.post("/console/session", { credential: input.value });
      input.value = "";
      await started(answer);
    } catch (failure) {
      error.textContent = failure.message;
      error.hidden = false;
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  root.appendChild(form);
  input.focus();
}

async function started(answer) {
  session = answer;
  api.setCsrf(answer.csrf);
  showShell(true);
  if (!location.hash || location.hash === "#" || location.hash === "#/") {
    history.replaceState(null, "", "#/overview");
  }
  await route();
  root.focus({ preventScroll: true });
}

async function signOut() {
  try {
    await api.post("/console/session/end", {});
  } catch (error) {
    announce(error.message);
  }
  ended("Signed out.");
}

async function ended(message) {
  await leave();
  live.close();
  session = null;
  api.setCsrf("");
  signInForm(message);
}

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
window.addEventListener("console:unauthenticated", () => {
  if (session) ended("Your session ended; sign in again.");
});

(async function boot() {
  try {
    await started(await api.get("/console/session"));
  } catch (error) {
    signInForm(error.status === 401 ? "" : error.message);
  }
})();
