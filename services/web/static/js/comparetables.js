// The tables of the run comparison page (js/runcompare.js) from a CompareRunsResponse: the
// deltas per criterion and judge (means, pass rates, their paired deltas with bootstrap
// intervals, samples up / down / the same) and the changed samples, each linked to its
// sample page on both sides. Every value goes in as text (dom.js el).
import {el, num, pct} from "./dom.js";
import {interval, score, signed} from "./judging.js";

function points(value) {
  return signed(100 * num(value), 1);
}

function deltaRow(d) {
  const type = d.judgeType, fmt = (v) => signed(v, type);
  return el("tr", {"data-criterion": d.criterion, "data-judge": d.judgeModel},
    el("td", {"data-col": "criterion", class: "text"}, d.criterion),
    el("td", {"data-col": "judge"}, d.judgeModel),
    el("td", {"data-col": "pairs", class: "num"}, String(num(d.pairedCount))),
    el("td", {"data-col": "baseline", class: "num"}, score(d.baselineMean, type)),
    el("td", {"data-col": "candidate", class: "num"}, score(d.candidateMean, type)),
    el("td", {"data-col": "delta", class: "num"},
      `${fmt(d.meanDelta)} ${interval(d.meanDeltaLow, d.meanDeltaHigh, fmt)}`),
    el("td", {"data-col": "pass", class: "num"},
      `${pct(num(d.baselinePassRate))} -> ${pct(num(d.candidatePassRate))}`),
    el("td", {"data-col": "pass-delta", class: "num"}, `${points(d.passRateDelta)} pts ` +
      interval(d.passRateDeltaLow, d.passRateDeltaHigh, points)),
    el("td", {"data-col": "improved", class: "num"}, String(num(d.improvedCount))),
    el("td", {"data-col": "regressed", class: "num"}, String(num(d.regressedCount))),
    el("td", {"data-col": "unchanged", class: "num"}, String(num(d.unchangedCount))));
}

export function deltasTable(reply) {
  if (!(reply.deltas || []).length) {
    return el("p", {class: "empty", id: "deltas-empty"},
      "No criterion was scored on both sides of a shared sample.");
  }
  return el("div", {class: "table-wrap"}, el("table", {id: "deltas-table", class: "rows fit"},
    el("caption", {}, "Per criterion and judge, over the samples scored on both sides"),
    el("thead", {}, el("tr", {}, ...["Criterion", "Judge", "Pairs", "Baseline mean",
      "Candidate mean", "Delta [interval]", "Pass rate", "Pass delta [interval]", "Improved",
      "Regressed", "Unchanged"].map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, ...reply.deltas.map(deltaRow))));
}

function sampleLink(runId, index) {
  return el("a", {href: `/runs/${encodeURIComponent(runId)}/samples/${num(index)}`},
    String(num(index)));
}

function changeText(c) {
  if (c.baselinePassed && !c.candidatePassed) return "regressed";
  if (c.candidatePassed && !c.baselinePassed) return "improved";
  return signed(num(c.candidateScore) - num(c.baselineScore), c.judgeType);
}

function verdictText(value, passed, type) {
  return `${score(value, type)} ${passed ? "pass" : "fail"}`;
}

function changeRow(reply, c) {
  const change = changeText(c);
  return el("tr", {"data-sample": num(c.sampleIndex), "data-criterion": c.criterion,
    class: "change-" + (change === "regressed" || change === "improved" ? change : "score")},
    el("td", {"data-col": "sample", class: "num"}, sampleLink(reply.runId, c.sampleIndex)),
    el("td", {"data-col": "baseline-sample", class: "num"},
      sampleLink(reply.baselineRunId, c.baselineSampleIndex)),
    el("td", {"data-col": "criterion", class: "text"}, c.criterion),
    el("td", {"data-col": "judge"}, c.judgeModel),
    el("td", {"data-col": "baseline", class: "num"},
      verdictText(c.baselineScore, c.baselinePassed, c.judgeType)),
    el("td", {"data-col": "candidate", class: "num"},
      verdictText(c.candidateScore, c.candidatePassed, c.judgeType)),
    el("td", {"data-col": "change"}, change));
}

export function changesTable(reply) {
  if (!(reply.changes || []).length) {
    return el("p", {class: "empty", id: "changes-empty"}, "No sample changed.");
  }
  return el("div", {class: "table-wrap"}, el("table", {id: "changes-table", class: "rows fit"},
    el("caption", {}, "Changed samples: verdict regressions, improvements, then the largest " +
      "score changes"),
    el("thead", {}, el("tr", {}, ...["Sample", "Baseline sample", "Criterion", "Judge",
      "Baseline", "Candidate", "Change"].map((h) => el("th", {scope: "col"}, h)))),
    el("tbody", {}, ...reply.changes.map((c) => changeRow(reply, c)))));
}
