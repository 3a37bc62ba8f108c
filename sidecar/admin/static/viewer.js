// agent-authz decision viewer. Plain JS, no build step, no third-party code.
// Every value from a record or a tree is inserted with textContent or setAttribute (never as HTML):
// paths and hosts are agent-controlled, and other sidecars' logs (viewer.logs) may hold anything.
"use strict";

const API = "/decisions/api";
const FILTERS = ["task", "agent", "caller", "decision", "reason", "tool", "since", "until"];
const MAX_ROWS = 500;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const state = {
  source: null, selected: null, shown: new Set(), records: [], timers: {},
  spiffeIds: new Set(), labels: new Map(),
  approvalErrors: new Map(), // approval id -> why the last approve was refused (kept across list reloads)
};

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Once per `delay` ms at most, however often asked.
function later(name, delay, fn) {
  if (state.timers[name]) return;
  state.timers[name] = setTimeout(() => { state.timers[name] = null; fn(); }, delay);
}

// --- SPIFFE IDs: show the end that tells them apart (full ID on hover) ---------------------------
function spiffeSegments(id) {
  if (typeof id !== "string" || !id.startsWith("spiffe://")) return null;
  const segments = id.slice("spiffe://".length).split("/");
  return segments.length >= 2 && segments.every((s) => s.length) ? segments : null;
}

// The label of each ID: the shortest end of its path that no other known ID of its trust domain
// ends with ("…/market-data", "…/finance/sa/bot" next to "…/marketing/sa/bot"), the trust domain
// first when several are known. The full ID is the element's title.
function distinguishingEnds(ids) {
  const parsed = [];
  for (const id of ids) {
    const segments = spiffeSegments(id);
    if (segments) parsed.push({ id, td: segments[0], path: segments.slice(1) });
  }
  const domains = new Set(parsed.map((p) => p.td));
  const endsWith = (path, tail) => path.length >= tail.length && tail.every((s, i) => path[path.length - tail.length + i] === s);
  const labels = new Map();
  for (const id of ids) labels.set(id, id);
  for (const { id, td, path } of parsed) {
    const others = parsed.filter((o) => o.td === td && o.id !== id);
    let n = 1;
    while (n < path.length && others.some((o) => endsWith(o.path, path.slice(-n)))) n++;
    const end = (n < path.length ? "…/" : "/") + path.slice(-n).join("/");
    labels.set(id, domains.size > 1 ? `${td} ${end}` : end);
  }
  return labels;
}

function learnIds(...ids) {
  let grew = false;
  for (const id of ids) {
    if (typeof id === "string" && id && !state.spiffeIds.has(id)) { state.spiffeIds.add(id); grew = true; }
  }
  if (grew) {
    state.labels = distinguishingEnds(state.spiffeIds);
    for (const node of document.querySelectorAll("[data-spiffe]")) node.textContent = idLabel(node.getAttribute("data-spiffe"));
  }
}

function idLabel(id) {
  return state.labels.get(id) || id;
}

