// The run page's predictions table: epoch, sample, prompt, prediction, ground truth and
// judgments, filtered by epoch, sample and criterion verdict, paged by the API's keyset page
// tokens (earlier tokens kept for Previous). Judgments come from ListJudgments for the epochs
// on the page, read until past the page's last prediction, and fill in after the rows.
import * as api from "./api.js";
import {navigable} from "./keyboard.js";
import {button, clear, DASH, el, field, num, select, shortNumber} from "./dom.js";

const PAGE_SIZES = [10, 25, 50];
const JUDGMENT_PAGE = 500;

function predictionKey(step, sample) {
  return `${num(step)}/${num(sample)}`;
}

function textCell(col, text, missing) {
  const cell = el("td", {"data-col": col, class: "text"});
  cell.append(text === undefined || text === null
    ? el("span", {class: "missing"}, missing) : el("div", {class: "clamp"}, text));
  return cell;
}

export function judgmentChip(j) {
  const unscored = j.status === "JUDGMENT_STATUS_UNSCORED";
  const verdict = unscored ? "unscored" : j.passed ? "pass" : "fail";
  return el("li", {class: "chip " + verdict, "data-criterion": j.criterion,
    "data-verdict": verdict}, `${j.criterion} ${unscored ? DASH : shortNumber(num(j.score))} `,
  el("span", {class: "verdict"}, verdict));
}

function predictionRow(runId, p) {
  const href = `/runs/${encodeURIComponent(runId)}/samples/${num(p.sampleIndex)}`;
  const row = el("tr", {"data-epoch": num(p.epoch), "data-sample": num(p.sampleIndex),
    "data-step": num(p.step)},
  el("td", {"data-col": "epoch", class: "num"}, String(num(p.epoch))),
  el("td", {"data-col": "sample", class: "num"},
    el("a", {href, "aria-label": `sample ${num(p.sampleIndex)} across epochs`},
      String(num(p.sampleIndex)))),
  textCell("prompt", p.prompt, ""), textCell("prediction", p.prediction, ""),
  textCell("truth", p.groundTruth, "(none)"),
  el("td", {"data-col": "judgments", class: "judgments"}, el("span", {class: "missing"}, "...")));
  row.dataset.href = href;
  return row;
}

async function judgmentsOfEpoch(runId, epoch, lastKey) {
  const found = [];
  let token = "";
  do {
    const page = await api.get(api.runPath(runId, "/judgments"), {epoch, page_size: JUDGMENT_PAGE,
      page_token: token});
    const rows = page.judgments || [];
    found.push(...rows);
    const last = rows[rows.length - 1];
    const ref = last && last.prediction;
    if (!ref || num(ref.step) > lastKey[0] ||
        (num(ref.step) === lastKey[0] && num(ref.sampleIndex) > lastKey[1])) break;
    token = page.nextPageToken || "";
  } while (token);
  return found;
}

async function fillJudgments(runId, predictions, rows) {
  const lastByEpoch = new Map();
  for (const p of predictions) lastByEpoch.set(num(p.epoch), [num(p.step), num(p.sampleIndex)]);
  const byKey = new Map();
  for (const [epoch, lastKey] of lastByEpoch) {
    for (const j of await judgmentsOfEpoch(runId, epoch, lastKey)) {
      const key = predictionKey(j.prediction.step, j.prediction.sampleIndex);
      if (!byKey.has(key)) byKey.set(key, []);
      byKey.get(key).push(j);
    }
  }
  predictions.forEach((p, i) => {
    const found = byKey.get(predictionKey(p.step, p.sampleIndex)) || [];
    const cell = clear(rows[i].querySelector('[data-col="judgments"]'));
    cell.append(found.length ? el("ul", {class: "chips"}, ...found.map(judgmentChip))
      : el("span", {class: "missing"}, "none"));
  });
}

function epochOptions(control, epochs, value) {
  control.replaceChildren(el("option", {value: ""}, "all epochs"),
    ...epochs.map((e) => el("option", {value: e}, "epoch " + e)));
  control.value = value;
}

