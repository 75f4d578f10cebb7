// An outside auditor's check of one audit entry, in the browser, with WebCrypto only
// (DESIGN §6; docs/console.md#audit-explorer). Nothing here trusts the server's word:
//
//   key        the C2SP verifier key name+keyhash+base64(0x01||pubkey): the key hash must
//              be SHA-256(name || 0x0A || 0x01 || pubkey)[:4] (c2sp.org/signed-note)
//   signature  the checkpoint is a signed note; the signature line of that key name and
//              key hash must be a valid Ed25519 signature over the note text; the text is
//              a C2SP tlog-checkpoint (origin = key name, tree size, base64 root)
//   event      the event shown is the JSON of the leaf's exact bytes
//   leaf       SHA-256(0x00 || leaf) (RFC 9162 §2.1.1)
//   path       the inclusion proof, folded by the RFC 9162 §2.1.3.2 algorithm
//   root       the path's root equals the signed checkpoint's root, at its size
//
// verifyEntry() never throws for a bad input: every problem is the failed step's detail.

const ED25519 = 0x01;
const encoder = new TextEncoder();

export class VerifyError extends Error {}

function fail(message) {
  throw new VerifyError(message);
}

export function fromBase64(text, what) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4) {
    fail(`${what} is not standard base64`);
  }
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  if (toBase64(bytes) !== text) fail(`${what} is not in canonical base64`);
  return bytes;
}

export function toBase64(bytes) {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary);
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

// RFC 9162 §2.1.1
export function leafHash(leaf) {
  return sha256(concat(Uint8Array.of(0x00), leaf));
}

function nodeHash(left, right) {
  return sha256(concat(Uint8Array.of(0x01), left, right));
}

// name+hexkeyid+base64(0x01||pubkey) -> {name, keyId (8 hex), publicKey (CryptoKey), raw}
export async function parseVerifierKey(vkey) {
  const text = String(vkey).trim();
  const first = text.indexOf("+");
  const second = first < 0 ? -1 : text.indexOf("+", first + 1);
  if (first <= 0 || second < 0) fail("the verifier key is not name+keyhash+key");
  const name = text.slice(0, first);
  const keyId = text.slice(first + 1, second);
  if (/[\s+]/u.test(name) || /[\u0000-\u001f]/.test(name)) fail("the key name has a space or '+'");
  if (!/^[0-9a-f]{8}$/.test(keyId)) fail(`the key hash ${keyId} is not 8 lowercase hex digits`);
  const raw = fromBase64(text.slice(second + 1), "the verifier key material");
  if (raw.length !== 33 || raw[0] !== ED25519) fail("the verifier key is not an Ed25519 key (0x01 and 32 bytes)");
  const pub = raw.slice(1);
  const expected = hex((await sha256(concat(encoder.encode(name + "\n"), Uint8Array.of(ED25519), pub))).slice(0, 4));
  if (expected !== keyId) fail(`the key hash ${keyId} does not match the name and key (they give ${expected})`);
  let publicKey;
  try {
    publicKey = await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
  } catch (err) {
    fail(`this browser cannot import an Ed25519 key (${err.name})`);
  }
  return { name, keyId, publicKey, raw: pub };
}

// A signed note: verify the signature by `key`, return the checkpoint it states.
export async function verifyCheckpoint(note, key) {
  if (typeof note !== "string" || !note.endsWith("\n")) fail("the checkpoint note does not end in a newline");
  const split = note.lastIndexOf("\n\n");
  if (split < 0) fail("the checkpoint note has no blank line before its signatures");
  const text = note.slice(0, split + 1);
  const lines = note.slice(split + 2, -1).split("\n");
  let signature = null;
  for (const line of lines) {
    if (!line.startsWith("\u2014 ")) fail("a signature line does not start with an em dash");
    const [name, encoded] = line.slice(2).split(" ");
    if (name !== key.name || encoded === undefined) continue;
    const raw = fromBase64(encoded, "the signature");
    if (raw.length !== 68) fail("the signature is not a key hash and a 64-byte Ed25519 signature");
    if (hex(raw.slice(0, 4)) !== key.keyId) continue;
    signature = raw.slice(4);
  }
  if (signature === null) fail(`the checkpoint has no signature by ${key.name} with key hash ${key.keyId}`);
  const valid = await crypto.subtle.verify({ name: "Ed25519" }, key.publicKey, signature, encoder.encode(text));
  if (!valid) fail(`the signature by ${key.name} does not verify`);
  const [origin, sizeLine, rootLine] = text.slice(0, -1).split("\n");
  if (origin !== key.name) fail(`the checkpoint's origin ${origin} is not the key's name ${key.name}`);
  if (!/^(0|[1-9][0-9]{0,15})$/.test(sizeLine || "")) fail("the checkpoint's tree size is not a decimal number");
  const root = fromBase64(rootLine || "", "the checkpoint's root hash");
  if (root.length !== 32) fail("the checkpoint's root hash is not 32 bytes");
  return { origin, size: Number(sizeLine), root, text };
}

