// The run page: header, charts, epochs table and predictions table. While the run is RUNNING
// the page listens to /v1/runs/{id}:watch (server-sent events fed by WatchRun): an epoch event
// adds or updates its row and chart points, metric events extend the loss lines, and a run
// event with a final state says so and closes the stream.
import * as api from "./api.js";
import {SERIES_POINTS} from "./charts.js";
import {clear, DASH, duration, el, field, num, section, select, STATE_LABELS, stateBadge, usd,
  when} from "./dom.js";
import {epochsTable} from "./epochs.js";
import {agreementTable, pairwiseTable} from "./judging.js";
import {predictionsTable} from "./predictions.js";
import {EXACT_METRIC, exactChart, isLossName, judgeCharts, lossChart, metricChart} from
  "./runcharts.js";

const RUNNING = "RUN_STATE_RUNNING";
const SUMMARY_REFRESH_MS = 400;
const JUDGING_POLL_MS = 1000;

async function loadMetrics(runId) {
  const names = await api.get(api.runPath(runId, "/metrics"), {max_points: 1});
  const all = (names.series || []).map((s) => s.name).concat(names.omittedNames || []);
  const wanted = all.filter((n) => isLossName(n) || n === EXACT_METRIC);
  const full = wanted.length
    ? await api.get(api.runPath(runId, "/metrics"), {names: wanted, max_points: SERIES_POINTS}) : {series: []};
  return {names: all, series: new Map((full.series || []).map((s) => [s.name, s.points || []]))};
}

async function loadModel(runId) {
  const [run, epochs, summary, metrics] = await Promise.all([
    api.get(api.runPath(runId)), api.allPages(api.runPath(runId, "/epochs"), {}, "epochs"),
    api.get(api.runPath(runId, "/summary")), loadMetrics(runId)]);
  return {run, epochs, summary, metrics: metrics.series, metricNames: metrics.names};
}

function fact(label, value) {
  return [el("dt", {}, label), el("dd", {"data-fact": label}, value)];
}

function sampleCount(model) {
  return model.epochs.reduce((most, e) => Math.max(most, num(e.predictionCount)), 0);
}

function judgeCost(summary) {
  const budget = num(summary.budgetUsd);
  return usd(summary.totalCostUsd) + (budget ? ` of ${usd(budget)} budget` : "") +
    (summary.budgetExhausted ? " (budget spent)" : "");
}

function judgingPending(summary) {
  return num(summary.pendingPredictions) + num(summary.handoffWaiting);
}

function judgingText(summary) {
  const parts = [];
  if (judgingPending(summary)) parts.push(`${judgingPending(summary)} predictions to judge`);
  if (num(summary.failedPredictions)) parts.push(`${num(summary.failedPredictions)} failed`);
  if (summary.llmPausedReason) parts.push(`LLM judging paused: ${summary.llmPausedReason}`);
  if (summary.handoffError) parts.push(`hand-off error: ${summary.handoffError}`);
  return parts.length ? parts.join("; ") : "up to date";
}

function renderHeader(model, ui) {
  const run = model.run;
  clear(ui.header).append(el("h1", {id: "run-name"}, run.name || run.id),
    el("dl", {class: "facts"},
      ...fact("Model", run.modelName || DASH), ...fact("Dataset", run.datasetName || DASH),
      ...fact("State", stateBadge(run.state)), ...fact("Started", when(run.createTime)),
      ...fact("Duration", duration(run.createTime, run.finishTime)),
      ...fact("Samples", String(sampleCount(model))),
      ...fact("Epochs", String(model.epochs.length)),
      ...fact("Judge cost", judgeCost(model.summary)),
      ...fact("Judging", judgingText(model.summary))),
    ui.live,
    el("p", {class: "links"}, el("a", {href: "/compare?a=" + encodeURIComponent(run.id)},
      "Compare with another run"), " | ",
    el("a", {href: "/runs/" + encodeURIComponent(run.id) + "/vs", id: "vs-link"},
      "Compare an epoch with a baseline")));
}

