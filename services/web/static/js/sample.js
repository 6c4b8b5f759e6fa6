// The sample view: one sample across every epoch (CompareSample, paged: "Load more epochs"
// appends the next page), each prediction shown with the words added and removed since the
// previous epoch and every judgment with its reasoning. Previous / next sample, a sample
// number field, and the arrow keys (outside form fields) switch samples.
import * as api from "./api.js";
import {diffNode} from "./diff.js";
import {navigableWithin, typingIn} from "./keyboard.js";
import {button, DASH, el, exactMatch, field, num, shortNumber} from "./dom.js";

const PAGE_SIZE = 20;

function judgmentItem(j) {
  const unscored = j.status === "JUDGMENT_STATUS_UNSCORED";
  const verdict = unscored ? "unscored" : j.passed ? "pass" : "fail";
  const who = j.judgeType === "JUDGE_TYPE_RULE" ? "rules" : j.judgeModel || "";
  return el("li", {class: "judgment " + verdict, "data-criterion": j.criterion,
    "data-verdict": verdict},
  el("span", {class: "j-name"}, `${j.criterion} (${who})`),
  el("span", {class: "j-score"}, unscored ? DASH : shortNumber(num(j.score))),
  el("span", {class: "j-verdict"}, unscored ? "unscored" : verdict),
  el("span", {class: "j-reason"}, unscored ? j.unscoredReason || "" : j.reasoning || ""));
}

function matchMarker(prediction, truth) {
  const match = exactMatch(prediction, truth);
  if (match === null) return null;
  return el("span", {class: "marker " + (match ? "match" : "miss"), "data-match": String(match)},
    match ? "exact match" : "not exact");
}

function predictionCard(p, previous, truth) {
  const text = p.prediction || "";
  const card = el("li", {class: "pred-card", tabindex: 0, "data-epoch": num(p.epoch),
    "data-step": num(p.step)},
    el("div", {class: "pred-head"},
      el("span", {class: "pred-label"}, `Epoch ${num(p.epoch)}`),
      el("span", {class: "pred-meta"}, `step ${num(p.step)}` +
        (p.completionTokens ? `, ${p.completionTokens} tokens` : "") +
        (previous === null ? "" : ", changes since the previous epoch marked")),
      matchMarker(text, truth)),
    diffNode(previous, text));
  if ((p.judgments || []).length) {
    card.append(el("ul", {class: "judgments-list"}, ...p.judgments.map(judgmentItem)));
  }
  card.setAttribute("aria-label", `Epoch ${num(p.epoch)} prediction`);
  return card;
}

function samplePicker(ctx, runId, index, count) {
  const go = (i) => ctx.navigate(`/runs/${encodeURIComponent(runId)}/samples/${i}`);
  const input = el("input", {id: "sample-index", type: "number", min: 0, value: index,
    max: count ? count - 1 : null});
  const form = el("form", {class: "filters", id: "sample-form"},
    button("Previous sample", {id: "prev-sample", disabled: index <= 0}),
    field("Sample", input), el("button", {type: "submit"}, "Show"),
    button("Next sample", {id: "next-sample", disabled: count > 0 && index >= count - 1}));
  form.querySelector("#prev-sample").addEventListener("click", () => go(index - 1));
  form.querySelector("#next-sample").addEventListener("click", () => go(index + 1));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value !== "" && Number(input.value) >= 0) go(Number(input.value));
  });
  return form;
}

function keyboardSwitch(ctx, form) {
  const onKey = (event) => {
    if (typingIn(event) || event.altKey || event.ctrlKey || event.metaKey) return;
    const target = {ArrowLeft: "#prev-sample", ArrowRight: "#next-sample"}[event.key];
    const control = target && form.querySelector(target);
    if (control && !control.disabled) {
      event.preventDefault();
      control.click();
    }
  };
  document.addEventListener("keydown", onKey);
  ctx.onLeave(() => document.removeEventListener("keydown", onKey));
}

function textBlock(title, id, text, missing) {
  return el("div", {class: "block"}, el("h3", {}, title),
    el("pre", {id, class: text === undefined || text === null ? "missing" : ""},
      text === undefined || text === null ? missing : text));
}

async function loadPages(ctx, runId, index, list, state) {
  const page = await api.get(api.runPath(runId, "/samples/" + index),
    {page_size: PAGE_SIZE, page_token: state.token});
  for (const p of page.predictions || []) {
    list.append(predictionCard(p, state.previous, page.groundTruth));
    state.previous = p.prediction || "";
  }
  state.token = page.nextPageToken || "";
  return page;
}

// The sample's first page, or null when the run has no such sample (404).
async function firstPage(ctx, runId, index, list, state) {
  try {
    return await loadPages(ctx, runId, index, list, state);
  } catch (err) {
    if (err instanceof api.ApiError && err.status === 404) {
      return null;
    }
    throw err;
  }
}

function sampleBody(ctx, runId, index, list, state, first) {
  if (first === null) {
    return [el("p", {class: "empty", id: "sample-missing"},
      `This run has no predictions for sample ${index}.`)];
  }
  const more = button("Load more epochs", {id: "more-epochs", hidden: !state.token});
  more.addEventListener("click", () => loadPages(ctx, runId, index, list, state)
    .then(() => { more.hidden = !state.token; }).catch(ctx.fail));
  return [el("p", {class: "hint"}, "Words added since the previous epoch are underlined in " +
    "green, removed ones struck through in red. Left and right arrow keys switch samples."),
  el("div", {class: "sample-meta"}, textBlock("Prompt", "sample-prompt", first.prompt, ""),
    textBlock("Ground truth", "sample-truth", first.groundTruth, "(no ground truth)")),
  list, more];
}

export async function sampleView(ctx, runId, index) {
  const [run, epochs] = await Promise.all([api.get(api.runPath(runId)),
    api.allPages(api.runPath(runId, "/epochs"), {}, "epochs")]);
  const count = epochs.reduce((most, e) => Math.max(most, num(e.predictionCount)), 0);
  const list = el("ol", {class: "predictions", id: "prediction-list"});
  navigableWithin(list, ".pred-card");
  const state = {token: "", previous: null};
  const first = await firstPage(ctx, runId, index, list, state);
  if (!ctx.alive()) return;
  document.title = `Sample ${index} of ${run.name || runId} - epochlens`;
  const form = samplePicker(ctx, runId, index, count);
  keyboardSwitch(ctx, form);
  ctx.main.append(el("nav", {class: "crumbs", "aria-label": "Breadcrumb"},
    el("a", {href: "/runs/" + encodeURIComponent(runId)}, run.name || runId), " / ",
    `sample ${index}`),
  section(`Sample ${index} across epochs`, "sample-section", form,
    ...sampleBody(ctx, runId, index, list, state, first)));
}

function section(title, id, ...children) {
  return el("section", {class: "card", id, "aria-labelledby": id + "-title"},
    el("h1", {id: id + "-title"}, title), ...children);
}

export {judgmentItem};
