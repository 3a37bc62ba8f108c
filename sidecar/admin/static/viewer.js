// agent-authz decision viewer. Plain JS, no build step, no third-party code.
// Every value from a record is inserted with textContent: paths and hosts are agent-controlled.
"use strict";

const API = "/decisions/api";
const FILTERS = ["task", "agent", "caller", "decision", "reason", "tool", "since", "until"];
const MAX_ROWS = 500;

const $ = (id) => document.getElementById(id);
const state = { source: null, selected: null, shown: new Set(), summaryTimer: null };

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
    el("td", { class: "c-agent", title: r.agent || "" }, r.agent || "–"),
    el("td", { class: "c-caller", title: r.caller || "" }, r.caller || "–"),
    el("td", { class: "c-request", title: destination(r) }, destination(r)),
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
  const tbody = $("records").tBodies[0];
  tbody.replaceChildren(...body.records.map(row));
  state.shown = new Set(body.records.map((r) => r.decision_id));
  tbody.dataset.query = filterQuery().toString();
  updateCount();
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
  const tbody = $("records").tBodies[0];
  const tr = row(record);
  tr.classList.add("fresh");
  tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.rows.length > MAX_ROWS) {
    state.shown.delete(tbody.lastChild.getAttribute("data-id"));
    tbody.lastChild.remove();
  }
  updateCount();
  scheduleSummary();
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
    card.append(el("h3", {}, task.task_id || "(no task matched)", task.declared || !task.task_id ? "" : " – not declared now"));
    if (task.purpose) card.append(el("div", { class: "muted" }, task.purpose, task.on_behalf_of ? ` – on behalf of ${task.on_behalf_of}` : ""));
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

function scheduleSummary() {
  if (state.summaryTimer) return;
  state.summaryTimer = setTimeout(() => { state.summaryTimer = null; loadSummary(); }, 500);
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
  loadRecords().then(connect);
  loadSummary();
  loadChain();
  setInterval(loadChain, 10000);
}

document.addEventListener("DOMContentLoaded", init);
