// fnattr report: draws the JSON of the element #fnattr-data (written by fnattr/report).
// Every token and caption is set with textContent or an attribute, never parsed as markup.
"use strict";
(function () {
  // ColorBrewer RdBu, as fnattr/report/build.py STOPS: blue (negative), white, red (positive).
  const STOPS = [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247],
    [253, 219, 199], [239, 138, 98], [178, 24, 43]];
  const SVG = "http://www.w3.org/2000/svg";
  const DASH = ["", "6 3", "2 3", "8 3 2 3", "1 2"];
  const LINE = ["#1b4f8a", "#b2182b", "#4d4d4d", "#5e3c99", "#8c510a"];
  const data = JSON.parse(document.getElementById("fnattr-data").textContent);
  const app = document.getElementById("app");
  const cache = new Map();
  const state = { example: null, step: 0, preview: null, panels: [] };

  function num(v) {
    if (typeof v === "string") return Number(v); // "NaN", "Infinity", "-Infinity"
    return v;
  }
  function colour(v, vmax, signed) {
    let x = vmax > 0 ? Math.max(-1, Math.min(1, v / vmax)) : 0;
    if (!signed) x = Math.max(x, 0);
    const t = (x + 1) / 2 * (STOPS.length - 1);
    const i = Math.min(Math.floor(t), STOPS.length - 2);
    const f = t - i;
    return STOPS[i].map((a, c) => Math.round(a * (1 - f) + STOPS[i + 1][c] * f));
  }
  function lum(rgb) {
    const ch = rgb.map((c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); });
    return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2];
  }
  function ink(rgb) {
    const l = lum(rgb);
    return (l + 0.05) / 0.05 >= 1.05 / (l + 0.05) ? "#000000" : "#ffffff";
  }
  function fmt(v, digits) {
    v = num(v);
    if (v === null || v === undefined) return "";
    if (!isFinite(v)) return String(v);
    return Number(v.toPrecision(digits || 4)).toString();
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  async function inflate(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return JSON.parse(await new Response(stream).text());
  }
  async function detail(i) {
    if (!cache.has(i)) cache.set(i, await inflate(data.details[i]));
    return cache.get(i);
  }

  // ---- legend and caption -------------------------------------------------------------------
  function legend(p) {
    const box = el("div", { class: "legend" });
    const vmax = num(p.vmax);
    box.append(el("span", {}, p.signed ? fmt(-vmax, 3) : "0"));
    const bar = el("span", { class: "bar", role: "img",
      "aria-label": "colour scale: blue negative, white zero, red positive" });
    const stops = (p.signed ? STOPS : STOPS.slice(3)).map((c) => `rgb(${c.join(",")})`);
    bar.style.background = `linear-gradient(to right,${stops.join(",")})`;
    box.append(bar, el("span", {}, fmt(vmax, 3)),
      el("span", { class: "muted" }, p.signed ? "score (blue negative, red positive)" : "score"));
    return box;
  }
  function caption(p) {
    const box = el("div", { class: "caption" });
    for (const line of p.notes) {
      box.append(el("p", { class: line.includes(p.flag) ? "note flagged" : "note" }, line));
    }
    return box;
  }

  // ---- the running text of one panel ----------------------------------------------------------
  function stepLabel(p, k) {
    return (p.flagged.includes(k) ? p.flag + " " : "") + p.cols[k];
  }
  function drawText(p, pi) {
    const box = el("div", { class: "text" });
    const src = el("p", { class: "src" });
    src.append(el("span", { class: "lbl" }, "prompt"));
    const cells = { rows: [], gens: [] };
    for (const [text, row, nl] of p.source) {
      const s = el("span", { class: "tok", "data-row": String(row) }, text);
      cells.rows[row] = s;
      src.append(s);
      if (nl) src.append(el("br"));
    }
    const gen = el("p", { class: "gen" });
    gen.append(el("span", { class: "lbl" }, "generated"));
    for (const [text, row, col, nl] of p.gen) {
      let s;
      if (col >= 0) {
        s = el("button", { type: "button", class: "tok step", "data-col": String(col),
          "aria-pressed": "false" }, text);
        if (p.flagged.includes(col)) s.classList.add("flagged");
        s.addEventListener("mouseenter", () => preview(col));
        s.addEventListener("mouseleave", () => preview(null));
        s.addEventListener("focus", () => select(col));
        s.addEventListener("click", () => select(col));
        cells.gens[col] = s;
      } else {
        s = el("span", { class: "tok forced" }, text);
      }
      if (row >= 0) { s.dataset.row = String(row); cells.rows[row] = s; }
      gen.append(s);
      if (nl) gen.append(el("br"));
    }
    box.append(src, gen);
    return [box, cells];
  }

  function paint(view) {
    const k = state.preview === null ? state.step : state.preview;
    const p = view.p;
    const col = p.values[k] || [];
    const vmax = num(p.vmax);
    view.cells.rows.forEach((s, i) => {
      if (!s) return;
      const v = col[i];
      s.classList.remove("nan", "unseen");
      if (v === null || v === undefined) {
        s.style.background = ""; s.style.color = "";
        s.classList.add("unseen");
        s.title = `${p.rows[i]}: not seen by step ${k + 1}`;
      } else if (Number.isNaN(num(v))) {
        s.style.background = ""; s.style.color = "";
        s.classList.add("nan");
        s.title = `${p.rows[i]} -> ${p.cols[k]}: NaN (the method gave no score)`;
      } else {
        const rgb = colour(num(v), vmax, p.signed);
        s.style.background = `rgb(${rgb.join(",")})`;
        s.style.color = ink(rgb);
        s.title = `${p.rows[i]} -> ${p.cols[k]}: ${fmt(v, 6)}`;
      }
      s.dataset.score = v === null || v === undefined ? "" : String(v);
    });
    view.cells.gens.forEach((b, c) => {
      if (!b) return;
      b.classList.toggle("current", c === k);
      b.setAttribute("aria-pressed", c === state.step ? "true" : "false");
      if (!b.dataset.row) { b.style.background = ""; b.style.color = ""; }
      const sc = p.score ? p.scores[p.score][c] : null;
      if (!b.dataset.row) b.title = `step ${c + 1}: ${stepLabel(p, c)}` + (p.score ? `; ${p.score} ${fmt(sc, 6)}` : "");
    });
    const sc = p.score ? `; ${p.score} ${fmt(p.scores[p.score][k], 4)}` : "";
    const delta = p.scores.delta ? `; delta ${fmt(p.scores.delta[k], 3)}` : "";
    view.status.textContent = p.cols.length ? `generated token ${k + 1} of ${p.cols.length} ` +
      `(step ${p.pos[k]}): ${stepLabel(p, k)}${sc}${delta}` : "no generated step";
    if (view.plot) view.plot.mark(k);
    if (view.table) view.table.mark(k);
  }
  function repaint() { state.panels.forEach(paint); }
  function preview(k) { state.preview = k; repaint(); }
  function select(k) {
    const n = Math.max(0, ...state.panels.map((v) => v.p.cols.length));
    if (!n) return;
    state.step = Math.max(0, Math.min(n - 1, k));
    state.preview = null;
    repaint();
  }

  // ---- the per-step plot ----------------------------------------------------------------------
  function linePlot(series, opts) {
    // series: [{name, values, dash, colour}], x positions 0..n-1 or opts.xs
    const W = opts.width || 340, H = opts.height || 160, L = 44, R = 12, T = 10, B = 32;
    const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": opts.label, class: "plot" });
    const all = series.flatMap((x) => x.values.map(num)).filter((v) => isFinite(v));
    let lo = Math.min(0, ...all), hi = Math.max(opts.ymax || 0, ...all);
    if (hi <= lo) hi = lo + 1;
    const n = Math.max(...series.map((x) => x.values.length), 1);
    const xs = opts.xs || [...Array(n).keys()].map((i) => (n === 1 ? 0.5 : i / (n - 1)));
    const X = (i) => L + 10 + xs[i] * (W - L - R - 20);
    const Y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    s.append(svg("line", { x1: L, y1: Y(lo), x2: W - R, y2: Y(lo), stroke: "#595959" }));
    s.append(svg("line", { x1: L, y1: T, x2: L, y2: Y(lo), stroke: "#595959" }));
    for (const v of [lo, hi]) {
      const t = svg("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end", class: "axis" });
      t.textContent = fmt(v, 2); s.append(t);
    }
    if (opts.ticks && opts.ticks.length <= 40) opts.ticks.forEach((tick, i) => {
      const short = tick.length > 7 ? tick.slice(0, 6) + "\u2026" : tick;
      const t = svg("text", { x: X(i), y: Y(lo) + 12, "text-anchor": "middle", class: "tick" });
      t.textContent = short; s.append(t);
    });
    const xl = svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis" });
    xl.textContent = opts.xlabel; s.append(xl);
    series.forEach((ser, j) => {
      const pts = ser.values.map((v, i) => [X(i), Y(num(v))]).filter((p) => isFinite(p[1]));
      s.append(svg("polyline", { points: pts.map((p) => p.join(",")).join(" "), fill: "none",
        stroke: ser.colour || LINE[j % LINE.length], "stroke-width": 2,
        "stroke-dasharray": ser.dash || "" }));
      if (opts.dots) pts.forEach((p, i) => {
        const c = svg("circle", { cx: p[0], cy: p[1], r: 3, fill: ser.colour || LINE[j % LINE.length] });
        const tt = svg("title", {}); tt.textContent = `${ser.name} ${i + 1}: ${fmt(ser.values[i], 4)}`;
        c.append(tt); s.append(c);
      });
    });
    const cursor = svg("line", { x1: 0, x2: 0, y1: T, y2: Y(lo), stroke: "#000", "stroke-dasharray": "2 2",
      visibility: "hidden" });
    s.append(cursor);
    s.mark = (k) => {
      if (k === null || k >= xs.length) { cursor.setAttribute("visibility", "hidden"); return; }
      cursor.setAttribute("x1", X(k)); cursor.setAttribute("x2", X(k));
      cursor.setAttribute("visibility", "visible");
    };
    return s;
  }
  function plotLegend(series) {
    const ul = el("ul", { class: "keys" });
    series.forEach((ser, j) => {
      const li = el("li");
      const sw = svg("svg", { width: 28, height: 10, "aria-hidden": "true" });
      sw.append(svg("line", { x1: 0, y1: 5, x2: 28, y2: 5, stroke: ser.colour || LINE[j % LINE.length],
        "stroke-width": 2, "stroke-dasharray": ser.dash || "" }));
      li.append(sw, document.createTextNode(" " + ser.name));
      ul.append(li);
    });
    return ul;
  }

  // ---- the heatmap table ----------------------------------------------------------------------
  function heatTable(p, id) {
    const scale = Math.pow(10, p.exp || 0);
    const wrap = el("div", { class: "heat", id, tabindex: "0", role: "region",
      "aria-label": `heatmap of ${p.name}` });
    const t = el("table", {});
    t.append(el("caption", {}, `${p.title}: rows are the attributed tokens, columns the steps` +
      (p.exp ? `; cell values x 1e${p.exp}` : "")));
    const head = el("tr");
    head.append(el("th", { scope: "col" }, "token"));
    const ths = p.cols.map((c, k) => {
      const th = el("th", { scope: "col", class: p.flagged.includes(k) ? "flagged" : "" }, stepLabel(p, k));
      head.append(th);
      return th;
    });
    const thead = el("thead"); thead.append(head); t.append(thead);
    const body = el("tbody");
    const vmax = num(p.vmax);
    p.rows.forEach((r, i) => {
      const tr = el("tr", { class: i < p.nsrc ? "srcrow" : "tgtrow" });
      tr.append(el("th", { scope: "row" }, r));
      p.cols.forEach((c, k) => {
        const v = p.values[k][i];
        const td = el("td");
        if (v === null) { td.title = "not visible to this step"; }
        else if (Number.isNaN(num(v))) { td.textContent = "NaN"; td.className = "nan"; td.title = "NaN"; }
        else {
          const rgb = colour(num(v), vmax, p.signed);
          td.style.background = `rgb(${rgb.join(",")})`; td.style.color = ink(rgb);
          td.textContent = (num(v) / scale).toFixed(2);
          td.title = `${r} -> ${c}: ${fmt(v, 6)}`;
        }
        tr.append(td);
      });
      body.append(tr);
    });
    for (const [name, vals] of Object.entries(p.scores)) {
      const tr = el("tr", { class: "scorerow" });
      tr.append(el("th", { scope: "row" }, name));
      vals.forEach((v, k) => tr.append(el("td", {
        class: name === "delta" && p.flagged.includes(k) ? "flagged" : "" }, fmt(v, 3))));
      body.append(tr);
    }
    t.append(body);
    wrap.append(t);
    wrap.mark = (k) => ths.forEach((th, c) => th.classList.toggle("current", c === k));
    return wrap;
  }

  // ---- one example --------------------------------------------------------------------------
  function drawPanel(p, pi, exampleId) {
    const sec = el("section", { class: "panel", "aria-labelledby": `p${pi}h` });
    sec.append(el("h3", { id: `p${pi}h` }, p.name));
    sec.append(el("p", { class: "ptitle" }, p.title));
    sec.append(caption(p), legend(p));
    const [text, cells] = drawText(p, pi);
    sec.append(text);
    const status = el("p", { class: "status", "aria-live": "polite" });
    sec.append(status);
    const view = { p, cells, status, plot: null, table: null };
    if (p.score && p.cols.length) {
      const ser = [{ name: p.score, values: p.scores[p.score] }];
      view.plot = linePlot(ser, { label: `${p.score} per step`, xlabel: "generated token", ticks: p.cols,
        dots: true, ymax: p.score === "probability" ? 1 : 0 });
      const fig = el("figure", { class: "stepplot" });
      fig.append(view.plot, el("figcaption", {}, `${p.score} of each generated token`));
      sec.append(fig);
    }
    const id = `heat-${exampleId}-${pi}`;
    const toggle = el("button", { type: "button", class: "toggle", "aria-expanded": "false",
      "aria-controls": id }, "show the token x step heatmap");
    sec.append(toggle);
    const holder = el("div", { id, hidden: "" });
    sec.append(holder);
    toggle.addEventListener("click", () => {
      const open = toggle.getAttribute("aria-expanded") !== "true";
      if (open && !view.table) { view.table = heatTable(p, id + "-t"); holder.append(view.table); }
      holder.hidden = !open;
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
      toggle.textContent = open ? "hide the heatmap" : "show the token x step heatmap";
      paint(view);
    });
    return [sec, view];
  }

  function faithSection(f, withPanels) {
    const sec = el("section", { class: "faith", "aria-labelledby": "faithh" });
    sec.append(el("h3", { id: "faithh" }, "faithfulness"));
    const t = el("table", { class: "metrics" });
    t.append(el("caption", {}, "area per metric for this example (AOPC or AUC), random rankings in brackets; " +
      "arrows say which way is better"));
    const hr = el("tr");
    hr.append(el("th", { scope: "col" }, "method"));
    f.metrics.forEach((m) => hr.append(el("th", { scope: "col" }, `${m} ${f.higher[m] ? "\u2191" : "\u2193"}`)));
    const thead = el("thead"); thead.append(hr); t.append(thead);
    const body = el("tbody");
    for (const [m, r] of Object.entries(f.methods)) {
      const tr = el("tr");
      tr.append(el("th", { scope: "row" }, m));
      f.metrics.forEach((k) => {
        const [v, chance] = r.metrics[k];
        tr.append(el("td", {}, fmt(v, 3) + (chance === null ? "" : ` (${fmt(chance, 3)})`)));
      });
      body.append(tr);
    }
    t.append(body); sec.append(t);
    const figs = el("div", { class: "figs" });
    const methods = Object.keys(f.methods);
    for (const curve of ["deletion", "insertion"]) {
      const ser = [];
      methods.forEach((m, j) => {
        const c = f.methods[m].curves;
        if (c[curve]) ser.push({ name: m, values: c[curve], dash: DASH[j % DASH.length], colour: LINE[j % LINE.length] });
      });
      const first = methods.find((m) => f.methods[m].curves["random_" + curve]);
      if (first) ser.push({ name: "random ranking", values: f.methods[first].curves["random_" + curve], dash: "1 3", colour: "#767676" });
      if (!ser.length) continue;
      const fig = el("figure");
      fig.append(linePlot(ser, { label: `${curve} curve`, xlabel: `fraction ${curve === "deletion" ? "removed" : "kept"}`,
        xs: f.levels, ticks: f.levels.map((x) => fmt(x, 2)) }), el("figcaption", {}, `${curve} curve (${f.target_fn}), mean over steps`), plotLegend(ser));
      figs.append(fig);
    }
    const m0 = methods[0];
    if (!withPanels && m0 && f.methods[m0].score.length) { // the panels plot it otherwise
      const ser = [{ name: f.target_fn, values: f.methods[m0].score }];
      const fig = el("figure");
      fig.append(linePlot(ser, { label: `${f.target_fn} per step`, xlabel: "step", dots: true,
        ymax: f.target_fn === "probability" ? 1 : 0 }), el("figcaption", {}, `${f.target_fn} of each generated token`));
      figs.append(fig);
    }
    sec.append(figs);
    return sec;
  }

  async function openExample(i, focus) {
    const d = await detail(i);
    state.example = i; state.step = 0; state.preview = null; state.panels = [];
    const box = document.getElementById("detail");
    box.replaceChildren();
    const key = data.index.length > 1 ? `example ${d.n}` + (d.id !== d.n ? `, id ${d.id}` : "") : "example";
    const h = el("h2", { id: "detailh", tabindex: "-1" }, key);
    box.append(h);
    const text = el("p", { class: "plain" });
    text.append(el("span", { class: "lbl" }, "text"), el("span", { class: "bidi" }, d.text),
      el("span", { class: "arrow" }, " \u2192 "), el("span", { class: "bidi" }, d.target));
    box.append(text);
    if (d.panels.length) {
      box.append(el("p", { class: "hint" }, "Hover or click a generated token (or use the arrow keys) to colour the tokens it was attributed to."));
    }
    const row = el("div", { class: d.panels.length > 1 ? "panels side" : "panels" });
    d.panels.forEach((p, pi) => {
      const [sec, view] = drawPanel(p, pi, i);
      row.append(sec); state.panels.push(view);
    });
    box.append(row);
    if (d.faith) box.append(faithSection(d.faith, d.panels.length > 0));
    repaint();
    document.querySelectorAll("#rows tr.sel").forEach((tr) => tr.classList.remove("sel"));
    const tr = document.querySelector(`#rows tr[data-i="${i}"]`);
    if (tr) tr.classList.add("sel");
    document.body.dataset.example = String(i);
    if (focus) h.focus(); // the arrow keys now move between this example's steps
  }

  // ---- the list of rows ----------------------------------------------------------------------
  const list = { query: "", sort: "n", dir: 1, shown: 100 };
  function matches(e, q) {
    if (!q) return true;
    const hay = `${e.id} ${e.text} ${e.target} ${e.top.map((t) => t[0]).join(" ")}`.toLowerCase();
    return hay.includes(q);
  }
  function drawRows() {
    const q = list.query.toLowerCase();
    const rows = data.index.map((e, i) => [e, i]).filter(([e]) => matches(e, q));
    const key = { n: (e) => e.n, id: (e) => e.id, text: (e) => e.text, top: (e) => e.topScore }[list.sort];
    rows.sort((a, b) => {
      const x = key(a[0]), y = key(b[0]);
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return c * list.dir || a[1] - b[1];
    });
    const body = document.getElementById("rowsbody");
    const frag = document.createDocumentFragment();
    for (const [e, i] of rows.slice(0, list.shown)) {
      const tr = el("tr", { "data-i": String(i) });
      if (i === state.example) tr.classList.add("sel");
      const open = el("button", { type: "button", class: "open" }, String(e.n));
      open.setAttribute("aria-label", `open example ${e.n}`);
      open.addEventListener("click", () => openExample(i, true));
      const c0 = el("td"); c0.append(open);
      const tops = el("td", { class: "tops" });
      e.top.forEach(([t, v]) => tops.append(el("span", { class: "top", title: fmt(v, 6) }, t)));
      tr.append(c0, el("td", {}, String(e.id)),
        el("td", { class: "txt" }, e.text + (e.target ? " \u2192 " + e.target : "")), tops);
      frag.append(tr);
    }
    body.replaceChildren(frag);
    document.getElementById("count").textContent =
      `${rows.length} of ${data.index.length} rows` + (rows.length > list.shown ? `, first ${list.shown} shown` : "");
    document.getElementById("more").hidden = rows.length <= list.shown;
    document.querySelectorAll("#rows th[data-sort]").forEach((th) => {
      th.setAttribute("aria-sort", th.dataset.sort === list.sort ? (list.dir > 0 ? "ascending" : "descending") : "none");
    });
  }
  function drawList() {
    const sec = el("section", { id: "list", "aria-labelledby": "listh" });
    sec.append(el("h2", { id: "listh" }, `${data.index.length} examples`));
    const lab = el("label", { for: "search" }, "search ");
    const input = el("input", { id: "search", type: "search", placeholder: "id, text or token" });
    lab.append(input);
    const count = el("span", { id: "count", class: "muted", "aria-live": "polite" });
    sec.append(lab, count);
    const wrap = el("div", { id: "rows", tabindex: "0", role: "region", "aria-label": "examples" });
    const t = el("table", {});
    const hr = el("tr");
    for (const [k, name] of [["n", "#"], ["id", "id"], ["text", "text \u2192 generated"], ["top", "top tokens"]]) {
      const th = el("th", { scope: "col", "data-sort": k });
      const b = el("button", { type: "button", class: "sort" }, name);
      b.addEventListener("click", () => {
        list.dir = list.sort === k ? -list.dir : (k === "top" ? -1 : 1);
        list.sort = k; drawRows();
      });
      th.append(b); hr.append(th);
    }
    const thead = el("thead"); thead.append(hr); t.append(thead);
    t.append(el("tbody", { id: "rowsbody" }));
    wrap.append(t);
    const more = el("button", { type: "button", id: "more" }, "show more rows");
    more.addEventListener("click", () => { list.shown += 200; drawRows(); });
    sec.append(wrap, more);
    input.addEventListener("input", () => { list.query = input.value.trim(); list.shown = 100; drawRows(); });
    return sec;
  }

  function overall(o) {
    const sec = el("section", { class: "overall", "aria-labelledby": "overallh" });
    sec.append(el("h2", { id: "overallh" }, "faithfulness over all examples"));
    for (const n of o.notes) sec.append(el("p", { class: "note" }, n));
    const t = el("table", { class: "metrics" });
    t.append(el("caption", {}, "mean [95% interval] per metric; chance in brackets; best first by the first metric"));
    const hr = el("tr");
    hr.append(el("th", { scope: "col" }, "method"));
    o.metrics.forEach((m) => hr.append(el("th", { scope: "col" }, `${m} ${o.higher[m] ? "\u2191" : "\u2193"}`)));
    const thead = el("thead"); thead.append(hr); t.append(thead);
    const body = el("tbody");
    for (const m of o.ranking[o.metrics[0]]) {
      const tr = el("tr");
      tr.append(el("th", { scope: "row" }, m));
      o.metrics.forEach((k) => {
        const [v, lo, hi] = o.estimates[m][k];
        const ch = o.chance[m][k];
        tr.append(el("td", {}, `${fmt(v, 3)} [${fmt(lo, 3)}, ${fmt(hi, 3)}]` + (ch === undefined ? "" : ` (${fmt(ch, 3)})`)));
      });
      body.append(tr);
    }
    t.append(body); sec.append(t);
    return sec;
  }

  // ---- keyboard -------------------------------------------------------------------------------
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA")) return;
    if (t && t.closest && t.closest("#rows")) return; // the list scrolls with its own keys
    if (!state.panels.length || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const moves = { ArrowRight: 1, ArrowLeft: -1 }; // up and down still scroll the page
    if (ev.key in moves) { select(state.step + moves[ev.key]); ev.preventDefault(); }
    else if (ev.key === "Home") { select(0); ev.preventDefault(); }
    else if (ev.key === "End") { select(1e9); ev.preventDefault(); }
    else return;
    const b = document.querySelector(`#detail button.step[data-col="${state.step}"]`);
    if (b && document.activeElement && document.activeElement.classList.contains("step")) b.focus({ preventScroll: false });
  });

  // ---- start ---------------------------------------------------------------------------------
  async function start() {
    for (const line of data.summary) app.append(el("p", { class: "summary" }, line));
    if (data.overall) app.append(overall(data.overall));
    if (data.index.length > 1) app.append(drawList());
    app.append(el("section", { id: "detail", "aria-labelledby": "detailh" }));
    if (data.index.length > 1) drawRows();
    if (data.index.length) await openExample(0);
    window.fnattrReadyAt = performance.now();
    document.body.dataset.ready = "1";
  }
  window.fnattrReport = { colour, ink, select, openExample, state };
  start().catch((err) => {
    app.append(el("p", { class: "error", role: "alert" }, `the report could not be drawn: ${err}`));
    throw err;
  });
})();