// An element showing a SPIFFE ID's label, the full ID as its title (relabelled when new IDs arrive).
function idCell(tag, cls, id) {
  if (!id) return el(tag, { class: cls }, "–");
  const node = el(tag, { class: cls, title: id, "data-spiffe": id }, idLabel(id));
  return node;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function filterQuery() {
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = $("f-" + name).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

function destination(r) {
  const port = r.port && r.port !== 80 ? ":" + r.port : "";
  const rpc = r.mcp || r.a2a;
  const call = rpc && rpc.method ? ` [${rpc.method} ${rpc.tool || rpc.resource || rpc.prompt || ""}]` : "";
  return `${r.method || ""} ${r.host || ""}${port}${r.path || ""}${call}`.trim();
}

function reasonText(r) {
  return r.dry_run && r.would_decision === "deny" ? `dry_run (would deny: ${r.would_reason})` : r.reason;
}

function row(r) {
  const tr = el("tr", { class: "record", "data-id": r.decision_id, "data-decision": r.decision, "data-task": r.task_id || "" });
  tr.append(
    el("td", { class: "c-time" }, (r.time || "").replace("T", " ").replace("Z", "")),
    el("td", { class: "c-decision " + (r.decision === "allow" ? "allow" : "deny") }, r.decision),
    el("td", { class: "c-reason" + (r.dry_run ? " dry" : "") }, reasonText(r)),
    el("td", { class: "c-task" }, r.task_id || "–"),
    idCell("td", "c-agent", r.agent),
    idCell("td", "c-caller", r.caller),
    el("td", { class: "c-request", title: destination(r) }, destination(r)),
    el("td", { class: "c-sensitivity", "data-level": r.sensitivity || "" }, r.sensitivity || "–"),
    el("td", { class: "c-status" }, r.status),
    el("td", { class: "c-latency" }, r.latency_us),
  );
  tr.addEventListener("click", () => showDetail(r.decision_id));
  if (r.decision_id === state.selected) tr.classList.add("selected");
  return tr;
}

function updateCount() {
  const n = $("records").tBodies[0].rows.length;
  $("count").textContent = n === 0 ? "no matching decisions" : `${n} decision${n === 1 ? "" : "s"}, newest first`;
}

async function fetchJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error((await response.text()) || response.statusText);
  return response.json();
}

let loadSeq = 0;
async function loadRecords() {
  const params = filterQuery();
  params.set("limit", String(MAX_ROWS));
  const mine = ++loadSeq;
  let body;
  try {
    body = await fetchJSON(`${API}/records?${params}`);
  } catch (err) {
    if (mine === loadSeq) $("filter-error").textContent = err.message;
    return false;
  }
  if (mine !== loadSeq) return false; // a newer filter's answer wins, whatever order they arrive in
  $("filter-error").textContent = "";
  fillReasons(body.reasons);
  learnIds(...body.records.flatMap((r) => [r.agent, r.caller]));
  const tbody = $("records").tBodies[0];
  tbody.replaceChildren(...body.records.map(row));
  state.shown = new Set(body.records.map((r) => r.decision_id));
  state.records = body.records.slice();
  tbody.dataset.query = filterQuery().toString();
  updateCount();
  drawChart();
  return true;
}

function fillReasons(reasons) {
  const select = $("f-reason");
  if (select.options.length > 1) return;
  for (const reason of reasons) select.append(el("option", { value: reason }, reason));
  const wanted = new URLSearchParams(location.search).get("reason");
  if (wanted) select.value = wanted;
}

function prepend(record) {
  if (state.shown.has(record.decision_id)) return;
  state.shown.add(record.decision_id);
  learnIds(record.agent, record.caller);
  const tbody = $("records").tBodies[0];
  const tr = row(record);
  tr.classList.add("fresh");
  tbody.insertBefore(tr, tbody.firstChild);
  state.records.unshift(record);
  while (tbody.rows.length > MAX_ROWS) {
    state.shown.delete(tbody.lastChild.getAttribute("data-id"));
    tbody.lastChild.remove();
    state.records.pop();
  }
  updateCount();
  later("chart", 200, drawChart);
  later("summary", 500, loadSummary);
  later("tree", 500, loadTree);
  if (record.approval || record.direction === "control") later("approvals", 200, loadApprovals);
}

function connect() {
  if (state.source) state.source.close();
  const live = $("live");
  live.dataset.state = "connecting";
  live.textContent = "connecting…";
  const source = new EventSource(`${API}/stream?${filterQuery()}`);
  state.source = source;
  let reconnecting = false;
  source.addEventListener("ready", () => {
    live.dataset.state = "live";
    live.textContent = "live";
    if (reconnecting) loadRecords(); // fill what was missed while disconnected
  });
  source.addEventListener("decision", (event) => prepend(JSON.parse(event.data)));
  source.addEventListener("tasks", () => {
    later("summary", 100, loadSummary); later("tree", 100, loadTree); later("approvals", 100, loadApprovals);
  });
  source.addEventListener("overflow", () => { loadRecords(); });
  source.onerror = () => {
    reconnecting = true;
    live.dataset.state = "offline";
    live.textContent = "offline – retrying";
  };
}

function actChain(act) {
  if (Array.isArray(act)) return act.map(String);  // decision records: actors, current first
  const actors = [];
  for (let current = act; current && typeof current === "object"; current = current.act) {
    actors.push(current.sub || JSON.stringify(current));
  }
  return actors;
}

function isoFromEpoch(seconds) {
  return typeof seconds === "number" ? new Date(seconds * 1000).toISOString() : "";
}

async function showDetail(id) {
  let record;
  try {
    record = await fetchJSON(`${API}/records/${encodeURIComponent(id)}`);
  } catch (err) {
    return;
  }
  state.selected = id;
  for (const tr of $("records").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.id === id);
  $("detail").hidden = false;
  $("detail-id").textContent = id;

  const delegation = $("detail-delegation");
  delegation.replaceChildren();
  const actors = actChain(record.act);
  delegation.append(el("h3", {}, "delegation chain"));
  if (record.on_behalf_of) delegation.append(el("p", {}, "on behalf of ", el("strong", {}, record.on_behalf_of)));
  if (actors.length) {
    delegation.append(el("ol", { id: "detail-act" }, ...actors.map((a, i) => el("li", {}, a, i === 0 ? " (current actor)" : ""))));
  } else {
    delegation.append(el("p", { class: "muted" }, `agent ${record.agent || "–"} acting directly (no act chain in this record)`));
  }

  const token = $("detail-token");
  token.replaceChildren(el("h3", {}, "token"));
  if (record.token) {
    const t = record.token;
    token.append(
      el("table", { id: "detail-token-fields" }, el("tbody", {},
        el("tr", {}, el("td", {}, "jti"), el("td", { class: "t-jti" }, t.jti)),
        el("tr", {}, el("td", {}, "aud"), el("td", { class: "t-aud" }, t.aud)),
        el("tr", {}, el("td", {}, "exp"), el("td", { class: "t-exp" }, `${t.exp} (${isoFromEpoch(t.exp)})`)),
        el("tr", {}, el("td", {}, "cached"), el("td", {}, String(t.cached))),
      )),
    );
  } else {
    token.append(el("p", { class: "muted" }, "no token was injected"));
  }

  const fields = $("detail-fields").tBodies[0];
  fields.replaceChildren(
    ...Object.entries(record).map(([key, value]) =>
      el("tr", { "data-field": key }, el("td", {}, key),
        el("td", {}, value !== null && typeof value === "object" ? JSON.stringify(value, null, 1) : String(value)))),
  );
}

function meter(used, max) {
  if (max === null || max === undefined) return el("span", { class: "muted" }, `${used} used, no limit`);
  const pct = max === 0 ? 100 : Math.min(100, Math.round((100 * used) / max));
  const bar = el("span", { class: "meter" + (used >= max ? " full" : "") }, el("span", {}));
  bar.firstChild.style.width = pct + "%";
  return el("span", {}, bar, ` ${used} / ${max}`);
}

async function loadSummary() {
  let body;
  try {
    body = await fetchJSON(`${API}/summary`);
  } catch (err) {
    return;
  }
  $("dry-run").hidden = !body.dry_run;
  const cards = body.tasks.map((task) => {
    const card = el("div", { class: "task", "data-task": task.task_id || "" });
    card.append(el("h3", {}, task.task_id || "(no task matched)", task.declared || !task.task_id ? "" : " – not a task of this sidecar now"));
    if (task.purpose) card.append(el("div", { class: "muted s-purpose" }, task.purpose, task.on_behalf_of ? ` – on behalf of ${task.on_behalf_of}` : ""));
    if (task.max_sensitivity) card.append(el("div", { class: "s-sensitivity" }, `max sensitivity: ${task.max_sensitivity}`));
    if (task.blocked) {
      const what = task.blocked.reason === "task_quarantined" ? "frozen" : "killed";
      card.append(el("div", { class: "blocked s-blocked", title: task.blocked.detail }, `${what}: ${task.blocked.detail}`));
    }
    card.append(el("div", {}, el("span", { class: "allow s-allowed" }, `${task.allowed} allowed`), " · ",
      el("span", { class: "deny s-denied" }, `${task.denied} denied`)));
    if (task.budget) {
      card.append(el("div", { class: "s-budget" }, "task budget: ", meter(task.budget.used, task.budget.max)));
      const limited = task.rules.filter((r) => r.max !== null);
      for (const rule of limited) card.append(el("div", { class: "s-rule" }, `rule ${rule.rule}: `, meter(rule.used, rule.max)));
    }
    if (task.destinations.length) {
      card.append(el("table", { class: "s-destinations" },
        el("thead", {}, el("tr", {}, el("th", {}, "destination"), el("th", {}, "allowed"), el("th", {}, "denied"))),
        el("tbody", {}, ...task.destinations.map((d) => el("tr", { "data-destination": d.destination },
          el("td", {}, d.destination), el("td", { class: "allow" }, d.allowed), el("td", { class: "deny" }, d.denied))))));
    }
    return card;
  });
  $("summary-tasks").replaceChildren(...cards);
}


async function loadChain() {
  const badge = $("chain-status");
  try {
    const chain = await fetchJSON(`${API}/chain`);
    badge.dataset.status = chain.status;
    if (chain.status === "intact") {
      badge.textContent = `chain intact · ${chain.records} records` + (chain.head_seq !== null && chain.head_seq !== undefined ? ` · seq ${chain.head_seq}` : "");
    } else if (chain.status === "broken") {
      const b = chain.break || {};
      badge.textContent = `chain BROKEN: ${b.kind}` + (b.file ? ` at ${b.file}:${b.line}` : "");
    } else {
      badge.textContent = `chain ${chain.status}`;
    }
    badge.title = [chain.break && chain.break.message, chain.message].filter(Boolean).join(" – ") || "hash-chain verification of the log files";
  } catch (err) {
    badge.dataset.status = "error";
    badge.textContent = "chain: check failed";
  }
}

// --- allow/deny over time: stacked bars over the decisions listed ---------------------------------
const STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400];
const MAX_BARS = 40;

