// Live updates over server-sent events (GET /console/events, session cookie): events
// "overview" and "anomalies", each {"revision": N}, when what those pages show changed;
// the page re-fetches. One EventSource for the whole console, opened on first use.

let source = null;
const listeners = new Map(); // kind -> Set<callback>

function open() {
  if (source) return;
  source = new EventSource("/console/events", { withCredentials: true });
  for (const kind of listeners.keys()) attach(kind);
  source.addEventListener("ended", () => {
    close();
    window.dispatchEvent(new CustomEvent("console:unauthenticated"));
  });
}

function attach(kind) {
  if (!source || source[`__${kind}`]) return;
  source[`__${kind}`] = true;
  source.addEventListener(kind, (event) => {
    let data = {};
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    for (const callback of listeners.get(kind) || []) callback(kind, data);
  });
}

// subscribe(["overview"], (kind, data) => …) -> unsubscribe()
export function subscribe(kinds, onEvent) {
  for (const kind of kinds) {
    if (!listeners.has(kind)) listeners.set(kind, new Set());
    listeners.get(kind).add(onEvent);
  }
  open();
  for (const kind of kinds) attach(kind);
  return () => {
    for (const kind of kinds) listeners.get(kind)?.delete(onEvent);
  };
}

export function close() {
  if (source) source.close();
  source = null;
}
