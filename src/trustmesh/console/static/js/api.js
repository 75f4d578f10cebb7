// Same-origin calls to the control plane's /v1 API and the console's session, with the
// session cookie (HttpOnly: never readable here) and the CSRF token on every change.
// No credential is ever stored in the browser: only the CSRF token, in memory.

let csrfToken = "";

export function setCsrf(token) {
  csrfToken = token || "";
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code || "";
  }
}

function url(path, params) {
  const target = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    if (Array.isArray(value)) value.forEach((v) => target.searchParams.append(key, String(v)));
    else target.searchParams.set(key, String(value));
  }
  return target.pathname + target.search;
}

async function answer(response) {
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const message =
      (body && (body.error_description || body.message || body.error)) ||
      `${response.status} ${response.statusText}`;
    const error = new ApiError(response.status, String(message), body && body.error);
    if (response.status === 401) window.dispatchEvent(new CustomEvent("console:unauthenticated"));
    throw error;
  }
  return body;
}

export async function get(path, params) {
  const response = await fetch(url(path, params), {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
    cache: "no-store",
  });
  return answer(response);
}

export async function post(path, body) {
  const response = await fetch(url(path), {
    method: "POST",
    credentials: "same-origin",
    headers: {
      Accept: "application/json",
      "Content-Type": "application/json",
      "X-CSRF-Token": csrfToken,
    },
    body: JSON.stringify(body === undefined ? {} : body),
    cache: "no-store",
  });
  return answer(response);
}
