"""The page of `epochlens report`: markup, style and script as string constants,
assembled by render_page() around the report's data.

The data travels as one JSON block (<script type="application/json">) that the
page script parses and renders with createElement / textContent only, so model
text is never parsed as markup. The script is allowed by a Content-Security-
Policy hash and nothing else may load or run: the file opens from disk with no
network. Only the selected sample is rendered; its word diffs (a small LCS over
words and whitespace runs) are computed when it is shown.

Everything here is ASCII: non-ASCII characters are written as \\uXXXX escapes
in the script (raw strings keep the backslash for JavaScript).
"""

import base64
import hashlib
import html
from pathlib import Path

STYLE = r"""
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f8fafc; --card: #ffffff;
  --accent: #2563eb; --ok: #15803d; --bad: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { display: grid; gap: 20px; margin-top: 20px; }
main > .card { min-width: 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px; }
h1 { margin: 0 0 12px; font-size: 22px; word-break: break-word; }
h2 { margin: 0 0 12px; font-size: 17px; }
h3 { margin: 0 0 6px; font-size: 13px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; word-break: break-word; }
.state { display: inline-block; padding: 0 8px; border-radius: 10px; background: #e0e7ff; }
.state-succeeded { background: #dcfce7; } .state-failed { background: #fee2e2; }
.state-running { background: #fef9c3; }
details { margin-top: 12px; } summary { cursor: pointer; color: var(--accent); }
pre { margin: 0; white-space: pre-wrap; word-break: break-word;
  font: 13px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.headline { display: flex; flex-wrap: wrap; gap: 12px 32px; margin: 0 0 14px; }
.headline .big { font-size: 26px; font-weight: 600; font-variant-numeric: tabular-nums; }
.headline .sub { color: var(--muted); font-size: 12px; }
.config-box { margin-top: 8px; max-height: 320px; overflow: auto; }
#run-config { width: auto; max-width: 100%; }
#run-config th { position: static; color: var(--muted); font-weight: normal; }
#run-config td, #run-config th { white-space: normal; word-break: break-word;
  font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.generated, .hint, .empty { color: var(--muted); margin: 8px 0 0; }
.hint { margin: 0 0 12px; }
.charts { display: grid; gap: 20px; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); }
.chart-figure { margin: 0; min-width: 0; }
.chart-figure h3 { text-transform: none; letter-spacing: 0; font-size: 14px; color: var(--fg); }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart .grid { stroke: var(--line); } svg.chart .tick { fill: var(--muted); font-size: 11px; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 6px 16px; padding: 0;
  margin: 8px 0 0; color: var(--muted); }
.legend svg { width: 36px; height: 14px; margin-right: 6px; vertical-align: middle; }
.chart-note { color: var(--muted); margin: 8px 0 0; font-size: 12px; }
.scroll { max-height: 560px; overflow: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left;
  white-space: nowrap; }
#epochs-table th { white-space: normal; overflow-wrap: break-word; vertical-align: bottom;
  min-width: 4em; }
#epochs-table th .sub { color: var(--muted); font-weight: normal; font-size: 12px; }
#epochs-table td > div + div { color: var(--muted); }
th { position: sticky; top: 0; background: var(--card); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.picker { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-bottom: 14px; }
.picker select { max-width: 520px; min-width: 240px; padding: 4px; }
.picker button { padding: 4px 10px; }
#sample-position { color: var(--muted); }
.sample-meta { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr));
  gap: 12px; margin-bottom: 14px; }
.block pre { padding: 10px; background: var(--bg); border-radius: 6px; max-height: 260px;
  overflow: auto; }
.predictions { list-style: none; margin: 0; padding: 0; display: grid; gap: 10px; }
#sample-view.grid .predictions { grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); }
.pred-card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
.pred-card.match { border-left: 4px solid var(--ok); }
.pred-card.miss { border-left: 4px solid var(--bad); }
.pred-head { display: flex; flex-wrap: wrap; gap: 12px; align-items: baseline;
  margin-bottom: 6px; }
.pred-label { font-weight: 600; } .pred-meta { color: var(--muted); font-size: 12px; }
.marker { font-size: 12px; padding: 0 6px; border-radius: 8px; }
.marker.match { color: var(--ok); background: #dcfce7; }
.marker.miss { color: var(--bad); background: #fee2e2; }
.marker.none { color: var(--muted); background: var(--bg); }
.pred-text:empty::after { content: "(empty prediction)"; color: var(--muted); }
.judgments { list-style: none; margin: 8px 0 0; padding: 8px 0 0; display: grid; gap: 4px;
  border-top: 1px dashed var(--line); font-size: 12px; }
.judgment { display: grid; grid-template-columns: minmax(120px, max-content) 4.5em 5.5em 1fr;
  gap: 8px; align-items: baseline; }
.j-name { font-weight: 600; word-break: break-word; }
.j-score { text-align: right; font-variant-numeric: tabular-nums; }
.j-verdict.pass { color: var(--ok); } .j-verdict.fail { color: var(--bad); }
.j-verdict.unscored { color: var(--muted); }
.j-reason { white-space: pre-wrap; word-break: break-word; }
ins { background: #bbf7d0; text-decoration: none; }
del { background: #fecaca; color: #7f1d1d; }
"""

