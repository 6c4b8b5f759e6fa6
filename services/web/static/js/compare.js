// Two runs side by side (/compare?a=<run>&b=<run>&sample=<n>): their settings that differ,
// per-epoch numbers of both (exact match, losses, each criterion's mean and pass rate) as
// charts and a table, and one sample's predictions from both runs epoch by epoch.
import * as api from "./api.js";
import {SERIES_POINTS, lineChart} from "./charts.js";
import {navigable} from "./keyboard.js";
import {button, clear, DASH, el, field, num, pct, section, select, shortNumber,
  stateBadge} from "./dom.js";
import {exactRates, isLossName, judgeKey, judgeLabel, EXACT_METRIC} from "./runcharts.js";
import {judgmentItem} from "./sample.js";

const RUN_CHOICES = 100;
const SAMPLE_PAGE = 100;

async function loadSide(runId) {
  const [run, epochs, summary, names] = await Promise.all([api.get(api.runPath(runId)),
    api.allPages(api.runPath(runId, "/epochs"), {}, "epochs"),
    api.get(api.runPath(runId, "/summary")),
    api.get(api.runPath(runId, "/metrics"), {max_points: 1})]);
  const wanted = (names.series || []).map((s) => s.name)
    .filter((n) => isLossName(n) || n === EXACT_METRIC);
  const full = wanted.length
    ? await api.get(api.runPath(runId, "/metrics"), {names: wanted, max_points: SERIES_POINTS}) : {series: []};
  return {run, epochs, summary,
    metrics: new Map((full.series || []).map((s) => [s.name, s.points || []]))};
}

async function pickerForm(ctx, a, b) {
  const page = await api.get("/v1/runs", {page_size: RUN_CHOICES});
  const options = (page.runs || []).map((r) => [r.id, `${r.name || r.id} (${r.id.slice(0, 8)})`]);
  for (const id of [a, b]) {
    if (id && !options.some(([value]) => value === id)) options.push([id, id]);
  }
  const runA = select("run-a", [["", "pick a run"], ...options], a);
  const runB = select("run-b", [["", "pick a run"], ...options], b);
  const form = el("form", {class: "filters", id: "compare-form"}, field("Run A", runA),
    field("Run B", runB), el("button", {type: "submit"}, "Compare"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (runA.value && runB.value) {
      ctx.navigate(`/compare?a=${encodeURIComponent(runA.value)}` +
        `&b=${encodeURIComponent(runB.value)}`);
    }
  });
  return form;
}

function flatten(value, prefix, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else out.set(prefix, JSON.stringify(value));
  return out;
}

function configDiff(a, b) {
  const left = flatten(a.run.config || {}, "", new Map());
  const right = flatten(b.run.config || {}, "", new Map());
  const keys = [...new Set([...left.keys(), ...right.keys()])].sort()
    .filter((k) => left.get(k) !== right.get(k));
  if (!keys.length) return el("p", {class: "hint"}, "The two runs have the same configuration.");
  return el("table", {id: "config-diff", class: "rows fit"},
    el("caption", {}, "Configuration that differs"),
    el("thead", {}, el("tr", {}, el("th", {scope: "col"}, "Setting"),
      el("th", {scope: "col"}, "Run A"), el("th", {scope: "col"}, "Run B"))),
    el("tbody", {}, ...keys.map((k) => el("tr", {"data-key": k}, el("td", {class: "text"}, k),
      el("td", {class: "text"}, left.get(k) ?? DASH),
      el("td", {class: "text"}, right.get(k) ?? DASH)))));
}

function sideHeader(label, side) {
  const run = side.run;
  return el("div", {class: "side", "data-side": label},
    el("h2", {}, `${label}: `, el("a", {href: "/runs/" + encodeURIComponent(run.id)},
      run.name || run.id)),
    el("p", {}, `${run.modelName || DASH} on ${run.datasetName || DASH} `, stateBadge(run.state)));
}

function perEpoch(side, rates) {
  return [...rates].sort((x, y) => x[0] - y[0]).map(([x, y]) => ({x, y,
    title: `${side}, epoch ${x}: ${pct(y)}`}));
}

