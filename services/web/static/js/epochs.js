// The run page's epochs table: one row per epoch with its predictions, the exact-match rate,
// the last training and eval loss at the epoch's predictions step, each judge criterion's mean
// score and pass rate (a wrapping list, so the table keeps the page's width) and judge cost.
import {navigable} from "./keyboard.js";
import {DASH, el, num, pct, shortNumber, usd, when} from "./dom.js";
import {exactRates, isLossName, judgeLabel} from "./runcharts.js";

function valueAt(points, step) {
  let found = null;
  for (const p of points || []) if (num(p.step) <= step) found = p;
  return found ? num(found.value) : null;
}

function lossNames(model) {
  return [...model.metrics.keys()].filter(isLossName).sort();
}

function judgesCell(rows) {
  if (!rows.length) return el("td", {"data-col": "judges", class: "judges"}, DASH);
  return el("td", {"data-col": "judges", class: "judges"}, el("ul", {class: "criteria"},
    ...rows.map((r) => el("li", {"data-criterion": r.criterion},
      el("span", {class: "c-name"}, judgeLabel(r)), " ",
      num(r.scoredCount) ? `mean ${shortNumber(num(r.meanScore))}, pass ${pct(num(r.passRate))}`
        : `${num(r.unscoredCount)} unscored`))));
}

function epochRow(model, epoch, rates, names) {
  const e = num(epoch.epoch), step = num(epoch.latestStep);
  const rows = (model.summary.rows || []).filter((r) => num(r.epoch) === e);
  const cost = rows.reduce((sum, r) => sum + num(r.costUsd), 0);
  const row = el("tr", {"data-epoch": e},
    el("td", {"data-col": "epoch", class: "num"}, String(e)),
    el("td", {"data-col": "predictions", class: "num"}, String(num(epoch.predictionCount))),
    el("td", {"data-col": "step", class: "num"}, String(step)),
    el("td", {"data-col": "exact", class: "num"}, rates.has(e) ? pct(rates.get(e)) : DASH),
    ...names.map((name) => el("td", {"data-col": "metric:" + name, class: "num"},
      shortNumber(valueAt(model.metrics.get(name), step)))),
    judgesCell(rows),
    el("td", {"data-col": "cost", class: "num"}, rows.length ? usd(cost) : DASH),
    el("td", {"data-col": "stored"}, when(epoch.lastCreateTime)));
  return row;
}

export function epochsTable(model, onOpen) {
  if (!model.epochs.length) {
    return el("p", {class: "empty", id: "epochs-empty"}, "No predictions stored yet.");
  }
  const {rates} = exactRates(model), names = lossNames(model);
  const rows = model.epochs.map((epoch) => epochRow(model, epoch, rates, names));
  navigable(rows, (row) => onOpen(Number(row.dataset.epoch)));
  const heads = ["Epoch", "Predictions", "Step", "Exact match", ...names, "Judges",
    "Judge cost", "Last stored"];
  return el("table", {id: "epochs-table", class: "rows fit"},
    el("caption", {class: "visually-hidden"},
      "Epochs; press Enter on a row to list its predictions"),
    el("thead", {}, el("tr", {}, ...heads.map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, ...rows));
}