BODY = r"""
<header id="run-header" class="card"></header>
<main>
<section id="chart-section" class="card">
<h2>Per epoch</h2>
<div id="chart-box"></div>
</section>
<section id="epochs-section" class="card">
<h2>Epochs</h2>
<div id="epochs-box" class="scroll"></div>
</section>
<section id="comparison-section" class="card" hidden>
<h2>Comparison</h2>
<p class="hint">This run's epoch against a baseline epoch, on the samples both have (matched
by prompt and ground truth across runs): per criterion and judge, both means and pass
rates, the paired deltas with their bootstrap confidence intervals, and how many samples
went up, down or stayed; then the samples that changed, verdict flips first.</p>
<div id="comparison-box"></div>
</section>
<section id="agreement-section" class="card" hidden>
<h2>Agreement with people</h2>
<p class="hint">Per criterion that people judged, each rule and LLM judge against them:
pairs are (person, prediction) judged by both; agreement and Cohen's kappa on pass/fail,
Spearman's correlation on scores (&#8211; where undefined).</p>
<div id="agreement-box"></div>
</section>
<section id="pairwise-section" class="card" hidden>
<h2>Pairwise judging</h2>
<p class="hint">Each candidate epoch against its baseline response to the same prompt (an
earlier epoch, or another run), asked in both orders so that position bias cancels: a win
needs both orders to prefer the candidate, a loss both to prefer the baseline, anything
else is a tie. Win rate = (wins + ties / 2) / scored pairs, with its confidence interval;
position-biased pairs are those where the judge picked the same position in both orders.</p>
<div id="pairwise-box" class="scroll"></div>
</section>
<section id="explorer" class="card">
<h2>Sample explorer</h2>
<p class="hint">Pick a sample to see its prediction at every epoch. Words
<ins>inserted</ins> and <del>deleted</del> since the previous epoch are highlighted;
&#10003; marks an exact match: equal to the ground truth ignoring case and
surrounding or repeated whitespace. Under each
prediction, its judgments: criterion (judge), score, pass or fail against the criterion's
threshold (or unscored, with why), and the judge's reasoning.</p>
<div id="explorer-box"></div>
</section>
</main>
<noscript><p>This report renders its data with JavaScript; please enable it.</p></noscript>
"""

SCRIPT_DOM = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#db2777", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04",
  "#4f46e5", "#be123c", "#0d9488"];
const DASH = "\u2013";
const JUDGES = DATA.judges || {criteria: [], total_cost_usd: 0, budget_usd: 0,
  budget_exhausted: false, paused_reason: "", pending: 0};

