// Lemonade Supervisor dashboard. Plain JavaScript, no framework, no build step.
//
// Data flow: the page reads GET /api/v1/status (everything it shows) and listens to
// GET /api/v1/events (server-sent events). Each event triggers a fresh status read, and a slow
// poll keeps memory figures and the plot moving between events. Steering buttons call the same
// lifecycle routes as the CLI; an error answer is shown in the banner, never swallowed.
//
// API key: kept in sessionStorage (this tab only) and sent as "Authorization: Bearer". The
// event stream is read with fetch() and a ReadableStream because EventSource cannot send
// headers. A 401 anywhere shows the key prompt.
"use strict";

const KEY_STORAGE = "lemonade.apiKey";
const POLL_MS = 2000;            // status refresh between events (memory, plot)
const TICK_MS = 250;             // countdown redraw
const RECONNECT_MS = 2000;       // after the event stream ends or fails
const PLOT_WINDOW_MS = 5 * 60 * 1000;
const TIMELINE_MAX = 200;
const COLORS = ["#d9a400", "#1565c0", "#2e7d32", "#8e24aa", "#c62828", "#00838f", "#6d4c41"];

const $ = (id) => document.getElementById(id);

const view = {
  status: null,          // the last /api/v1/status answer
  clockOffsetMs: 0,      // server clock minus ours, so countdowns follow the server's clock
  samples: [],           // [{t, byModel: {name: bytes}}] for the memory plot
  seenEvents: new Set(), // timeline entries already shown (history and stream overlap)
  colors: new Map(),     // model -> plot colour, stable for the page's life
  refreshQueued: false,
  started: false,
};

// ------------------------------------------------------------------ API calls

class Unauthorized extends Error {}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

// One JSON call. Resolves to the parsed body; rejects with the server's own message.
async function api(method, path, body) {
  const headers = authHeaders();
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (response.status === 401) {
    throw new Unauthorized(errorMessage(data, text) || "an API key is required");
  }
  if (!response.ok) {
    const message = errorMessage(data, text) || response.statusText;
    throw new Error(`${method} ${path}: ${response.status} ${message}`);
  }
  return data;
}

// OpenAI's {"error": {"message"}} or Ollama's {"error": "..."}.
function errorMessage(data, text) {
  if (data && data.error) {
    return typeof data.error === "string" ? data.error : data.error.message;
  }
  return text ? text.slice(0, 300) : "";
}

// Runs a steering action: shows its error, refreshes the view either way.
async function act(what, fn) {
  try {
    await fn();
    hideError();
  } catch (e) {
    if (e instanceof Unauthorized) {
      showLogin(true);
    } else {
      showError(`${what} failed: ${e.message}`);
    }
  }
  scheduleRefresh();
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

// ------------------------------------------------------------------ login

function showLogin(refused) {
  const hadKey = Boolean(sessionStorage.getItem(KEY_STORAGE));
  const message = $("login-message");
  if (refused && hadKey) {
    message.textContent = "That API key was refused. Enter the server's key.";
    message.className = "login-refused";
  } else {
    message.textContent = "This server needs an API key.";
    message.className = "";
  }
  $("dashboard").hidden = true;
  $("login").hidden = false;
  $("key-input").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value);
  $("key-input").value = "";
  await start();
});

// ------------------------------------------------------------------ status

async function refresh() {
  let status;
  try {
    status = await api("GET", "/api/v1/status");
  } catch (e) {
    if (e instanceof Unauthorized) {
      showLogin(true);
    } else {
      $("connection").textContent = "server unreachable";
      $("connection").className = "connection down";
    }
    return false;
  }
  $("login").hidden = true;
  $("dashboard").hidden = false;
  view.status = status;
  if (status.server.time) {
    view.clockOffsetMs = Date.parse(status.server.time) - Date.now();
  }
  sample(status);
  render(status);
  return true;
}

// Coalesces a burst of events (spawned, loaded, ...) into one status read.
function scheduleRefresh() {
  if (view.refreshQueued) return;
  view.refreshQueued = true;
  setTimeout(() => { view.refreshQueued = false; refresh(); }, 100);
}

function render(status) {
  const server = status.server;
  $("server-info").textContent =
    `v${server.version} · pid ${server.pid} · global idle timeout ` +
    `${duration(server.auto_unload_timer_s)} (${shortSource(server.auto_unload_timer_source)})`;
  $("global-timeout-now").textContent = `now ${duration(server.auto_unload_timer_s)}, ` +
    `set by ${shortSource(server.auto_unload_timer_source)}`;
  $("global-timeout-now").title = server.auto_unload_timer_source;
  renderModels(status.models);
  renderDevices(status.devices || [], status.models);
  renderZygotes(server.zygotes || []);
  for (const event of status.recent_events || []) addToTimeline(event);
  drawPlot();
}

