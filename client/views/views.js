// lmscope views: renders the data block of one view fragment into its container (see page.py).
// No network, no libraries: DOM, CSS grid and canvas only. Values shown on hover are the data's own
// (4 significant digits, attention to 4 decimals), formatted by fmt().
function lmscopeView(kind, root) {
  "use strict";
  if (!root || root.dataset.rendered) return;
  root.dataset.rendered = "1";
  const d = JSON.parse(root.querySelector("script.lmv-data").textContent);
  root.querySelectorAll(".lmv-fallback").forEach((n) => n.remove());

  // ----- helpers ---------------------------------------------------------------------------------
  const RAMPS = {
    blues: [[247,251,255],[222,235,247],[198,219,239],[158,202,225],[107,174,214],[66,146,198],[33,113,181],[8,81,156],[8,48,107]],
    purples: [[252,251,253],[239,237,245],[218,218,235],[188,189,220],[158,154,200],[128,125,186],[106,81,163],[84,39,143],[63,0,125]],
    oranges: [[255,245,235],[254,230,206],[253,208,162],[253,174,107],[253,141,60],[241,105,19],[217,72,1],[166,54,3],[127,39,4]],
    viridis_r: [[253,231,37],[180,222,44],[109,205,89],[53,183,121],[31,158,137],[38,130,142],[49,104,142],[62,73,137],[72,40,120],[68,1,84]],
    rdbu: [[103,0,31],[178,24,43],[214,96,77],[244,165,130],[253,219,199],[247,247,247],[209,229,240],[146,197,222],[67,147,195],[33,102,172],[5,48,97]],
  };
  RAMPS.burd = RAMPS.rdbu.slice().reverse();
  function rgb(ramp, t) {
    const s = RAMPS[ramp];
    t = Math.min(1, Math.max(0, isFinite(t) ? t : 0)) * (s.length - 1);
    const i = Math.min(s.length - 2, Math.floor(t)), f = t - i;
    return s[i].map((a, c) => Math.round(a + f * (s[i + 1][c] - a)));
  }
  const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
  const ink = (c) => (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 140 ? "#fff" : "#111");
  function paint(node, ramp, t) { const c = rgb(ramp, t); node.style.background = css(c); node.style.color = ink(c); }
  function el(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined && text !== null) n.textContent = text;
    return n;
  }
  function add(parent, ...kids) { kids.forEach((k) => parent.appendChild(k)); return parent; }
  const fmt = (v) => (v === null || v === undefined ? "–"
                      : v !== 0 && Math.abs(v) < 1e-3 ? Number(v).toExponential(3) : Number(v).toPrecision(4));
  const num = (v) => String(+Number(v).toPrecision(3));  // legends: 0, 1, 5.47
  const fmtP = (v) => Number(v).toFixed(4);
  // A token in a grid or a list: whitespace made visible (the labels escape control characters as \n).
  function shown(t) {
    if (t === null || t === undefined) return "";
    if (t === "") return "∅";
    return t.replace(/\\n/g, "↵").replace(/\\t/g, "⇥").replace(/\\r/g, "␍").replace(/ /g, "␣");
  }
  // A token in running text: spaces stay spaces, a newline shows as ↵ and breaks the line.
  // A character split over several tokens is labelled X[i/n]: its first piece shows X; a token holding only
  // later pieces shows as a narrow shaded sliver (class "cont"), so the text reads as written.
  const continuation = (t) => /^((.)\[(\d+)\/(\d+)\])+$/u.test(t) && !/\[1\/\d+\]/.test(t);
  const flow = (t) => t.replace(/(.)\[(\d+)\/(\d+)\]/gu, (m, c, i) => (i === "1" ? c : "·"))
    .replace(/\\n/g, "↵").replace(/\\t/g, "⇥").replace(/\\r/g, "␍");
  const breaks = (t) => /\\n/.test(t);
  function short(t, n) { const a = Array.from(t); return a.length > n ? a.slice(0, n - 1).join("") + "…" : t; }
  function tok(t) { return el("span", "tok", shown(t)); }
  function textToken(t) { return continuation(t) ? el("span", "s cont") : el("span", "s", flow(t)); }
  function legend(ramp, lo, hi, name) {
    const g = el("span", "legend");
    const bar = el("span", "ramp");
    const s = RAMPS[ramp];
    bar.style.background = `linear-gradient(to right, ${s.map((c, i) => `${css(c)} ${(100 * i / (s.length - 1)).toFixed(1)}%`).join(", ")})`;
    add(g, el("span", null, name), el("span", null, lo), bar, el("span", null, hi));
    return g;
  }
  function select(label, options, value, onchange) {
    const wrap = el("label", null, label + " ");
    const s = el("select");
    options.forEach(([v, text]) => { const o = el("option", null, text); o.value = String(v); s.appendChild(o); });
    s.value = String(value);
    s.addEventListener("change", () => onchange(s.value));
    wrap.appendChild(s);
    return wrap;
  }
  function checkbox(label, checked, onchange) {
    const wrap = el("label");
    const c = el("input");
    c.type = "checkbox"; c.checked = checked;
    c.addEventListener("change", () => onchange(c.checked));
    add(wrap, c, document.createTextNode(" " + label));
    return wrap;
  }
  function table(head, rows) {
    const t = el("table");
    if (head) { const tr = el("tr"); head.forEach((h) => tr.appendChild(el("th", null, h))); t.appendChild(tr); }
    rows.forEach((r) => t.appendChild(r));
    return t;
  }
  function row(cells, cls) {
    const tr = el("tr", cls);
    cells.forEach(([c, text]) => { const td = el("td", c); if (text instanceof Node) td.appendChild(text); else td.textContent = text; tr.appendChild(td); });
    return tr;
  }
  function pbar(p, width) { const b = el("div", "pbar"); b.style.width = Math.max(1, Math.round(p * width)) + "px"; return b; }
  // Hover on a container, delegated to the children that carry data-i.
  function hover(container, selector, fn) {
    container.addEventListener("mouseover", (e) => { const n = e.target.closest(selector); if (n && container.contains(n)) fn(n); });
  }
  let lit = null;
  function light(node) { if (lit) lit.classList.remove("on"); lit = node; if (node) node.classList.add("on"); }

  // ----- logit lens ------------------------------------------------------------------------------
  function lens() {
    const L = d.layers.length, P = d.positions.length, K = d.k;
    const at = (i, j) => i * P + j;
    const maxEntropy = Math.max(1e-9, ...d.entropy.filter((v) => v !== null));
    const modes = [
      { key: "prob", name: "top-1 probability", ramp: "blues", lo: 0, hi: 1, value: (i, j) => d.probs[at(i, j) * K] },
      { key: "entropy", name: "entropy (nats)", ramp: "viridis_r", lo: 0, hi: maxEntropy, value: (i, j) => d.entropy[at(i, j)] },
      ...d.targets.map((t, n) => ({ key: String(n), name: `p(${shown(t.token)})`, ramp: "blues", lo: 0, hi: 1,
                                     value: (i, j) => t.probs[at(i, j)] })),
    ];
    let mode = modes.find((m) => m.key === String(d.color)) || modes[0];
    let words = P <= 40;
    const bar = el("div", "bar-row"), main = el("div", "main"), panel = el("div", "panel");
    const gridBox = el("div");
    add(root, bar, main);
    add(main, gridBox, panel);
    let cells = [];
    function controls() {
      bar.textContent = "";
      add(bar, select("colour:", modes.map((m) => [m.key, m.name]), mode.key, (v) => { mode = modes.find((m) => m.key === v); draw(); }),
          checkbox("top-1 token in cells", words, (v) => { words = v; draw(); }),
          legend(mode.ramp, num(mode.lo), num(mode.hi), mode.name),
          el("span", "note", "framed: the top-1 token is the real next token · hover a cell for the top-" + K
             + (d.fidelity ? ` · red corner: activation rounding moves the state by > ${num(100 * d.fidelity.threshold)} % (fidelity map)` : "")));
    }
    function draw() {
      controls();
      gridBox.textContent = "";
      const g = el("div", "g");
      const w = words ? 62 : 17;
      g.style.gridTemplateColumns = `max-content repeat(${P}, ${w}px)`;
      const colLab = (t, top) => {
        const n = el("div", "lab col" + (words ? "" : " vert" + (top ? " top" : "")), words ? short(shown(t), 8) : short(shown(t), 10));
        return n;
      };
      g.appendChild(el("div", "axis", "next →"));
      d.next.forEach((t) => g.appendChild(t === null ? el("div") : colLab(t, true)));
      cells = [];
      for (let i = L - 1; i >= 0; i--) {
        g.appendChild(el("div", "lab row", d.layers[i]));
        for (let j = 0; j < P; j++) {
          const top = d.top[at(i, j) * K];
          const c = el("div", "c", words ? short(shown(d.vocab[top]), 7) : "");
          c.dataset.i = i; c.dataset.j = j;
          const v = mode.value(i, j);
          paint(c, mode.ramp, (v - mode.lo) / (mode.hi - mode.lo));
          if (d.nextIndex[j] >= 0 && top === d.nextIndex[j]) c.classList.add("hit");
          if (d.fidelity && d.fidelity.estimate[at(i, j)] > d.fidelity.threshold) c.classList.add("flag");
          g.appendChild(c);
          cells[at(i, j)] = c;
        }
      }
      g.appendChild(el("div", "axis", "input →"));
      d.tokens.forEach((t) => g.appendChild(colLab(t, false)));
      add(gridBox, g, el("div", "note", `rows: hidden states (embed = token embeddings, L = output of block L); temperature ${d.temperature}`));
      hover(g, ".c", (c) => show(+c.dataset.i, +c.dataset.j));
      show(L - 1, P - 1);
    }
    function show(i, j) {
      light(cells[at(i, j)]);
      panel.textContent = "";
      const h = el("h4", null, `layer ${d.layers[i]} · position ${d.positions[j]}`);
      const io = el("div");
      add(io, document.createTextNode("input "), tok(d.tokens[j]), document.createTextNode(" → next "),
          d.next[j] === null ? el("span", "note", "(end of prompt)") : tok(d.next[j]));
      const rows = [];
      for (let r = 0; r < K; r++) {
        const v = d.top[at(i, j) * K + r], p = d.probs[at(i, j) * K + r];
        const isNext = v === d.nextIndex[j];
        rows.push(row([["r", String(r + 1)], ["t", shown(d.vocab[v]) + (isNext ? " ✓ next" : "")], ["p", fmt(p)], ["b", pbar(p, 70)]],
                      "topk" + (isNext ? " next" : "")));
      }
      add(panel, h, io, el("div", "note", `entropy ${fmt(d.entropy[at(i, j)])} nats`), table(["#", "token", "p", ""], rows));
      if (d.fidelity) {
        const e = d.fidelity.estimate[at(i, j)];
        panel.appendChild(el("div", e > d.fidelity.threshold ? "note flagged" : "note",
                             `fidelity: activation rounding moves this state by about ${fmt(100 * e)} %`));
      }
      if (d.nextIndex[j] >= 0 && !rows.some((r) => r.classList.contains("next"))) {
        panel.appendChild(el("div", "note", `next token ${shown(d.next[j])} is not in the top-${K}`));
      }
      if (d.targets.length) {
        const trs = d.targets.map((t) => row([["t", shown(t.token) + (t.multi ? " (1st token)" : "")], ["p", fmt(t.probs[at(i, j)])],
                                                ["r", String(t.ranks[at(i, j)] + 1)]], "target"));
        panel.appendChild(table(["target", "p", "rank"], trs));
      }
    }
    draw();
  }

  // ----- attention -------------------------------------------------------------------------------
  function attention() {
    const H = d.heads.length, T = d.tokens.length, tri = T * (T + 1) / 2;
    let li = d.layer, hi = d.head, focus = T - 1;
    const p = (l, h, q, k) => (k > q ? 0 : d.probs[(l * H + h) * tri + q * (q + 1) / 2 + k] / d.scale);
    const bar = el("div", "bar-row"), thumbs = el("div", "thumbs"), main = el("div", "main"), panel = el("div", "panel");
    const left = el("div");
    add(root, bar, thumbs, main);
    add(main, left, panel);
    let grid = [], s1 = [], s2 = [], colLabs = [], rowLabs = [];
    function controls() {
      bar.textContent = "";
      add(bar, select("layer", d.layers.map((L, n) => [n, String(L)]), li, (v) => { li = +v; draw(); }),
          select("head", d.heads.map((h, n) => [n, String(h)]), hi, (v) => { hi = +v; draw(); }),
          legend("purples", "0", "1", "attention probability"),
          el("span", "note", "all heads of the layer below: hover one to show it · hover a token or a cell"));
    }
    function drawThumbs() {
      thumbs.textContent = "";
      d.heads.forEach((h, n) => {
        const box = el("div", "thumb" + (n === hi ? " sel" : ""));
        const cv = el("canvas");
        cv.width = T; cv.height = T;
        const ctx = cv.getContext("2d"), img = ctx.createImageData(T, T);
        for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
          const c = rgb("purples", p(li, n, q, k)), o = 4 * (q * T + k);
          img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
        }
        ctx.putImageData(img, 0, 0);
        box.dataset.h = n;
        add(box, cv, el("span", null, `head ${h}`));
        box.addEventListener("mouseenter", () => { if (hi !== n) { hi = n; draw(); } });
        thumbs.appendChild(box);
      });
    }
    function draw() {
      controls();
      drawThumbs();
      left.textContent = "";
      const size = T <= 24 ? 22 : T <= 48 ? 13 : 9;
      const g = el("div", "g");
      g.style.gridTemplateColumns = `max-content repeat(${T}, ${size}px)`;
      g.style.gap = "0";
      g.appendChild(el("div", "axis", "query ↓ key →"));
      colLabs = []; rowLabs = [];
      for (let k = 0; k < T; k++) {
        const lab = el("div", "lab col vert top", size >= 13 ? short(shown(d.tokens[k]), 10) : "");
        g.appendChild(lab);
        colLabs.push(lab);
      }
      grid = [];
      for (let q = 0; q < T; q++) {
        const lab = el("div", "lab row", short(shown(d.tokens[q]), 12));
        rowLabs.push(lab);
        lab.style.lineHeight = size + "px"; lab.style.fontSize = Math.min(11, size) + "px";
        g.appendChild(lab);
        for (let k = 0; k < T; k++) {
          const c = el("div", "c");
          c.style.height = size + "px";
          c.dataset.q = q; c.dataset.k = k;
          const c0 = rgb("purples", p(li, hi, q, k));
          c.style.background = css(c0);
          g.appendChild(c);
          grid[q * T + k] = c;
        }
      }
      hover(g, ".c", (c) => showCell(+c.dataset.q, +c.dataset.k));
      const head1 = el("div", "strip-head", "where the hovered token attends (its row) — hover a token");
      const strip1 = el("div", "strip"), head2 = el("div", "strip-head", "who attends to it (its column)");
      const strip2 = el("div", "strip");
      s1 = d.tokens.map((t, i) => strip1.appendChild(stripToken(t, i)));
      s2 = d.tokens.map((t, i) => strip2.appendChild(stripToken(t, i)));
      [strip1, strip2].forEach((s) => hover(s, ".s", (n) => showToken(+n.dataset.i)));
      add(left, head1, strip1, head2, strip2, el("div", "strip-head", `layer ${d.layers[li]}, head ${d.heads[hi]}: query × key`), g);
      showToken(Math.min(focus, T - 1));
    }
    function stripToken(t, i) {
      const n = textToken(t);
      n.dataset.i = i;
      return n;
    }
    function shadeStrips(i) {
      for (let k = 0; k < T; k++) {
        paint(s1[k], "oranges", p(li, hi, i, k));
        paint(s2[k], "blues", p(li, hi, k, i));
        s1[k].classList.toggle("on", k === i);
        s2[k].classList.toggle("on", k === i);
        rowLabs[k].classList.toggle("sel", k === i);
        colLabs[k].classList.toggle("sel", k === i);
      }
    }
    function ranked(values) {
      return values.map((v, n) => [v, n]).filter(([v]) => v > 0).sort((a, b) => b[0] - a[0]).slice(0, 6);
    }
    function showToken(i) {
      focus = i;
      shadeStrips(i);
      light(null);
      panel.textContent = "";
      const row_ = [...Array(T).keys()].map((k) => p(li, hi, i, k));
      const col_ = [...Array(T).keys()].map((q) => p(li, hi, q, i));
      const h = el("h4", null, `layer ${d.layers[li]} · head ${d.heads[hi]} · token ${i}`);
      add(panel, h, add(el("div"), document.createTextNode("token "), tok(d.tokens[i])),
          el("div", "note", "attends to (top keys)"),
          table(["key", "token", "p"], ranked(row_).map(([v, k]) => row([["r", String(k)], ["t", shown(d.tokens[k])], ["p", fmtP(v)]], "to"))),
          el("div", "note", "attended by (top queries)"),
          table(["query", "token", "p"], ranked(col_).map(([v, q]) => row([["r", String(q)], ["t", shown(d.tokens[q])], ["p", fmtP(v)]], "from"))));
    }
    function showCell(q, k) {
      light(grid[q * T + k]);
      shadeStrips(q);
      panel.textContent = "";
      add(panel, el("h4", null, `layer ${d.layers[li]} · head ${d.heads[hi]}`),
          table(null, [row([["n", "query"], ["r", String(q)], ["t", tok(d.tokens[q])]]),
                       row([["n", "key"], ["r", String(k)], ["t", tok(d.tokens[k])]]),
                       row([["n", "p"], ["v cellp", fmtP(p(li, hi, q, k))], ["n", ""]])]));
    }
    draw();
  }

  // ----- neurons ---------------------------------------------------------------------------------
  function neurons() {
    const N = d.neurons.length;
    let ni = d.neuron;
    const bar = el("div", "bar-row"), main = el("div", "main");
    const prompts = el("div", "prompts"), side = el("div", "side"), panel = el("div", "panel");
    add(root, bar, main);
    add(main, prompts, side);
    let spans = [];
    function draw() {
      const act = (pr, i) => d.prompts[pr].acts[i * N + ni];
      let scale = 1e-9;
      d.prompts.forEach((pr, n) => pr.tokens.forEach((t, i) => { scale = Math.max(scale, Math.abs(act(n, i))); }));
      bar.textContent = "";
      add(bar, select("neuron", d.neurons.map((x, n) => [n, `${d.layer}.${x}`]), ni, (v) => { ni = +v; draw(); }),
          legend("burd", num(-scale), num(scale), "activation"),
          el("span", "note", "red: fires positive, blue: negative · hover a token"));
      prompts.textContent = "";
      spans = [];
      d.prompts.forEach((pr, n) => {
        const box = el("div", "prompt strip");
        box.appendChild(el("span", "pn", `#${n}`));
        pr.tokens.forEach((t, i) => {
          const s = textToken(t);
          s.dataset.p = n; s.dataset.i = i;
          paint(s, "burd", 0.5 + act(n, i) / (2 * scale));
          box.appendChild(s);
          if (breaks(t)) box.appendChild(el("br"));
          spans.push(s);
        });
        prompts.appendChild(box);
      });
      hover(prompts, ".s", (s) => show(+s.dataset.p, +s.dataset.i));
      side.textContent = "";
      const pj = d.projections[ni];
      const list = (items) => table(null, items.map(([t, v]) => row([["t tok", shown(t)], ["v", fmt(v)]])));
      add(side, panel, el("h4", null, `neuron ${d.layer}.${d.neurons[ni]}: value vector through the LM head`),
          el("div", "note", "promotes (logit per unit activation)"), list(pj.top),
          el("div", "note", "suppresses"), list(pj.bottom));
      let best = [0, 0], bv = -Infinity;
      d.prompts.forEach((pr, n) => pr.tokens.forEach((t, i) => { if (act(n, i) > bv) { bv = act(n, i); best = [n, i]; } }));
      show(best[0], best[1]);
    }
    function show(n, i) {
      const s = spans.find((x) => +x.dataset.p === n && +x.dataset.i === i);
      light(s);
      panel.textContent = "";
      add(panel, el("h4", null, `prompt ${n} · position ${i}`), add(el("div"), document.createTextNode("token "), tok(d.prompts[n].tokens[i])),
          table(null, [row([["n", "activation"], ["v act", fmt(d.prompts[n].acts[i * N + ni])]])]));
    }
    draw();
  }

  // ----- patch sweep -----------------------------------------------------------------------------
  function patch() {
    const nL = d.layers.length, nP = d.positions.length;
    let normalized = d.normalized;
    const bar = el("div", "bar-row"), main = el("div", "main"), panel = el("div", "panel"), box = el("div");
    add(root, bar, main);
    add(main, box, panel);
    let cells = [];
    // Colour is the change from the corrupted run: white = no effect, blue = towards the clean run.
    function draw() {
      const v = normalized ? d.restored : d.values, base = normalized ? 0 : d.corrupted;
      const lim = Math.max(1e-9, ...v.filter((x) => x !== null).map((x) => Math.abs(x - base)));
      bar.textContent = "";
      add(bar, legend("rdbu", num(base - lim), num(base + lim), normalized ? "restored fraction" : d.metric));
      if (d.restored) bar.appendChild(checkbox("normalized (0 = corrupted run, 1 = clean run)", normalized, (x) => { normalized = x; draw(); }));
      bar.appendChild(el("span", "note", `clean ${fmt(d.clean)} · corrupted ${fmt(d.corrupted)} · hover a cell`));
      box.textContent = "";
      const g = el("div", "g");
      const w = nL <= 16 ? 34 : 22;
      g.style.gridTemplateColumns = `max-content repeat(${nL}, ${w}px)`;
      g.appendChild(el("div", "axis", "position: token ↓  layer →"));
      d.layers.forEach((L) => g.appendChild(el("div", "lab col", String(L))));
      cells = [];
      for (let j = 0; j < nP; j++) {
        g.appendChild(el("div", "lab row", `${d.positions[j]}: ${short(shown(d.tokens[j]), 18)}`));
        for (let i = 0; i < nL; i++) {
          const c = el("div", "c");
          c.dataset.i = i; c.dataset.j = j;
          const x = v[i * nP + j];
          c.style.background = css(rgb("rdbu", 0.5 + (x - base) / (2 * lim)));
          g.appendChild(c);
          cells[i * nP + j] = c;
        }
      }
      hover(g, ".c", (c) => show(+c.dataset.i, +c.dataset.j));
      box.appendChild(g);
      let best = 0;
      v.forEach((x, n) => { if (Math.abs(x - base) > Math.abs(v[best] - base)) best = n; });
      show(Math.floor(best / nP), best % nP);
    }
    function show(i, j) {
      light(cells[i * nP + j]);
      panel.textContent = "";
      const rows = [row([["n", d.metric], ["v value", fmt(d.values[i * nP + j])]])];
      if (d.restored) rows.push(row([["n", "restored fraction"], ["v restored", fmt(d.restored[i * nP + j])]]));
      add(panel, el("h4", null, `layer ${d.layers[i]} · position ${d.positions[j]}`),
          add(el("div"), document.createTextNode("token "), tok(d.tokens[j])),
          el("div", "note", `clean state of ${d.site} patched into the corrupted run`), table(null, rows));
    }
    draw();
  }

  // ----- SAE features ----------------------------------------------------------------------------
  function sae() {
    let fi = d.feature;
    const bar = el("div", "bar-row"), main = el("div", "main");
    const contexts = el("div", "prompts"), side = el("div", "side"), panel = el("div", "panel");
    add(root, bar, main);
    add(main, contexts, side);
    let spans = [];
    function draw() {
      const f = d.features[fi];
      const scale = Math.max(1e-9, f.max);
      bar.textContent = "";
      add(bar, select("feature", d.features.map((x, n) => [n, String(x.index)]), fi, (v) => { fi = +v; draw(); }),
          legend("oranges", "0", num(scale), "activation"),
          el("span", "note", `active on ${(100 * f.frequency).toPrecision(3)}% of ${d.nTokens} tokens · ` +
                             `max ${fmt(f.max)} · mean when active ${fmt(f.mean)} · hover a token`));
      contexts.textContent = "";
      spans = [];
      f.contexts.forEach((c, n) => {
        const box = el("div", "prompt strip");
        box.appendChild(el("span", "pn", `#${n} · prompt ${c.prompt}`));
        c.tokens.forEach((t, i) => {
          const s = textToken(t);
          s.dataset.c = n; s.dataset.i = i;
          paint(s, "oranges", c.acts[i] / scale);
          if (i === c.center) s.classList.add("top");
          box.appendChild(s);
          if (breaks(t)) box.appendChild(el("br"));
          spans.push(s);
        });
        contexts.appendChild(box);
      });
      if (!f.contexts.length) contexts.appendChild(el("div", "note", "this feature is active on none of the tokens"));
      hover(contexts, ".s", (s) => show(+s.dataset.c, +s.dataset.i));
      side.textContent = "";
      const list = (items) => table(null, items.map(([t, v]) => row([["t tok", shown(t)], ["v", fmt(v)]])));
      const hist = el("div", "hist");
      const top = Math.max(1, ...f.hist);
      f.hist.forEach((count, b) => {
        const h = el("div", "hb");
        h.style.height = `${Math.max(count ? 1 : 0, Math.round(60 * count / top))}px`;
        h.title = `${fmt(f.edges[b])} – ${fmt(f.edges[b + 1])}: ${count} tokens`;
        hist.appendChild(h);
      });
      add(side, panel, el("h4", null, `feature ${f.index}: decoder direction through the LM head`),
          el("div", "note", "promotes"), list(f.promoted), el("div", "note", "suppresses"), list(f.suppressed),
          el("div", "note", `activations when active (0 – ${fmt(f.max)})`), hist);
      if (f.contexts.length) show(0, f.contexts[0].center);
    }
    function show(n, i) {
      const c = d.features[fi].contexts[n];
      light(spans.find((x) => +x.dataset.c === n && +x.dataset.i === i));
      panel.textContent = "";
      add(panel, el("h4", null, `prompt ${c.prompt} · position ${c.position - c.center + i}`),
          add(el("div"), document.createTextNode("token "), tok(c.tokens[i])),
          table(null, [row([["n", "activation"], ["v act", fmt(c.acts[i])]])]));
    }
    draw();
  }

  ({ lens, attention, neurons, patch, sae })[kind]();
}
