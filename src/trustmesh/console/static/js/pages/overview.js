// The overview: every cluster and its agents (desired vs applied policy revision,
// drift, how long behind, staleness; the revocations each agent lacks and for how long;
// last audit shipment), the issuers and key sets,
// the control plane's signing keys and revocation list. One request (GET /v1/overview);
// re-fetched when the server says it changed (the "overview" live event), and its
// relative times re-drawn every few seconds without a request.

import { h, clear, table, timeAgo, errorBox } from "../dom.js";

let unsubscribe = null;
let ticker = null;
let data = null;
let pending = null;

function badge(text, kind) {
  return h("span", { class: `badge ${kind}` }, text);
}

function card(label, value, note) {
  return h("div", { class: "card" }, h("div", { class: "value" }, String(value)), h("div", { class: "label" }, label), note ? h("div", { class: "muted" }, note) : null);
}

function state(cluster) {
  if (cluster.suspended) return badge("suspended", "bad");
  if (!cluster.agentsReporting) return badge(cluster.agentsStale ? "stale" : "no agent", "warn");
  if (cluster.drift) return badge("drift", "bad");
  return badge("in sync", "ok");
}

function agentsCell(cluster) {
  if (!cluster.agents.length) return h("span", { class: "muted" }, "none reported");
  return h(
    "ul",
    { class: "plain" },
    cluster.agents.map((a) =>
      h(
        "li",
        { dataset: { agent: a.agentId } },
        h("span", { class: "mono" }, a.agentId),
        " — r",
        String(a.appliedRevision),
        a.behind ? h("span", { class: "bad" }, ` (${a.revisionsBehind} behind, ${Math.round(a.lagSeconds)} s)`) : null,
        a.stale ? h("span", { class: "warn" }, " stale") : null,
        " · seen ",
        timeAgo(a.lastSeen),
      ),
    ),
  );
}

function revocationText(behind, lag) {
  if (behind === null) return h("span", { class: "muted" }, "unknown");
  if (!behind) return h("span", { class: "ok" }, "up to date");
  return h("span", { class: "bad" }, `${behind} behind${lag === null ? "" : `, ${Math.round(lag)} s`}`);
}

// Per agent: the revision it holds and how far behind it is ("unknown": it never said).
function revocationsCell(cluster) {
  if (!cluster.agents.length) return h("span", { class: "muted" }, "—");
  return h(
    "ul",
    { class: "plain" },
    cluster.agents.map((a) =>
      h(
        "li",
        { dataset: { revocationsOf: a.agentId } },
        h("span", { class: "mono" }, a.agentId),
        a.revocationRevision === null ? " — " : ` — r${a.revocationRevision} `,
        revocationText(a.revocationsBehind, a.revocationLagSeconds),
      ),
    ),
  );
}