function renderModels(models) {
  const body = $("models").tBodies[0];
  const rows = new Map([...body.rows].map((row) => [row.dataset.model, row]));
  models.forEach((model, index) => {
    let row = rows.get(model.name);
    if (!row) row = newModelRow(model.name);
    rows.delete(model.name);
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    fillModelRow(row, model);
  });
  for (const gone of rows.values()) gone.remove();  // removed by a config reload
}

// Rows are built once per model and then updated in place, so an input the user is typing in
// (the timeout box) survives the refreshes.
function newModelRow(name) {
  const row = document.createElement("tr");
  row.dataset.model = name;
  for (const cls of ["name", "type", "state", "device", "pid", "memory", "requests",
                     "timeout", "source", "expires", "last-eviction"]) {
    const cell = row.insertCell();
    cell.className = cls;
  }
  const actions = row.insertCell();
  actions.className = "actions";
  actions.append(
    button("Load", "load", () => act(`loading ${name}`,
      () => api("POST", "/api/v1/load", { model_name: name }))),
    button("Unload", "unload", () => act(`unloading ${name}`,
      () => api("POST", "/api/v1/unload", { model_name: name }))),
    button("Pin", "pin", () => act(`pinning ${name}`,
      () => api("POST", "/api/v1/pin", { model_name: name, pinned: !row.dataset.pinned }))),
  );
  const input = document.createElement("input");
  input.className = "timeout-input";
  input.placeholder = "5m";
  input.setAttribute("aria-label", `idle timeout for ${name}`);
  actions.append(input, button("Set timeout", "set-timeout", () => act(
    `setting the idle timeout of ${name}`,
    () => api("POST", "/api/v1/timeout",
              { model_name: name, idle_timeout: timeoutValue(input.value) }))));
  return row;
}

function button(label, action, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.addEventListener("click", onClick);
  return b;
}

function fillModelRow(row, m) {
  const cell = (cls) => row.querySelector("td." + cls);
  row.dataset.pinned = m.pinned ? "1" : "";
  row.dataset.state = m.state;
  row.dataset.expiresAt = m.expires_at || "";
  cell("name").textContent = m.name + (m.pinned ? " (pinned)" : "");
  cell("type").textContent = m.type;
  const state = cell("state");
  state.className = "state state-" + m.state;
  state.textContent = m.state;
  if (m.state === "loading" && m.progress) {
    // The phase the worker last reported, and a bar where the fraction is known.
    const p = m.progress;
    const bar = document.createElement("progress");
    if (typeof p.fraction === "number") bar.value = p.fraction;
    const phase = document.createElement("small");
    phase.textContent = ` ${p.phase || ""}`;
    state.append(" ", bar, phase);
  } else if (m.state === "failed" && m.last_error) {
    state.title = m.last_error;
  }
  cell("device").textContent = m.placed_device || m.device || "-";
  cell("pid").textContent = m.pid ?? "-";
  const mem = m.memory || {};
  const held = (mem.rss_bytes || 0) + (mem.vram_bytes || 0);
  cell("memory").textContent = held ? bytes(mem.rss_bytes) +
    (mem.vram_bytes ? ` + ${bytes(mem.vram_bytes)} VRAM` : "") : "-";
  cell("requests").textContent = `${m.in_flight ?? 0} / ${m.waiting ?? 0}`;
  cell("timeout").textContent = duration(m.idle_timeout_s);
  cell("source").textContent = shortSource(m.idle_timeout_source);
  cell("source").title = m.idle_timeout_source;
  const last = m.last_eviction;
  cell("last-eviction").textContent = last ? `${last.reason} at ${clock(Date.parse(last.at))}` : "-";
  row.querySelector('[data-action="pin"]').textContent = m.pinned ? "Unpin" : "Pin";
  fillCountdown(row);
}

// The countdown: only while a timer runs (the server sends expires_at null when the model is
// busy, pinned, never unloads for idleness, or is not loaded).
function fillCountdown(row) {
  const cell = row.querySelector("td.expires");
  const at = row.dataset.expiresAt;
  if (!at) {
    const state = row.dataset.state;
    cell.textContent = state === "ready" ? (row.dataset.pinned ? "pinned" : "-") : "-";
    return;
  }
  const left = Math.max(0, (Date.parse(at) - (Date.now() + view.clockOffsetMs)) / 1000);
  cell.textContent = countdown(left);
}

