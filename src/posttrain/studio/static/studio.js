// posttrain studio: live curves (SVG, no library: the studio works offline) and the playground.
"use strict";
const Studio = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = {train: "#1f77b4", eval: "#ff7f0e"};
  const el = (tag, attrs, parent) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  };
  const fmt = v => Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : +v.toPrecision(4) + "";

  // One metric: every split a line, x = step. Points are data attributes, so tests can count them.
  function chart(metric) {
    const W = 400, H = 220, L = 52, R = 10, T = 8, B = 26;
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.metric = metric.key;
    const title = document.createElement("div");
    title.className = "t";
    title.textContent = metric.title;
    box.appendChild(title);
    const svg = el("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`}, box);
    const xs = [], ys = [];
    for (const ln of metric.lines) ln.steps.forEach((s, i) => { if (ln.values[i] !== null) { xs.push(s); ys.push(ln.values[i]); } });
    if (!xs.length) return box;
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const px = s => L + (s - x0) / (x1 - x0) * (W - L - R), py = v => T + (y1 - v) / (y1 - y0) * (H - T - B);
    el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#99a"}, svg);
    el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#99a"}, svg);
    for (const [v, y] of [[y1, T + 4], [y0, H - B]]) {
      const t = el("text", {x: L - 4, y, "text-anchor": "end", "font-size": 10, fill: "#667085"}, svg); t.textContent = fmt(v);
    }
    for (const [s, x, a] of [[x0, L, "start"], [x1, W - R, "end"]]) {
      const t = el("text", {x, y: H - 10, "text-anchor": a, "font-size": 10, fill: "#667085"}, svg); t.textContent = "step " + s;
    }
    for (const ln of metric.lines) {
      const pts = ln.steps.map((s, i) => ln.values[i] === null ? null : `${px(s).toFixed(1)},${py(ln.values[i]).toFixed(1)}`).filter(p => p);
      const color = COLORS[ln.split] || "#2ca02c";
      const line = el("polyline", {points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 1.6,
                                   "stroke-dasharray": ln.split === "eval" ? "5 3" : "none"}, svg);
      line.dataset.split = ln.split;
      line.dataset.points = pts.length;
      if (pts.length <= 40) pts.forEach(p => { const [x, y] = p.split(","); el("circle", {cx: x, cy: y, r: 2.2, fill: color}, svg); });
    }
    if (metric.lines.length > 1) metric.lines.forEach((ln, i) => {
      const t = el("text", {x: W - R - 4, y: T + 12 + 12 * i, "text-anchor": "end", "font-size": 10, fill: COLORS[ln.split] || "#2ca02c"}, svg);
      t.textContent = ln.split;
    });
    return box;
  }

  // Folded groups (optimization, throughput, other) stay open across redraws once opened.
  const opened = new Set();
  function drawGroups(root, groups) {
    root.replaceChildren();
    for (const g of groups) {
      let parent = root;
      const h = document.createElement("h4"); h.textContent = g.name;
      if (g.folded) {
        const d = document.createElement("details"); d.className = "more"; d.open = opened.has(g.name);
        d.ontoggle = () => d.open ? opened.add(g.name) : opened.delete(g.name);
        const s = document.createElement("summary"); s.appendChild(h); d.appendChild(s);
        root.appendChild(d); parent = d;
      } else root.appendChild(h);
      const row = document.createElement("div"); row.className = "plots"; parent.appendChild(row);
      g.metrics.forEach(m => row.appendChild(chart(m)));
    }
  }

  async function post(url, body) {
    const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {})});
    return [r.status, await r.json()];
  }

  function followRun(rid) {
    const root = document.getElementById("curves");
    const status = document.getElementById("status"), msg = document.getElementById("jobmsg");
    let last = -1, timer = null, wasRunning = false;
    async function tick() {
      const r = await fetch(`/api/runs/${rid}/metrics`);
      if (!r.ok) return;
      const d = await r.json();
      if (d.events !== last) { drawGroups(root, d.groups); last = d.events; }
      status.textContent = d.status;
      status.className = "status s-" + d.status.replaceAll(" ", "-");
      document.getElementById("steps").textContent = d.last_step ?? 0;
      for (const [k, v] of Object.entries(d.glance)) document.getElementById("g-" + k).textContent = v || "–";
      document.getElementById("events").textContent = d.events;
      const log = document.getElementById("log");
      if (log) log.textContent = d.log;
      const cancel = document.getElementById("cancel");
      if (cancel) cancel.hidden = d.job !== "running";
      if (d.job && d.job !== "running") msg.textContent = "process " + d.job;
      document.getElementById("evaluate").hidden = d.status !== "completed";
      const running = d.status === "running" || d.job === "running";
      if (running) wasRunning = true;
      if (!running && timer) {
        clearInterval(timer); timer = null;
        // the summary above the curves (stage, model, duration, headline) was rendered before the run ended
        if (wasRunning) location.reload();
      }
    }
    tick();
    timer = setInterval(tick, 1000);
    const cancel = document.getElementById("cancel");
    if (cancel) cancel.onclick = async () => { const [s, d] = await post(`/api/runs/${rid}/cancel`); msg.textContent = d.error || "cancelling..."; };
    document.getElementById("evaluate").onclick = async () => {
      const [s, d] = await post(`/api/evaluate/${rid}`, {limit: 20});
      if (d.error) { msg.textContent = d.error; return; }
      msg.textContent = "evaluating against the base model...";
      const poll = setInterval(async () => {
        const j = await (await fetch(`/api/jobs/${d.eval}`)).json();
        if (j.state === "running") return;
        clearInterval(poll);
        msg.innerHTML = "";
        const a = document.createElement("a");
        a.href = `/compare?run=${encodeURIComponent(d.eval)}&run=${encodeURIComponent(rid)}`;
        a.id = "eval-done";
        a.textContent = j.state === "finished" ? "evaluation done: compare with the base" : "evaluation " + j.state;
        msg.appendChild(a);
      }, 1000);
    };
    document.getElementById("load-audit").onclick = async () => {
      const box = document.getElementById("audit");
      box.textContent = "rendering...";
      const d = await (await fetch(`/api/runs/${rid}/audit`)).json();
      if (d.error) { box.innerHTML = ""; const p = document.createElement("p"); p.className = "err"; p.textContent = d.error; box.appendChild(p); return; }
      box.innerHTML = "";
      const t = document.createElement("div"); t.className = "meta"; t.textContent = d.title + " (loss tokens highlighted)";
      const pre = document.createElement("pre"); pre.id = "audit-example"; pre.innerHTML = d.example_html;  // escaped on the server
      const c = document.createElement("div"); c.className = "meta"; c.textContent = d.counts.join(" · ");
      box.append(t, pre, c);
    };
  }

  function playground() {
    const hist = {base: [], adapter: []};
    const show = (col, role, text) => {
      const d = document.createElement("div"); d.className = "msg " + role; d.textContent = (role === "user" ? "you: " : "") + text;
      document.getElementById("col-" + col).appendChild(d);
    };
    document.getElementById("reset").onclick = () => {
      hist.base = []; hist.adapter = [];
      document.getElementById("col-base").replaceChildren(); document.getElementById("col-adapter").replaceChildren();
    };
    document.getElementById("run").onchange = () => document.getElementById("reset").onclick();
    document.getElementById("chat").onsubmit = async ev => {
      ev.preventDefault();
      const input = document.getElementById("prompt"), msg = document.getElementById("chatmsg");
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      for (const col of ["base", "adapter"]) { hist[col].push({role: "user", content: text}); show(col, "user", text); }
      msg.textContent = "generating...";
      const [s, d] = await post("/api/chat", {run: document.getElementById("run").value, conversations: hist,
        max_tokens: +document.getElementById("max_tokens").value, temperature: +document.getElementById("temperature").value});
      if (d.error) { msg.textContent = d.error; for (const col of ["base", "adapter"]) hist[col].pop(); return; }
      msg.textContent = "";
      for (const col of ["base", "adapter"]) { hist[col].push({role: "assistant", content: d[col]}); show(col, "assistant", d[col]); }
    };
  }
  return {chart, followRun, playground};
})();