function draw(root) {
  clear(root);
  root.appendChild(h("h1", {}, "Overview"));
  const t = data.totals;
  root.appendChild(
    h(
      "section",
      { class: "cards", "aria-label": "Totals" },
      card("clusters", t.clusters),
      card("agents reporting", `${t.agentsReporting} / ${t.agents}`),
      card("clusters drifting", t.drifting),
      card("policy revision", data.policy.desiredRevision, `registry r${data.policy.registryRevision}`),
      card("revocation revision", data.revocations.revision, data.revocations.lastPublishedAt ? null : "none published"),
      card("workloads", t.workloads),
    ),
  );
  root.appendChild(h("h2", { id: "clusters-title" }, "Clusters and agents"));
  root.appendChild(
    table(
      [
        { label: "Cluster", render: (c) => h("span", { class: "mono" }, c.name) },
        { label: "State", render: state },
        { label: "Desired / applied", render: (c) => `r${c.desiredRevision} / ${c.appliedRevisions.length ? c.appliedRevisions.map((r) => "r" + r).join(", ") : "—"}` },
        { label: "Agents", render: agentsCell },
        { label: "Revocations", render: revocationsCell },
        { label: "Last audit shipment", render: (c) => (c.lastShipment ? h("span", {}, timeAgo(c.lastShipment), ` (${c.auditEvents} events)`) : h("span", { class: "muted" }, "none")) },
        { label: "Workloads", key: "workloads" },
      ],
      data.clusters,
      { empty: "No cluster is registered yet (trustmesh apply -f cluster.yaml)." },
    ),
  );
  root.querySelector("table").classList.add("stack");
  root.querySelector("table").setAttribute("aria-labelledby", "clusters-title");
  root.querySelectorAll("tbody tr").forEach((row, i) => {
    if (data.clusters[i]) row.dataset.cluster = data.clusters[i].name;
  });

  root.appendChild(h("h2", {}, "Issuers and key sets"));
  root.appendChild(
    table(
      [
        { label: "Cluster", render: (c) => h("span", { class: "mono" }, c.name) },
        { label: "Token issuer", render: (c) => h("span", { class: "mono" }, c.issuer) },
        { label: "Key sources", render: (c) => h("span", { class: "mono" }, c.keySources.join(", ")) },
        {
          label: "Last good key set",
          render: (c) =>
            c.keySet
              ? h("span", {}, `${c.keySet.kids.length} key(s), fetched `, timeAgo(c.keySet.fetchedAt), c.keySet.expiredAt ? h("span", { class: "bad" }, " expired") : null)
              : h("span", { class: "muted" }, "not fetched yet"),
        },
      ],
      data.clusters,
      { empty: "No cluster." },
    ),
  );
  root.appendChild(h("h2", {}, "Control plane"));
  root.appendChild(
    h(
      "p",
      {},
      "Issuer ",
      h("span", { class: "mono" }, data.issuer),
      ", trust domain ",
      h("span", { class: "mono" }, `spiffe://${data.trustDomain}`),
      ". Policy published ",
      data.policy.publishedAt ? timeAgo(data.policy.publishedAt) : "—",
      "; last revocation ",
      data.revocations.lastPublishedAt ? timeAgo(data.revocations.lastPublishedAt) : "never",
      ".",
    ),
  );
  root.appendChild(
    table(
      [
        { label: "Signing key", render: (k) => h("span", { class: "mono" }, k.kid) },
        { label: "Algorithm", key: "alg" },
        { label: "State", render: (k) => (k.kid === data.signingKeys.activeKid ? badge("active", "ok") : k.state) },
        { label: "Created", render: (k) => timeAgo(k.createdAt) },
      ],
      data.signingKeys.keys,
    ),
  );
  if (data.federation.length) {
    root.appendChild(h("h2", {}, "Federated trust domains"));
    root.appendChild(
      table(
        [
          { label: "Name", key: "name" },
          { label: "Trust domain", render: (f) => h("span", { class: "mono" }, f.trustDomain) },
          { label: "Bundle endpoint", render: (f) => h("span", { class: "mono" }, f.endpoint) },
        ],
        data.federation,
      ),
    );
  }
  root.appendChild(h("p", { class: "muted", id: "overview-updated" }, "Updated ", timeAgo(data.generatedAt), "; live."));
}

async function load(root, ctx) {
  if (pending) return pending;
  pending = (async () => {
    try {
      data = await ctx.api.get("/v1/overview");
      draw(root);
    } catch (error) {
      clear(root);
      root.appendChild(h("h1", {}, "Overview"));
      root.appendChild(errorBox(error));
    } finally {
      pending = null;
    }
  })();
  return pending;
}

export async function render(root, ctx) {
  unsubscribe = ctx.live.subscribe(["overview"], () => load(root, ctx));
  await load(root, ctx);
  ticker = setInterval(() => data && !pending && draw(root), 10000);
}

export function cleanup() {
  if (unsubscribe) unsubscribe();
  if (ticker) clearInterval(ticker);
  unsubscribe = ticker = data = pending = null;
}
