// A prediction's text with the words added since the previous one and those removed from it
// marked (the diff itself: worddiff.js).
import {el} from "./dom.js";
import {diffWords} from "./worddiff.js";

const OP_CLASS = {"=": "same", "+": "added", "-": "removed"};

// The new text with the words added since `before` and those removed from it marked, as spans
// (class added / removed / same) whose text is set by textContent.
export function diffNode(before, after) {
  const out = el("div", {class: "pred-text diffed"});
  const ops = before === null ? [["=", after]] : diffWords(before, after);
  for (const [op, text] of ops) {
    out.append(el("span", {class: "w-" + OP_CLASS[op], "data-op": OP_CLASS[op]}, text));
  }
  return out;
}
