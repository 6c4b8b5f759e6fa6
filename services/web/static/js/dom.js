// DOM building and formatting helpers. Every text goes in through textContent (or an
// attribute value): nothing here parses markup, so model output stays inert text.

const SVG_NS = "http://www.w3.org/2000/svg";
export const DASH = "\u2013";

function applyAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendChildren(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// el("td", {class: "num"}, "text", otherNode, ...): strings become text nodes.
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  applyAttrs(node, attrs);
  appendChildren(node, children);
  return node;
}

export function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  applyAttrs(node, attrs);
  appendChildren(node, children);
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

export function num(value) {
  // int64 fields arrive as strings in proto3 JSON; absent fields mean zero.
  if (value === undefined || value === null || value === "") return 0;
  return Number(value);
}

export function pct(value) {
  return value === null || value === undefined ? DASH : (100 * value).toFixed(1) + "%";
}

export function usd(value) {
  return "$" + num(value).toFixed(4);
}

export function fixed(value, digits) {
  return value === null || value === undefined || Number.isNaN(value) ? DASH
    : Number(value).toFixed(digits);
}

export function shortNumber(value) {
  if (value === null || value === undefined) return DASH;
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 0.001 || abs >= 100000)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

export function when(timestamp) {
  if (!timestamp) return DASH;
  const date = new Date(timestamp);
  return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC").replace("Z", " UTC");
}

export function duration(startStamp, endStamp) {
  if (!startStamp) return DASH;
  const end = endStamp ? new Date(endStamp) : new Date();
  let seconds = Math.max(0, Math.round((end - new Date(startStamp)) / 1000));
  const hours = Math.floor(seconds / 3600);
  seconds -= hours * 3600;
  const minutes = Math.floor(seconds / 60);
  seconds -= minutes * 60;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min ${seconds} s`;
  return `${seconds} s`;
}

export const STATE_LABELS = {
  RUN_STATE_RUNNING: "running", RUN_STATE_SUCCEEDED: "finished", RUN_STATE_FAILED: "failed",
  RUN_STATE_CANCELLED: "cancelled", RUN_STATE_UNSPECIFIED: "unknown",
};

export function stateBadge(state) {
  const label = STATE_LABELS[state] || String(state || "unknown");
  return el("span", {class: "state state-" + label, "data-state": state || ""}, label);
}

export function section(title, id, ...children) {
  return el("section", {class: "card", id, "aria-labelledby": id + "-title"},
    el("h2", {id: id + "-title"}, title), ...children);
}

// A labelled form control: <label for=id>text</label> control.
export function field(labelText, control) {
  return el("div", {class: "field"}, el("label", {for: control.id}, labelText), control);
}

export function select(id, options, value) {
  const node = el("select", {id, name: id});
  for (const [optionValue, label] of options) {
    const option = el("option", {value: optionValue}, label);
    if (String(optionValue) === String(value ?? "")) option.selected = true;
    node.append(option);
  }
  return node;
}

export function button(text, attrs) {
  return el("button", {type: "button", ...attrs}, text);
}

// Exact match as trainer_client.matching defines it: NFC, whitespace collapsed, case folded
// (upper then lower case approximates Python's casefold, e.g. "\u00df" -> "ss").
export function normalizeAnswer(text) {
  return text.normalize("NFC").split(/\s+/).filter(Boolean).join(" ")
    .toUpperCase().toLowerCase();
}

export function exactMatch(prediction, truth) {
  if (truth === undefined || truth === null) return null;
  return normalizeAnswer(prediction || "") === normalizeAnswer(truth);
}
