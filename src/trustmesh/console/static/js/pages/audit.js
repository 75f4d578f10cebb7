// The Audit page (placeholder: its owner replaces this file).
import { h } from "../dom.js";

export async function render(root, ctx) {
  root.appendChild(h("h1", {}, "Audit"));
  root.appendChild(h("p", { class: "muted" }, "This page is being built."));
}

export function cleanup() {}
