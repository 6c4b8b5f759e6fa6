// Word diff between two texts, without DOM (the web pages import it; `epochlens report`
// embeds this file in its page with the export keyword removed: services/cli/report_page.py).
// A token is a word with the whitespace after it (or a leading whitespace run), so joining
// tokens gives the text back; tokens compare without their whitespace. Common prefix and
// suffix are cut first; the middle is aligned by an LCS table, or shown as deleted then
// inserted when the table would be larger than MAX_DIFF_CELLS. Kept and inserted chunks are
// the new text's own, so together they are exactly the new text.
const MAX_DIFF_CELLS = 4000000;

function tokenize(text) {
  const texts = text.match(/\s+|\S+\s*/g) || [];
  return {texts, keys: texts.map((t) => t.trim())};
}

function pushOp(ops, op, text) {
  if (!text) return;
  const last = ops[ops.length - 1];
  if (last && last[0] === op) last[1] += text; else ops.push([op, text]);
}

function lcsTable(a, b) {
  const width = b.length + 1;
  const table = new Uint32Array((a.length + 1) * width);
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      table[i * width + j] = a[i] === b[j] ? table[(i + 1) * width + j + 1] + 1
        : Math.max(table[(i + 1) * width + j], table[i * width + j + 1]);
    }
  }
  return table;
}

function alignMiddle(a, b, ops) {
  if (a.keys.length * b.keys.length > MAX_DIFF_CELLS) {
    pushOp(ops, "-", a.texts.join(""));
    pushOp(ops, "+", b.texts.join(""));
    return;
  }
  const table = lcsTable(a.keys, b.keys), width = b.keys.length + 1;
  let i = 0, j = 0;
  while (i < a.keys.length && j < b.keys.length) {
    if (a.keys[i] === b.keys[j]) { pushOp(ops, "=", b.texts[j]); i++; j++; }
    else if (table[(i + 1) * width + j] >= table[i * width + j + 1]) pushOp(ops, "-", a.texts[i++]);
    else pushOp(ops, "+", b.texts[j++]);
  }
  pushOp(ops, "-", a.texts.slice(i).join(""));
  pushOp(ops, "+", b.texts.slice(j).join(""));
}

function sliceTokens(tokens, start, end) {
  return {texts: tokens.texts.slice(start, end), keys: tokens.keys.slice(start, end)};
}

export function diffWords(before, after) {
  const a = tokenize(before), b = tokenize(after), ops = [];
  let start = 0, endA = a.keys.length, endB = b.keys.length;
  while (start < endA && start < endB && a.keys[start] === b.keys[start]) start++;
  while (endA > start && endB > start && a.keys[endA - 1] === b.keys[endB - 1]) {
    endA--;
    endB--;
  }
  pushOp(ops, "=", b.texts.slice(0, start).join(""));
  alignMiddle(sliceTokens(a, start, endA), sliceTokens(b, start, endB), ops);
  pushOp(ops, "=", b.texts.slice(endB).join(""));
  return ops;
}
