// The Policy page (placeholder: its owner replaces this file).
import { h } from "../dom.js";

export async function render(root, ctx) {
  root.appendChild(h("h1", {}, "Policy"));
  root.appendChild(h("p", { class: "muted" }, "This page is being built."));
}

export function cleanup() {}
