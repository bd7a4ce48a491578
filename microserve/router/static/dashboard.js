// The router's live dashboard: polls /dashboard/state every second and draws it; admin actions go to
// /admin/* with the token the operator typed (kept in this tab's sessionStorage only).
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("microserve-admin-token") || "";
let optionsFilled = false;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const ms = (s) => (s === null || s === undefined ? "–" : s < 1 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`);
const pct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(0)}%`);
const short = (url) => url.replace(/^https?:\/\//, "");

function bytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// -- drawing --------------------------------------------------------------------------------------

function drawTiles(state) {
  const t = state.traffic;
  $("strategy").textContent = describe(state.strategy);
  $("policy").textContent = describe(state.policy);
  $("rate").textContent = t.rate_per_s.toFixed(t.rate_per_s < 10 ? 2 : 0);
  $("errors").textContent = `${t.errors} (${pct(t.error_ratio)})`;
  $("errors").classList.toggle("err", t.errors > 0);
  $("ttft").textContent = `${ms(t.ttft_p50_s)} / ${ms(t.ttft_p99_s)}`;
  $("tpot").textContent = `${ms(t.tpot_p50_s)} / ${ms(t.tpot_p99_s)}`;
  const a = state.admission;
  $("admission").textContent = `${a.running} / ${a.waiting}`;
  $("window").textContent =
    `Over the last ${Math.round(t.span_s)} s: ${t.requests} requests, ${t.rejected} refused (429). ` +
    "TPOT counts streams whose tokens the router tracks (microserve engines).";
}

function describe(thing) {
  const opts = Object.entries(thing.options || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`);
  return opts.length ? `${thing.name} (${opts.join(", ")})` : thing.name;
}

function bars(svg, bins, key, cls, scale) {
  const w = 600 / bins.length;
  bins.forEach((b, i) => {
    const h = (b[key] / scale) * 110;
    if (h > 0) svg.append(svgEl("rect", { class: cls, x: i * w + 1, y: 120 - h, width: Math.max(1, w - 2), height: h }));
  });
}

function line(svg, bins, key, cls, scale) {
  const w = 600 / bins.length;
  const points = bins
    .map((b, i) => (b[key] === null ? null : [i * w + w / 2, 120 - (b[key] / scale) * 110]))
    .filter((p) => p !== null);
  if (points.length > 1) svg.append(svgEl("polyline", { class: cls, points: points.map((p) => p.join(",")).join(" ") }));
  // A dot per bin too: one bin alone draws no line.
  for (const [x, y] of points) svg.append(svgEl("circle", { class: cls.replace("line", "point"), cx: x, cy: y, r: 3 }));
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function drawCharts(traffic) {
  const bins = traffic.bins;
  const rate = $("chart-rate");
  rate.replaceChildren();
  const top = Math.max(1, ...bins.map((b) => b.requests));
  bars(rate, bins, "requests", "bar", top);
  bars(rate, bins, "errors", "bar err", top);
  rate.append(svgEl("text", { class: "axis", x: 4, y: 12 }));
  rate.lastChild.textContent = `${top}`;
  const ttft = $("chart-ttft");
  ttft.replaceChildren();
  const worst = Math.max(1e-3, ...bins.map((b) => b.ttft_p99_s || 0));
  line(ttft, bins, "ttft_p50_s", "line", worst);
  line(ttft, bins, "ttft_p99_s", "line p99", worst);
  ttft.append(svgEl("text", { class: "axis", x: 4, y: 12 }));
  ttft.lastChild.textContent = ms(worst);
}

function badge(text, cls) {
  return el("span", { class: `badge ${cls}` }, text);
}

function meter(fraction) {
  const bar = el("div", { class: `meter${fraction > 0.9 ? " high" : ""}` }, el("div"));
  bar.firstChild.style.width = `${Math.min(100, fraction * 100).toFixed(0)}%`;
  return el("div", { class: "bar-cell" }, bar, pct(fraction));
}

function drawWorkers(workers) {
  const body = $("workers").tBodies[0];
  body.replaceChildren(
    ...workers.map((w) => {
      const load = w.load;
      const health = w.draining ? badge("draining", "draining") : w.healthy ? badge("up", "ok") : badge("down", "down");
      const drain = el(
        "button",
        { class: "drain", "data-url": w.url, onclick: () => drainWorker(w.url, !w.draining) },
        w.draining ? "undrain" : "drain",
      );
      return el(
        "tr",
        { "data-url": w.url },
        el("td", { title: w.models.join(", ") }, short(w.url)),
        el("td", {}, w.role),
        el("td", {}, w.kind),
        el("td", { class: "health" }, health),
        el("td", { class: "circuit" }, badge(w.circuit.replace("_", "-"), w.circuit)),
        el("td", { class: "num in-flight" }, w.in_flight),
        el("td", { class: "num" }, load ? load.waiting : "–"),
        el("td", { class: "num" }, load ? load.running : "–"),
        el("td", { class: "kv" }, load ? meter(load.kv_usage) : "–"),
        el("td", { class: "num" }, load ? pct(load.prefix_hit_rate) : "–"),
        el("td", { class: "num requests" }, w.requests),
        el("td", { class: "num" }, w.errors),
        el("td", { class: "admin-only" }, drain),
      );
    }),
  );
}

function hop(h) {
  let detail = "";
  if (h.verb === "prep_recv") detail = ` matched ${h.tokens}`;
  else if (h.verb === "remote_send") detail = ` ${h.tokens} tok, ${bytes(h.bytes || 0)}`;
  return el("span", { class: "hop" }, el("b", {}, h.verb), ` @ ${short(h.worker)}${detail}`);
}

function drawRecent(recent) {
  const body = $("recent").tBodies[0];
  body.replaceChildren(
    ...recent.map((r) => {
      const hops = [];
      r.hops.forEach((h, i) => { if (i) hops.push(" → "); hops.push(hop(h)); });
      return el(
        "tr",
        { "data-seq": r.seq },
        el("td", {}, new Date(r.at * 1000).toLocaleTimeString()),
        el("td", {}, r.route.replace("/v1/", "") + (r.stream ? " (stream)" : "")),
        el("td", {}, r.model || "–"),
        el("td", {}, r.strategy || "–"),
        el("td", { class: r.status >= 400 ? "status-error" : "" }, r.status),
        el("td", { class: "num" }, ms(r.ttft_s)),
        el("td", { class: "num" }, ms(r.e2e_s)),
        el("td", { class: "num" }, r.output_tokens ?? "–"),
        el("td", { class: "num" }, r.cached_tokens ?? "–"),
        el("td", { class: "hops" }, ...hops),
      );
    }),
  );
}

function fillChoices(state) {
  if (optionsFilled) return;
  const fill = (select, names, current) => {
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    select.value = current;
  };
  fill($("strategy-name"), state.strategies, state.strategy.name);
  fill($("policy-name"), state.policies, state.policy.name);
  optionsFilled = true;
}

// -- polling --------------------------------------------------------------------------------------

async function poll() {
  try {
    // Behind the metrics token when the router has one: the admin token typed below opens it too.
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const resp = await fetch("/dashboard/state", { cache: "no-store", headers });
    if (resp.status === 401) throw new Error("this router needs its admin or metrics token (below)");
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const state = await resp.json();
    drawTiles(state);
    drawCharts(state.traffic);
    drawWorkers(state.workers);
    drawRecent(state.recent);
    fillChoices(state);
    $("token-state").textContent = state.admin ? "" : "the admin API is off (start the router with --admin-token)";
    $("live").className = "dot live";
    $("updated").textContent = `updated ${new Date(state.now * 1000).toLocaleTimeString()}`;
  } catch (err) {
    $("live").className = "dot down";
    $("updated").textContent = `cannot reach the router: ${err.message}`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

// -- admin ----------------------------------------------------------------------------------------

async function admin(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error((data.error && data.error.message) || `HTTP ${resp.status}`);
  return data;
}

function say(text, bad = false) {
  $("admin-message").textContent = text;
  $("admin-message").classList.toggle("err", bad);
}

async function useToken(value) {
  token = value;
  try {
    await admin("GET", "/admin/strategy");
    sessionStorage.setItem("microserve-admin-token", token);
    document.body.classList.add("admin");
    say("Admin actions are on.");
  } catch (err) {
    sessionStorage.removeItem("microserve-admin-token");
    document.body.classList.remove("admin");
    if (value) say(`The token was refused: ${err.message}`, true);
  }
}

async function drainWorker(url, drain) {
  try {
    await admin("POST", "/admin/workers/drain", { url, drain });
    say(`${short(url)} ${drain ? "is draining" : "takes requests again"}.`);
  } catch (err) {
    say(`Drain failed: ${err.message}`, true);
  }
}

function parseOptions(text) {
  return text.trim() ? JSON.parse(text) : {};
}

async function switchTo(what, name, optionsText) {
  try {
    const result = await admin("PUT", `/admin/${what}`, { name, options: parseOptions(optionsText) });
    say(`The ${what} is now ${describe(result)}.`);
  } catch (err) {
    say(`Switching the ${what} failed: ${err.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token").value = token;
  $("token-form").addEventListener("submit", (e) => { e.preventDefault(); useToken($("token").value.trim()); });
  $("strategy-form").addEventListener("submit", (e) => {
    e.preventDefault();
    switchTo("strategy", $("strategy-name").value, $("strategy-options").value);
  });
  $("policy-form").addEventListener("submit", (e) => {
    e.preventDefault();
    switchTo("policy", $("policy-name").value, $("policy-options").value);
  });
  if (token) useToken(token);
  poll();
});