function otherMetricPicker(ctx, model, ui) {
  // the trainer's own metrics (learning rate, grad norm, ...) first, then epochlens' pass ones
  const own = (n) => (n.startsWith("epochlens/") ? 1 : 0);
  const others = model.metricNames.filter((n) => !isLossName(n) && n !== EXACT_METRIC)
    .sort((a, b) => own(a) - own(b) || (a < b ? -1 : a > b ? 1 : 0));
  if (!others.length) return null;
  const picker = select("metric-name", others.map((n) => [n, n]), others[0]);
  const box = el("div", {class: "metric-box"});
  const show = async () => {
    const page = await api.get(api.runPath(model.run.id, "/metrics"), {names: [picker.value], max_points: SERIES_POINTS});
    const points = ((page.series || [])[0] || {}).points || [];
    clear(box).append(metricChart({...model, metrics: new Map([[picker.value, points]])},
      picker.value));
  };
  picker.addEventListener("change", () => show().catch(ctx.fail));
  show().catch(ctx.fail);
  return el("div", {class: "chart-cell"}, field("Other training metric", picker), box);
}

function renderCharts(model, ui) {
  clear(ui.charts).append(lossChart(model), exactChart(model), ...judgeCharts(model));
  if (ui.metricPicker) ui.charts.append(ui.metricPicker);
}

// Redrawn on live updates: a focused row keeps the focus.
function renderEpochs(model, ui) {
  const row = document.activeElement && document.activeElement.closest &&
    document.activeElement.closest("#epochs-table tr[data-epoch]");
  clear(ui.epochs).append(epochsTable(model, (epoch) => ui.predictions.showEpoch(epoch)));
  if (row) ui.epochs.querySelector(`tr[data-epoch="${Number(row.dataset.epoch)}"]`)?.focus();
}

// The pairwise and judge-human agreement tables, each only when the summary has rows of it.
function renderJudging(model, ui) {
  const pairwise = pairwiseTable(model.summary, model.run.id);
  const agreement = agreementTable(model.summary);
  ui.judgingBox.hidden = !pairwise && !agreement;
  clear(ui.judgingBox).append(
    ...[pairwise && section("Pairwise judging", "pairwise-section", pairwise),
      agreement && section("Judge agreement with people", "agreement-section", agreement)]
      .filter(Boolean));
}

function criteriaOf(summary) {
  return [...new Set((summary.rows || []).map((r) => r.criterion))].sort();
}

function buildPage(ctx, model) {
  const ui = {header: el("header", {class: "card run-header", id: "run-header"}),
    live: el("p", {class: "live", id: "live-status", role: "status"}),
    charts: el("div", {class: "charts", id: "charts"}), epochs: el("div", {id: "epochs-box"}),
    judgingBox: el("div", {id: "judging-box"})};
  ui.predictions = predictionsTable(ctx, model.run.id, model.epochs.map((e) => num(e.epoch)),
    criteriaOf(model.summary));
  ui.metricPicker = otherMetricPicker(ctx, model, ui);
  ctx.main.append(ui.header, section("Charts", "charts-section", ui.charts),
    section("Epochs", "epochs-section", ui.epochs), ui.judgingBox,
    section("Predictions", "predictions-section", ui.predictions.node));
  return ui;
}

// Re-reads the run summary (judge results land after their predictions): soon after an
// epoch event or the end of the run, then again while the judge has predictions of the run
// left to judge (the charts and tables are redrawn only when the judged numbers changed).
// Returns schedule(delayMs).
function summaryRefresher(ctx, model, redraw, renderHeaderOnly) {
  let timer = null;
  const refresh = async () => {
    timer = null;
    const summary = await api.get(api.runPath(model.run.id, "/summary"));
    if (!ctx.alive()) return;
    const judged = (s) => JSON.stringify([s.rows, s.pairwise, s.agreements]);
    const rowsChanged = judged(summary) !== judged(model.summary);
    model.summary = summary;
    if (rowsChanged) redraw();
    else renderHeaderOnly();
    if (judgingPending(summary) && timer === null) schedule(JUDGING_POLL_MS);
  };
  const schedule = (delay) => {
    clearTimeout(timer);
    timer = setTimeout(() => refresh().catch(ctx.fail), delay);
  };
  ctx.onLeave(() => clearTimeout(timer));
  return schedule;
}

