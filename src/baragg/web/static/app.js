// baragg status page: task table (auto-refreshing) and a candlestick chart of any symbol/timeframe.
// Plain JS, no build step; the chart is TradingView Lightweight Charts (vendored beside this file).
"use strict";

(function () {
  const TF_ORDER = ["1m", "5m", "15m", "1h", "4h", "1d", "1w", "1mo"];
  const TF_SECONDS = { "1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14400, "1d": 86400, "1w": 604800, "1mo": 2678400 };
  const STATE_RANK = { hard_failed: 0, disabled: 2, running: 3, idle: 4 };
  const QUALITY_ALPHA = { 2: 1, 1: 0.72, 0: 0.36, "-1": 0.18 };
  const QUALITY_NAME = { 2: "excellent", 1: "good", 0: "poor", "-1": "very poor" };
  const UP = "38, 166, 154";
  const DOWN = "239, 83, 80";

  const $ = (sel) => document.querySelector(sel);
  const state = {
    refreshMs: 5000,
    tasks: [],
    nowIso: null,
    symbols: [],
    sortKey: null, // null: problems first
    sortAsc: true,
    selected: null, // {symbol, timeframe}
    chart: null,
    candles: null,
    volume: null,
    bars: null, // columns as loaded, for the tooltip
    index: new Map(), // ts -> row in state.bars
    lastTs: null,
    loadSeq: 0,
  };

  // The browser test (and anyone curious) reads the chart's state from here.
  window.baraggChart = {
    candleCount: 0,
    symbol: null,
    timeframe: null,
    ready: false,
    // The logical range of bars on screen, e.g. {from: 104880, to: 105123}.
    visibleRange() {
      const r = state.chart && state.chart.timeScale().getVisibleLogicalRange();
      return r ? { from: r.from, to: r.to } : null;
    },
    // Where the bar starting at `ts` (epoch seconds) is drawn, in pixels inside #chart (its close).
    coordinateOf(ts) {
      const i = state.index.get(ts);
      if (!state.chart || i === undefined) return null;
      const x = state.chart.timeScale().timeToCoordinate(ts);
      const y = state.candles.priceToCoordinate(state.bars.close[i]);
      return x === null || y === null ? null : { x, y };
    },
  };

  // ---------------------------------------------------------------------------------------------
  // formatting
  // ---------------------------------------------------------------------------------------------
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function duration(sec) {
    if (sec === null || sec === undefined) return "";
    sec = Math.round(sec);
    if (sec <= 0) return "0";
    if (sec < 60) return sec + "s";
    const m = Math.floor(sec / 60);
    if (m < 60) return m + "m";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h" + (m % 60 ? " " + (m % 60) + "m" : "");
    const d = Math.floor(h / 24);
    return d + "d" + (h % 24 ? " " + (h % 24) + "h" : "");
  }
  function utc(iso, withYear) {
    if (!iso) return "";
    const s = iso.replace("T", " ").replace("Z", "");
    return withYear ? s.slice(0, 16) : s.slice(5, 16);
  }
  function relative(iso, nowMs) {
    if (!iso) return "";
    const diff = (Date.parse(iso) - nowMs) / 1000;
    if (Math.abs(diff) < 1) return "now";
    return diff > 0 ? "in " + duration(diff) : duration(-diff) + " ago";
  }
  function num(n) {
    if (n === null || n === undefined) return "";
    return Number(n).toLocaleString("en-US");
  }
  function lagClass(lag, tf) {
    if (lag === null || lag === undefined) return "dim";
    const interval = TF_SECONDS[tf] || 300;
    if (lag <= interval) return "lag-ok";
    if (lag <= Math.max(12 * interval, 3600)) return "lag-warn";
    return "lag-bad";
  }
  function severity(t) {
    if (t.state === "hard_failed") return 0;
    if (t.streak > 0) return 1;
    if (t.state === "disabled") return 3;
    if (t.lag_frontier_seconds !== null && t.lag_frontier_seconds > (TF_SECONDS[t.timeframe] || 300)) return 2;
    return 4;
  }

  async function getJSON(url) {
    const res = await fetch(url, { cache: "no-store" });
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) throw new Error((body && (body.error || body.reason)) || res.status + " " + res.statusText);
    return body;
  }

  // ---------------------------------------------------------------------------------------------
  // header and task table
  // ---------------------------------------------------------------------------------------------
  function renderChips(summary, cron) {
    const by = summary.by_state || {};
    const chips = [];
    const chip = (cls, value, label, title, labelFirst) => {
      const v = `<b>${esc(value)}</b>`, l = `<span class="lbl">${esc(label)}</span>`;
      chips.push(`<span class="chip ${cls}" title="${esc(title || "")}">${labelFirst ? l + v : v + l}</span>`);
    };
    chip("", summary.tasks, "tasks");
    chip(by.idle ? "ok" : "", by.idle || 0, "idle");
    chip("", by.running || 0, "running");
    chip(by.hard_failed ? "bad" : "", by.hard_failed || 0, "hard failed", "mandatory tasks with 3+ hard failures in a row");
    chip(by.disabled ? "warn" : "", by.disabled || 0, "disabled", "optional tasks stopped after failures, or switched off");
    for (const [tf, w] of Object.entries(summary.worst_lag || {})) {
      const lag = w.lag_frontier_seconds;
      const cls = lagClass(lag, tf);
      const tone = cls === "lag-bad" ? "bad" : cls === "lag-warn" ? "warn" : "";
      chip(tone, lag === null ? "–" : duration(lag), tf + " lag",
        "largest lag behind the frontier" + (w.symbol_frontier ? `: ${w.symbol_frontier}` : ""), true);
    }
    if (summary.invalidations_pending) {
      chip("warn", num(summary.invalidations_pending), "to redo", "windows waiting for re-aggregation after late or corrected source bars");
    }
    chip("", num(summary.bars_created), "created", "bars inserted");
    chip("", num(summary.bars_rewritten), "rewritten", "stored bars whose values changed (late or corrected source bars)");
    chip("", num(summary.bars_withdrawn), "withdrawn", "bars soft-deleted because their source bars vanished");
    chip("", num(summary.bars_unchanged), "unchanged", "bars recomputed equal to the stored bar: nothing written");
    chip("", num(summary.bars_quality_poor), "poor", "bars written with quality ≤ 0");
    const job = cron && cron.job;
    if (job) {  // the worker round run by pg_cron (baragg db schedule)
      const runs = job.runs || [];
      const failed = runs.filter((r) => r.status === "failed");
      const tone = runs.length && runs[0].status === "failed" ? "bad" : failed.length ? "warn" : runs.length ? "ok" : "";
      const lines = [`${job.schedule}, env ${job.env}, as ${job.username}${job.active ? "" : " (paused)"}`]
        .concat(runs.slice(0, 5).map((r) => `${utc(r.start_time, true)} ${r.status}` +
          (r.seconds !== null ? ` ${r.seconds.toFixed(1)}s` : "") +
          (r.status === "failed" && r.return_message ? `: ${r.return_message.trim().split("\n")[0]}` : "")));
      chip(tone, runs.length ? runs[0].status : "no runs yet", "pg_cron", lines.join("\n"), true);
    }
    $("#chips").innerHTML = chips.join("");
  }

  function sortedTasks() {
    const q = $("#filter").value.trim().toLowerCase();
    const problemsOnly = $("#problems-only").checked;
    let rows = state.tasks.filter((t) => {
      if (problemsOnly && severity(t) >= 4) return false;
      if (!q) return true;
      return q.split(/\s+/).every((w) => `${t.symbol} ${t.timeframe} ${t.state} ${t.last_error || ""}`.toLowerCase().includes(w));
    });
    const tfRank = (tf) => { const i = TF_ORDER.indexOf(tf); return i < 0 ? 99 : i; };
    const base = (a, b) => a.symbol.localeCompare(b.symbol) || tfRank(a.timeframe) - tfRank(b.timeframe);
    if (!state.sortKey) {
      rows.sort((a, b) => severity(a) - severity(b) || base(a, b));
    } else {
      const k = state.sortKey;
      const dir = state.sortAsc ? 1 : -1;
      rows.sort((a, b) => {
        let x = a[k], y = b[k];
        if (k === "timeframe") { x = tfRank(x); y = tfRank(y); }
        if (k === "state") { x = STATE_RANK[x] ?? 1; y = STATE_RANK[y] ?? 1; }
        if (x === y) return base(a, b);
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * dir;
      });
    }
    return rows;
  }

  function stateTitle(t) {
    const parts = [];
    if (t.lease_owner) parts.push(`held by ${t.lease_owner} until ${utc(t.lease_expires_utc, true)} UTC`);
    if (t.last_rescue) parts.push(`last rescue: ${t.last_rescue}`);
    if (t.invalidations_pending) parts.push(`${num(t.invalidations_pending)} window(s) to re-aggregate (late or corrected data)`);
    parts.push(`${num(t.total_runs)} runs, ${num(t.transient_failures)} transient and ${num(t.hard_failures)} hard failures`);
    return parts.join("\n");
  }

  function renderTasks() {
    // The server's clock (the database's now, or the fixed --now), not the browser's.
    const nowMs = state.nowIso ? Date.parse(state.nowIso) : Date.now();
    const rows = sortedTasks();
    const sel = state.selected;
    const html = rows.map((t) => {
      const cls = [t.state === "hard_failed" ? "hard_failed" : "", t.state === "disabled" ? "disabled" : "",
        t.streak > 0 && t.state !== "hard_failed" ? "failing" : "",
        sel && sel.symbol === t.symbol && sel.timeframe === t.timeframe ? "selected" : ""].join(" ");
      const badge = ["idle", "running", "hard_failed", "disabled"].includes(t.state) ? t.state : "other";
      const cursor = t.cursor_utc ? utc(t.cursor_utc, true) : '<span class="dim">not started</span>';
      return `<tr class="${cls}" data-symbol="${esc(t.symbol)}" data-timeframe="${esc(t.timeframe)}">` +
        `<td class="sym" title="session ${esc(t.session || "24x7")}">${esc(t.symbol)}` +
        `${t.session && t.session !== "24x7" ? ` <span class="dim">${esc(t.session)}</span>` : ""}</td>` +
        `<td>${esc(t.timeframe)}${t.mandatory ? '<span class="mand" title="mandatory">M</span>' : ""}</td>` +
        `<td><span class="badge ${badge}" title="${esc(stateTitle(t))}">${esc(t.state.replace("_", " "))}</span></td>` +
        `<td title="${esc(t.cursor_utc || "")}">${cursor}</td>` +
        `<td class="num ${lagClass(t.lag_frontier_seconds, t.timeframe)}" title="frontier ${esc(t.frontier_utc || "unknown: no source data")}">${t.lag_frontier_seconds === null ? "–" : duration(t.lag_frontier_seconds)}</td>` +
        `<td class="num dim">${t.lag_now_seconds === null ? "–" : duration(t.lag_now_seconds)}</td>` +
        `<td title="${esc(t.next_run_utc || "")}">${esc(relative(t.next_run_utc, nowMs))}</td>` +
        `<td class="num ${t.streak > 0 ? "lag-bad" : "dim"}">${t.streak}</td>` +
        `<td class="num">${num(t.bars_created)}</td>` +
        `<td class="num ${t.bars_rewritten > 0 ? "" : "dim"}">${num(t.bars_rewritten)}</td>` +
        `<td class="num ${t.bars_withdrawn > 0 ? "" : "dim"}">${num(t.bars_withdrawn)}</td>` +
        `<td class="num dim">${num(t.bars_unchanged)}</td>` +
        `<td class="num ${t.bars_quality_poor > 0 ? "" : "dim"}">${num(t.bars_quality_poor)}</td>` +
        `<td class="err" title="${esc(t.last_error || "")}">${esc(t.last_error || "")}</td></tr>`;
    });
    $("#tasks tbody").innerHTML = html.join("");
    $("#tasks-empty").hidden = state.tasks.length > 0;
    $("#task-count").textContent = rows.length === state.tasks.length ? `${rows.length}` : `${rows.length} of ${state.tasks.length}`;
    for (const th of document.querySelectorAll("#tasks th")) {
      th.classList.toggle("sorted", th.dataset.key === state.sortKey);
      th.classList.toggle("asc", th.dataset.key === state.sortKey && state.sortAsc);
    }
  }

  // One line across the top while something is wrong: the database, the schema, or the server.
  function setBanner(text) {
    const el = $("#banner");
    el.hidden = !text;
    el.textContent = text || "";
  }

  async function refreshReady() {
    const el = $("#ready");
    try {
      const res = await fetch("/readyz", { cache: "no-store" });
      const body = await res.json();
      el.className = "ready " + (res.ok ? "ok" : "bad");
      el.textContent = res.ok ? "ready" : "not ready";
      el.title = body.reason || "";
      setBanner(res.ok ? "" : "Not ready: " + body.reason);
    } catch (e) {
      el.className = "ready bad";
      el.textContent = "server unreachable";
      el.title = String(e);
      setBanner("The baragg server does not answer; retrying every " + state.refreshMs / 1000 + "s.");
    }
  }

  async function refreshTasks() {
    try {
      const [summary, tasks, cron] = await Promise.all([getJSON("/api/summary"), getJSON("/api/tasks"),
        getJSON("/api/cron").catch(() => null)]);
      state.tasks = tasks.tasks;
      state.nowIso = tasks.now;
      renderChips(summary, cron);
      renderTasks();
      $("#updated").textContent = "updated " + utc(tasks.now, true).slice(11) + " UTC";
      $("#updated").title = "last refresh of the task table";
      $("#updated").classList.remove("lag-bad");
    } catch (e) {
      $("#updated").textContent = "refresh failed";
      $("#updated").title = e.message;
      $("#updated").classList.add("lag-bad");
    }
  }

  // ---------------------------------------------------------------------------------------------
  // chart
  // ---------------------------------------------------------------------------------------------
  function makeChart() {
    const LC = window.LightweightCharts;
    const chart = LC.createChart($("#chart"), {
      autoSize: true,
      layout: {
        background: { type: "solid", color: "#0d1117" }, textColor: "#8b96a3", fontSize: 11,
        panes: { separatorColor: "#232b35", separatorHoverColor: "#2f3a47" },
      },
      grid: { vertLines: { color: "#161c24" }, horzLines: { color: "#161c24" } },
      rightPriceScale: { borderColor: "#232b35" },
      timeScale: {
        borderColor: "#232b35", timeVisible: true, secondsVisible: false, rightOffset: 4,
        minBarSpacing: 0.002, enableConflation: true,
      },
      crosshair: { mode: LC.CrosshairMode.Normal },
      localization: { dateFormat: "yyyy-MM-dd" },
    });
    state.candles = chart.addSeries(LC.CandlestickSeries, {
      upColor: `rgb(${UP})`, downColor: `rgb(${DOWN})`, borderVisible: false,
      wickUpColor: `rgb(${UP})`, wickDownColor: `rgb(${DOWN})`, priceLineVisible: true,
    });
    state.volume = chart.addSeries(LC.HistogramSeries, {
      priceFormat: { type: "volume" }, priceLineVisible: false, lastValueVisible: false,
    }, 1);
    const panes = chart.panes();
    if (panes.length > 1) { panes[0].setStretchFactor(0.8); panes[1].setStretchFactor(0.2); }
    chart.subscribeCrosshairMove(showTooltip);
    chart.timeScale().subscribeVisibleLogicalRangeChange((range) => {
      if (range && range.from < 10) loadOlder();
    });
    state.chart = chart;
  }

  function precisionOf(values) {
    let p = 0;
    for (let i = Math.max(0, values.length - 200); i < values.length; i++) {
      const s = String(values[i]);
      const dot = s.indexOf(".");
      if (dot >= 0 && !s.includes("e")) p = Math.max(p, s.length - dot - 1);
    }
    return Math.min(p, 6);
  }

  function candleOf(c, i) {
    const up = c.close[i] >= c.open[i];
    const q = c.quality[i];
    const a = q === null || q === undefined ? 1 : (QUALITY_ALPHA[q] ?? 0.2);
    const rgb = up ? UP : DOWN;
    const color = a === 1 ? `rgb(${rgb})` : `rgba(${rgb}, ${a})`;
    return [
      { time: c.ts[i], open: c.open[i], high: c.high[i], low: c.low[i], close: c.close[i], color, wickColor: color, borderColor: color },
      { time: c.ts[i], value: c.vol[i] ?? 0, color: `rgba(${rgb}, ${(0.45 * a).toFixed(3)})` },
    ];
  }

  function setChartMessage(text) {
    let el = document.querySelector("#chart .chart-msg");
    if (!text) { if (el) el.remove(); return; }
    if (!el) { el = document.createElement("div"); el.className = "chart-msg"; $("#chart").appendChild(el); }
    el.textContent = text;
  }

  function publishCount() {
    const n = state.bars ? state.bars.ts.length : 0;
    window.baraggChart.candleCount = n;
    $("#chart").dataset.candleCount = String(n);
  }

  async function loadChart() {
    const sel = state.selected;
    if (!sel) return;
    const seq = ++state.loadSeq;
    const limit = $("#limit").value;
    window.baraggChart.ready = false;
    $("#chart").dataset.state = "loading";
    $("#chart-info").textContent = `loading ${sel.symbol} ${sel.timeframe}…`;
    let body;
    try {
      body = await getJSON(`/api/bars?symbol=${encodeURIComponent(sel.symbol)}&timeframe=${encodeURIComponent(sel.timeframe)}&limit=${limit}`);
    } catch (e) {
      if (seq !== state.loadSeq) return;
      $("#chart-info").textContent = "";
      setChartMessage("cannot load bars: " + e.message);
      $("#chart").dataset.state = "error";
      return;
    }
    if (seq !== state.loadSeq) return; // a newer selection won
    if (!state.chart) makeChart();
    const c = body.columns;
    state.bars = c;
    state.hasOlder = body.truncated;
    state.lastTs = c.ts.length ? c.ts[c.ts.length - 1] : null;
    const precision = precisionOf(c.close);
    state.candles.applyOptions({ priceFormat: { type: "price", precision, minMove: Math.pow(10, -precision) } });
    drawAll();
    const n = c.ts.length;
    if (n) state.chart.timeScale().setVisibleLogicalRange({ from: Math.max(0, n - 240), to: n + 3 });
    setChartMessage(n ? "" : `no ${sel.timeframe} bars for ${sel.symbol} yet`);
    window.baraggChart.symbol = sel.symbol;
    window.baraggChart.timeframe = sel.timeframe;
    window.baraggChart.ready = true;
    $("#chart").dataset.state = "ready";
  }

  // (Re)draw every loaded bar and say what is loaded.
  function drawAll() {
    const c = state.bars;
    const sel = state.selected;
    const n = c.ts.length;
    const candles = new Array(n);
    const volume = new Array(n);
    state.index = new Map();
    for (let i = 0; i < n; i++) {
      [candles[i], volume[i]] = candleOf(c, i);
      state.index.set(c.ts[i], i);
    }
    state.candles.setData(candles);
    state.volume.setData(volume);
    const poor = c.quality.reduce((acc, q) => acc + (q !== null && q <= 0 ? 1 : 0), 0);
    $("#chart-info").textContent = n
      ? `${num(n)} bars${state.hasOlder ? " (older ones load as you pan left)" : ""} · ${utc(new Date(c.ts[0] * 1000).toISOString(), true)} → ${utc(new Date(c.ts[n - 1] * 1000).toISOString(), true)}` +
        (sel.timeframe === "1m" ? " · raw 1m" : ` · ${num(poor)} poor`)
      : "";
    publishCount();
  }

  // Panning to the oldest loaded bar fetches the bars before it (as many as the "last N" choice).
  async function loadOlder() {
    const sel = state.selected;
    if (!sel || !state.bars || !state.hasOlder || state.loadingOlder || !state.bars.ts.length) return;
    const seq = state.loadSeq;
    state.loadingOlder = true;
    try {
      const first = state.bars.ts[0];
      const body = await getJSON(`/api/bars?symbol=${encodeURIComponent(sel.symbol)}&timeframe=${encodeURIComponent(sel.timeframe)}&to=${first}&limit=${$("#limit").value}`);
      if (seq !== state.loadSeq) return;
      const k = body.count;
      state.hasOlder = body.truncated;
      if (k) {
        const range = state.chart.timeScale().getVisibleLogicalRange();
        for (const key of Object.keys(state.bars)) state.bars[key] = body.columns[key].concat(state.bars[key]);
        drawAll();
        if (range) state.chart.timeScale().setVisibleLogicalRange({ from: range.from + k, to: range.to + k });
      } else {
        drawAll();
      }
    } catch (e) {
      /* keep what is loaded; the next pan tries again */
    } finally {
      state.loadingOlder = false;
    }
  }

  // Append bars that appeared since the last load (and redraw the last one, which may have changed).
  async function refreshChart() {
    const sel = state.selected;
    if (!sel || !state.bars || !$("#live").checked) return;
    if (state.lastTs === null) {
      // Nothing to chart yet: load everything as soon as the first bars exist.
      try {
        const probe = await getJSON(`/api/bars?symbol=${encodeURIComponent(sel.symbol)}&timeframe=${encodeURIComponent(sel.timeframe)}&limit=1`);
        if (probe.count && state.lastTs === null) loadChart();
      } catch (e) { /* next refresh */ }
      return;
    }
    const seq = state.loadSeq;
    let body;
    try {
      body = await getJSON(`/api/bars?symbol=${encodeURIComponent(sel.symbol)}&timeframe=${encodeURIComponent(sel.timeframe)}&from=${state.lastTs}&limit=5000`);
    } catch (e) { return; }
    if (seq !== state.loadSeq || !body.count) return;
    const c = body.columns;
    const b = state.bars;
    for (let i = 0; i < c.ts.length; i++) {
      if (c.ts[i] < state.lastTs) continue;
      const [candle, vol] = candleOf(c, i);
      state.candles.update(candle);
      state.volume.update(vol);
      let j = state.index.get(c.ts[i]);
      if (j === undefined) { j = b.ts.length; state.index.set(c.ts[i], j); }
      for (const k of Object.keys(b)) b[k][j] = c[k][i];
      state.lastTs = c.ts[i];
    }
    publishCount();
  }

  function showTooltip(param) {
    const tip = $("#tooltip");
    if (!param.point || param.time === undefined || !state.bars) { tip.hidden = true; return; }
    const i = state.index.get(param.time);
    if (i === undefined) { tip.hidden = true; return; }
    const b = state.bars;
    const p = state.candles.options().priceFormat.precision;
    const f = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(p));
    const q = b.quality[i];
    let quality = "";
    if (q !== null && q !== undefined) {
      const cls = q <= 0 ? "q-bad" : "";
      quality = `\n<span class="t">quality</span> <span class="${cls}">${q} ${QUALITY_NAME[q] || ""}</span>` +
        (b.source_candles[i] !== null ? ` <span class="t">(${b.source_candles[i]}/${b.expected_candles[i]} source bars)</span>` : "");
    }
    const change = b.open[i] ? ((b.close[i] - b.open[i]) / b.open[i]) * 100 : 0;
    tip.innerHTML =
      `<span class="t">${esc(state.selected.symbol)} ${esc(state.selected.timeframe)}</span> ${utc(new Date(b.ts[i] * 1000).toISOString(), true)} UTC\n` +
      `<span class="t">O</span> ${f(b.open[i])}  <span class="t">H</span> ${f(b.high[i])}\n` +
      `<span class="t">L</span> ${f(b.low[i])}  <span class="t">C</span> ${f(b.close[i])}  <span class="${change >= 0 ? "" : "q-bad"}">${change >= 0 ? "+" : ""}${change.toFixed(2)}%</span>\n` +
      `<span class="t">vol</span> ${b.vol[i] === null ? "–" : num(b.vol[i])}` + quality;
    tip.hidden = false;
    const pane = $("#chart").getBoundingClientRect();
    const host = $("#chart-pane").getBoundingClientRect();
    const x = param.point.x + (pane.left - host.left);
    const y = param.point.y + (pane.top - host.top);
    const w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = (x + 16 + w > host.width - 70 ? x - w - 16 : x + 16) + "px";
    tip.style.top = Math.max(pane.top - host.top + 4, Math.min(y - h / 2, host.height - h - 30)) + "px";
  }

  // ---------------------------------------------------------------------------------------------
  // selection
  // ---------------------------------------------------------------------------------------------
  function symbolInfo(symbol) {
    return state.symbols.find((s) => s.symbol === symbol);
  }

  function renderSelectors() {
    const sel = state.selected;
    const symSel = $("#symbol");
    symSel.innerHTML = state.symbols.map((s) => `<option${sel && s.symbol === sel.symbol ? " selected" : ""}>${esc(s.symbol)}</option>`).join("");
    const info = sel && symbolInfo(sel.symbol);
    const tfs = info ? info.timeframes : [];
    $("#timeframes").innerHTML = tfs.map((tf) => `<button type="button" data-tf="${esc(tf)}" class="${sel && sel.timeframe === tf ? "on" : ""}">${esc(tf)}</button>`).join("");
  }

  function select(symbol, timeframe, load = true) {
    const info = symbolInfo(symbol);
    if (info && !info.timeframes.includes(timeframe)) {
      timeframe = info.timeframes.includes("5m") ? "5m" : info.timeframes[0];
    }
    if (!symbol || !timeframe) return;
    state.selected = { symbol, timeframe };
    history.replaceState(null, "", `#symbol=${encodeURIComponent(symbol)}&tf=${encodeURIComponent(timeframe)}`);
    renderSelectors();
    renderTasks();
    if (load) loadChart();
  }

  function initialSelection() {
    const h = new URLSearchParams(location.hash.slice(1));
    if (h.get("symbol") && symbolInfo(h.get("symbol"))) return [h.get("symbol"), h.get("tf") || "5m"];
    const withBars = state.symbols.find((s) => s.timeframes.length);
    if (!withBars) return [null, null];
    return [withBars.symbol, withBars.timeframes.includes("5m") ? "5m" : withBars.timeframes[0]];
  }

  // ---------------------------------------------------------------------------------------------
  // start
  // ---------------------------------------------------------------------------------------------
  function wire() {
    $("#filter").addEventListener("input", () => renderTasks());
    $("#problems-only").addEventListener("change", () => renderTasks());
    for (const th of document.querySelectorAll("#tasks th")) {
      th.addEventListener("click", () => {
        const k = th.dataset.key;
        if (state.sortKey === k) {
          if (state.sortAsc) state.sortAsc = false; else state.sortKey = null; // third click: problems first
        } else { state.sortKey = k; state.sortAsc = true; }
        renderTasks();
      });
    }
    $("#tasks tbody").addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr");
      if (tr) select(tr.dataset.symbol, tr.dataset.timeframe);
    });
    $("#symbol").addEventListener("change", (ev) => select(ev.target.value, state.selected ? state.selected.timeframe : "5m"));
    $("#timeframes").addEventListener("click", (ev) => {
      const b = ev.target.closest("button");
      if (b && state.selected) select(state.selected.symbol, b.dataset.tf);
    });
    $("#limit").addEventListener("change", () => loadChart());
    $("#fit").addEventListener("click", () => { if (state.chart) state.chart.timeScale().fitContent(); });
    $("#chart-pane").addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
  }

  async function start() {
    wire();
    try {
      const cfg = await getJSON("/api/config");
      state.refreshMs = Math.max(1000, (cfg.refresh_seconds || 5) * 1000);
      $("#version").textContent = "v" + cfg.version;
    } catch (e) { /* defaults */ }
    let symbolsFailed = false;
    const symbolsLoaded = getJSON("/api/symbols")
      .then((s) => { state.symbols = s.symbols; })
      .catch(() => { symbolsFailed = true; });
    await Promise.all([refreshTasks(), refreshReady(), symbolsLoaded]);
    const [symbol, tf] = initialSelection();
    if (symbol) select(symbol, tf);
    else { renderSelectors(); setChartMessage(symbolsFailed ? "waiting for the database" : "no bars yet"); }
    setInterval(async () => {
      await refreshTasks();
      refreshReady();
      refreshChart();
    }, state.refreshMs);
    setInterval(async () => {
      try { state.symbols = (await getJSON("/api/symbols")).symbols; } catch (e) { return; }
      renderSelectors();
      if (!state.selected) {
        const [s, t] = initialSelection();
        if (s) select(s, t);
      }
    }, Math.max(30000, state.refreshMs * 6));
  }

  if (!window.LightweightCharts) {
    document.body.insertAdjacentHTML("afterbegin", '<div class="chip bad">chart library failed to load</div>');
  }
  start();
})();
