// Line charts drawn as SVG (createElementNS). Every line stays visible: each series has its
// own color, marker shape and dash pattern; lines and markers drawn first are larger, so one
// drawn later on the same values leaves the earlier one showing at its edges; on per-epoch
// charts the points of each series are also shifted sideways by a few pixels. Each point has
// a <title> (hover) and moving the pointer over the plot writes the nearest values below it.
import {el, svg, shortNumber} from "./dom.js";

const COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#332288", "#56b4e9",
  "#882255", "#117733", "#999933"];
const DASHES = [null, "7 4", "2 3", "9 3 2 3", "4 4"];
const SHAPES = ["circle", "square", "triangle", "diamond", "down", "cross"];
const BOX = {width: 560, height: 250, left: 56, right: 14, top: 14, bottom: 38};
// Points asked per metric series (ListMetrics max_points): about one per pixel of a chart
// (BOX.width); the server downsamples longer series into step buckets with min and max.
export const SERIES_POINTS = 500;
const DODGE_PX = 4;
const MARKED_POINTS = 40;  // markers of full size per series; the others are small dots
const MAX_POINTS_DRAWN = 250;  // longer series: only the full-size markers (hover: the readout)

export function seriesStyle(index) {
  return {color: COLORS[index % COLORS.length], dash: DASHES[index % DASHES.length],
    shape: SHAPES[index % SHAPES.length], width: Math.max(1.6, 3.6 - 0.5 * index),
    radius: Math.max(2.6, 5 - 0.6 * index)};
}

function niceStep(span, count) {
  const raw = span / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
  const scaled = raw / power;
  return power * (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10);
}

function ticks(min, max, count) {
  const step = niceStep(max - min || 1, count), out = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step / 1e6; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return out;
}

function extent(values, fixedMin, fixedMax) {
  let min = fixedMin ?? Math.min(...values), max = fixedMax ?? Math.max(...values);
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  if (min === max) return [min - 1, max + 1];
  if (fixedMin === undefined || fixedMax === undefined) {
    const pad = (max - min) * 0.06;
    if (fixedMin === undefined) min -= pad;
    if (fixedMax === undefined) max += pad;
  }
  return [min, max];
}

function scales(spec) {
  const all = spec.series.flatMap((s) => s.points);
  const [x0, x1] = extent(all.map((p) => p.x), spec.xMin, spec.xMax);
  const [y0, y1] = extent(all.map((p) => p.y), spec.yMin, spec.yMax);
  const w = BOX.width - BOX.left - BOX.right, h = BOX.height - BOX.top - BOX.bottom;
  return {x0, x1, y0, y1,
    x: (v) => BOX.left + ((v - x0) / (x1 - x0)) * w,
    y: (v) => BOX.top + (1 - (v - y0) / (y1 - y0)) * h,
    invertX: (px) => x0 + ((px - BOX.left) / w) * (x1 - x0)};
}

function markerPath(shape, x, y, r) {
  const f = (n) => n.toFixed(1);
  switch (shape) {
    case "square": return `M${f(x - r)} ${f(y - r)}h${f(2 * r)}v${f(2 * r)}h${f(-2 * r)}Z`;
    case "triangle": return `M${f(x)} ${f(y - r * 1.2)}L${f(x + r * 1.1)} ${f(y + r * 0.9)}` +
      `L${f(x - r * 1.1)} ${f(y + r * 0.9)}Z`;
    case "diamond": return `M${f(x)} ${f(y - r * 1.3)}L${f(x + r * 1.3)} ${f(y)}` +
      `L${f(x)} ${f(y + r * 1.3)}L${f(x - r * 1.3)} ${f(y)}Z`;
    case "down": return `M${f(x)} ${f(y + r * 1.2)}L${f(x + r * 1.1)} ${f(y - r * 0.9)}` +
      `L${f(x - r * 1.1)} ${f(y - r * 0.9)}Z`;
    case "cross": return `M${f(x - r)} ${f(y - r)}L${f(x + r)} ${f(y + r)}` +
      `M${f(x - r)} ${f(y + r)}L${f(x + r)} ${f(y - r)}`;
    default: return `M${f(x - r)} ${f(y)}a${f(r)} ${f(r)} 0 1 0 ${f(2 * r)} 0` +
      `a${f(r)} ${f(r)} 0 1 0 ${f(-2 * r)} 0Z`;
  }
}

function drawAxes(root, spec, s) {
  const grid = svg("g", {class: "axes"});
  for (const v of ticks(s.y0, s.y1, 5)) {
    const y = s.y(v).toFixed(1);
    grid.append(svg("line", {class: "grid", x1: BOX.left, x2: BOX.width - BOX.right, y1: y,
      y2: y}), svg("text", {class: "tick", x: BOX.left - 6, y, "text-anchor": "end",
      "dominant-baseline": "middle"}, (spec.yFormat || shortNumber)(v)));
  }
  const xs = spec.integerX ? ticks(s.x0, s.x1, 8).filter(Number.isInteger) : ticks(s.x0, s.x1, 6);
  for (const v of xs) {
    grid.append(svg("text", {class: "tick", x: s.x(v).toFixed(1), y: BOX.height - BOX.bottom + 16,
      "text-anchor": "middle"}, shortNumber(v)));
  }
  grid.append(svg("text", {class: "axis-label", x: (BOX.left + BOX.width - BOX.right) / 2,
    y: BOX.height - 4, "text-anchor": "middle"}, spec.xLabel));
  root.append(grid);
}

