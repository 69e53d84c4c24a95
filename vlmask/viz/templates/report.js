// The report of one result: token strip, token x layer heatmap, layer x head heatmap, images, continuations.
(function () {
  const D = DATA, U = D.units, S = D.seq, V = D.values;
  const T = U.pos.length, L = D.layers, H = D.heads, M = D.metrics.length, STEPS = D.steps.token.length;
  const METRICS = [...D.metrics.map((m) => "residual:" + m), ...D.logit_metrics];
  const unitOfSeq = new Int32Array(S.text.length).fill(-1);
  U.members.forEach((members, u) => members.forEach((p) => { if (p < unitOfSeq.length) unitOfSeq[p] = u; }));
  const unitOfPos = new Map(U.pos.map((p, u) => [p, u]));
  const MAX_CANVAS = 30000;  // pixels: the token x layer map grows to this height, then its rows shrink
  const LONG_PROMPT = 400, PROMPT_START = 240, LONG_STRIP = 300;  // characters, characters, tokens
  // the clean attention beside the knockouts (null when the sweep did not read it)
  const A = D.attention;
  const MAPS = A ? ["knockout", ...A.sources] : ["knockout"];
  const MAP_LABELS = { knockout: "knockout effect", attention: "attention", attention_norm: "value-weighted attention" };
  const mass = (map, s, u, l) => A.mass[map][(s * T + u) * L + l];

  const residual = (s, u, l, m) => V.residual[((s * T + u) * L + l) * M + m];
  const headValue = (s, u, l, h, m) => V.heads[(((s * T + u) * L + l) * H + h) * M + m];
  const isResidual = (metric) => metric.startsWith("residual:");
  // value of `metric` for unit u at step s and layer l (logit metrics ignore the layer)
  function value(metric, s, u, l) {
    if (isResidual(metric)) return residual(s, u, l, D.metrics.indexOf(metric.slice(9)));
    return V[metric][s * T + u];
  }

  const state = { metric: METRICS[0], step: 0, layer: L - 1, token: T ? U.pos[0] : -1, head: D.metrics[0], scale: SCALES[0][0], map: "knockout" };
  function fromHash() {
    const h = readHash();
    if (METRICS.includes(h.metric)) state.metric = h.metric;
    if (MAPS.includes(h.map)) state.map = h.map;
    if (D.metrics.includes(h.head)) state.head = h.head;
    if (SCALES.some(([key]) => key === h.scale)) state.scale = h.scale;
    const step = parseInt(h.step, 10), layer = parseInt(h.layer, 10), token = parseInt(h.token, 10);
    if (step >= 0 && step < STEPS) state.step = step;
    if (layer >= 0 && layer < L) state.layer = layer;
    if (unitOfPos.has(token)) state.token = token;
  }
  function set(patch) {
    Object.assign(state, patch);
    writeHash(state);
    render();
  }

  // ---- the page skeleton, built once -------------------------------------------------------
  const app = document.getElementById("app");
  app.replaceChildren();
  const metricLabel = (m) => (isResidual(m) ? m + " (token × layer)" : m + " (final output)");
  const controls = el("div", { class: "controls" },
    el("label", { for: "metric", text: "metric " }),
    select("metric", METRICS.map((m) => [m, metricLabel(m)]), state.metric, (metric) => set({ metric })),
    el("label", { for: "step", text: " step " }),
    select("step", D.steps.token.map((t, s) => [String(s), s + ": next token " + JSON.stringify(t)]), "0", (s) => set({ step: parseInt(s, 10) })),
    el("label", { for: "layer", text: " layer for the strip and images " }),
    select("layer", Array.from({ length: L }, (_, l) => [String(l), String(l)]), String(L - 1), (l) => set({ layer: parseInt(l, 10) })),
    el("label", { for: "head", text: " head metric " }),
    select("head", D.metrics.map((m) => [m, m]), state.head, (head) => set({ head })),
    el("label", { for: "scale", text: " colour scale " }),
    select("scale", SCALES, state.scale, (scale) => set({ scale })),
    A ? el("span", { id: "map-toggle", class: "toggle" }, el("span", { class: "muted", text: " strip and images show " }),
      ...MAPS.map((m) => { const b = el("button", { type: "button", "data-map": m, text: MAP_LABELS[m] }); b.addEventListener("click", () => set({ map: m })); return b; })) : null);
  const stripLegend = el("div", { class: "legend-row" });
  const strip = el("div", { id: "strip", class: "strip" + (S.text.length > LONG_STRIP ? " long" : "") });
  const stripSpans = S.text.map((text, p) => {
    const u = unitOfSeq[p];
    const vision = S.kind[p] === "vision";
    const span = el("span", { class: "tok " + S.kind[p] + (u >= 0 ? " masked" : ""), "data-pos": p, text: vision ? "" : shown(text) });
    if (u >= 0) span.addEventListener("click", () => set({ token: U.pos[u] }));
    strip.append(span);
    return span;
  });
  const mainBox = el("div", { class: "scroll tall" });
  const mainLegend = el("div", { class: "legend-row" });
  const detail = el("div", { id: "detail" });
  const imagesBox = el("div", { id: "images", class: "panels" });
  const contBox = el("div", { id: "continuations" });
  const agreeBox = el("div", { id: "agreement" });
  const meta = el("p", { class: "meta" },
    el("span", { text: "model " }), el("code", { text: D.model }),
    el("span", { text: " · " + S.text.length + " tokens, " + T + " masked units, " + L + " layers × " + H + " heads, " + STEPS + " step(s)" }));
  app.append(
    el("header", {}, el("h1", { text: "vlmask report" }), promptView(D.prompt), meta,
      el("p", {}, el("span", { class: "muted", text: D.continuation_label + " " }), el("q", { id: "clean", text: D.clean_continuation }))),
    controls,
    section("Prompt tokens, coloured by the impact of blocking them", stripLegend, strip,
      el("p", { class: "muted", text: "Outlined tokens were masked; click one to inspect it. Vision tokens are the small squares. Hover for values." })),
    section("Masked tokens × layers", mainLegend, mainBox),
    section("Selected token", detail),
    ...(D.panels.length ? [section("Images: masked cells", imagesBox)] : []),
    ...(A ? [section("Attention vs knockout: agreement over the masked units, per layer", agreeBox)] : []),
    section("Continuations", contBox),
    section("Provenance", attrTable(D.attrs)));

  // A long prompt is collapsed to its start; the whole text is one click away (and always in #prompt).
  function promptView(prompt) {
    const whole = el("q", { id: "prompt", text: prompt });
    if (prompt.length <= LONG_PROMPT) return el("p", { class: "prompt" }, el("span", { class: "muted", text: "prompt " }), whole);
    return el("details", { class: "prompt", id: "prompt-box" },
      el("summary", {}, el("span", { class: "muted", text: "prompt (" + prompt.length + " characters, click for all) " }),
        el("q", { id: "prompt-start", text: prompt.slice(0, PROMPT_START) + "…" })),
      whole);
  }

  function tipFor(u, s) {
    const lines = ["position " + U.pos[u] + " · " + U.kind[u] + " · " + JSON.stringify(U.text[u])];
    if (U.members[u].length > 1) lines.push("members " + U.members[u].join(","));
    for (const m of D.logit_metrics) lines.push(m + " " + fmt(V[m][s * T + u]));
    for (const m of D.metrics) lines.push("residual " + m + " @ layer " + state.layer + " " + fmt(value("residual:" + m, s, u, state.layer)));
    return lines.join("\n");
  }

  // ---- rendering, on every change -----------------------------------------------------------
  const render = timed(() => {
    const s = state.step, sel = unitOfPos.has(state.token) ? unitOfPos.get(state.token) : -1;
    for (const [id, v] of [["metric", state.metric], ["step", String(s)], ["layer", String(state.layer)], ["head", state.head], ["scale", state.scale]]) document.getElementById(id).value = v;
    const attention = state.map !== "knockout";
    document.getElementById("layer").disabled = !isResidual(state.metric) && !attention;
    for (const b of document.querySelectorAll("#map-toggle button")) b.classList.toggle("on", b.dataset.map === state.map);
    const unitValues = U.pos.map((_, u) => (attention ? mass(state.map, s, u, state.layer) : value(state.metric, s, u, state.layer)));
    const sc = scaleOf(unitValues, state.scale);
    const where = isResidual(state.metric) || attention ? " at layer " + state.layer : "";
    const shownName = attention ? MAP_LABELS[state.map] + " (clean, mean over heads)" : state.metric;
    stripLegend.replaceChildren(legend(sc, shownName + where + ", step " + s));
    stripSpans.forEach((span, p) => {
      const u = unitOfSeq[p];
      const lines = ["position " + p + " · " + S.kind[p] + " · " + JSON.stringify(S.text[p])];
      if (S.kind[p] === "vision") lines.push((S.image[p] >= 0 ? "image " + S.image[p] : "video " + S.video[p] + " group " + S.t[p]) + " row " + S.row[p] + " col " + S.col[p]);
      if (u >= 0) {
        const c = sc.color(unitValues[u]);
        span.style.background = isNum(unitValues[u]) ? rgb(c) : "";
        span.style.color = isNum(unitValues[u]) ? ink(c) : "";
        lines.push(tipFor(u, s));
      }
      span.classList.toggle("selected", u >= 0 && u === sel);
      span.title = lines.join("\n");
    });
    const residualView = isResidual(state.metric);
    const main = heatmap({
      name: "token-layer", rows: T, cols: residualView ? L : 1,
      value: (r, c) => value(state.metric, s, r, c),
      rowLabel: (r) => U.pos[r] + " " + U.text[r], colLabel: (c) => (residualView ? c : "out"),
      tip: (r, c, v) => (residualView ? "layer " + c + " · " : "") + state.metric + " " + fmt(v) + "\n" + tipFor(r, s),
      selectedRow: sel, onClick: (r, c) => set(residualView ? { token: U.pos[r], layer: c } : { token: U.pos[r] }),
      cellW: residualView ? Math.max(12, Math.min(64, Math.floor(900 / L))) : 64, labelW: 180, scale: state.scale,
      cellH: Math.max(1, Math.min(18, Math.max(12, Math.floor(640 / T)), Math.floor(MAX_CANVAS / T))),
    });
    main.canvas.id = "heatmap";
    main.canvas.dataset.metric = state.metric;
    main.canvas.dataset.step = String(s);
    mainBox.replaceChildren(main.canvas);
    mainLegend.replaceChildren(legend(main.scale, state.metric + ", step " + s + (residualView ? ", columns are layers 0–" + (L - 1) : ", final output")));
    renderDetail(sel, s);
    renderImages(unitValues, sc, sel);
    renderContinuations(unitValues, sel);
    if (A) renderAgreement(s);
  });

  // Spearman of each attention with the knockout effect, per layer: a small chart and its table
  function renderAgreement(s) {
    const E = A.effects.includes(state.metric) ? state.metric : A.effects[0];
    const e = A.effects.indexOf(E), NS = A.sources.length, NE = A.effects.length, NK = A.k.length;
    const rho = (l, src) => A.spearman[((s * L + l) * NS + src) * NE + e];
    const top = (l, src, k) => A.top_k[(((s * L + l) * NS + src) * NE + e) * NK + k];
    const width = Math.max(240, 40 * L), height = 160, pad = 24;
    const chart = el("canvas", { id: "agreement-chart", width, height });
    const ctx = chart.getContext("2d");
    const x = (l) => pad + (L > 1 ? (l * (width - 2 * pad)) / (L - 1) : (width - 2 * pad) / 2), y = (v) => pad + ((1 - v) * (height - 2 * pad)) / 2;
    ctx.strokeStyle = "#ccc";
    ctx.fillStyle = "#555";
    ctx.font = "10px sans-serif";
    for (const v of [-1, 0, 1]) { ctx.beginPath(); ctx.moveTo(pad, y(v)); ctx.lineTo(width - pad, y(v)); ctx.stroke(); ctx.fillText(String(v), 2, y(v) + 3); }
    const colors = ["#d62728", "#1f77b4"];
    let sum = 0;
    A.sources.forEach((_, src) => {
      ctx.strokeStyle = ctx.fillStyle = colors[src % 2];
      ctx.lineWidth = 2;
      ctx.beginPath();
      for (let l = 0; l < L; l++) {
        const v = rho(l, src);
        if (!isNum(v)) continue;
        sum += v;
        ctx.lineTo(x(l), y(v));
        ctx.fillRect(x(l) - 2, y(v) - 2, 4, 4);
      }
      ctx.stroke();
    });
    chart.dataset.effect = E;
    chart.dataset.sum = sum.toPrecision(6);
    const table = el("table", { class: "values" }, el("tr", {}, ...["layer", ...A.sources.map((n) => "Spearman " + MAP_LABELS[n]), ...A.k.map((k) => "top-" + k + " overlap (attention)")].map((h) => el("th", { text: h }))));
    for (let l = 0; l < L; l++) table.append(el("tr", {}, el("td", { text: String(l) }), ...A.sources.map((_, src) => el("td", { class: "num", text: fmt(rho(l, src)) })), ...A.k.map((_, k) => el("td", { class: "num", text: fmt(top(l, 0, k)) }))));
    table.append(el("tr", {}, el("td", { text: "all layers" }), ...A.sources.map((_, src) => el("td", { class: "num", text: fmt(A.spearman_all[(s * NS + src) * NE + e]) }))));
    const key = el("p", { class: "muted" }, ...A.sources.map((n, src) => el("span", { text: "■ " + MAP_LABELS[n] + "  " })));
    key.querySelectorAll("span").forEach((span, src) => { span.style.color = colors[src % 2]; });
    agreeBox.replaceChildren(el("p", { class: "muted", text: "Spearman rank correlation, over the masked units, of the clean attention mass at each layer (mean over heads) with the knockout effect " + E + " at step " + s + " (x: layers 0–" + (L - 1) + ", y: −1 to 1)." }), key, chart, table);
  }

  function renderDetail(u, s) {
    if (u < 0) { detail.replaceChildren(el("p", { class: "muted", text: "Click a masked token to see its heads." })); return; }
    const m = D.metrics.indexOf(state.head);
    const heads = heatmap({
      name: "layer-head", rows: L, cols: H, cellW: Math.max(12, Math.min(36, Math.floor(480 / H))), cellH: Math.max(8, Math.min(22, Math.floor(420 / L))),
      value: (l, h) => headValue(s, u, l, h, m), rowLabel: (l) => "layer " + l, colLabel: (h) => h,
      tip: (l, h, v) => "layer " + l + " · head " + h + " · " + state.head + " " + fmt(v), selectedRow: -1, scale: state.scale,
    });
    heads.canvas.id = "heads";
    heads.canvas.dataset.token = String(U.pos[u]);
    const values = el("table", { class: "values" });
    for (const name of D.logit_metrics) values.append(el("tr", {}, el("th", { text: name }), el("td", { text: fmt(V[name][s * T + u]) })));
    detail.replaceChildren(
      el("p", {}, el("span", { class: "muted", text: "position " + U.pos[u] + " · " + U.kind[u] + " · " }), el("code", { id: "detail-text", text: U.text[u] }),
        U.members[u].length > 1 ? el("span", { class: "muted", text: " · members " + U.members[u].join(",") }) : null),
      el("div", { class: "row" },
        el("div", {}, el("h3", { text: "each head's output change (" + state.head + "), layers × heads, step " + s }), legend(heads.scale, state.head), el("div", {}, heads.canvas)),
        el("div", {}, el("h3", { text: "final output, step " + s }), values,
          el("p", {}, el("span", { class: "muted", text: "masked continuation " }), el("q", { text: U.continuation[u] })),
          el("p", {}, el("span", { class: "muted", text: D.continuation_label + " " }), el("q", { text: D.clean_continuation })))));
  }

  function renderImages(unitValues, sc, sel) {
    if (!D.panels.length) return;
    imagesBox.replaceChildren();
    D.panels.forEach((panel, i) => {
      const cellSeq = new Map();
      S.kind.forEach((kind, p) => {
        if (kind !== "vision") return;
        const mine = panel.source === "image" ? S.image[p] === panel.index : S.video[p] === panel.index && S.t[p] === panel.t;
        if (mine) cellSeq.set(S.row[p] * panel.cols + S.col[p], p);
      });
      const width = 360, height = Math.round(360 * panel.rows / panel.cols);
      const box = el("div", { class: "panel" });
      const stage = el("div", { class: "stage" });
      stage.style.width = width + "px";
      stage.style.height = height + "px";
      if (panel.src) {
        const img = el("img", { alt: panel.label, width, height });
        img.src = panel.src;
        stage.append(img);
      }
      const overlay = el("canvas", { class: "overlay", width, height, "data-panel": i });
      const ctx = overlay.getContext("2d");
      const cw = width / panel.cols, ch = height / panel.rows;
      let drawn = 0;
      const chosen = [];
      for (const [cell, p] of cellSeq) {
        const r = Math.floor(cell / panel.cols), c = cell % panel.cols, u = unitOfSeq[p];
        if (u === sel) chosen.push([r, c]);
        if (u < 0 || !isNum(unitValues[u])) continue;
        const color = sc.color(unitValues[u]);
        ctx.fillStyle = "rgba(" + color.join(",") + ",0.6)";
        ctx.fillRect(c * cw, r * ch, cw, ch);
        drawn++;
      }
      ctx.strokeStyle = panel.src ? "rgba(255,255,255,0.35)" : "#bbb";
      ctx.lineWidth = 1;
      for (let r = 0; r <= panel.rows; r++) { ctx.beginPath(); ctx.moveTo(0, r * ch); ctx.lineTo(width, r * ch); ctx.stroke(); }
      for (let c = 0; c <= panel.cols; c++) { ctx.beginPath(); ctx.moveTo(c * cw, 0); ctx.lineTo(c * cw, height); ctx.stroke(); }
      ctx.strokeStyle = "#0af";
      ctx.lineWidth = 3;
      for (const [r, c] of chosen) ctx.strokeRect(c * cw + 1.5, r * ch + 1.5, cw - 3, ch - 3);
      overlay.dataset.cells = String(drawn);
      overlay.dataset.map = state.map;
      const hit = (event) => {
        const b = overlay.getBoundingClientRect();
        const r = Math.floor((event.clientY - b.top) / (b.height / panel.rows)), c = Math.floor((event.clientX - b.left) / (b.width / panel.cols));
        const p = cellSeq.get(r * panel.cols + c);
        return p === undefined ? -1 : p;
      };
      overlay.addEventListener("mousemove", (event) => {
        const p = hit(event);
        if (p < 0) { tooltip.hide(); return; }
        const u = unitOfSeq[p];
        tooltip.show(event, "position " + p + " · row " + S.row[p] + " col " + S.col[p] + (u >= 0 ? "\n" + tipFor(u, state.step) : "\nnot masked"));
      });
      overlay.addEventListener("mouseleave", () => tooltip.hide());
      overlay.addEventListener("click", (event) => { const p = hit(event); if (p >= 0 && unitOfSeq[p] >= 0) set({ token: U.pos[unitOfSeq[p]] }); });
      stage.append(overlay);
      box.append(el("h3", { text: panel.label + " (" + panel.rows + "×" + panel.cols + " cells)" }), stage);
      if (panel.note) box.append(el("p", { class: "note", text: panel.note }));
      imagesBox.append(box);
    });
  }

  function renderContinuations(unitValues, sel) {
    const chips = el("p", { id: "clean-steps" }, el("span", { class: "muted", text: D.continuation_label + ", step by step: " }));
    D.steps.token.forEach((t, s) => chips.append(el("span", { class: "chip" + (s === state.step ? " on" : ""), text: s + ": " + shown(t) })));
    const order = U.pos.map((_, u) => u).sort((a, b) => (isNum(unitValues[b]) ? unitValues[b] : -Infinity) - (isNum(unitValues[a]) ? unitValues[a] : -Infinity));
    const table = el("table", { class: "conts" }, el("tr", {}, ...["position", "token", "kind", state.metric, "masked continuation", "first changed step"].map((h) => el("th", { text: h }))));
    for (const u of order) {
      const first = U.changed[u].indexOf(true);
      const row = el("tr", { class: (u === sel ? "selected" : "") + (first >= 0 ? " differs" : "") },
        el("td", { text: String(U.pos[u]) }), el("td", {}, el("code", { text: shown(U.text[u]) })), el("td", { text: U.kind[u] }),
        el("td", { class: "num", text: fmt(unitValues[u]) }), el("td", {}, el("q", { text: U.continuation[u] })),
        el("td", { text: first >= 0 ? String(first) : "same as clean" }));
      row.addEventListener("click", () => set({ token: U.pos[u] }));
      table.append(row);
    }
    contBox.replaceChildren(chips, el("div", { class: "scroll" }, table));
  }

  fromHash();
  render();
  window.addEventListener("hashchange", () => { fromHash(); render(); });
  finish();
})();
