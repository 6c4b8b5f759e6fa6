// The run page's charts, one per kind of number: losses by step (with the steps of each
// epoch's predictions pass marked), the exact-match rate per epoch, the judges' mean scores
// per epoch (one chart per score scale: rule 0..1, LLM 1..10, human) and every criterion's pass
// rate per epoch; and one more training metric picked by name.
import {lineChart} from "./charts.js";
import {num, pct, shortNumber} from "./dom.js";

export const EXACT_CRITERION = "exact_match";
export const EXACT_METRIC = "epochlens/exact_match";
const LOSS_NAME = /(^|[/_.-])loss$/i;
const JUDGE_SCALES = [
  ["JUDGE_TYPE_RULE", "Mean score per epoch, rule criteria (0 to 1)", 0, 1],
  ["JUDGE_TYPE_LLM", "Mean score per epoch, LLM criteria (1 to 10)", 0, 10],
  ["JUDGE_TYPE_HUMAN", "Mean score per epoch, human judgments", undefined, undefined],
];

export function isLossName(name) {
  return LOSS_NAME.test(name);
}

export function judgeLabel(row) {
  const who = row.judgeType === "JUDGE_TYPE_RULE" ? "rules"
    : row.judgeType === "JUDGE_TYPE_HUMAN" ? "human" : row.judgeModel || "llm";
  return `${row.criterion} (${who})`;
}

export function judgeKey(row) {
  return `${row.criterion}|${row.judgeType}|${row.judgeModel || ""}`;
}

function epochBoundaries(epochs) {
  return epochs.map((e) => ({x: num(e.latestStep), short: "e" + num(e.epoch),
    label: `epoch ${num(e.epoch)}: predictions at step ${num(e.latestStep)}`}));
}

function metricSeries(model, name) {
  const points = model.metrics.get(name) || [];
  return {key: name, label: name, points: points.map((p) => ({x: num(p.step), y: num(p.value)}))};
}

export function lossChart(model) {
  const names = [...model.metrics.keys()].filter(isLossName).sort();
  return lineChart({key: "loss", title: "Training and eval loss by step", xLabel: "step",
    series: names.map((name) => metricSeries(model, name)),
    boundaries: epochBoundaries(model.epochs),
    empty: "No loss recorded (the trainer's logs arrive as metrics).",
    note: "Dashed vertical lines: the step of each epoch's predictions."});
}

export function metricChart(model, name) {
  return lineChart({key: "metric", title: `${name} by step`, xLabel: "step",
    series: [metricSeries(model, name)], boundaries: epochBoundaries(model.epochs)});
}

// Exact-match rate per epoch: the judge's exact_match rule when the run has it, otherwise
// the rate the trainer client logs with each predictions pass (metric epochlens/exact_match,
// at the pass's step).
export function exactRates(model) {
  const judged = (model.summary.rows || []).filter((r) => r.criterion === EXACT_CRITERION &&
    num(r.scoredCount) > 0);
  if (judged.length) {
    return {source: "judge rule exact_match", rates: new Map(judged.map((r) =>
      [num(r.epoch), num(r.passRate)]))};
  }
  const byStep = new Map(model.epochs.map((e) => [num(e.latestStep), num(e.epoch)]));
  const rates = new Map();
  for (const p of model.metrics.get(EXACT_METRIC) || []) {
    if (byStep.has(num(p.step))) rates.set(byStep.get(num(p.step)), num(p.value));
  }
  return {source: "trainer pass (" + EXACT_METRIC + ")", rates};
}

export function exactChart(model) {
  const {source, rates} = exactRates(model);
  const points = [...rates].sort((a, b) => a[0] - b[0]).map(([x, y]) => ({x, y,
    title: `exact match, epoch ${x}: ${pct(y)}`}));
  return lineChart({key: "exact", title: "Exact-match rate per epoch", xLabel: "epoch",
    integerX: true, yMin: 0, yMax: 1, yFormat: pct,
    series: [{key: "exact_match", label: "exact-match rate", points}],
    note: points.length ? "From the " + source + "." : null,
    empty: "No exact-match rate yet (needs ground truths and the exact_match rule or the " +
      "trainer client's pass metrics)."});
}

function criterionSeries(rows, value, format) {
  const groups = new Map();
  for (const row of rows) {
    const key = judgeKey(row);
    if (!groups.has(key)) groups.set(key, {key, label: judgeLabel(row), points: []});
    if (num(row.scoredCount) === 0) continue;
    const y = value(row), x = num(row.epoch);
    groups.get(key).points.push({x, y, title: `${judgeLabel(row)}, epoch ${x}: ${format(y)}`});
  }
  return [...groups.values()];
}

export function judgeCharts(model) {
  const rows = (model.summary.rows || []).filter((r) => r.criterion !== EXACT_CRITERION);
  const charts = [];
  for (const [type, title, yMin, yMax] of JUDGE_SCALES) {
    const typed = rows.filter((r) => r.judgeType === type);
    if (!typed.length) continue;
    charts.push(lineChart({key: "mean-" + type.slice(11).toLowerCase(), title, xLabel: "epoch",
      integerX: true, dodge: true, yMin, yMax,
      series: criterionSeries(typed, (r) => num(r.meanScore), (v) => shortNumber(v))}));
  }
  if (rows.length) {
    charts.push(lineChart({key: "pass", title: "Pass rate per epoch and criterion",
      xLabel: "epoch", integerX: true, dodge: true, yMin: 0, yMax: 1, yFormat: pct,
      series: criterionSeries(rows, (r) => num(r.passRate), pct)}));
  }
  return charts;
}
