// The Who calls whom page (placeholder: its owner replaces this file).
import { h } from "../dom.js";

export async function render(root, ctx) {
  root.appendChild(h("h1", {}, "Who calls whom"));
  root.appendChild(h("p", { class: "muted" }, "This page is being built."));
}

export function cleanup() {}
