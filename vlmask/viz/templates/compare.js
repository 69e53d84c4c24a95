// Two results side by side, token by token: impact in A, in B, and A − B.
(function () {
  const D = DATA, R = D.rows, N = R.text.length, STEPS = Math.min(D.steps.a.length, D.steps.b.length);
  const [A, B] = D.names;
  const state = { metric: D.metrics[0], step: 0 };
  function fromHash() {
    const h = readHash();
    if (D.metrics.includes(h.metric)) state.metric = h.metric;
    const step = parseInt(h.step, 10);
    if (step >= 0 && step < STEPS) state.step = step;
  }
  function set(patch) {
    Object.assign(state, patch);
    writeHash(state);
    render();
  }
  const get = (part, r) => D.values[state.metric][part][state.step * N + r];

  const app = document.getElementById("app");
  app.replaceChildren();
  const side = (s, name) => el("tr", {}, el("th", { text: name }), el("td", {}, el("q", { class: "prompt-" + s, text: D.sides[s].prompt })),
    el("td", {}, el("q", { text: D.sides[s].clean_continuation })), el("td", { text: D.sides[s].image_files }), el("td", {}, el("code", { text: D.sides[s].model })));
  const sides = el("table", { class: "attrs" }, el("tr", {}, ...["", "prompt", "clean continuation", "images", "model"].map((h) => el("th", { text: h }))), side("a", A), side("b", B));
  const controls = el("div", { class: "controls" },
    el("label", { for: "metric", text: "metric " }), select("metric", D.metrics.map((m) => [m, m.startsWith("residual:") ? m + " (final layer)" : m]), state.metric, (metric) => set({ metric })),
    el("label", { for: "step", text: " step " }),
    select("step", Array.from({ length: STEPS }, (_, s) => [String(s), s + ": " + JSON.stringify(D.steps.a[s]) + " / " + JSON.stringify(D.steps.b[s])]), "0", (s) => set({ step: parseInt(s, 10) })));
  const same = D.steps.a.slice(0, STEPS).every((t, s) => t === D.steps.b[s]);
  const warn = same ? null : el("p", { class: "note", text: "The clean continuations differ, so at a step the two results may measure different next tokens." });
  const mapBox = el("div", { class: "scroll" });
  const legends = el("div", { class: "legend-row" });
  const tableBox = el("div", { class: "scroll" });
  const unmatched = (s, name) => el("p", { class: "muted", text: name + ": " + (D.unmatched[s].length ? D.unmatched[s].map(([p, t]) => p + " " + JSON.stringify(t)).join(", ") : "none") });
  app.append(el("header", {}, el("h1", { text: "vlmask compare" }), sides), controls, warn,
    section(N + " aligned tokens (by text and order): " + A + ", " + B + ", " + A + " − " + B, legends, el("div", { class: "row" }, mapBox, tableBox)),
    section("Masked tokens with no partner", unmatched("a", A), unmatched("b", B)),
    section("Provenance", attrTable(D.attrs)));

  const render = timed(() => {
    document.getElementById("metric").value = state.metric;
    document.getElementById("step").value = String(state.step);
    const parts = ["a", "b", "diff"];
    const both = scaleOf([...Array(N).keys()].flatMap((r) => [get("a", r), get("b", r)]));
    const diff = scaleOf([...Array(N).keys()].map((r) => get("diff", r)));
    const map = heatmap({
      name: "compare", rows: N, cols: 3, cellW: 56, scaleFor: (c) => (c === 2 ? diff : both),
      value: (r, c) => get(parts[c], r), rowLabel: (r) => R.text[r], colLabel: (c) => [A, B, A + "−" + B][c],
      tip: (r, c) => JSON.stringify(R.text[r]) + " · " + A + " position " + R.pos_a[r] + ", " + B + " position " + R.pos_b[r] + "\n" + state.metric + ": " + A + " " + fmt(get("a", r)) + ", " + B + " " + fmt(get("b", r)) + ", difference " + fmt(get("diff", r)),
    });
    map.canvas.id = "compare-map";
    map.canvas.dataset.metric = state.metric;
    mapBox.replaceChildren(map.canvas);
    legends.replaceChildren(legend(both, state.metric + " in " + A + " and " + B), legend(diff, A + " − " + B));
    const table = el("table", { class: "conts", id: "compare-table" }, el("tr", {}, ...["token", A + " position", B + " position", state.metric + " " + A, state.metric + " " + B, A + " − " + B].map((h) => el("th", { text: h }))));
    for (let r = 0; r < N; r++) {
      const cell = (v, sc) => {
        const td = el("td", { class: "num", text: fmt(v) });
        if (isNum(v)) { const c = sc.color(v); td.style.background = rgb(c); td.style.color = ink(c); }
        return td;
      };
      table.append(el("tr", {}, el("td", {}, el("code", { text: shown(R.text[r]) })), el("td", { text: String(R.pos_a[r]) }), el("td", { text: String(R.pos_b[r]) }),
        cell(get("a", r), both), cell(get("b", r), both), cell(get("diff", r), diff)));
    }
    tableBox.replaceChildren(table);
  });

  fromHash();
  render();
  window.addEventListener("hashchange", () => { fromHash(); render(); });
  finish();
})();