// RFC 9162 §2.1.3.2: the root an inclusion proof leads to from `hash` at `index` of `size`.
export async function rootFromInclusion(index, size, hash, path) {
  if (!(Number.isSafeInteger(index) && Number.isSafeInteger(size) && index >= 0 && index < size)) {
    fail(`leaf ${index} is not in a tree of size ${size}`);
  }
  let fn = index;
  let sn = size - 1;
  let r = hash;
  for (const p of path) {
    if (p.length !== 32) fail("a proof hash is not 32 bytes");
    if (sn === 0) fail("the proof has more hashes than the tree has levels");
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) fail("the proof has fewer hashes than the tree has levels");
  return r;
}

// Key order does not matter in JSON: compare with sorted keys.
function sortedJson(value) {
  if (Array.isArray(value)) return `[${value.map(sortedJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${sortedJson(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

// Every step, in order; the first that fails ends the check.
//   input: {vkey: text, note: text, entry: {index, leaf (base64), event}, shown: event shown,
//           proof: {leaf_index, tree_size, hashes: [base64]}}
// -> {ok, failed: step name or null, steps: [{step, ok, detail}], checkpoint}
export async function verifyEntry({ vkey, note, entry, shown, proof }) {
  const steps = [];
  const state = {};
  const run = async (step, work) => {
    try {
      steps.push({ step, ok: true, detail: await work() });
      return true;
    } catch (err) {
      const detail = err instanceof VerifyError ? err.message : `${err.name}: ${err.message}`;
      steps.push({ step, ok: false, detail });
      return false;
    }
  };
  const all = [
    ["key", async () => {
      state.key = await parseVerifierKey(vkey);
      return `${state.key.name}, key hash ${state.key.keyId} matches the Ed25519 key`;
    }],
    ["signature", async () => {
      state.checkpoint = await verifyCheckpoint(note, state.key);
      return `checkpoint of size ${state.checkpoint.size} signed by ${state.key.name}`;
    }],
    ["event", async () => {
      state.leaf = fromBase64(entry.leaf, "the leaf");
      let parsed;
      try {
        parsed = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(state.leaf));
      } catch (err) {
        fail("the leaf is not UTF-8 JSON");
      }
      if (sortedJson(parsed) !== sortedJson(shown)) fail("the event shown is not the leaf's JSON");
      return `the event shown is the leaf's ${state.leaf.length} bytes`;
    }],
    ["leaf hash", async () => {
      state.hash = await leafHash(state.leaf);
      return `SHA-256(0x00 || leaf) = ${hex(state.hash)}`;
    }],
    ["path", async () => {
      if (proof.leaf_index !== entry.index || proof.tree_size !== state.checkpoint.size) {
        fail(`the proof is for leaf ${proof.leaf_index} of ${proof.tree_size}, not ${entry.index} of ${state.checkpoint.size}`);
      }
      const hashes = proof.hashes.map((h, i) => fromBase64(h, `proof hash ${i}`));
      state.root = await rootFromInclusion(entry.index, state.checkpoint.size, state.hash, hashes);
      return `${hashes.length} hashes from leaf ${entry.index} give root ${toBase64(state.root)}`;
    }],
    ["root", async () => {
      if (!equal(state.root, state.checkpoint.root)) {
        fail(`the path leads to ${toBase64(state.root)}, the signed root is ${toBase64(state.checkpoint.root)}`);
      }
      return `equals the signed root of size ${state.checkpoint.size}`;
    }],
  ];
  for (const [step, work] of all) {
    if (!(await run(step, work))) {
      return { ok: false, failed: step, steps, checkpoint: state.checkpoint || null };
    }
  }
  return { ok: true, failed: null, steps, checkpoint: state.checkpoint };
}

// The key and the checkpoint are text/plain: fetched here, same-origin with the session.
async function getText(path) {
  const answer = await fetch(path, { credentials: "same-origin", headers: { Accept: "text/plain" } });
  if (!answer.ok) throw new VerifyError(`${path} answered ${answer.status}`);
  return answer.text();
}

// Fetch what a check needs (the console's API client for JSON) and run it. `shown`: the
// event the page shows for the entry.
export async function verifyIndex(api, index, shown) {
  const vkey = await getText("/v1/audit/key");
  const note = await getText("/v1/audit/checkpoint");
  const size = Number((String(note).split("\n")[1]) || 0);
  if (!(index < size)) {
    return {
      ok: false,
      failed: "checkpoint",
      steps: [{ step: "checkpoint", ok: false, detail: `entry ${index} is not yet in a signed checkpoint (size ${size}); try again in a moment` }],
    };
  }
  const found = await api.get("/v1/audit/entries", { start: index, end: index + 1 });
  const entry = (found.entries || [])[0];
  if (!entry || entry.index !== index) {
    return { ok: false, failed: "entry", steps: [{ step: "entry", ok: false, detail: `the log returned no entry ${index}` }] };
  }
  const proof = await api.get("/v1/audit/proof/inclusion", { index, size });
  return verifyEntry({ vkey, note, entry, shown: shown === undefined ? entry.event : shown, proof });
}
