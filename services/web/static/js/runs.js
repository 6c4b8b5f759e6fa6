// The runs list: newest first, filtered by name, state and model, paged with the API's page
// tokens. Filters and the page token live in the URL; the tokens of earlier pages travel in
// the history entry's state, so Previous (and the back button) return to them.
import * as api from "./api.js";
import {navigable} from "./keyboard.js";
import {button, duration, el, field, section, select, stateBadge, when} from "./dom.js";

const PAGE_SIZE = 20;
const STATES = [["", "any state"], ["RUN_STATE_RUNNING", "running"],
  ["RUN_STATE_SUCCEEDED", "finished"], ["RUN_STATE_FAILED", "failed"],
  ["RUN_STATE_CANCELLED", "cancelled"]];

function filtersForm(ctx) {
  const p = ctx.params;
  const name = el("input", {id: "filter-name", type: "search", value: p.get("name") || ""});
  const model = el("input", {id: "filter-model", type: "search", value: p.get("model") || ""});
  const state = select("filter-state", STATES, p.get("state") || "");
  const form = el("form", {class: "filters", id: "runs-filters", role: "search"},
    field("Name contains", name), field("State", state), field("Model contains", model),
    el("button", {type: "submit"}, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    if (name.value.trim()) query.set("name", name.value.trim());
    if (state.value) query.set("state", state.value);
    if (model.value.trim()) query.set("model", model.value.trim());
    ctx.navigate("/" + (query.toString() ? "?" + query : ""));
  });
  state.addEventListener("change", () => form.requestSubmit());
  return form;
}

// The run's kind as the API spells it (RUN_KIND_*); a run without one is a training run.
function kindName(kind) {
  return kind === "RUN_KIND_EVALUATION" ? "evaluation" : "training";
}

function runRow(run, ctx) {
  const href = "/runs/" + encodeURIComponent(run.id);
  const row = el("tr", {"data-run-id": run.id},
    el("td", {"data-col": "name"}, el("a", {href}, run.name || run.id)),
    el("td", {"data-col": "state"}, stateBadge(run.state)),
    el("td", {"data-col": "kind"}, kindName(run.kind)),
    el("td", {"data-col": "model", class: "wrap"}, run.modelName || ""),
    el("td", {"data-col": "dataset", class: "wrap"}, run.datasetName || ""),
    el("td", {"data-col": "created"}, when(run.createTime)),
    el("td", {"data-col": "duration"}, duration(run.createTime, run.finishTime)));
  row.dataset.href = href;
  return row;
}

function pager(ctx, page) {
  const prev = (history.state && history.state.prev) || [];
  const go = (token, stack) => {
    const query = new URLSearchParams(ctx.params);
    if (token) query.set("page_token", token); else query.delete("page_token");
    ctx.navigate("/" + (query.toString() ? "?" + query : ""), {state: {prev: stack}});
  };
  const back = button("Previous page", {id: "runs-prev", disabled: !prev.length});
  const next = button("Next page", {id: "runs-next", disabled: !page.nextPageToken});
  back.addEventListener("click", () => go(prev[prev.length - 1], prev.slice(0, -1)));
  next.addEventListener("click", () =>
    go(page.nextPageToken, [...prev, ctx.params.get("page_token") || ""]));
  return el("div", {class: "pager"}, back,
    el("span", {class: "page-number"}, `Page ${prev.length + 1}`), next);
}

function runsTable(ctx, runs) {
  if (!runs.length) return el("p", {class: "empty", id: "runs-empty"}, "No runs match.");
  const rows = runs.map((run) => runRow(run, ctx));
  navigable(rows, (row) => ctx.navigate(row.dataset.href));
  return el("div", {class: "table-wrap"}, el("table", {id: "runs-table", class: "rows"},
    el("caption", {class: "visually-hidden"}, "Runs, newest first"),
    el("thead", {}, el("tr", {}, ...["Name", "State", "Kind", "Model", "Dataset", "Created",
      "Duration"].map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, ...rows)));
}

export async function runsView(ctx) {
  document.title = "Runs - epochlens";
  const p = ctx.params;
  const page = await api.get("/v1/runs", {name_contains: p.get("name"), state: p.get("state"),
    model_contains: p.get("model"), page_size: PAGE_SIZE, page_token: p.get("page_token")});
  if (!ctx.alive()) return;
  ctx.main.append(el("h1", {class: "page-title"}, "Runs"),
    section("Your runs", "runs", filtersForm(ctx), runsTable(ctx, page.runs || []),
      pager(ctx, page)));
}
