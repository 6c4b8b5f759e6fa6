// Tables of judging results shared by the run page and the run comparison page: pairwise
// judging (PairwiseSummary: wins, losses, ties and the win rate with its interval) and the
// agreement of the rule and LLM judges with people (JudgeAgreement). Every value goes in as
// text (dom.js el), so criterion and judge names stay inert.
import {DASH, el, num, pct, usd} from "./dom.js";

const TYPE_NAMES = {JUDGE_TYPE_RULE: "rule", JUDGE_TYPE_LLM: "llm", JUDGE_TYPE_HUMAN: "human"};

export function judgeTypeName(type) {
  return TYPE_NAMES[type] || String(type || "unknown");
}

// Rule scores with three decimals, LLM and human scores with two (as the CLI shows them).
export function score(value, type) {
  return num(value).toFixed(type === "JUDGE_TYPE_RULE" ? 3 : 2);
}

export function signed(value, digitsOrType) {
  const text = typeof digitsOrType === "number" ? Math.abs(num(value)).toFixed(digitsOrType)
    : score(Math.abs(num(value)), digitsOrType);
  return (num(value) < 0 ? "-" : "+") + text;
}

export function interval(low, high, format) {
  return `[${format(low)}, ${format(high)}]`;
}

function headRow(labels) {
  return el("thead", {}, el("tr", {}, ...labels.map((h) => el("th", {scope: "col"}, h))));
}

function optionalStat(value) {
  return value === undefined || value === null ? DASH : num(value).toFixed(3);
}

export function winRateText(p) {
  return `${pct(num(p.winRate))} ${interval(p.winRateLow, p.winRateHigh, (v) => pct(num(v)))}`;
}

export function wltText(p) {
  return `${num(p.wins)}/${num(p.losses)}/${num(p.ties)}`;
}

function baselineText(p, runId) {
  const epoch = `epoch ${num(p.baselineEpoch)}`;
  if (p.baselineRunId === runId) return epoch;
  return el("span", {}, el("a", {href: "/runs/" + encodeURIComponent(p.baselineRunId)},
    p.baselineRunId.slice(0, 8)), " " + epoch);
}

// The comparison page of the same candidate epoch and baseline (js/runcompare.js URL).
function compareLink(p, runId) {
  const query = new URLSearchParams({epoch: String(num(p.epoch))});
  if (p.baselineRunId !== runId) query.set("baseline", p.baselineRunId);
  query.set("baseline_epoch", String(num(p.baselineEpoch)));
  return el("a", {href: `/runs/${encodeURIComponent(runId)}/vs?${query}`}, "compare");
}

function pairwiseRow(p, runId) {
  return el("tr", {"data-epoch": num(p.epoch), "data-criterion": p.criterion},
    el("td", {"data-col": "epoch", class: "num"}, String(num(p.epoch))),
    el("td", {"data-col": "baseline"}, baselineText(p, runId)),
    el("td", {"data-col": "criterion", class: "text"}, p.criterion),
    el("td", {"data-col": "judge"}, p.judgeModel),
    el("td", {"data-col": "wlt", class: "num"}, wltText(p)),
    el("td", {"data-col": "unscored", class: "num"}, String(num(p.unscored))),
    el("td", {"data-col": "win-rate", class: "num"}, winRateText(p)),
    el("td", {"data-col": "details"}, compareLink(p, runId)));
}

// The run page's pairwise table (RunSummary.pairwise); null when there is none.
export function pairwiseTable(summary, runId) {
  const rows = summary.pairwise || [];
  if (!rows.length) return null;
  return el("div", {class: "table-wrap"}, el("table", {id: "pairwise-table", class: "rows fit"},
    el("caption", {}, "Pairwise judging against a baseline (W/L/T: wins, losses, ties)"),
    headRow(["Epoch", "Baseline", "Criterion", "Judge", "W/L/T", "Unscored", "Win rate",
      "Details"]),
    el("tbody", {}, ...rows.map((p) => pairwiseRow(p, runId)))));
}

// The comparison page's pairwise table (CompareRunsResponse.pairwise), with position-biased
// pairs and cost; null when there is none.
export function comparePairwiseTable(pairwise) {
  if (!(pairwise || []).length) return null;
  const rows = pairwise.map((p) => el("tr", {"data-criterion": p.criterion},
    el("td", {"data-col": "criterion", class: "text"}, p.criterion),
    el("td", {"data-col": "judge"}, p.judgeModel),
    el("td", {"data-col": "wlt", class: "num"}, wltText(p)),
    el("td", {"data-col": "unscored", class: "num"}, String(num(p.unscored))),
    el("td", {"data-col": "win-rate", class: "num"}, winRateText(p)),
    el("td", {"data-col": "biased", class: "num"}, String(num(p.positionBiasPairs))),
    el("td", {"data-col": "cost", class: "num"}, usd(p.costUsd))));
  return el("div", {class: "table-wrap"}, el("table", {id: "vs-pairwise-table", class: "rows fit"},
    el("caption", {}, "Pairwise judging of this epoch against the baseline"),
    headRow(["Criterion", "Judge", "W/L/T", "Unscored", "Win rate", "Position-biased pairs",
      "Cost"]),
    el("tbody", {}, ...rows)));
}

function agreementRow(a) {
  return el("tr", {"data-criterion": a.criterion, "data-judge": a.judgeModel},
    el("td", {"data-col": "criterion", class: "text"}, a.criterion),
    el("td", {"data-col": "type"}, judgeTypeName(a.judgeType)),
    el("td", {"data-col": "judge"}, a.judgeModel),
    el("td", {"data-col": "pairs", class: "num"}, String(num(a.pairs))),
    el("td", {"data-col": "agreement", class: "num"}, pct(num(a.percentAgreement))),
    el("td", {"data-col": "kappa", class: "num"}, optionalStat(a.cohenKappa)),
    el("td", {"data-col": "spearman", class: "num"}, optionalStat(a.spearman)));
}

// The run page's judge-human agreement table (RunSummary.agreements); null when no person
// judged the run. Kappa and Spearman are unset when undefined: shown as a dash.
export function agreementTable(summary) {
  const rows = summary.agreements || [];
  if (!rows.length) return null;
  return el("div", {class: "table-wrap"}, el("table", {id: "agreement-table", class: "rows fit"},
    el("caption", {}, "Agreement of the judges with people (pass/fail and scores)"),
    headRow(["Criterion", "Type", "Judge", "Pairs", "Agreement", "Cohen's kappa", "Spearman"]),
    el("tbody", {}, ...rows.map(agreementRow))));
}