function compareCharts(a, b) {
  const exact = lineChart({key: "exact", title: "Exact-match rate per epoch", xLabel: "epoch",
    integerX: true, dodge: true, yMin: 0, yMax: 1, yFormat: pct,
    series: [{key: "a", label: "run A", points: perEpoch("run A", exactRates(a).rates)},
      {key: "b", label: "run B", points: perEpoch("run B", exactRates(b).rates)}]});
  const lossSeries = [];
  for (const [label, side] of [["A", a], ["B", b]]) {
    for (const name of [...side.metrics.keys()].filter(isLossName).sort()) {
      lossSeries.push({key: `${label}:${name}`, label: `run ${label} ${name}`,
        points: side.metrics.get(name).map((p) => ({x: num(p.step), y: num(p.value)}))});
    }
  }
  const loss = lineChart({key: "loss", title: "Loss by step", xLabel: "step",
    series: lossSeries, empty: "Neither run recorded a loss."});
  const pass = lineChart({key: "pass", title: "Pass rate per epoch and criterion",
    xLabel: "epoch", integerX: true, dodge: true, yMin: 0, yMax: 1, yFormat: pct,
    series: [...passSeries("A", a), ...passSeries("B", b)], empty: "No judgments in either run."});
  return el("div", {class: "charts", id: "compare-charts"}, exact, loss, pass);
}

function passSeries(label, side) {
  const groups = new Map();
  for (const r of side.summary.rows || []) {
    if (!num(r.scoredCount)) continue;
    const key = `${label}:${judgeKey(r)}`;
    if (!groups.has(key)) {
      groups.set(key, {key, label: `run ${label} ${judgeLabel(r)}`, points: []});
    }
    groups.get(key).points.push({x: num(r.epoch), y: num(r.passRate)});
  }
  return [...groups.values()];
}

function criteriaText(side, epoch) {
  const rows = (side.summary.rows || [])
    .filter((r) => num(r.epoch) === epoch && num(r.scoredCount));
  if (!rows.length) return DASH;
  return el("ul", {class: "criteria"}, ...rows.map((r) => el("li", {},
    `${judgeLabel(r)}: mean ${shortNumber(num(r.meanScore))}, pass ${pct(num(r.passRate))}`)));
}

function lossAt(side, epoch) {
  const e = side.epochs.find((x) => num(x.epoch) === epoch);
  const points = side.metrics.get("loss") || [];
  if (!e) return DASH;
  let found = null;
  for (const p of points) if (num(p.step) <= num(e.latestStep)) found = p;
  return found ? shortNumber(num(found.value)) : DASH;
}