function drawBoundaries(root, spec, s) {
  const group = svg("g", {class: "boundaries"});
  for (const b of spec.boundaries || []) {
    if (b.x < s.x0 || b.x > s.x1) continue;
    const x = s.x(b.x).toFixed(1);
    group.append(svg("line", {class: "boundary", x1: x, x2: x, y1: BOX.top,
      y2: BOX.height - BOX.bottom, "data-x": b.x}, svg("title", {}, b.label)),
    svg("text", {class: "boundary-label", x: Number(x) + 3, y: BOX.top + 9}, b.short || ""));
  }
  root.append(group);
}

function seriesOffset(spec, index) {
  if (!spec.dodge) return 0;
  return (index - (spec.series.length - 1) / 2) * DODGE_PX;
}

function drawSeries(root, spec, series, index, s) {
  const style = seriesStyle(index), dx = seriesOffset(spec, index);
  const group = svg("g", {class: "series", "data-series": series.key});
  const coords = series.points.map((p) => [s.x(p.x) + dx, s.y(p.y)]);
  if (coords.length > 1) {
    group.append(svg("path", {class: "line", "data-series": series.key, fill: "none",
      stroke: style.color, "stroke-width": style.width, "stroke-dasharray": style.dash,
      d: coords.map(([x, y], i) => (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1))
        .join("")}));
  }
  const every = Math.max(1, Math.ceil(series.points.length / MARKED_POINTS));
  const dense = series.points.length > MAX_POINTS_DRAWN;
  series.points.forEach((p, i) => {
    const last = i === series.points.length - 1;
    const marked = i % every === 0 || last;
    if (dense && !marked) return;
    group.append(svg("path", {class: marked ? "pt" : "pt minor", "data-series": series.key,
      "data-x": p.x, "data-y": p.y, fill: style.shape === "cross" ? "none" : style.color,
      stroke: style.color, "stroke-width": 1.5,
      d: markerPath(style.shape, coords[i][0], coords[i][1], marked ? style.radius : 2)},
    svg("title", {}, p.title || `${series.label}, ${spec.xLabel} ${p.x}: ${shortNumber(p.y)}`)));
  });
  root.append(group);
}

function legendSwatch(index) {
  const style = seriesStyle(index);
  return svg("svg", {class: "swatch", viewBox: "0 0 30 12", width: 30, height: 12,
    "aria-hidden": "true"},
  svg("line", {x1: 1, x2: 29, y1: 6, y2: 6, stroke: style.color, "stroke-width": 2.5,
    "stroke-dasharray": style.dash}),
  svg("path", {d: markerPath(style.shape, 15, 6, 3.5), stroke: style.color,
    fill: style.shape === "cross" ? "none" : style.color}));
}

function legend(spec) {
  return el("ul", {class: "legend"}, ...spec.series.map((series, i) =>
    el("li", {"data-series": series.key}, legendSwatch(i), series.label)));
}

function nearest(points, x) {
  let best = null;
  for (const p of points) if (best === null || Math.abs(p.x - x) < Math.abs(best.x - x)) best = p;
  return best;
}

function attachReadout(root, spec, s, readout) {
  root.addEventListener("pointermove", (event) => {
    const box = root.getBoundingClientRect();
    const x = s.invertX(((event.clientX - box.left) / box.width) * BOX.width);
    const parts = spec.series.map((series) => {
      const p = nearest(series.points, x);
      return p ? `${series.label} ${shortNumber(p.y)} (${spec.xLabel} ${p.x})` : null;
    }).filter(Boolean);
    readout.textContent = parts.join("; ");
  });
}

// spec: {key, title, xLabel, series: [{key, label, points: [{x, y, title?}]}], yMin?, yMax?,
// yFormat?, integerX?, dodge?, boundaries?: [{x, label, short}], note?}
export function lineChart(spec) {
  const figure = el("figure", {class: "chart", "data-chart": spec.key});
  figure.append(el("figcaption", {}, spec.title));
  const drawn = spec.series.filter((series) => series.points.length);
  if (!drawn.length) {
    figure.append(el("p", {class: "empty"}, spec.empty || "Nothing recorded yet."));
    return figure;
  }
  spec = {...spec, series: drawn};
  const s = scales(spec);
  const root = svg("svg", {class: "plot", viewBox: `0 0 ${BOX.width} ${BOX.height}`,
    role: "img", "aria-label": spec.title});
  drawAxes(root, spec, s);
  drawBoundaries(root, spec, s);
  spec.series.forEach((series, i) => drawSeries(root, spec, series, i, s));
  const readout = el("p", {class: "readout", "aria-live": "polite"});
  attachReadout(root, spec, s, readout);
  figure.append(root, legend(spec), readout);
  if (spec.note) figure.append(el("p", {class: "chart-note"}, spec.note));
  return figure;
}