function stepLabel(seconds) {
  return seconds < 60 ? `${seconds} s` : seconds < 3600 ? `${seconds / 60} min` : `${seconds / 3600} h`;
}

function clock(ms) {
  return new Date(ms).toISOString().slice(11, 19);
}

function drawChart() {
  const chart = $("chart");
  const times = [];
  for (const r of state.records) {
    const t = Date.parse(r.time);
    if (Number.isFinite(t)) times.push([Math.floor(t / 1000), r.decision === "allow"]);
  }
  const allowed = times.filter(([, ok]) => ok).length;
  const denied = times.length - allowed;
  chart.replaceChildren();
  chart.dataset.allowed = String(allowed);
  chart.dataset.denied = String(denied);
  if (!times.length) {
    $("chart-totals").textContent = "no decisions to chart";
    return;
  }
  const first = Math.min(...times.map(([t]) => t));
  const last = Math.max(...times.map(([t]) => t));
  const step = STEPS.find((s) => (last - first + 1) / s <= MAX_BARS) || STEPS[STEPS.length - 1];
  const start = Math.floor(first / step) * step;
  const count = Math.floor((last - start) / step) + 1;
  const buckets = Array.from({ length: count }, () => [0, 0]);
  for (const [t, ok] of times) buckets[Math.floor((t - start) / step)][ok ? 0 : 1] += 1;
  const top = Math.max(...buckets.map(([a, d]) => a + d));
  const [left, width, height, base] = [34, 680, 86, 92];
  const barWidth = width / Math.max(count, 10);
  chart.append(
    svg("line", { x1: left, y1: base, x2: left + width, y2: base, class: "axis" }),
    svg("text", { x: left - 4, y: base - height + 8, class: "tick", "text-anchor": "end" }, top),
    svg("text", { x: left - 4, y: base, class: "tick", "text-anchor": "end" }, 0),
    svg("text", { x: left, y: base + 14, class: "tick" }, clock(start * 1000)),
  );
  if (count > 1) {
    chart.append(svg("text", { x: left + (count - 0.5) * barWidth, y: base + 14, class: "tick", "text-anchor": "end" },
      clock((start + (count - 1) * step) * 1000)));
  }
  buckets.forEach(([a, d], i) => {
    const x = left + i * barWidth + 1;
    const ha = (height * a) / top;
    const hd = (height * d) / top;
    const when = start + i * step;
    chart.append(svg("g", { class: "bar", "data-start": new Date(when * 1000).toISOString(), "data-allowed": a, "data-denied": d },
      svg("title", {}, `${clock(when * 1000)} + ${stepLabel(step)}: ${a} allowed, ${d} denied`),
      svg("rect", { class: "allowed", x, y: base - ha, width: Math.max(1, barWidth - 2), height: ha }),
      svg("rect", { class: "denied", x, y: base - ha - hd, width: Math.max(1, barWidth - 2), height: hd })));
  });
  $("chart-totals").textContent = `${allowed} allowed · ${denied} denied · bars of ${stepLabel(step)}`;
}

