// The bus console: everything it shows comes from the gateway's WebSocket
// (the `console` op, once a second, and a live subscription for the tail).
// No library, no build step, nothing loaded from elsewhere (the gateway's
// Content-Security-Policy allows this origin alone). Text from the bus is
// only ever set as textContent: a payload is never markup.
"use strict";

const HISTORY_S = 300;          // what the plot shows
const TAIL_ROWS = 50;
const POLL_MS = 1000;
const state = { ws: null, nextId: 1, waiting: new Map(), samples: [], topics: null,
                tailPrefix: null, timer: null, forbidden: false };
const $ = (id) => document.getElementById(id);

function request(op, args = {}) {
  const id = state.nextId++;
  state.ws.send(JSON.stringify({ op, id, ...args }));
  return new Promise((resolve, reject) => state.waiting.set(id, { resolve, reject }));
}

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

async function start() {
  // Whether this gateway asks for a token: ask for one before connecting.
  const config = await fetch("console.json").then((r) => r.json()).catch(() => ({ tokens: false }));
  if (config.tokens && !sessionStorage.getItem("bus-token")) {
    setStatus("this gateway asks for a token (an admin's)", "closed");
    $("token-form").hidden = false;
    return;
  }
  connect();
}

function askToken(why) {
  sessionStorage.removeItem("bus-token");
  setStatus(why, "closed");
  $("token-form").hidden = false;
}

function connect() {
  const token = sessionStorage.getItem("bus-token");
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/");
  state.ws = ws;
  setStatus("connecting", "connecting");
  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    if (frame.type === "reply") {
      const waiter = state.waiting.get(frame.id);
      if (!waiter) return;
      state.waiting.delete(frame.id);
      frame.ok ? waiter.resolve(frame.result) : waiter.reject(new Error(`${frame.error.code}: ${frame.error.reason}`));
    } else if (frame.type === "messages" && frame.stream === 0) {
      for (const m of frame.messages) addTail(m);
    }
  };
  ws.onclose = (event) => {
    clearInterval(state.timer);
    for (const waiter of state.waiting.values()) waiter.reject(new Error("closed"));
    state.waiting.clear();
    if (state.forbidden) return;             // closed by us: the page asks for another token
    const why = event.reason || `code ${event.code}`;
    setStatus(`disconnected (${why})`, "closed");
    if (event.code === 1008 && /token|revoked/.test(why)) {
      askToken(`disconnected (${why})`);
      return;
    }
    setTimeout(connect, 2000);            // the gateway restarting: come back
  };
  ws.onopen = async () => {
    try {
      if (token) await request("auth", { token });
      else await request("ping");
      setStatus("connected", "open");
      $("token-form").hidden = true;
      if (state.tailPrefix !== null) await follow(state.tailPrefix);
      await poll();
      if (!state.forbidden) state.timer = setInterval(poll, POLL_MS);
    } catch (error) {
      setStatus(String(error.message), "closed");
    }
  };
}

async function poll() {
  let view;
  try {
    view = await request("console");
  } catch (error) {
    if (/^forbidden/.test(error.message)) {    // a token, not an admin's: ask for another
      state.forbidden = true;
      clearInterval(state.timer);
      state.ws.close(1000, "another token");
      askToken("this token is not an admin's: the console needs one");
      return;
    }
    setStatus(String(error.message), "closed");
    return;
  }
  const writer = view.processes.writer;
  const t = view.at_ns / 1e9;
  if (writer.up) state.samples.push({ t, stored: writer.stored, refused: writer.refused });
  state.samples = state.samples.filter((s) => s.t >= t - HISTORY_S - 2);
  renderProcesses(view);
  renderRates();
  renderTopics(view.topics, t);
  renderConsumers(writer);
  renderBatch(writer);
  renderGateway(view.gateway);
}

function rows(table, cells) {
  const body = $(table).tBodies[0];
  body.replaceChildren(...cells.map((row) => {
    const tr = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      if (cell && typeof cell === "object") { td.textContent = cell.text; td.className = cell.cls; }
      else td.textContent = cell;
      tr.append(td);
    }
    return tr;
  }));
}

const duration = (s) => (s == null ? "" : s < 120 ? `${Math.round(s)} s` : s < 7200 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
const num = (n) => (n == null ? "-" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 }));

function renderProcesses(view) {
  const list = Object.entries(view.processes).map(([name, p]) => [
    name, { text: p.up ? (p.problem ? "unhealthy" : "up") : "down", cls: p.up && !p.problem ? "up" : "down" },
    duration(p.uptime_seconds), p.problem || ""]);
  list.push(["gateway", { text: "up", cls: "up" }, duration(view.gateway.uptime_seconds),
             `${view.gateway.connections.open} connection(s)`]);
  rows("processes", list);
  for (const tr of $("processes").tBodies[0].rows) tr.dataset.process = tr.cells[0].textContent;
  for (const tr of $("processes").tBodies[0].rows) tr.dataset.state = tr.cells[1].textContent;
}

function rate(key) {
  const s = state.samples;
  if (s.length < 2) return null;
  const a = s[s.length - 2], b = s[s.length - 1];
  return b.t > a.t ? Math.max(0, (b[key] - a[key]) / (b.t - a.t)) : null;
}

