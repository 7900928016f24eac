// The PetSage fleet page: polls fleet.json twice a second while visible and redraws.
// No framework and no innerHTML: every text goes in through textContent.
"use strict";

const POLL_MS = 500;
const SHOWN_TRANSITIONS = 3;
const ORDER = { unreachable: 0, draining: 1, "not-serving": 2, connecting: 3, serving: 4 };
let timer = null;

function el(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString();
}

function ago(seconds, now) {
  const s = Math.max(0, Math.round(now - seconds));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// What a replica's card says: its connection state, or whether every name serves.
function cardState(replica) {
  if (replica.state !== "up") return replica.state;
  const statuses = Object.values(replica.names).filter((s) => s !== "SERVICE_UNKNOWN");
  return statuses.every((s) => s === "SERVING") ? "serving" : "not-serving";
}

const LABELS = {
  serving: "serving", "not-serving": "not serving", draining: "draining",
  unreachable: "unreachable", connecting: "connecting",
};

function card(replica, now) {
  const state = cardState(replica);
  const node = el("article", { class: "replica", "data-replica": replica.address, "data-state": state });
  const title = el("h3");
  title.append(el("span", {}, replica.address), el("span", { class: "badge", "data-state": state }, LABELS[state]));
  let since = replica.since;  // connected or draining since; a status change is later news
  if (replica.state === "up" && replica.transitions.length) {
    since = Math.max(since, replica.transitions[replica.transitions.length - 1].at);
  }
  node.append(title, el("p", { class: "since muted" }, LABELS[state] + " for " + ago(since, now)));
  const names = el("ul", { class: "names" });
  for (const [name, status] of Object.entries(replica.names)) {
    if (name.startsWith("check.")) continue;  // shown as checks below
    const item = el("li", { "data-name": name, "data-status": status });
    item.append(el("span", { class: "name" }, name === "" ? '"" (overall)' : name),
                el("span", { class: "badge", "data-status": status }, status));
    names.append(item);
  }
  node.append(names);
  if (replica.names_hidden) node.append(el("p", { class: "muted" }, "List refused: the standard names only (a token shows every name)."));
  if (replica.checks && Object.keys(replica.checks).length) {
    const heading = replica.state === "draining" ? "Dependency checks (before the drain)" : "Dependency checks";
    node.append(el("p", { class: "checks-title" }, heading));
    const checks = el("ul", { class: "checks" });
    for (const [name, serving] of Object.entries(replica.checks)) {
      const status = serving ? "SERVING" : "NOT_SERVING";
      const item = el("li", { "data-check": name, "data-status": status });
      item.append(el("span", { class: "name" }, name), el("span", { class: "badge", "data-status": status }, serving ? "passing" : "failing"));
      checks.append(item);
    }
    node.append(checks);
  }
  const last = replica.transitions.slice(-SHOWN_TRANSITIONS).reverse();
  if (last.length) {
    const changes = el("ul", { class: "changes" });
    for (const t of last) changes.append(el("li", {}, clock(t.at) + " " + (t.name || '""') + " " + t.from + " \u2192 " + t.to));
    node.append(changes);
  }
  return node;
}

function render(doc) {
  const now = doc.generated_at;
  const replicas = doc.replicas.slice().sort((a, b) =>
    (ORDER[cardState(a)] - ORDER[cardState(b)]) || 0);
  const counts = {};
  for (const r of replicas) counts[cardState(r)] = (counts[cardState(r)] || 0) + 1;
  const parts = [replicas.length + (replicas.length === 1 ? " replica" : " replicas")];
  for (const state of Object.keys(ORDER)) if (counts[state]) parts.push(counts[state] + " " + LABELS[state]);
  const summary = document.getElementById("summary");
  summary.textContent = parts.join(" \u00b7 ");
  summary.dataset.bad = String(replicas.length - (counts.serving || 0));
  document.getElementById("targets").textContent = "(" + doc.targets.join(", ") + ")";
  document.getElementById("updated").textContent = "updated " + clock(now);
  document.getElementById("empty").hidden = replicas.length > 0;
  const problems = [...doc.resolve_errors];
  if (doc.not_followed) problems.push(doc.not_followed + " more replicas found than followed (--max-replicas)");
  const banner = document.getElementById("problems");
  banner.hidden = problems.length === 0;
  banner.textContent = problems.join("; ");
  document.getElementById("replicas").replaceChildren(...replicas.map((r) => card(r, now)));
  const events = document.getElementById("events");
  events.replaceChildren(...doc.events.slice(0, 30).map((e) => {
    const item = el("li", { "data-event": e.event });
    item.append(el("time", {}, clock(e.at)));
    if (e.replica) item.append(el("span", { class: "who" }, e.replica));
    item.append(document.createTextNode(e.text));
    return item;
  }));
}

async function poll() {
  timer = null;
  try {
    const response = await fetch("fleet.json", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    document.body.dataset.connection = "ok";
    document.getElementById("gone").hidden = true;
  } catch (error) {
    document.body.dataset.connection = "gone";
    document.getElementById("gone").hidden = false;
  }
  if (!document.hidden) timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && timer === null) poll();
});
poll();