export async function runView(ctx, runId) {
  const model = await loadModel(runId);
  if (!ctx.alive()) return;
  document.title = `${model.run.name || runId} - epochlens`;
  const ui = buildPage(ctx, model);
  const redraw = () => {
    renderHeader(model, ui);
    renderCharts(model, ui);
    renderEpochs(model, ui);
    renderJudging(model, ui);
  };
  redraw();
  const refreshSummary = summaryRefresher(ctx, model, redraw, () => renderHeader(model, ui));
  if (judgingPending(model.summary)) refreshSummary(JUDGING_POLL_MS);
  await ui.predictions.load();
  if (model.run.state === RUNNING) ctx.onLeave(watch(ctx, model, ui, redraw, refreshSummary));
}

// Whether the epoch is new or differs from the one shown.
function upsertEpoch(model, epoch) {
  const i = model.epochs.findIndex((e) => num(e.epoch) === num(epoch.epoch));
  if (i >= 0) {
    const old = model.epochs[i];
    if (num(old.predictionCount) === num(epoch.predictionCount) &&
        num(old.latestStep) === num(epoch.latestStep)) return false;
    model.epochs[i] = epoch;
  } else {
    model.epochs.push(epoch);
    model.epochs.sort((a, b) => num(a.epoch) - num(b.epoch));
  }
  return true;
}

// Whether the update added points to a series the charts draw.
function addPoints(model, update) {
  const points = model.metrics.get(update.name) || [];
  const last = points.length ? num(points[points.length - 1].step) : -1;
  const fresh = (update.points || []).filter((p) => num(p.step) > last);
  model.metrics.set(update.name, points.concat(fresh));
  if (!model.metricNames.includes(update.name)) model.metricNames.push(update.name);
  return fresh.length > 0 && (isLossName(update.name) || update.name === EXACT_METRIC);
}

// One WatchRunEvent into the page's model; whether the page has to be redrawn (the first
// events of a stream repeat what the page already shows).
function applyEvent(model, ui, event, refreshSummary) {
  if (event.epoch) {
    if (!upsertEpoch(model, event.epoch)) return false;
    ui.predictions.setEpochs(model.epochs.map((e) => num(e.epoch)));
    refreshSummary(SUMMARY_REFRESH_MS);
    return true;
  }
  if (event.run) {
    const changed = event.run.state !== model.run.state ||
      (event.run.finishTime || "") !== (model.run.finishTime || "");
    model.run = event.run;
    return changed;
  }
  return event.metrics ? addPoints(model, event.metrics) : false;
}

function watch(ctx, model, ui, redraw, refreshSummary) {
  const source = new EventSource(api.watchUrl(model.run.id));
  const listening = "Live: new epochs appear as they are stored.";
  ui.live.textContent = listening;
  source.onopen = () => {
    ui.live.textContent = listening;
  };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (applyEvent(model, ui, event, refreshSummary)) redraw();
    if (event.run && event.run.state !== RUNNING) finished(model, ui, source, refreshSummary);
  };
  source.addEventListener("end", () => {
    source.close();
    if (!ui.live.dataset.final) ui.live.textContent = "The live stream ended.";
  });
  source.addEventListener("rpc-error", (message) => {
    source.close();
    const status = JSON.parse(message.data);
    ui.live.textContent = `Live updates stopped: ${status.message || status.code}`;
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      ui.live.textContent = "Live updates stopped; reload the page to see newer epochs.";
    } else ui.live.textContent = "Live: reconnecting...";
  };
  return () => source.close();
}

function finished(model, ui, source, refreshSummary) {
  source.close();
  const label = STATE_LABELS[model.run.state] || model.run.state;
  ui.live.textContent = `The run ${label}.`;
  ui.live.dataset.final = label;
  refreshSummary(SUMMARY_REFRESH_MS);
}