function renderDevices(devices, models) {
  const root = $("devices");
  root.replaceChildren();
  for (const d of devices) {
    const total = d.budget_bytes || d.total_bytes || 0;
    const box = document.createElement("div");
    box.className = "device";
    box.dataset.device = d.name;
    const title = document.createElement("div");
    const budget = d.budget_bytes ? `budget ${bytes(d.budget_bytes)}` : "no budget";
    title.textContent = `${d.name}${d.label ? " (" + d.label + ")" : ""}: ` +
      `models ${bytes(d.used_by_models_bytes || 0)} · free ${bytes(d.free_bytes)} · ${budget}`;
    const bar = document.createElement("div");
    bar.className = "bar";
    const legend = document.createElement("div");
    legend.className = "legend";
    for (const m of models) {
      const n = (m.memory_by_device || {})[d.name];
      if (!n || !total) continue;
      const part = document.createElement("span");
      part.style.width = `${Math.min(100, (100 * n) / total)}%`;
      part.style.background = colorOf(m.name);
      part.title = `${m.name}: ${bytes(n)}`;
      bar.append(part);
      legend.append(swatch(m.name, `${m.name} ${bytes(n)}`));
    }
    box.append(title, bar, legend);
    root.append(box);
  }
}

function renderZygotes(zygotes) {
  const body = $("zygotes").tBodies[0];
  body.replaceChildren();
  for (const z of zygotes) {
    const row = body.insertRow();
    // What it holds: the modules it imported once (learned from its workers' loads), so
    // every worker forked from it starts with them; no weights, no VRAM.
    const held = z.learned_modules ? `${z.learned_modules} modules` : "-";
    for (const value of [z.kind, z.state, z.pid ?? "-", bytes(z.rss_bytes), held,
                         z.workers ?? "-", z.forks ?? 0]) {
      row.insertCell().textContent = value;
    }
  }
  $("no-zygotes").hidden = zygotes.length > 0;
}

// ------------------------------------------------------------------ timeline

const TIMELINE_KINDS = new Set(["loading", "spawned", "loaded", "unloaded", "crashed",
                                "load_failed", "load_refused", "zygote_stopped"]);

function addToTimeline(event) {
  if (!TIMELINE_KINDS.has(event.event)) return;
  const id = `${event.event}|${event.model}|${event.at}`;
  if (view.seenEvents.has(id)) return;
  view.seenEvents.add(id);
  const list = $("timeline");
  const item = document.createElement("li");
  item.dataset.event = event.event;
  item.dataset.model = event.model || "";
  item.dataset.at = event.at;
  const time = document.createElement("time");
  time.textContent = clock(event.at * 1000);
  const details = [];
  if (event.reason) details.push(`reason: ${event.reason}`);
  if (event.pid) details.push(`pid ${event.pid}`);
  if (event.load_seconds != null) details.push(`in ${event.load_seconds.toFixed(2)}s`);
  if (event.exit != null) details.push(`exit ${event.exit}`);
  if (event.error) details.push(event.error);
  item.append(time, `${event.model || event.kind || "server"} ${event.event}` +
              (details.length ? ` (${details.join(", ")})` : ""));
  // Newest first; history and stream can interleave, so keep the list sorted by time.
  let before = null;
  for (const other of list.children) {
    if (Number(other.dataset.at) < event.at) { before = other; break; }
  }
  list.insertBefore(item, before);
  while (list.children.length > TIMELINE_MAX) list.lastChild.remove();
}

// ------------------------------------------------------------------ memory plot

function sample(status) {
  const byModel = {};
  for (const m of status.models) {
    const mem = m.memory || {};
    const held = m.pid ? (mem.rss_bytes || 0) + (mem.vram_bytes || 0) : 0;
    if (held) byModel[m.name] = held;
  }
  const now = Date.now();
  view.samples.push({ t: now, byModel });
  while (view.samples.length && view.samples[0].t < now - PLOT_WINDOW_MS) view.samples.shift();
}

