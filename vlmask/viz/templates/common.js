"use strict";
// Helpers shared by the report and compare pages. Data is only ever put on screen with
// textContent, attributes or canvas drawing: never as HTML.
const SCRIPT_START = performance.now();
const DATA = JSON.parse(document.getElementById("vlmask-data").textContent);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key === "title" || key === "for") node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function section(title, ...children) {
  return el("section", {}, el("h2", { text: title }), ...children);
}

const INFERNO = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]];
const DIVERGING = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247], [253, 219, 199], [239, 138, 98], [178, 24, 43]];

function ramp(stops, x) {
  x = Math.min(1, Math.max(0, Number.isFinite(x) ? x : 0));
  const f = x * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(f));
  const t = f - i;
  return stops[i].map((c, j) => Math.round(c + (stops[i + 1][j] - c) * t));
}

function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

// Colour scales: "linear" spans min..max; "clip" the 1st..99th percentile, so one outlier cannot
// darken the rest (values beyond saturate); "log" a signed log over three decades below the largest |value|.
const SCALES = [["clip", "clipped to the 1st–99th percentile"], ["linear", "linear, min to max"], ["log", "logarithmic"]];

function quantile(sorted, q) {
  if (!sorted.length) return 0;
  const f = (sorted.length - 1) * q, i = Math.floor(f);
  return i + 1 < sorted.length ? sorted[i] + (sorted[i + 1] - sorted[i]) * (f - i) : sorted[i];
}

// A colour scale over the finite values, diverging around 0 when they have both signs.
function scaleOf(values, mode) {
  const finite = [];
  for (const v of values) if (isNum(v)) finite.push(v);
  finite.sort((a, b) => a - b);
  let min = finite.length ? finite[0] : 0, max = finite.length ? finite[finite.length - 1] : 0;
  const clipped = mode === "clip" && finite.length > 2;
  if (clipped) { min = quantile(finite, 0.01); max = quantile(finite, 0.99); }
  const both = min < 0 && max > 0;
  let f = (v) => v;
  if (mode === "log") {
    const t = Math.max(Math.abs(min), Math.abs(max)) * 1e-3 || 1;
    f = (v) => Math.sign(v) * Math.log10(1 + Math.abs(v) / t);
  }
  const lo = f(min), hi = f(max);
  const base = { min, max, mode: mode || "linear", clipped };
  if (both) {
    const m = Math.max(-lo, hi), top = Math.max(-min, max);
    return { ...base, min: -top, max: top, stops: DIVERGING, color: (v) => ramp(DIVERGING, (f(v) + m) / (2 * m)) };
  }
  const span = hi - lo || 1;
  return { ...base, stops: INFERNO, color: (v) => ramp(INFERNO, (f(v) - lo) / span) };
}

function rgb(c) {
  return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
}

function ink(c) {
  return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 ? "#000" : "#fff";
}