function epochsCompare(a, b) {
  const ra = exactRates(a).rates, rb = exactRates(b).rates;
  const epochs = [...new Set([...a.epochs, ...b.epochs].map((e) => num(e.epoch)))]
    .sort((x, y) => x - y);
  const rows = epochs.map((e) => el("tr", {"data-epoch": e},
    el("td", {"data-col": "epoch", class: "num"}, String(e)),
    el("td", {"data-col": "exact-a", class: "num"}, ra.has(e) ? pct(ra.get(e)) : DASH),
    el("td", {"data-col": "exact-b", class: "num"}, rb.has(e) ? pct(rb.get(e)) : DASH),
    el("td", {"data-col": "loss-a", class: "num"}, lossAt(a, e)),
    el("td", {"data-col": "loss-b", class: "num"}, lossAt(b, e)),
    el("td", {"data-col": "judges-a", class: "judges"}, criteriaText(a, e)),
    el("td", {"data-col": "judges-b", class: "judges"}, criteriaText(b, e))));
  navigable(rows);
  return el("table", {id: "compare-epochs", class: "rows fit"},
    el("caption", {class: "visually-hidden"}, "Per-epoch numbers of both runs"),
    el("thead", {}, el("tr", {}, ...["Epoch", "Exact match A", "Exact match B", "Loss A",
      "Loss B", "Judges A", "Judges B"].map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, ...rows));
}

async function allSamplePredictions(runId, index) {
  const out = {prompt: null, truth: null, predictions: []};
  let token = "";
  do {
    const page = await api.get(api.runPath(runId, "/samples/" + index),
      {page_size: SAMPLE_PAGE, page_token: token}).catch((err) => {
      if (err.status === 404) return {predictions: []};
      throw err;
    });
    out.prompt = out.prompt ?? page.prompt ?? null;
    out.truth = out.truth ?? page.groundTruth ?? null;
    out.predictions.push(...(page.predictions || []));
    token = page.nextPageToken || "";
  } while (token);
  return out;
}

function sampleCell(side, p) {
  if (!p) {
    return el("td", {"data-col": "prediction-" + side, class: "text"},
      el("div", {class: "pred-text missing"}, "(none)"));
  }
  return el("td", {"data-col": "prediction-" + side, class: "text"},
    el("div", {class: "pred-text"}, p.prediction || ""),
    (p.judgments || []).length ? el("ul", {class: "judgments-list"},
      ...p.judgments.map(judgmentItem)) : null);
}

function sampleTable(sa, sb) {
  const byEpoch = (list) => new Map(list.map((p) => [num(p.epoch), p]));
  const ma = byEpoch(sa.predictions), mb = byEpoch(sb.predictions);
  const epochs = [...new Set([...ma.keys(), ...mb.keys()])].sort((x, y) => x - y);
  if (!epochs.length) return el("p", {class: "empty", id: "compare-sample-empty"},
    "Neither run has this sample.");
  const rows = epochs.map((e) => el("tr", {"data-epoch": e},
    el("td", {"data-col": "epoch", class: "num"}, String(e)),
    sampleCell("a", ma.get(e)), sampleCell("b", mb.get(e))));
  navigable(rows);
  return el("table", {id: "compare-sample", class: "rows fit halves"},
    el("caption", {class: "visually-hidden"}, "The sample's predictions in both runs"),
    el("thead", {}, el("tr", {}, el("th", {scope: "col"}, "Epoch"),
      el("th", {scope: "col"}, "Run A"), el("th", {scope: "col"}, "Run B"))),
    el("tbody", {}, ...rows));
}

function promptBlock(sa, sb) {
  const same = sa.prompt === sb.prompt || sa.prompt === null || sb.prompt === null;
  return el("div", {class: "sample-meta"},
    el("div", {class: "block"}, el("h3", {}, same ? "Prompt" : "Prompt (run A)"),
      el("pre", {id: "compare-prompt"}, sa.prompt ?? sb.prompt ?? "")),
    same ? null : el("div", {class: "block"}, el("h3", {}, "Prompt (run B)"),
      el("pre", {id: "compare-prompt-b"}, sb.prompt ?? "")),
    el("div", {class: "block"}, el("h3", {}, "Ground truth"),
      el("pre", {id: "compare-truth"}, sa.truth ?? sb.truth ?? "(no ground truth)")));
}

async function showSample(ctx, a, b, index, box) {
  const [sa, sb] = await Promise.all([allSamplePredictions(a.run.id, index),
    allSamplePredictions(b.run.id, index)]);
  if (!ctx.alive()) return;
  clear(box).append(promptBlock(sa, sb), sampleTable(sa, sb));
}

function sampleSection(ctx, a, b) {
  const params = new URLSearchParams(location.search);
  let index = Math.max(0, Number(params.get("sample") || 0)) || 0;
  const box = el("div", {id: "compare-sample-box"});
  const input = el("input", {id: "compare-sample-index", type: "number", min: 0, value: index});
  const prev = button("Previous sample", {id: "compare-prev-sample"});
  const next = button("Next sample", {id: "compare-next-sample"});
  const show = (i) => {
    index = Math.max(0, i);
    input.value = index;
    prev.disabled = index === 0;
    params.set("sample", String(index));
    history.replaceState(history.state, "", "/compare?" + params);
    showSample(ctx, a, b, index, box).catch(ctx.fail);
  };
  prev.addEventListener("click", () => show(index - 1));
  next.addEventListener("click", () => show(index + 1));
  const form = el("form", {class: "filters", id: "compare-sample-form"}, prev,
    field("Sample", input), el("button", {type: "submit"}, "Show"), next);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    show(Number(input.value || 0));
  });
  show(index);
  return section("One sample in both runs", "compare-sample-section", form, box);
}

export async function compareView(ctx) {
  document.title = "Compare runs - epochlens";
  const a = ctx.params.get("a") || "", b = ctx.params.get("b") || "";
  const form = await pickerForm(ctx, a, b);
  if (!ctx.alive()) return;
  ctx.main.append(el("h1", {class: "page-title"}, "Compare two runs"),
    section("Runs", "compare-pick", form));
  if (!a || !b) return;
  const [sa, sb] = await Promise.all([loadSide(a), loadSide(b)]);
  if (!ctx.alive()) return;
  ctx.main.append(el("div", {class: "card sides", id: "compare-sides"}, sideHeader("A", sa),
    sideHeader("B", sb), configDiff(sa, sb)),
  section("Per epoch", "compare-epochs-section", compareCharts(sa, sb), epochsCompare(sa, sb)),
  sampleSection(ctx, sa, sb));
}
