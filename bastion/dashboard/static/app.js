// Bastion dashboard: small progressive enhancements. Every page works without this file.
"use strict";

function left(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  if (seconds >= 3600) return Math.floor(seconds / 3600) + "h " + Math.floor(seconds % 3600 / 60) + "m";
  if (seconds >= 60) return Math.floor(seconds / 60) + "m " + (seconds % 60) + "s";
  return seconds + "s";
}

// Countdowns: elements with data-expires (epoch seconds) show the time left.
function tickCountdowns() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll("[data-expires]")) {
    const rest = parseFloat(el.dataset.expires) - now;
    el.textContent = rest > 0 ? left(rest) + (el.closest("td") ? "" : " left") : "expired";
    el.classList.toggle("late", rest < 60);
  }
}

// Flow rows open their detail when clicked anywhere.
function clickableRows() {
  document.addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a, button, input, select")) window.location = row.dataset.href;
  });
}

function durationText(us) {
  if (us == null) return "—";
  if (us < 1000) return us + " µs";
  if (us < 1e6) return (us / 1000).toFixed(1) + " ms";
  return (us / 1e6).toFixed(2) + " s";
}

// Live flows: one EventSource per page; new summaries are prepended (text only, never HTML).
function liveFlows() {
  const badge = document.getElementById("live");
  const body = document.getElementById("flow-rows");
  const template = document.getElementById("flow-row-template");
  if (!badge || !body || !template || !window.EventSource) return;
  const source = new EventSource(badge.dataset.stream);
  source.onopen = () => badge.classList.add("on");
  source.onerror = () => badge.classList.remove("on");
  source.addEventListener("flow", (event) => {
    const f = JSON.parse(event.data);
    const row = template.content.firstElementChild.cloneNode(true);
    const set = (name, text) => { const el = row.querySelector('[data-f="' + name + '"]'); el.textContent = text; return el; };
    const link = set("link", f.started.slice(11, 23));
    link.href = "/flows/" + encodeURIComponent(f.id);
    row.dataset.href = link.href;
    set("date", f.started.slice(0, 10));
    set("agent", f.agent || "—");
    set("method", f.method);
    set("url", f.url).title = f.url;
    const status = set("status", f.status == null ? "—" : String(f.status));
    if (f.status) status.classList.add("s" + Math.floor(f.status / 100));
    const decision = set("decision", f.decision || "—");
    if (f.decision) decision.classList.add(f.decision);
    set("rules", (f.rules || []).join(", ") || "default");
    set("duration", durationText(f.duration_us));
    const facts = [];
    if (f.llm) {
      const tokens = f.llm.input_tokens != null || f.llm.output_tokens != null
        ? ` ${f.llm.input_tokens ?? "?"}→${f.llm.output_tokens ?? "?"} tok` : "";
      facts.push((f.llm.model || "model unknown") + tokens);
    }
    if (f.mcp_method) facts.push(f.mcp_method);
    if (f.tool) facts.push(`tool ${f.tool}`);
    set("facts", facts.join(" · "));
    body.prepend(row);
    while (body.rows.length > 500) body.deleteRow(-1);  // the page keeps a bounded buffer
  });
}

// Approval queue keys: j/k select, a approve, d deny, o open.
function approvalKeys() {
  const queue = document.getElementById("queue");
  if (!queue) return;
  const items = () => Array.from(queue.querySelectorAll("li.approval"));
  let index = 0;
  const select = (i) => {
    const all = items();
    if (!all.length) return;
    index = Math.max(0, Math.min(all.length - 1, i));
    all.forEach((el, n) => el.classList.toggle("sel", n === index));
    all[index].scrollIntoView({ block: "nearest" });
  };
  select(0);
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, select, textarea") || event.metaKey || event.ctrlKey || event.altKey) return;
    const current = items()[index];
    if (event.key === "j") select(index + 1);
    else if (event.key === "k") select(index - 1);
    else if (event.key === "o" && current) window.location = current.querySelector("header a").href;
    else if ((event.key === "a" || event.key === "d") && current) {
      const button = current.querySelector('button[data-key="' + event.key + '"]');
      if (button) { event.preventDefault(); button.closest("form").requestSubmit(button); }
    } else return;
    event.preventDefault();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  tickCountdowns();
  setInterval(tickCountdowns, 1000);
  clickableRows();
  liveFlows();
  approvalKeys();
});