function renderRates() {
  const stored = rate("stored"), refused = rate("refused");
  $("stored-rate").textContent = stored == null ? "-" : num(stored);
  $("refused-rate").textContent = refused == null ? "-" : num(refused);
  const canvas = $("rates"), g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 30;
  g.clearRect(0, 0, w, h);
  const s = state.samples, points = { stored: [], refused: [] };
  for (let i = 1; i < s.length; i++) {
    const dt = s[i].t - s[i - 1].t;
    if (dt <= 0) continue;
    for (const key of ["stored", "refused"]) points[key].push([s[i].t, Math.max(0, (s[i][key] - s[i - 1][key]) / dt)]);
  }
  const now = s.length ? s[s.length - 1].t : 0;
  const peak = Math.max(0, ...points.stored.map((p) => p[1]), ...points.refused.map((p) => p[1]));
  const top = Math.max(10, Math.ceil(peak * 1.1 / 10) * 10);   // whole numbers on the axis
  g.strokeStyle = "#ddd"; g.fillStyle = "#667"; g.font = "11px sans-serif";
  for (const frac of [0, 0.5, 1]) {
    const y = h - pad + frac * -(h - pad - 8);
    g.beginPath(); g.moveTo(pad, y); g.lineTo(w, y); g.stroke();
    g.fillText(num(top * frac), 2, y + 4);
  }
  g.fillText(`-${HISTORY_S / 60} min`, pad, h - 8); g.fillText("now", w - 26, h - 8);
  const x = (t) => pad + (w - pad) * (1 - (now - t) / HISTORY_S);
  const y = (v) => h - pad - (h - pad - 8) * (v / top);
  for (const [key, color] of [["stored", "#1f6feb"], ["refused", "#d1242f"]]) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    points[key].forEach(([t, v], i) => (i ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))));
    g.stroke();
  }
  canvas.dataset.points = String(points.stored.length);
}

function renderTopics(topics, t) {
  const before = state.topics;
  state.topics = { t, counts: topics };
  const list = Object.entries(topics).map(([group, count]) => {
    const old = before && before.counts[group] !== undefined ? before.counts[group] : count;
    const perS = before && t > before.t ? (count - old) / (t - before.t) : 0;
    return [group, perS, count];
  }).sort((a, b) => b[1] - a[1] || b[2] - a[2]).slice(0, 30);
  rows("topics", list.map(([group, perS, count]) => [group, num(perS), num(count)]));
}

function renderConsumers(writer) {
  rows("consumers", (writer.consumers || []).map((c) => [
    c.name, num(c.last_id), c.lag == null ? "?" : (c.lag_exact ? "" : ">=") + num(c.lag)]));
}

function renderBatch(writer) {
  if (!writer.up) { rows("batch", [["writer", "down"]]); return; }
  const b = writer.batch, l = writer.load;
  rows("batch", [
    ["batches", num(b.total_flushes)], ["average batch", num(b.avg_batch_size)],
    ["largest batch", num(b.max_batch_size)], ["last flush", `${num(b.last_flush_ms)} ms`],
    ["longest flush", `${num(b.max_flush_ms)} ms`],
    ["flushed by size / time / low load", `${num(b.flush_by_size)} / ${num(b.flush_by_time)} / ${num(b.flush_by_low_load)}`],
    ["flush errors", num(b.flush_errors)], ["buffered", num(writer.buffer)],
    ["load", `${num(l.requests_per_second)} msg/s (${l.is_low_load ? "low" : "high"}: threshold ${num(l.threshold)})`],
  ]);
}

function renderGateway(g) {
  const closed = Object.entries(g.connections.closed).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(", ");
  rows("gateway", [
    ["connections", `${num(g.connections.open)} open, ${num(g.connections.accepted)} accepted`],
    ["closed by reason", closed || "none"], ["live messages in", num(g.live.received)],
    ["messages sent", num(g.messages_sent)], ["published (stored / refused)", `${num(g.published.stored)} / ${num(g.published.refused)}`],
    ["memory", `${num(g.memory.rss / 1048576)} MiB of ${num(g.memory.limit / 1048576)}`],
  ]);
}

function addTail(m) {
  const li = document.createElement("li");
  const payload = m.encoding === "base64" ? `(${atob(m.payload).length} bytes)` : m.payload;
  li.textContent = `${new Date().toLocaleTimeString()}  ${m.topic}  ${payload.slice(0, 200)}`;
  li.dataset.topic = m.topic;
  const list = $("tail");
  list.prepend(li);
  while (list.children.length > TAIL_ROWS) list.lastChild.remove();
}

async function follow(prefix) {
  if (state.tailPrefix !== null && state.tailPrefix !== prefix) {
    await request("unsubscribe", { prefixes: [state.tailPrefix] }).catch(() => {});
  }
  await request("subscribe", { prefixes: [prefix] });
  state.tailPrefix = prefix;
  $("tail-following").textContent = `following "${prefix}"`;
}

$("tail-form").addEventListener("submit", (event) => {
  event.preventDefault();
  follow($("tail-prefix").value).catch((error) => { $("tail-following").textContent = error.message; });
});
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("bus-token", $("token").value.trim());
  $("token").value = "";
  state.forbidden = false;
  connect();
});
start();