// One line per model (bytes held, RAM + VRAM) over the last PLOT_WINDOW_MS.
function drawPlot() {
  const canvas = $("memory-plot");
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  g.clearRect(0, 0, w, h);
  const names = [...new Set(view.samples.flatMap((s) => Object.keys(s.byModel)))];
  const peak = Math.max(1, ...view.samples.flatMap((s) => Object.values(s.byModel)));
  const now = Date.now();
  const x = (t) => pad + ((t - (now - PLOT_WINDOW_MS)) / PLOT_WINDOW_MS) * (w - 2 * pad);
  const y = (v) => h - pad - (v / peak) * (h - 2 * pad);
  g.strokeStyle = "#ccc";
  g.beginPath(); g.moveTo(pad, pad); g.lineTo(pad, h - pad); g.lineTo(w - pad, h - pad); g.stroke();
  g.fillStyle = "#777";
  g.font = "11px sans-serif";
  g.fillText(bytes(peak), pad + 2, pad - 6);
  g.fillText("5 min ago", pad, h - 6);
  g.fillText("now", w - pad - 18, h - 6);
  for (const name of names) {
    g.strokeStyle = colorOf(name);
    g.lineWidth = 2;
    g.beginPath();
    let drawing = false;
    for (const s of view.samples) {
      const v = s.byModel[name];
      if (v === undefined) { drawing = false; continue; }  // a gap while it was unloaded
      if (drawing) g.lineTo(x(s.t), y(v)); else g.moveTo(x(s.t), y(v));
      drawing = true;
    }
    g.stroke();
    const last = view.samples[view.samples.length - 1];
    if (last && last.byModel[name] !== undefined) {  // the newest reading, as a dot
      g.fillStyle = colorOf(name);
      g.beginPath();
      g.arc(x(last.t), y(last.byModel[name]), 3, 0, 2 * Math.PI);
      g.fill();
    }
  }
  $("memory-legend").replaceChildren(...names.map((n) => swatch(n, n)));
}

function colorOf(name) {
  if (!view.colors.has(name)) view.colors.set(name, COLORS[view.colors.size % COLORS.length]);
  return view.colors.get(name);
}

function swatch(name, label) {
  const span = document.createElement("span");
  const box = document.createElement("span");
  box.className = "swatch";
  box.style.background = colorOf(name);
  span.append(box, label);
  return span;
}

// ------------------------------------------------------------------ event stream

// Reads the SSE stream by hand: blocks separated by a blank line, "event:" and "data:" lines
// in each; ":" lines are keep-alives. Resolves when the stream ends.
async function followEvents() {
  const response = await fetch("/api/v1/events", { headers: authHeaders() });
  if (response.status === 401) throw new Unauthorized("refused");
  if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
  $("connection").textContent = "live";
  $("connection").className = "connection live";
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      try {
        onEvent(JSON.parse(data));
      } catch (e) {
        console.warn("unreadable event", data, e);
      }
    }
  }
}

function onEvent(event) {
  addToTimeline(event);
  scheduleRefresh();
}

async function streamForever() {
  for (;;) {
    try {
      await followEvents();
    } catch (e) {
      if (e instanceof Unauthorized) { showLogin(true); return; }
    }
    $("connection").textContent = "reconnecting…";
    $("connection").className = "connection down";
    await new Promise((r) => setTimeout(r, RECONNECT_MS));
    scheduleRefresh();  // catch up on what happened while disconnected
  }
}

// ------------------------------------------------------------------ formatting

function bytes(n) {
  if (n == null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

// Seconds as "1h30m", "5m", "45s"; null (the server's "never") as "never".
function duration(s) {
  if (s == null) return "never";
  if (s === 0) return "0s";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.round(s % 60);
  return (h ? `${h}h` : "") + (m ? `${m}m` : "") + (sec || (!h && !m) ? `${sec}s` : "");
}

function countdown(s) {
  const whole = Math.ceil(s);
  const m = Math.floor(whole / 60), sec = whole % 60;
  return m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
}

// "recipe (/etc/lemonade/lemonade.toml)" -> "recipe (lemonade.toml)": the level and the
// file's name; the whole text is the cell's tooltip.
function shortSource(source) {
  return String(source || "").replace(/\/(?:[^\s()/]+\/)+([^\s()/]+)/g, "$1");
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

// A timeout as typed: a bare number is seconds; anything else ("5m", "never") goes to the
// server as text, which checks it exactly as it checks the CLI's.
function timeoutValue(text) {
  const t = text.trim();
  return /^\d+(\.\d+)?$/.test(t) ? Number(t) : t;
}

// ------------------------------------------------------------------ start

$("error-close").addEventListener("click", hideError);
$("unload-all").addEventListener("click", () => act("unloading all models",
  () => api("POST", "/api/v1/unload", {})));
$("global-timeout-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act("setting the global idle timeout", () => api("POST", "/api/v1/timeout",
    { idle_timeout: timeoutValue($("global-timeout").value) }));
});

async function start() {
  if (!(await refresh())) {
    // The login prompt is showing (its submit calls start again), or the server is down.
    if ($("login").hidden) setTimeout(start, RECONNECT_MS);
    return;
  }
  if (view.started) return;
  view.started = true;
  streamForever();
  setInterval(refresh, POLL_MS);
  setInterval(() => {
    for (const row of $("models").tBodies[0].rows) fillCountdown(row);
  }, TICK_MS);
}

start();