function fmt(v) {
  if (!isNum(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

// Show a token's text visibly: line breaks and tabs as symbols, spaces kept.
function shown(text) {
  return String(text).replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

function legend(sc, label) {
  const canvas = el("canvas", { class: "legend", width: 160, height: 10 });
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < 160; x++) {
    ctx.fillStyle = rgb(ramp(sc.stops, x / 159));
    ctx.fillRect(x, 0, 1, 10);
  }
  const note = sc.clipped ? " (clipped to the 1st–99th percentile)" : sc.mode === "log" ? " (log scale)" : "";
  return el("span", { class: "legend-box" }, el("span", { text: (sc.clipped ? "≤" : "") + fmt(sc.min) }), canvas, el("span", { text: (sc.clipped ? "≥" : "") + fmt(sc.max) }), el("span", { class: "muted", text: " " + label + note }));
}

// A heatmap on one canvas: rows x cols cells, labels drawn on the canvas, a tooltip on hover.
// spec: {rows, cols, value(r, c), rowLabel(r), colLabel(c), tip(r, c, v), selectedRow, onClick(r, c), cellW, cellH, labelW,
//        name, scale (a scaleOf mode), scaleFor(c): a colour scale per column (default: one over all cells)}
function heatmap(spec) {
  const cellW = spec.cellW || Math.max(6, Math.min(28, Math.floor(640 / Math.max(1, spec.cols))));
  const cellH = spec.cellH || Math.max(3, Math.min(18, Math.floor(640 / Math.max(1, spec.rows))));
  const labelW = cellH >= 8 && spec.rowLabel ? spec.labelW || 120 : 0;
  const headH = cellW >= 12 && spec.colLabel ? 14 : 0;
  const canvas = el("canvas", { class: "heatmap", width: labelW + spec.cols * cellW, height: headH + spec.rows * cellH });
  const ctx = canvas.getContext("2d");
  const values = new Float64Array(spec.rows * spec.cols);
  for (let r = 0; r < spec.rows; r++) for (let c = 0; c < spec.cols; c++) {
    const v = spec.value(r, c);
    values[r * spec.cols + c] = isNum(v) ? v : NaN;
  }
  const sc = scaleOf(values, spec.scale);
  let sum = 0, finite = 0;
  ctx.font = Math.min(11, cellH - 1) + "px sans-serif";
  ctx.textBaseline = "middle";
  for (let r = 0; r < spec.rows; r++) {
    if (labelW) {
      ctx.fillStyle = r === spec.selectedRow ? "#b00" : "#333";
      ctx.fillText(shown(spec.rowLabel(r)).slice(0, Math.floor(labelW / 6.5)), 2, headH + r * cellH + cellH / 2, labelW - 4);
    }
    for (let c = 0; c < spec.cols; c++) {
      const v = values[r * spec.cols + c];
      if (Number.isFinite(v)) { sum += v; finite++; }
      ctx.fillStyle = Number.isFinite(v) ? rgb((spec.scaleFor ? spec.scaleFor(c) : sc).color(v)) : "#ddd";
      ctx.fillRect(labelW + c * cellW, headH + r * cellH, cellW, cellH);
    }
  }
  if (headH) {
    ctx.fillStyle = "#333";
    ctx.font = "10px sans-serif";
    ctx.textAlign = "center";
    for (let c = 0; c < spec.cols; c++) ctx.fillText(String(spec.colLabel(c)), labelW + c * cellW + cellW / 2, headH / 2, cellW);
    ctx.textAlign = "start";
  }
  if (spec.selectedRow !== undefined && spec.selectedRow >= 0) {
    ctx.strokeStyle = "#0af";
    ctx.lineWidth = 2;
    ctx.strokeRect(labelW + 1, headH + spec.selectedRow * cellH, spec.cols * cellW - 2, Math.max(2, cellH));
  }
  Object.assign(canvas.dataset, { name: spec.name, rows: spec.rows, cols: spec.cols, cells: spec.rows * spec.cols, finite, sum: sum.toPrecision(8), min: sc.min, max: sc.max, scale: sc.mode, cellH, labelW });
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = (event.clientX - box.left) * (canvas.width / box.width) - labelW;
    const y = (event.clientY - box.top) * (canvas.height / box.height) - headH;
    const r = Math.floor(y / cellH), c = Math.floor(x / cellW);
    return r >= 0 && r < spec.rows && c >= 0 && c < spec.cols ? [r, c] : null;
  };
  canvas.addEventListener("mousemove", (event) => {
    const hit = at(event);
    if (hit) tooltip.show(event, spec.tip(hit[0], hit[1], values[hit[0] * spec.cols + hit[1]]));
    else tooltip.hide();
  });
  canvas.addEventListener("mouseleave", () => tooltip.hide());
  if (spec.onClick) canvas.addEventListener("click", (event) => { const hit = at(event); if (hit) spec.onClick(hit[0], hit[1]); });
  return { canvas, scale: sc };
}

const tooltip = (() => {
  const box = el("div", { id: "tooltip", hidden: true });
  document.body.append(box);
  return {
    show(event, text) {
      box.textContent = text;
      box.hidden = false;
      box.style.left = Math.min(window.innerWidth - 320, event.clientX + 14) + "px";
      box.style.top = event.clientY + 14 + "px";
    },
    hide() { box.hidden = true; },
  };
})();

function select(id, options, value, onChange) {
  const node = el("select", { id });
  for (const [key, label] of options) node.append(el("option", { value: key, text: label }));
  node.value = value;
  node.addEventListener("change", () => onChange(node.value));
  return node;
}

function readHash() {
  const out = {};
  for (const [key, value] of new URLSearchParams(location.hash.slice(1))) out[key] = value;
  return out;
}

function writeHash(state) {
  try {
    history.replaceState(null, "", "#" + new URLSearchParams(state).toString());
  } catch (err) {
    // file:// pages may refuse; the view still works, it just is not kept in the address.
  }
}

function attrTable(rows, header) {
  const table = el("table", { class: "attrs" });
  if (header) table.append(el("tr", {}, ...header.map((h) => el("th", { text: h }))));
  for (const row of rows) table.append(el("tr", {}, el("th", { text: row[0] }), ...row.slice(1).map((v) => el("td", {}, el("div", { class: "value", text: v })))));
  return table;
}

// Mark the page as rendered: data-status "ok" unless an error was recorded, and how long it took (ms).
function finish() {
  document.body.dataset.scriptMs = String(Math.round(performance.now() - SCRIPT_START));
  document.body.dataset.loadMs = String(Math.round(performance.now()));
  if (document.body.getAttribute("data-status") !== "error") document.body.setAttribute("data-status", "ok");
  document.getElementById("status").textContent = document.body.getAttribute("data-status");
}

// Run render() and record how long it took in data-render-ms.
function timed(render) {
  return () => {
    const start = performance.now();
    render();
    document.body.dataset.renderMs = String(Math.round(performance.now() - start));
  };
}
