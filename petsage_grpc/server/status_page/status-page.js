// The PetSage status page: polls status.json and draws it. No framework, no build step.
"use strict";

(() => {
  const POLL_MS = 500; // a failing check shows within a second of the server knowing
  const TIMEOUT_MS = 3000; // an answer slower than this counts as "server gone"
  const TIMELINE = 20; // transitions drawn per check (status.json has up to 100)
  const TOKEN_KEY = "petsage-status-token";

  const $ = (id) => document.getElementById(id);
  let lastOk = null; // when status.json last answered
  let timer = null;
  let busy = false; // one request at a time

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString();
  }

  function ago(seconds, now) {
    const delta = Math.max(0, now - seconds);
    if (delta < 1) return "just now";
    if (delta < 90) return `${Math.round(delta)} s ago`;
    if (delta < 5400) return `${Math.round(delta / 60)} min ago`;
    if (delta < 172800) return `${Math.round(delta / 3600)} h ago`;
    return `${Math.round(delta / 86400)} d ago`;
  }

  function millis(seconds) {
    if (seconds === null || seconds === undefined) return "none yet";
    return seconds < 10 ? `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms` : `${seconds.toFixed(1)} s`;
  }

  function label(name) {
    return name === "" ? '"" (whole server)' : name;
  }

  function statusWord(status) {
    return { SERVING: "serving", NOT_SERVING: "not serving" }[status] || status.toLowerCase();
  }

  function badge(attrs, text) {
    return el("span", { className: "badge", ...attrs }, text);
  }

  function timeline(transitions) {
    const strip = el("div", { className: "timeline", "data-count": String(transitions.length) });
    for (const t of transitions.slice(-TIMELINE)) {
      strip.append(el("span", { "data-status": t.status, title: `${clock(t.at)} ${statusWord(t.status)}` }));
    }
    return strip;
  }

  function renderNames(names) {
    const list = $("names");
    list.replaceChildren(
      ...names.map((n) =>
        el(
          "li",
          { "data-name": n.name, "data-status": n.status },
          el("span", { className: "name", title: n.since ? `since ${clock(n.since)}` : "" }, label(n.name)),
          badge({ "data-status": n.status }, statusWord(n.status)),
        ),
      ),
    );
  }

  function renderCheck(check, now) {
    const facts = [
      ["kind", `${check.kind}${check.critical ? ", critical" : ""}`],
      ["last attempt", `${millis(check.last_duration_seconds)} of ${millis(check.timeout_seconds)}`],
      ["last success", check.last_success_at ? `${clock(check.last_success_at)} (${ago(check.last_success_at, now)})` : "never"],
      ["failures in a row", String(check.consecutive_failures)],
      ["status changes", String(check.status_changes)],
    ];
    const recent = check.transitions.slice(-3).reverse();
    return el(
      "article",
      { className: "check", "data-check": check.name, "data-state": check.state },
      el("h3", {}, el("span", {}, check.name), badge({ "data-state": check.state }, check.state)),
      el("dl", {}, ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      timeline(check.transitions),
      el(
        "ul",
        { className: "changes" },
        ...recent.map((t) => el("li", {}, `${clock(t.at)} ${statusWord(t.status)} (${ago(t.at, now)})`)),
      ),
    );
  }

  function renderChecks(doc) {
    const note = $("checks-note");
    const form = $("token-form");
    const hidden = doc.checks_hidden;
    note.hidden = !hidden && doc.checks.length > 0;
    form.hidden = hidden !== "token";
    if (hidden === "token") {
      note.textContent = "This server has a bearer token: enter it to see the dependency checks.";
    } else if (hidden === "config") {
      note.textContent = "This server does not report its dependency checks ([smoke_test] report_checks = false).";
    } else {
      note.textContent = "This server has no dependency checks.";
    }
    $("checks").replaceChildren(...doc.checks.map((c) => renderCheck(c, doc.generated_at)));
  }

  function render(doc) {
    const overall = $("overall");
    overall.dataset.status = doc.status;
    overall.textContent = statusWord(doc.status);
    document.title = `${doc.status === "SERVING" ? "✓" : "✗"} PetSage status`;
    $("updated").textContent = `updated ${clock(doc.generated_at)}`;
    const lag = $("loop-lag");
    lag.hidden = doc.loop_lag_seconds === null || doc.loop_lag_seconds === undefined;
    if (!lag.hidden) lag.textContent = `event loop lag ${millis(doc.loop_lag_seconds)}`;
    $("draining").hidden = !doc.draining;
    renderNames(doc.names);
    renderChecks(doc);
  }

  function gone(why) {
    document.body.dataset.connection = "gone";
    $("gone").hidden = false;
    $("gone-detail").textContent = lastOk
      ? `${why} Last answer at ${lastOk.toLocaleTimeString()}.`
      : why;
  }

  async function poll() {
    timer = null;
    if (busy) return;
    busy = true;
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const abort = new AbortController();
    const deadline = setTimeout(() => abort.abort(), TIMEOUT_MS);
    try {
      const response = await fetch("status.json", { headers, cache: "no-store", signal: abort.signal });
      if (!response.ok) throw new Error(`The server answered ${response.status}.`);
      const doc = await response.json();
      lastOk = new Date();
      document.body.dataset.connection = "live";
      $("gone").hidden = true;
      render(doc);
    } catch (error) {
      gone(error.name === "AbortError" ? "No answer within 3 s." : "The server does not answer.");
    } finally {
      clearTimeout(deadline);
      busy = false;
      schedule();
    }
  }

  function schedule() {
    // A page nobody looks at asks nothing of the server.
    if (timer === null && !document.hidden) timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null && !busy) poll();
  });

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    if (timer !== null) clearTimeout(timer);
    timer = null;
    poll(); // or, if a request is on its way, the next one sends the token
  });

  poll();
})();