function setAttributes(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function el(tag, attrs, text) {
  const node = setAttributes(document.createElement(tag), attrs);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svgEl(tag, attrs, text) {
  const node = setAttributes(document.createElementNS(SVG_NS, tag), attrs);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function percent(value) {
  return value === null || value === undefined ? DASH : (value * 100).toFixed(1) + "%";
}

// Rule scores (0-1) with three decimals, LLM and human scores (1-10) with two.
function fmtScore(value, type) {
  if (value === null || value === undefined) return DASH;
  return type === "rule" ? value.toFixed(3) : value.toFixed(2);
}

function usd(value) {
  return "$" + Number(value || 0).toFixed(4);
}
"""

SCRIPT_HEADER = r"""
// The header: the run's name, its headline numbers, the facts, then its config (collapsed,
// one row per setting, nested keys joined with dots).
function renderHeader(host) {
  const run = DATA.run;
  host.append(el("h1", null, run.name || run.id), headline());
  const facts = [["Run", run.id], ["Model", run.model], ["Dataset", run.dataset],
    ["State", run.state], ["Kind", run.kind], ["Created", run.created],
    ["Finished", run.finished || "not finished"], ["Duration", run.duration || DASH],
    ["Owner", run.user], ...judgeFacts()];
  const list = el("dl", {class: "facts"});
  for (const [label, value] of facts) {
    const cell = el("dd", {"data-fact": label}, value === "" ? DASH : value);
    if (label === "State") cell.replaceChildren(el("span", {class: "state state-" + value}, value));
    list.append(el("dt", null, label), cell);
  }
  host.append(list, configDetails(run.config), el("p", {class: "generated"}, "Generated " +
    DATA.generated + " by epochlens from the query service."));
}

function headline() {
  const box = el("div", {class: "headline", id: "headline"});
  const item = (label, value, note) => {
    const cell = el("div", {"data-headline": label});
    cell.append(el("div", {class: "sub"}, label), el("div", {class: "big"}, value));
    if (note) cell.append(el("div", {class: "sub"}, note));
    box.append(cell);
  };
  const rated = DATA.epochs.filter((row) => row.rate !== null);
  if (rated.length) {
    const first = rated[0], last = rated[rated.length - 1];
    item("Exact match", percent(last.rate), last.exact + " / " + last.with_truth +
      " at epoch " + last.epoch + (rated.length > 1 ? "; " + percent(first.rate) +
      " at epoch " + first.epoch : ""));
  }
  item("Epochs", DATA.epochs.length);
  item("Samples", DATA.samples.length);
  item("Predictions", DATA.totals.predictions);
  return box;
}

function configEntries(value, key, out) {
  const nested = value !== null && typeof value === "object" && !Array.isArray(value);
  if (nested && Object.keys(value).length) {
    for (const [name, inner] of Object.entries(value)) {
      configEntries(inner, key ? key + "." + name : name, out);
    }
  } else if (key) {
    out.push([key, typeof value === "string" ? value : JSON.stringify(value)]);
  }
  return out;
}

function configDetails(config) {
  const entries = configEntries(config || {}, "", []);
  const details = el("details", {id: "config-details"});
  details.append(el("summary", null, "Config (" + entries.length + " settings)"));
  if (!entries.length) {
    details.append(el("p", {class: "empty"}, "No config recorded."));
    return details;
  }
  const body = el("tbody");
  for (const [key, value] of entries) {
    body.appendChild(el("tr", {"data-key": key})).append(el("th", {scope: "row"}, key),
      el("td", null, value));
  }
  const table = el("table", {id: "run-config"});
  table.append(body);
  const box = el("div", {class: "config-box"});
  box.append(table);
  details.append(box);
  return details;
}

function judgeFacts() {
  const facts = [], judged = JUDGES.criteria.length > 0;
  if (judged) facts.push(["Judge criteria", JUDGES.criteria.map((c) => c.label).join(", ")]);
  if (judged || JUDGES.budget_usd) {
    facts.push(["Judge cost", usd(JUDGES.total_cost_usd) +
      (JUDGES.budget_usd ? " of a " + usd(JUDGES.budget_usd) + " budget" : "")]);
  }
  if (JUDGES.budget_exhausted) facts.push(["LLM budget", "exhausted: no further paid calls"]);
  if (JUDGES.paused_reason) facts.push(["LLM judging", "paused: " + JUDGES.paused_reason]);
  if (JUDGES.pending) facts.push(["Waiting for the judge", JUDGES.pending + " predictions"]);
  return facts;
}

// [key, label, numeric, title, note]: per criterion one column, its mean score over the
// pass rate (over scored judgments; unscored ones are left out), then the judge cost.
function epochColumns() {
  const columns = [["epoch", "Epoch", true], ["latest_step", "Latest step", true],
    ["predictions", "Predictions", true], ["exact", "Exact matches", true],
    ["rate", "Exact-match rate", true]];
  const shared = (name) => JUDGES.criteria.filter((c) => c.criterion === name).length > 1;
  for (const c of JUDGES.criteria) {
    const name = shared(c.criterion) ? c.label : c.criterion;
    columns.push(["judge:" + c.id, name, true,
      c.label + ": mean score and pass rate over scored judgments", "mean / pass"]);
  }
  if (JUDGES.criteria.length) columns.push(["judge_cost", "Judge cost", true]);
  return columns.concat([["written", "Written (UTC)", false,
    "First and last write of the epoch's predictions"]]);
}

// The epoch's first and last write as times of day when they share a date.
function writtenCell(row) {
  if (!row.first_write) return DASH;
  const [firstDay, firstTime] = row.first_write.split(" ");
  const [lastDay, lastTime] = row.last_write.split(" ");
  if (firstDay !== lastDay) return row.first_write + " to " + row.last_write;
  return firstTime === lastTime ? firstTime : firstTime + " to " + lastTime;
}

function epochCells(row) {
  const shown = {...row, rate: percent(row.rate), written: writtenCell(row),
    exact: row.with_truth ? row.exact + " / " + row.with_truth : DASH,
    judge_cost: row.judge_cost ? usd(row.judge_cost.cost_usd) : DASH};
  for (const c of JUDGES.criteria) {
    const judged = (row.judges || {})[c.id];
    shown["judge:" + c.id] = [["mean:" + c.id, judged ? fmtScore(judged.mean, c.type) : DASH],
      ["pass:" + c.id, judged ? percent(judged.pass) : DASH]];
  }
  return shown;
}

function renderEpochs(host) {
  const table = el("table", {id: "epochs-table"});
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  const columns = epochColumns();
  for (const [key, label, , title, note] of columns) {
    const th = head.appendChild(el("th", {scope: "col", "data-col": key, title: title || label},
      label));
    if (note) th.append(el("div", {class: "sub"}, note));
  }
  const body = table.appendChild(el("tbody"));
  for (const row of DATA.epochs) {
    const tr = body.appendChild(el("tr", {"data-epoch": row.epoch}));
    const shown = epochCells(row);
    for (const [key, , numeric] of columns) {
      const title = key === "written" && row.first_write ?
        {title: row.first_write + " to " + row.last_write} : {};
      const value = shown[key], td = el("td", {"data-col": key, class: numeric ? "num" : "",
        ...title}, Array.isArray(value) ? null : value);
      if (Array.isArray(value)) {
        td.append(...value.map(([col, text]) => el("div", {"data-col": col}, text)));
      }
      tr.append(td);
    }
  }
  host.append(DATA.epochs.length ? table : el("p", {class: "empty"}, "No epochs recorded yet."));
}
"""

SCRIPT_CHART = r"""
// One chart per kind of number (DATA.charts): the exact-match rate alone, the judges' mean
// scores on their own scale, their pass rates. A criterion keeps its colour in every chart;
// within a chart each series also has its own dash pattern and marker shape, and the
// series drawn first are wider with larger markers, so lines and points that coincide
// stay visible as nested rings and bands. Each point's <title> is its hover value.
const CHART = {width: 640, height: 240, left: 48, right: 16, top: 16, bottom: 36};
const DASHES = ["", "10 5", "3 4", "12 4 3 4", "6 3", "1 3"];
const SHAPES = ["circle", "square", "triangle", "diamond"];

function chartScales(count, max) {
  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const step = plotWidth / Math.max(1, count);
  return {step, plotHeight, x: (i) => CHART.left + (i + 0.5) * step,
    y: (v) => CHART.top + (1 - Math.min(max, Math.max(0, v)) / max) * plotHeight};
}

function tickLabel(chart, value) {
  return chart.unit === "rate" ? Math.round(value * 100) + "%" : String(value);
}

function drawAxes(root, chart, s) {
  const right = CHART.width - CHART.right;
  for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
    const value = fraction * chart.max, y = s.y(value);
    root.append(svgEl("line", {class: "grid", x1: CHART.left, x2: right, y1: y, y2: y}),
      svgEl("text", {class: "tick", x: CHART.left - 6, y: y + 4, "text-anchor": "end"},
        tickLabel(chart, value)));
  }
  const every = Math.ceil(DATA.epochs.length / 12);
  DATA.epochs.forEach((row, i) => {
    if (i % every && i !== DATA.epochs.length - 1) return;
    root.append(svgEl("text", {class: "tick", x: s.x(i), y: CHART.height - 18,
      "text-anchor": "middle"}, row.epoch));
  });
  root.append(svgEl("text", {class: "tick", x: CHART.left + (right - CHART.left) / 2,
    y: CHART.height - 3, "text-anchor": "middle"}, "epoch"));
}

// The look of series i of n: wider lines and larger markers for the ones drawn first.
function seriesStyle(series, i, n, s) {
  const largest = Math.max(4, Math.min(16, s.step * 0.45));
  const gap = n > 1 ? Math.min(3, (largest - 3.5) / (n - 1)) : 0;
  return {color: COLORS[series.color % COLORS.length], dash: DASHES[i % DASHES.length],
    shape: SHAPES[i % SHAPES.length], width: 2 + 1.5 * (n - 1 - i),
    radius: 3.5 + gap * (n - 1 - i)};
}

function markerPoints(shape, x, y, r) {
  if (shape === "triangle") return [[x, y - r], [x + r, y + r * 0.8], [x - r, y + r * 0.8]];
  return [[x, y - r], [x + r, y], [x, y + r], [x - r, y]];
}

function shapeMarker(shape, x, y, r, attrs) {
  if (shape === "circle") return svgEl("circle", {cx: x, cy: y, r: r, ...attrs});
  if (shape === "square") {
    return svgEl("rect", {x: x - r, y: y - r, width: 2 * r, height: 2 * r, ...attrs});
  }
  const points = markerPoints(shape, x, y, r).map((p) => p[0] + "," + p[1]).join(" ");
  return svgEl("polygon", {points: points, ...attrs});
}

function seriesPath(series, s) {
  let path = "", pen = "M";
  series.values.forEach((v, i) => {
    if (v === null) { pen = "M"; return; }
    path += pen + s.x(i).toFixed(1) + "," + s.y(v).toFixed(1) + " ";
    pen = "L";
  });
  return path.trim();
}

function pointLabel(chart, series, i, v) {
  const shown = chart.unit === "rate" ? percent(v) : v.toFixed(chart.max > 1 ? 2 : 3);
  return series.label + ", epoch " + DATA.epochs[i].epoch + ": " + shown;
}

function drawSeriesLine(root, series, style, s) {
  const path = seriesPath(series, s);
  if (!path) return;
  const dash = style.dash ? {"stroke-dasharray": style.dash} : {};
  root.append(svgEl("path", {class: "line", d: path, fill: "none", stroke: style.color,
    "stroke-width": style.width, "stroke-linejoin": "round", "data-series": series.id,
    ...dash}));
}

function drawSeriesPoints(root, chart, series, style, s) {
  const group = svgEl("g", {class: "series", "data-series": series.id});
  series.values.forEach((v, i) => {
    if (v === null) return;
    const point = shapeMarker(style.shape, Number(s.x(i).toFixed(1)), Number(s.y(v).toFixed(1)),
      style.radius, {class: "pt", fill: "#ffffff", stroke: style.color, "stroke-width": 1.5,
        "stroke-linejoin": "round",
        "data-series": series.id, "data-epoch": DATA.epochs[i].epoch,
        "data-value": v, "data-shape": style.shape});
    point.append(svgEl("title", null, pointLabel(chart, series, i, v)));
    group.append(point);
  });
  root.append(group);
}

function legendItem(series, style) {
  const sample = svgEl("svg", {viewBox: "0 0 36 14", "aria-hidden": "true"});
  const dash = style.dash ? {"stroke-dasharray": style.dash} : {};
  sample.append(svgEl("line", {x1: 1, x2: 35, y1: 7, y2: 7, stroke: style.color,
    "stroke-width": Math.min(style.width, 3), ...dash}),
  shapeMarker(style.shape, 18, 7, 4.5, {fill: "#ffffff", stroke: style.color, "stroke-width": 2}));
  const item = el("li", {"data-series": series.id});
  item.append(sample, document.createTextNode(series.label));
  return item;
}

function renderOneChart(chart) {
  const figure = el("figure", {class: "chart-figure", "data-chart": chart.id});
  figure.append(el("h3", null, chart.title));
  const s = chartScales(DATA.epochs.length, chart.max);
  const root = svgEl("svg", {class: "chart", "data-chart": chart.id, role: "img",
    viewBox: "0 0 " + CHART.width + " " + CHART.height, "aria-label": chart.title});
  drawAxes(root, chart, s);
  const n = chart.series.length, styles = chart.series.map((x, i) => seriesStyle(x, i, n, s));
  chart.series.forEach((series, i) => drawSeriesLine(root, series, styles[i], s));
  chart.series.forEach((series, i) => drawSeriesPoints(root, chart, series, styles[i], s));
  const legend = el("ul", {class: "legend"});
  chart.series.forEach((series, i) => legend.append(legendItem(series, styles[i])));
  figure.append(root, legend);
  return figure;
}

function renderChart(host) {
  if (!DATA.epochs.length) {
    host.append(el("p", {class: "empty"}, "No predictions recorded yet."));
    return;
  }
  const grid = el("div", {class: "charts"});
  for (const chart of DATA.charts) grid.append(renderOneChart(chart));
  host.append(grid);
  if (!DATA.charts.some((chart) => chart.id === "exact")) host.append(el("p",
    {class: "empty"},
    "No prediction in this run has a ground truth, so there is no exact-match rate."));
  if (JUDGES.criteria.length) host.append(el("p", {class: "chart-note", id: "chart-note"},
    "Judge scores are means over scored judgments (unscored ones are left out), on the " +
    "criterion's own scale: rule criteria 0 to 1, LLM and human criteria 1 to 10. A pass " +
    "rate is the share of scored judgments that passed the criterion's threshold."));
}
"""

# The word diff of the web pages (an ES module there), embedded with its export removed.
WORD_DIFF_JS = Path(__file__).resolve().parent.parent / "web" / "static" / "js" / "worddiff.js"
SCRIPT_DIFF = "\n" + WORD_DIFF_JS.read_text(encoding="ascii").replace("export function",
                                                                     "function")

SCRIPT_EXPLORER = r"""
const state = {index: -1, ui: null};

function optionLabel(sample) {
  const last = sample.predictions[sample.predictions.length - 1];
  const mark = last.exact === true ? "\u2713" : last.exact === false ? "\u2717" : "\u00b7";
  return "#" + sample.index + " " + mark + " " + sample.prompt.replace(/\s+/g, " ").slice(0, 80);
}

function marker(exact) {
  if (exact === null) return el("span", {class: "marker none"}, "no ground truth");
  return exact ? el("span", {class: "marker match", "data-match": "true"}, "\u2713 exact match")
    : el("span", {class: "marker miss", "data-match": "false"}, "\u2717 differs");
}

function predictionMeta(p, previous) {
  const parts = [p.ms + " ms"];
  if (p.tokens !== null) parts.push(p.tokens + " tokens");
  if (previous && previous.text === p.text) parts.push("unchanged");
  return parts.join(" \u00b7 ");
}

function judgmentItem(j) {
  const verdict = j.score === null ? "unscored" : j.passed ? "pass" : "fail";
  const marks = {pass: "\u2713 pass", fail: "\u2717 fail", unscored: "unscored"};
  const li = el("li", {class: "judgment", "data-criterion": j.criterion,
    "data-verdict": verdict, title: "threshold " + j.threshold});
  li.append(el("span", {class: "j-name"}, j.criterion + " (" + j.model + ")"),
    el("span", {class: "j-score"}, fmtScore(j.score, j.type)),
    el("span", {class: "j-verdict " + verdict}, marks[verdict]),
    el("span", {class: "j-reason"}, verdict === "unscored" ? j.unscored_reason : j.reasoning));
  return li;
}

function judgmentList(judgments) {
  const list = el("ul", {class: "judgments"});
  for (const j of judgments) list.append(judgmentItem(j));
  return list;
}

function predictionCard(p, previous) {
  const verdict = p.exact === null ? "none" : p.exact ? "match" : "miss";
  const card = el("li", {class: "pred-card " + verdict, "data-epoch": p.epoch,
    "data-step": p.step});
  const head = el("div", {class: "pred-head"});
  head.append(el("span", {class: "pred-label"}, "epoch " + p.epoch + " \u00b7 step " + p.step),
    marker(p.exact), el("span", {class: "pred-meta"}, predictionMeta(p, previous)));
  const text = el("pre", {class: "text pred-text"});
  const ops = previous ? diffWords(previous.text, p.text) : [["=", p.text]];
  for (const [op, chunk] of ops) {
    text.append(op === "=" ? document.createTextNode(chunk) : el(op === "+" ? "ins" : "del",
      null, chunk));
  }
  card.append(head, text);
  if (p.judgments && p.judgments.length) card.append(judgmentList(p.judgments));
  return card;
}

function textBlock(title, id, text) {
  const block = el("div", {class: "block"});
  block.append(el("h3", null, title), el("pre", {id: id, class: "text"}, text));
  return block;
}

function renderSample(sample) {
  const meta = el("div", {class: "sample-meta"});
  meta.append(textBlock("Prompt", "sample-prompt", sample.prompt),
    textBlock("Ground truth", "sample-truth",
      sample.truth === null ? "(no ground truth)" : sample.truth));
  const list = el("ol", {id: "prediction-list", class: "predictions"});
  let previous = null;
  for (const p of sample.predictions) {
    list.append(predictionCard(p, previous));
    previous = p;
  }
  const fragment = document.createDocumentFragment();
  fragment.append(meta, list);
  return fragment;
}
"""

SCRIPT_MAIN = r"""
function selectSample(i) {
  const ui = state.ui, count = DATA.samples.length;
  const index = Math.max(0, Math.min(count - 1, Number(i) || 0));
  const sample = DATA.samples[index];
  state.index = index;
  ui.select.value = String(index);
  ui.prev.disabled = index === 0;
  ui.next.disabled = index === count - 1;
  ui.position.textContent = "sample " + (index + 1) + " of " + count + " \u00b7 " +
    sample.predictions.length + " predictions";
  ui.view.replaceChildren(renderSample(sample));
  try {
    history.replaceState(null, "", "#sample=" + sample.index);
  } catch (err) {
    // Some browsers refuse history changes on file: URLs; the hash is only a bookmark aid.
  }
}

function buildPicker(host) {
  const ui = {prev: el("button", {type: "button", id: "prev-sample"}, "\u2190 Previous"),
    select: el("select", {id: "sample-select", "aria-label": "Sample"}),
    next: el("button", {type: "button", id: "next-sample"}, "Next \u2192"),
    layout: el("input", {type: "checkbox", id: "side-by-side"}),
    position: el("span", {id: "sample-position"}), view: el("div", {id: "sample-view"})};
  DATA.samples.forEach((sample, i) => ui.select.append(el("option", {value: i},
    optionLabel(sample))));
  const toggle = el("label", {class: "toggle"});
  toggle.append(ui.layout, document.createTextNode(" side by side"));
  const bar = el("div", {class: "picker"});
  bar.append(ui.prev, ui.select, ui.next, toggle, ui.position);
  host.append(bar, ui.view);
  ui.prev.addEventListener("click", () => selectSample(state.index - 1));
  ui.next.addEventListener("click", () => selectSample(state.index + 1));
  ui.select.addEventListener("change", () => selectSample(ui.select.value));
  ui.layout.addEventListener("change", () => ui.view.classList.toggle("grid",
    ui.layout.checked));
  return ui;
}

function initialIndex() {
  const match = /^#sample=(\d+)$/.exec(location.hash);
  const found = match ? DATA.samples.findIndex((s) => s.index === Number(match[1])) : 0;
  return Math.max(0, found);
}

function main() {
  renderHeader(document.getElementById("run-header"));
  renderChart(document.getElementById("chart-box"));
  renderEpochs(document.getElementById("epochs-box"));
  renderComparison(document.getElementById("comparison-box"));
  renderAgreements(document.getElementById("agreement-box"));
  renderPairwise(document.getElementById("pairwise-box"));
  const host = document.getElementById("explorer-box");
  if (DATA.samples.length) {
    state.ui = buildPicker(host);
    selectSample(initialIndex());
  } else {
    host.append(el("p", {class: "empty"}, "No samples recorded yet."));
  }
  void document.body.offsetHeight;
  window.epochlensReport = Object.freeze({renderedAt: performance.now(),
    select: (i) => selectSample(i), selected: () => state.index});
}

main();
"""

SCRIPT_COMPARE = r"""
// The comparison (DATA.comparison, when the report was asked for one) and the judges'
// agreement with people (DATA.agreements); each section stays hidden without data.
function simpleTable(id, headers, rows) {
  const table = el("table", {id: id});
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  for (const label of headers) head.append(el("th", {scope: "col"}, label));
  const body = table.appendChild(el("tbody"));
  for (const row of rows) {
    const tr = body.appendChild(el("tr"));
    for (const cell of row) tr.append(el("td", null, cell));
  }
  return table;
}

function signed(value, type) {
  return (value < 0 ? "-" : "+") + fmtScore(Math.abs(value), type);
}

function points(value) {
  return (value < 0 ? "" : "+") + (value * 100).toFixed(1) + " pts";
}

function fixed3(value) {
  return value === null || value === undefined ? DASH : value.toFixed(3);
}

function renderAgreements(host) {
  const rows = DATA.agreements || [];
  if (!rows.length) return;
  host.append(simpleTable("agreement-table", ["Criterion", "Type", "Judge", "Pairs",
    "Agreement", "Kappa", "Spearman"], rows.map((a) => [a.criterion, a.type, a.model,
    a.pairs, percent(a.agreement), fixed3(a.kappa), fixed3(a.spearman)])));
  host.closest("section").hidden = false;
}

function comparisonTitle(c) {
  const baseline = c.baseline_run === c.run ? "epoch " + c.baseline_epoch :
    "run " + c.baseline_run + " epoch " + c.baseline_epoch;
  return "Epoch " + c.epoch + " against " + baseline + ": " + c.shared + " shared samples; " +
    (c.level * 100) + "% paired bootstrap intervals, " + c.resamples + " resamples.";
}

function renderComparison(host) {
  const c = DATA.comparison;
  if (!c) return;
  host.append(el("p", {id: "comparison-title"}, comparisonTitle(c)));
  host.append(simpleTable("comparison-table", ["Criterion", "Judge", "Pairs", "Baseline",
    "Candidate", "Delta", "Interval", "Pass rate", "Pass delta", "Interval", "Up", "Down",
    "Same"], c.deltas.map((d) => [d.criterion, d.model, d.pairs,
    fmtScore(d.baseline_mean, d.type), fmtScore(d.candidate_mean, d.type),
    signed(d.mean_delta, d.type), "[" + signed(d.mean_low, d.type) + ", " +
    signed(d.mean_high, d.type) + "]", percent(d.baseline_pass) + " \u2192 " +
    percent(d.candidate_pass), points(d.pass_delta), "[" + points(d.pass_low) + ", " +
    points(d.pass_high) + "]", d.improved, d.regressed, d.unchanged])));
  host.append(el("h3", null, "Changed samples"));
  const verdict = (passed) => passed ? "pass" : "fail";
  host.append(c.changes.length ? simpleTable("changes-table", ["Sample", "Baseline sample",
    "Criterion", "Judge", "Baseline", "Candidate"], c.changes.map((x) => [x.sample,
    x.baseline_sample, x.criterion, x.model, fmtScore(x.baseline_score, x.type) + " " +
    verdict(x.baseline_passed), fmtScore(x.candidate_score, x.type) + " " +
    verdict(x.candidate_passed)])) : el("p", {class: "empty"}, "No sample changed."));
  host.closest("section").hidden = false;
}
"""

SCRIPT_PAIRWISE = r"""
// The pairwise section (DATA.pairwise, one row per candidate epoch, baseline, criterion and
// judge): shown only when the run has pairwise results.
function pairwiseBaseline(p) {
  const epoch = p.baseline_epoch < 0 ? "?" : String(p.baseline_epoch);
  return p.baseline_run_id === DATA.run.id ? "epoch " + epoch :
    "run " + p.baseline_run_id.slice(0, 8) + " epoch " + epoch;
}

function renderPairwise(host) {
  const rows = DATA.pairwise || [];
  if (!rows.length) return;
  document.getElementById("pairwise-section").hidden = false;
  const table = el("table", {id: "pairwise-table"});
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  for (const label of ["epoch", "baseline", "criterion", "judge", "W/L/T", "unscored",
    "win rate [low, high]", "position-biased pairs", "cost"]) {
    head.append(el("th", {scope: "col"}, label));
  }
  const body = table.appendChild(el("tbody"));
  for (const p of rows) {
    const scored = p.wins + p.losses + p.ties;
    const rate = scored ? percent(p.win_rate) + " [" + percent(p.win_rate_low) + ", " +
      percent(p.win_rate_high) + "]" : DASH;
    const tr = body.appendChild(el("tr", {"data-epoch": p.epoch}));
    for (const [text, numeric] of [[String(p.epoch), true], [pairwiseBaseline(p), false],
      [p.criterion, false], [p.judge_model, false],
      [p.wins + "/" + p.losses + "/" + p.ties, true], [String(p.unscored), true],
      [rate, true], [String(p.position_bias_pairs), true], [usd(p.cost_usd), true]]) {
      tr.append(el("td", {class: numeric ? "num" : ""}, text));
    }
  }
  host.append(table);
}
"""

SCRIPT = "(() => {" + SCRIPT_DOM + SCRIPT_HEADER + SCRIPT_CHART + SCRIPT_DIFF + \
    SCRIPT_EXPLORER + SCRIPT_COMPARE + SCRIPT_PAIRWISE + SCRIPT_MAIN + "})();\n"


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    digest = hashlib.sha256(script.encode("ascii")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def render_page(title: str, data_json: str) -> str:
    """The whole page. data_json must already be safe inside a <script> element (no '<')."""
    if "<" in data_json:
        raise ValueError("data_json must have every '<' escaped")
    policy = (f"default-src 'none'; script-src {script_hash(SCRIPT)}; "
              "style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'")
    safe_title = html.escape(title).encode("ascii", "xmlcharrefreplace").decode("ascii")
    return "".join((
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>{safe_title}</title>\n<style>{STYLE}</style>\n</head>\n<body>{BODY}",
        '<script type="application/json" id="report-data">', data_json, "</script>\n",
        "<script>", SCRIPT, "</script>\n</body>\n</html>\n"))
