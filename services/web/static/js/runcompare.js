// The run comparison page (/runs/{id}/vs?epoch=&baseline=&baseline_epoch=&choice=&best=):
// one epoch of the run (the candidate) against a baseline, another epoch of it or an epoch
// of another of the user's runs (QueryService.CompareRuns). The form's choices live in the
// URL; the page shows per criterion and judge the paired means, pass rates and their deltas
// with bootstrap intervals, the samples that changed (linked to their sample pages) and the
// stored pairwise judging of the candidate epoch against that baseline.
import * as api from "./api.js";
import {ApiError, Unauthorized} from "./api.js";
import {changesTable, deltasTable} from "./comparetables.js";
import {DASH, el, field, num, section, select} from "./dom.js";
import {comparePairwiseTable} from "./judging.js";

const RUN_CHOICES = 100;
const CHOICES = {first: "EPOCH_CHOICE_FIRST", last: "EPOCH_CHOICE_LAST",
  best: "EPOCH_CHOICE_BEST"};

async function loadChoices(runId) {
  const [run, epochs, runs] = await Promise.all([api.get(api.runPath(runId)),
    api.allPages(api.runPath(runId, "/epochs"), {}, "epochs"),
    api.get("/v1/runs", {page_size: RUN_CHOICES})]);
  const names = new Map((runs.runs || []).map((r) => [r.id, r.name || r.id]));
  names.set(run.id, run.name || run.id);
  return {run, epochs, runs: runs.runs || [], names};
}

function runLabel(model, id) {
  return `${model.names.get(id) || id} (${id.slice(0, 8)})`;
}

function controls(model, p) {
  const epochs = model.epochs.map((e) => [num(e.epoch), `epoch ${num(e.epoch)}`]);
  const runs = model.runs.filter((r) => r.id !== model.run.id)
    .map((r) => [r.id, runLabel(model, r.id)]);
  const baseline = p.get("baseline") || "";
  if (baseline && !runs.some(([id]) => id === baseline)) runs.push([baseline, baseline]);
  return {
    epoch: select("vs-epoch", [["", "last epoch"], ...epochs], p.get("epoch") || ""),
    baseline: select("vs-baseline", [["", "this run"], ...runs], baseline),
    baselineEpoch: el("input", {id: "vs-baseline-epoch", type: "number", min: 0, step: 1,
      value: p.get("baseline_epoch") || ""}),
    choice: select("vs-choice", [["", "default (first of this run, last of another)"],
      ["first", "first epoch"], ["last", "last epoch"], ["best", "best epoch on a criterion"]],
    p.get("choice") || ""),
    best: el("input", {id: "vs-best", type: "text", value: p.get("best") || ""}),
  };
}

function compareForm(ctx, model) {
  const c = controls(model, ctx.params);
  const form = el("form", {class: "filters", id: "vs-form"}, field("Candidate epoch", c.epoch),
    field("Baseline run", c.baseline), field("Baseline epoch (number)", c.baselineEpoch),
    field("Or baseline epoch by", c.choice), field("Best on criterion", c.best),
    el("button", {type: "submit"}, "Compare"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    const values = {epoch: c.epoch.value, baseline: c.baseline.value,
      baseline_epoch: c.baselineEpoch.value.trim(), choice: c.choice.value,
      best: c.best.value.trim()};
    for (const [key, value] of Object.entries(values)) if (value) query.set(key, value);
    ctx.navigate(vsPath(model.run.id) + (query.toString() ? "?" + query : ""));
  });
  return form;
}

export function vsPath(runId) {
  return "/runs/" + encodeURIComponent(runId) + "/vs";
}

function compareRequest(p) {
  return {epoch: p.get("epoch"), baseline_run_id: p.get("baseline"),
    baseline_epoch: p.get("baseline_epoch"), baseline_choice: CHOICES[p.get("choice")],
    best_criterion: p.get("best")};
}

function headerText(model, reply) {
  const baseline = reply.baselineRunId === reply.runId ? `epoch ${num(reply.baselineEpoch)}`
    : `run ${runLabel(model, reply.baselineRunId)} epoch ${num(reply.baselineEpoch)}`;
  return `Epoch ${num(reply.epoch)} of ${runLabel(model, reply.runId)} against ${baseline}: ` +
    `${num(reply.sharedSamples)} shared samples; intervals: ` +
    `${Number((100 * num(reply.confidenceLevel)).toFixed(1))}% paired bootstrap, ` +
    `${num(reply.bootstrapResamples)} resamples.`;
}

function results(model, reply) {
  const pairwise = comparePairwiseTable(reply.pairwise);
  return [el("p", {id: "vs-header"}, headerText(model, reply)),
    section("Deltas", "vs-deltas", deltasTable(reply)),
    section("Changed samples", "vs-changes", changesTable(reply)),
    pairwise && section("Pairwise judging", "vs-pairwise", pairwise)];
}

function refusal(err) {
  return el("div", {class: "card error", role: "alert", id: "vs-error"},
    el("h2", {}, "The comparison was refused"),
    el("p", {class: "error-message"}, `HTTP ${err.status}: ${err.message || DASH}`));
}

export async function runCompareView(ctx, runId) {
  const model = await loadChoices(runId);
  if (!ctx.alive()) return;
  document.title = `Compare ${model.run.name || runId} - epochlens`;
  const box = el("div", {id: "vs-results"}, el("p", {class: "loading"}, "Comparing..."));
  const title = el("h1", {class: "page-title"}, "Compare ",
    el("a", {href: "/runs/" + encodeURIComponent(runId), id: "vs-run"}, model.run.name || runId));
  ctx.main.append(title, section("Comparison", "vs-choose", compareForm(ctx, model)), box);
  let reply;
  try {
    reply = await api.get(api.runPath(runId, ":compare"), compareRequest(ctx.params));
  } catch (err) {
    if (!(err instanceof ApiError) || err instanceof Unauthorized) throw err;
    if (ctx.alive()) box.replaceChildren(refusal(err));
    return;
  }
  if (ctx.alive()) box.replaceChildren(...results(model, reply).filter(Boolean));
}
