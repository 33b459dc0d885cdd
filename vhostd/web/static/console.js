// vhostd web console: renders the daemon's snapshots as they stream in
// (/api/events) and sends actions with the token.  Everything the daemon
// reports (device names, a guest's console) is shown as text, never as HTML.
"use strict";

let keep = 300;                 // samples per graph (one a second); the daemon says how many
const TOKEN_KEY = "vhostd-token"; // sessionStorage: this tab only, never a cookie
const history = new Map();      // device name -> [{time, ops, bytes, drops}]
let actionsOn = false;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function si(n, unit = "") {
  const steps = [[1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [f, p] of steps) if (Math.abs(n) >= f) return (n / f).toFixed(1) + " " + p + unit;
  return (Math.round(n * 10) / 10) + (unit ? " " + unit : "");
}

function bytes(n) {
  const steps = [[2 ** 40, "TiB"], [2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]];
  for (const [f, p] of steps) if (n >= f) return (n / f).toFixed(n % f ? 1 : 0) + " " + p;
  return n + " B";
}

// ---------------------------------------------------------------- devices

function frontEnd(d) {
  if (d.state !== "serving") return el("span", {class: "empty", text: "-"});
  if (!d.connected) return el("span", {class: "empty", text: "not connected"});
  const p = d.peer;
  return el("span", {class: "ok", text: p ? `pid ${p.pid} uid ${p.uid}` : "connected"});
}

function state(d) {
  if (d.state === "opening") {
    return el("div", {},
      el("span", {class: "warn", text: `opening its ${d.backend} store (attempt ${d.attempts})`}),
      el("div", {class: "reason", text: d.error || ""}));
  }
  if (d.needs_reset) {
    return el("div", {},
      el("span", {class: "bad", text: "NEEDS_RESET"}),
      el("div", {class: "reason", text: d.reset_reason || ""}));
  }
  return el("span", {class: d.connected ? "ok" : "", text: d.connected ? "running" : "waiting"});
}

function details(d) {
  const parts = [];
  if (d.type === "net") {
    if (d.mac) parts.push(`MAC ${d.mac}`);
    if (d.mtu) parts.push(`MTU ${d.mtu}`);
    if (d.tap) parts.push(`TAP ${d.tap}`);
    if (d.switch) parts.push(`switch ${d.switch}`);
  } else if (d.state === "serving") {
    parts.push(bytes(d.capacity) + (d.readonly ? " read-only" : ""));
    if (d.image) parts.push(d.image);
    if (d.store) parts.push(`${d.store.server}: ${d.store.up ? "answers" : "DOES NOT ANSWER"}`);
    if (d.aio) parts.push(`aio ${d.aio}`);
  }
  return el("div", {}, ...parts.map((p) => el("div", {text: p})));
}

function requests(d) {
  return (d.queues || []).reduce((sum, q) => sum + q.requests, 0);
}

function rate(d, r) {
  if (!r) return el("span", {class: "empty", text: "-"});
  const main = d.type === "net"
    ? `${si(r.ops)} frames/s, ${si(r.bytes, "B/s")}, ${si(r.drops)} drops/s`
    : `${si(r.ops)} IOPS, ${si(r.bytes, "B/s")}`;
  return el("div", {class: "num"},
    el("div", {class: "rate-main", text: main}),
    el("div", {class: "total", text: `${requests(d).toLocaleString("en")} requests in all`}));
}

function queueName(d, i) {
  // net: receive and transmit queue of each pair, then the control queue
  if (d.type !== "net") return `q${i}`;
  if (i === 2 * (d.counters || []).length) return "ctrl";
  return (i % 2 ? "tx" : "rx") + Math.floor(i / 2);
}

function queueLine(d, r) {
  if (!r) return "";
  const qs = r.queues.map((q, i) => `${queueName(d, i)} ${si(q.ops)}/s ${si(q.bytes, "B/s")}`);
  const pairs = r.pairs.map((p, i) => `pair ${i}: ${si(p.frames)} frames/s, ${si(p.drops)} drops/s`);
  return [...qs, ...pairs].join("  \u00b7  ");
}

function graph(name) {
  const canvas = el("canvas", {width: "180", height: "34", class: "graph"});
  const points = history.get(name) || [];
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.strokeStyle = "#d6dbe0";
  ctx.strokeRect(0.5, 0.5, w - 1, h - 1);
  if (!points.length) return canvas;
  const top = Math.max(1, ...points.map((p) => p.ops));
  const x = (i) => w - 1 - (points.length - 1 - i) * (w - 2) / (keep - 1);
  const y = (v) => h - 2 - v / top * (h - 5);
  ctx.beginPath();
  ctx.moveTo(x(0), h - 1);
  points.forEach((p, i) => ctx.lineTo(x(i), y(p.ops)));
  ctx.lineTo(x(points.length - 1), h - 1);
  ctx.fillStyle = "rgba(42, 107, 179, 0.18)";
  ctx.fill();
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p.ops)) : ctx.moveTo(x(i), y(p.ops))));
  ctx.strokeStyle = "#2a6bb3";
  ctx.stroke();
  canvas.title = `peak ${si(top)}/s over the last ${points.length} s`;
  return canvas;
}