// --- delegation trees: one SVG per transaction (root grant), grants as nodes ----------------------
const NODE = { w: 216, h: 84, gapX: 18, gapY: 42 };

function budgetText(budget) {
  const used = budget.used === null || budget.used === undefined ? "?" : budget.used;
  const reserved = budget.reserved ? ` · ${budget.reserved} reserved` : "";
  if (budget.max_calls === null || budget.max_calls === undefined) return `${used} used · no limit${reserved}`;
  return `${used} / ${budget.max_calls} used${reserved}`;
}

function nodeName(node) {
  return node.parent && node.task_id.startsWith(node.parent + "/") ? node.task_id.slice(node.parent.length + 1) : node.task_id;
}

function treeLayout(nodes) {
  const byId = new Map(nodes.map((n) => [n.task_id, n]));
  const at = new Map();
  let leaf = 0;
  const place = (n) => {
    const kids = n.children.map((c) => byId.get(c)).filter(Boolean);
    if (!kids.length) { at.set(n.task_id, leaf++); return; }
    kids.forEach(place);
    at.set(n.task_id, (at.get(kids[0].task_id) + at.get(kids[kids.length - 1].task_id)) / 2);
  };
  nodes.filter((n) => !byId.has(n.parent) || n.depth === 0).forEach(place);
  return { at, width: Math.max(1, leaf), depth: Math.max(...nodes.map((n) => n.depth)) + 1 };
}