function filterInputs(table) {
  const f = table.filters;
  const epoch = select("pred-epoch", [], "");
  epochOptions(epoch, table.epochs, f.epoch);
  const passed = select("pred-passed", [["", "passed or failed"], ["true", "passed"],
    ["false", "failed"]], f.passed);
  passed.disabled = !f.criterion;
  return {epoch, passed,
    sample: el("input", {id: "pred-sample", type: "number", min: 0, step: 1, value: f.sample,
      placeholder: "all"}),
    criterion: select("pred-criterion", [["", "any criterion"],
      ...table.criteria.map((c) => [c, c])], f.criterion),
    size: select("pred-page-size", PAGE_SIZES.map((n) => [n, String(n)]), f.pageSize)};
}

// The filter form, built once (focus stays in it while the rows reload).
function filterControls(table) {
  const c = filterInputs(table);
  const apply = () => {
    c.passed.disabled = !c.criterion.value;
    table.setFilters({epoch: c.epoch.value, sample: c.sample.value.trim(),
      criterion: c.criterion.value, passed: c.criterion.value ? c.passed.value : "",
      pageSize: Number(c.size.value)});
  };
  for (const control of Object.values(c)) control.addEventListener("change", apply);
  table.setEpochs = (list) => {
    table.epochs = list;
    epochOptions(c.epoch, list, table.filters.epoch);
  };
  table.showEpoch = (value) => {
    c.epoch.value = String(value);
    apply();
  };
  const form = el("form", {class: "filters", id: "pred-filters", role: "search"},
    field("Epoch", c.epoch), field("Sample", c.sample), field("Criterion", c.criterion),
    field("Verdict", c.passed), field("Rows per page", c.size));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  return form;
}

function requestParams(table) {
  const f = table.filters;
  return {epoch: f.epoch, sample_index: f.sample, criterion: f.criterion,
    passed: f.criterion ? f.passed : "", page_size: f.pageSize, page_token: table.token};
}

function pagerControls(table, page) {
  const back = button("Previous page", {id: "pred-prev", disabled: !table.prev.length});
  const next = button("Next page", {id: "pred-next", disabled: !page.nextPageToken});
  back.addEventListener("click", () => table.load(table.prev.pop(), true).catch(table.ctx.fail));
  next.addEventListener("click", () => {
    table.prev.push(table.token);
    table.load(page.nextPageToken, true).catch(table.ctx.fail);
  });
  return el("div", {class: "pager"}, back,
    el("span", {class: "page-number", id: "pred-page"}, `Page ${table.prev.length + 1}`), next);
}

function rowsTable(table, predictions, ctx) {
  if (!predictions.length) {
    return el("p", {class: "empty", id: "pred-empty"}, "No predictions match these filters.");
  }
  const rows = predictions.map((p) => predictionRow(table.runId, p));
  navigable(rows, (row) => ctx.navigate(row.dataset.href));
  fillJudgments(table.runId, predictions, rows).catch(ctx.fail);
  return el("table", {id: "pred-table", class: "rows fit"},
    el("caption", {class: "visually-hidden"},
      "Predictions; press Enter on a row to open its sample across epochs"),
    el("thead", {}, el("tr", {}, ...["Epoch", "Sample", "Prompt", "Prediction", "Ground truth",
      "Judgments"].map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, ...rows));
}

// A predictions table for one run; returns {node, load(), showEpoch(epoch), setEpochs(list)}.
export function predictionsTable(ctx, runId, epochs, criteria) {
  const table = {ctx, runId, epochs, criteria, token: "", prev: [],
    filters: {epoch: "", sample: "", criterion: "", passed: "", pageSize: PAGE_SIZES[0]}};
  const rowsBox = el("div", {id: "pred-rows"}), pagerBox = el("div", {});
  const node = el("div", {id: "predictions-box"}, filterControls(table), rowsBox, pagerBox);
  table.load = async (token, focusTable) => {
    table.token = token || "";
    const seq = (table.seq = (table.seq || 0) + 1);
    const page = await api.get(api.runPath(runId, "/predictions"), requestParams(table));
    if (!ctx.alive() || seq !== table.seq) return;  // left, or a newer load started
    clear(rowsBox).append(rowsTable(table, page.predictions || [], ctx));
    clear(pagerBox).append(pagerControls(table, page));
    if (focusTable) rowsBox.querySelector("#pred-table tbody tr")?.focus();
  };
  table.setFilters = (filters) => {
    table.filters = filters;
    table.prev = [];
    table.load("", false).catch(ctx.fail);
  };
  return {node, load: () => table.load("", false),
    showEpoch: (epoch) => {
      table.showEpoch(epoch);
      node.scrollIntoView();
    },
    setEpochs: (list) => table.setEpochs(list)};
}