function renderDevices(devices, rates) {
  const body = $("devices").tBodies[0];
  const rows = [];
  for (const d of devices) {
    const r = rates[d.name];
    const features = d.feature_names ? d.feature_names.join(" ") : "";
    rows.push(el("tr", {class: "device", "data-device": d.name},
      el("td", {class: "name", text: d.name}),
      el("td", {text: d.type}),
      el("td", {text: d.backend || "-"}),
      el("td", {class: "socket", text: d.socket}),
      el("td", {class: "frontend"}, frontEnd(d)),
      el("td", {class: "state"}, state(d)),
      el("td", {class: "features", title: d.features !== undefined ? "0x" + d.features.toString(16) : "",
                text: features || "-"}),
      el("td", {class: "details"}, details(d)),
      el("td", {class: "rate"}, rate(d, r)),
      el("td", {class: "graph"}, graph(d.name))));
    rows.push(el("tr", {class: "queues", "data-device": d.name},
      el("td", {colspan: "10", class: "num", text: queueLine(d, r)})));
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "10", class: "empty", text: "no devices"})));
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------- VMs

function vmState(vm) {
  if (vm.state === "running") return el("span", {class: "ok", text: "running"});
  if (vm.state === "failed") return el("span", {class: "bad", text: `did not start: ${vm.error}`});
  if (vm.state === "ended") {
    const bad = vm.exit_status !== 0 && vm.exit_status !== null;
    return el("span", {class: bad ? "bad" : "",
                       text: `ended: ${vm.exit_reason} (exit status ${vm.exit_status})`});
  }
  return el("span", {class: "empty", text: "not started"});
}

function vmButton(vm, action) {
  const b = el("button", {type: "button", class: action, text: action === "start" ? "Start" : "Stop"});
  b.disabled = !actionsOn || (action === "start") === (vm.state === "running");
  b.addEventListener("click", () => act(`/api/vms/${encodeURIComponent(vm.name)}/${action}`,
                                         `${action} ${vm.name}`));
  return b;
}

function renderVms(vms) {
  const body = $("vms").tBodies[0];
  const rows = [];
  for (const vm of vms) {
    const devs = vm.devices.map((d) => `${d.type} ${d.socket}`).join("\n") || "-";
    rows.push(el("tr", {class: "vm", "data-vm": vm.name},
      el("td", {class: "name", text: vm.name}),
      el("td", {class: "state"}, vmState(vm)),
      el("td", {class: "mono", text: devs}),
      el("td", {class: "num", text: vm.runs ? `${vm.run_time.toFixed(1)} s` : "-"}),
      el("td", {}, vmButton(vm, "start"), " ", vmButton(vm, "stop"))));
    if (vm.console.length) {
      rows.push(el("tr", {class: "vm-console", "data-vm": vm.name},
        el("td", {colspan: "5"}, el("pre", {class: "console", text: vm.console.join("\n")}))));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "5", class: "empty", text: "no VMs in the config"})));
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------- updates

function remember(time, rates) {
  for (const [name, r] of Object.entries(rates)) {
    const h = history.get(name) || [];
    h.push({time, ops: r.ops, bytes: r.bytes, drops: r.drops});
    if (h.length > keep) h.splice(0, h.length - keep);
    history.set(name, h);
  }
}

function render(update) {
  const st = update.status;
  actionsOn = update.actions;
  $("summary").textContent = `${st.devices.length} device(s), ` +
    `${st.devices.filter((d) => d.connected).length} connected, ` +
    `${st.devices.filter((d) => d.needs_reset).length} need a reset, ${st.vms.length} VM(s)`;
  $("config").textContent = st.config;
  $("pid").textContent = st.pid;
  $("updated").textContent = new Date(update.time * 1000).toLocaleTimeString("en-GB");
  $("reload").disabled = !actionsOn;
  $("mode").textContent = actionsOn ? "" : "read-only: the config sets no daemon.web_token_file";
  renderDevices(st.devices, update.rates);
  renderVms(st.vms);
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("hello", (e) => {
    const hello = JSON.parse(e.data);
    keep = hello.keep;
    history.clear();
    for (const sample of hello.history) {
      remember(sample.time, sample.devices);
    }
  });
  events.addEventListener("update", (e) => {
    const update = JSON.parse(e.data);
    remember(update.time, update.rates);
    render(update);
    $("live").textContent = "live";
    $("live").className = "live on";
  });
  events.onerror = () => {
    $("live").textContent = "offline";
    $("live").className = "live off";
  };  // (EventSource connects again by itself)
}

// ---------------------------------------------------------------- actions

function say(text, bad) {
  const m = $("message");
  m.textContent = text;
  m.className = bad ? "bad" : "";
  m.hidden = false;
}

function reloadText(out) {
  if (out.errors) return "Reload refused; the running devices are unchanged:\n" + out.errors.join("\n");
  const lines = [];
  for (const k of ["started", "stopped", "restarted", "kept"]) {
    if (out[k] && out[k].length) lines.push(`${k}: ${out[k].join(", ")}`);
  }
  for (const [name, why] of Object.entries(out.failed || {})) lines.push(`failed: ${name}: ${why}`);
  return "Reloaded.\n" + (lines.join("\n") || "nothing to do");
}

async function act(path, what) {
  const token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  const headers = token ? {"Authorization": "Bearer " + token} : {};
  let out;
  try {
    const response = await fetch(path, {method: "POST", headers, cache: "no-store"});
    out = await response.json();
  } catch (err) {
    say(`${what}: the daemon did not answer (${err})`, true);
    return;
  }
  if (path === "/api/reload" && (out.ok || out.errors)) say(reloadText(out), !out.ok);
  else if (out.ok) say(`${what}: done (${out.state})`, false);
  else say(`${what}: refused: ${out.error}`, true);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", (e) => e.preventDefault());
  $("reload").addEventListener("click", () => act("/api/reload", "Reload"));
  connect();
});