function drawTree(tree) {
  const { at, width, depth } = treeLayout(tree.nodes);
  const W = width * (NODE.w + NODE.gapX) + NODE.gapX;
  const H = depth * (NODE.h + NODE.gapY) + NODE.gapY / 2;
  const picture = svg("svg", { class: "tree-svg", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  const pos = (n) => [NODE.gapX + at.get(n.task_id) * (NODE.w + NODE.gapX), NODE.gapY / 2 + n.depth * (NODE.h + NODE.gapY)];
  const byId = new Map(tree.nodes.map((n) => [n.task_id, n]));
  for (const n of tree.nodes) {
    const parent = byId.get(n.parent);
    if (!parent) continue;
    const [x1, y1] = pos(parent);
    const [x2, y2] = pos(n);
    const [ax, ay, bx, by] = [x1 + NODE.w / 2, y1 + NODE.h, x2 + NODE.w / 2, y2];
    picture.append(svg("path", { class: `edge state-${n.state}`, d: `M${ax},${ay} C${ax},${ay + NODE.gapY / 2} ${bx},${by - NODE.gapY / 2} ${bx},${by}` }));
  }
  for (const n of tree.nodes) {
    const [x, y] = pos(n);
    const b = n.budget;
    const g = svg("g", {
      class: `node state-${n.state}`, transform: `translate(${x},${y})`,
      "data-task": n.task_id, "data-parent": n.parent || "", "data-state": n.state, "data-agent": n.agent || "",
      "data-used": b.used === null || b.used === undefined ? "" : b.used, "data-max": b.max_calls === null || b.max_calls === undefined ? "" : b.max_calls,
      "data-reserved": b.reserved, "data-allowed": n.calls.allowed, "data-denied": n.calls.denied,
    });
    const about = [n.task_id, n.agent && `agent ${n.agent}`, n.purpose && `purpose: ${n.purpose}`,
      n.on_behalf_of && `on behalf of ${n.on_behalf_of}`,
      n.expires_at && `expires ${new Date(n.expires_at * 1000).toISOString()}`,
      `known from: ${n.sources.join(", ").replaceAll("_", " ")}`].filter(Boolean).join("\n");
    g.append(svg("title", {}, about), svg("rect", { class: "box", width: NODE.w, height: NODE.h, rx: 6 }));
    g.append(svg("text", { class: "name", x: 10, y: 18 }, nodeName(n)));
    g.append(svg("text", { class: "state", x: NODE.w - 10, y: 18, "text-anchor": "end" }, n.state));
    const agent = svg("text", { class: "agent", x: 10, y: 36 }, n.agent ? idLabel(n.agent) : "agent unknown here");
    if (n.agent) agent.setAttribute("data-spiffe", n.agent);
    g.append(agent);
    g.append(svg("text", { class: "budget", x: 10, y: 54 }, budgetText(b)));
    const track = NODE.w - 20;
    g.append(svg("rect", { class: "track", x: 10, y: 60, width: track, height: 6, rx: 3 }));
    if (b.max_calls) {
      const used = Math.min(track, (track * (b.used || 0)) / b.max_calls);
      const reserved = Math.min(track - used, (track * (b.reserved || 0)) / b.max_calls);
      g.append(svg("rect", { class: "used", x: 10, y: 60, width: used, height: 6 }),
        svg("rect", { class: "reserved", x: 10 + used, y: 60, width: reserved, height: 6 }));
    }
    g.append(svg("text", { class: "calls", x: 10, y: 79 }, `${n.calls.allowed} allowed · ${n.calls.denied} denied`));
    picture.append(g);
  }
  const root = tree.nodes[0];
  const caption = el("figcaption", {},
    el("strong", {}, tree.txn), ` · ${tree.nodes.length} grant${tree.nodes.length === 1 ? "" : "s"}`,
    root && root.on_behalf_of ? ` · on behalf of ${root.on_behalf_of}` : "",
    root && root.purpose ? el("span", { class: "muted" }, ` · ${root.purpose}`) : null,
    tree.more_nodes ? el("span", { class: "warn" }, ` · ${tree.more_nodes} more grants not drawn`) : null);
  return el("figure", { class: "tree", "data-txn": tree.txn }, caption, picture);
}

async function loadTree() {
  let body;
  try {
    body = await fetchJSON(`${API}/tree`);
  } catch (err) {
    return;
  }
  learnIds(...body.trees.flatMap((t) => t.nodes.map((n) => n.agent)));
  const others = body.logs.others;
  $("tree-sources").textContent = others.length
    ? `(this sidecar's log and ${others.length} other${others.length === 1 ? "" : "s"}: ${others.map((o) => o.path + (o.error ? ` – ${o.error}` : "")).join(", ")})`
    : "(this sidecar's tasks, the sub-grants it issued, and its own log)";
  const figures = body.trees.map(drawTree);
  if (!figures.length) figures.push(el("p", { class: "muted" }, "no tasks yet"));
  if (body.more_trees) figures.push(el("p", { class: "warn" }, `${body.more_trees} more trees not drawn`));
  $("trees").replaceChildren(...figures);
  $("trees").dataset.loaded = String((Number($("trees").dataset.loaded) || 0) + 1);
}

// --- approvals: the operator's token (sessionStorage only) and the approve buttons ----------------
const OPERATOR_KEY = "agent-authz-operator";

function operatorToken() {
  return sessionStorage.getItem(OPERATOR_KEY) || "";
}

function showOperator() {
  const signedIn = Boolean(operatorToken());
  const badge = $("operator");
  badge.dataset.state = signedIn ? "operator" : "none";
  badge.textContent = signedIn ? "operator: may approve" : "viewer only";
  $("operator-form").hidden = signedIn;
  $("operator-out").hidden = !signedIn;
}

// agent-authz approve --operator-token --admin URL prints URL/decisions#operator=TOKEN: keep the token in
// this tab's sessionStorage and take it out of the address bar (and of the history).
function takeOperatorToken() {
  const token = new URLSearchParams(location.hash.slice(1)).get("operator");
  if (!token) return false;
  sessionStorage.setItem(OPERATOR_KEY, token);
  history.replaceState(null, "", location.pathname + location.search);
  return true;
}

function signIn(token) {
  if (token) sessionStorage.setItem(OPERATOR_KEY, token.trim());
  else sessionStorage.removeItem(OPERATOR_KEY);
  showOperator();
  loadApprovals();
}

function callText(call) {
  const port = call.port && call.port !== 80 ? ":" + call.port : "";
  return `${call.method} ${call.host}${port}${call.path}${call.tool ? ` [tool ${call.tool}]` : ""}`;
}

async function approve(id, ttl, cell) {
  cell.replaceChildren(el("span", { class: "muted" }, "approving…"));
  let response;
  try {
    response = await fetch(`${API}/approvals/${encodeURIComponent(id)}`, {
      method: "POST", cache: "no-store",
      headers: { "Authorization": `Bearer ${operatorToken()}`, "Content-Type": "application/json" },
      body: JSON.stringify({ ttl }),
    });
  } catch (err) {
    state.approvalErrors.set(id, err.message);
    cell.replaceChildren(el("span", { class: "a-error" }, err.message));
    return;
  }
  if (!response.ok) {
    let text = response.statusText;
    try { const body = await response.json(); text = `${body.error}: ${body.detail}`; } catch (err) { /* keep the status */ }
    // the refusal is itself recorded, and its record reloads the list: the row keeps the message
    state.approvalErrors.set(id, text);
    cell.replaceChildren(el("span", { class: "a-error" }, text));
    return;
  }
  state.approvalErrors.delete(id);
  loadApprovals();
}

function approvalRow(a) {
  const tr = el("tr", { "data-approval": a.id, "data-status": a.status });
  const action = el("td", { class: "a-action" });
  if (a.status === "pending" && operatorToken()) {
    const ttl = el("select", { class: "a-ttl", title: "how long the approval stays usable" },
      ...["1m", "5m", "10m", "1h"].map((t) => el("option", { value: t, selected: t === "10m" }, t)));
    const button = el("button", { type: "button", class: "a-approve" }, "approve");
    button.addEventListener("click", () => approve(a.id, ttl.value, action));
    action.append(ttl, " ", button);
  } else if (a.approved_by) {
    action.append(el("span", { class: "muted" }, `by ${a.approved_by}`));
  }
  if (state.approvalErrors.has(a.id)) action.append(" ", el("span", { class: "a-error" }, state.approvalErrors.get(a.id)));
  tr.append(
    el("td", { class: "a-id" }, a.id),
    el("td", { class: "a-status" }, a.status),
    el("td", { class: "a-task" }, a.task_id),
    el("td", { class: "a-call", title: callText(a.call) }, callText(a.call)),
    el("td", { class: "a-content", title: a.call.content_digest }, String(a.call.content_digest).slice(0, 19)),
    el("td", { class: "a-expires" }, isoFromEpoch(a.expires_at).replace("T", " ").replace("Z", "")),
    action,
  );
  return tr;
}

async function loadApprovals() {
  let body;
  try {
    body = await fetchJSON(`${API}/approvals`);
  } catch (err) {
    return;
  }
  const order = { pending: 0, approved: 1 };
  const list = body.approvals.slice().reverse().sort((x, y) => (order[x.status] ?? 2) - (order[y.status] ?? 2)).slice(0, 200);
  $("approval-list").hidden = !list.length;
  $("approvals-empty").hidden = Boolean(list.length);
  $("approval-list").tBodies[0].replaceChildren(...list.map(approvalRow));
}

let debounce = null;
function filtersChanged() {
  clearTimeout(debounce);
  debounce = setTimeout(async () => {
    const params = filterQuery();
    history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
    if (await loadRecords()) connect();
  }, 250);
}

function init() {
  const initial = new URLSearchParams(location.search);
  for (const name of FILTERS) {
    const input = $("f-" + name);
    if (initial.get(name)) input.value = initial.get(name);
    input.addEventListener("input", filtersChanged);
    input.addEventListener("change", filtersChanged);
  }
  $("f-clear").addEventListener("click", () => {
    for (const name of FILTERS) $("f-" + name).value = "";
    filtersChanged();
  });
  $("detail-close").addEventListener("click", () => {
    $("detail").hidden = true;
    state.selected = null;
  });
  takeOperatorToken();
  window.addEventListener("hashchange", () => { if (takeOperatorToken()) { showOperator(); loadApprovals(); } });
  $("operator-form").addEventListener("submit", (event) => { event.preventDefault(); signIn($("operator-token").value); $("operator-token").value = ""; });
  $("operator-out").addEventListener("click", () => signIn(""));
  showOperator();
  loadRecords().then(connect);
  loadSummary();
  loadTree();
  loadApprovals();
  loadChain();
  setInterval(loadChain, 10000);
}

document.addEventListener("DOMContentLoaded", init);
