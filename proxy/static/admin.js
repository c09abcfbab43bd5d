// together-meter's built-in spend page: fetches /admin/budgets with the operator token and draws
// one row per tenant. No dependencies; every value from the API is set with textContent.
"use strict";

const KEY = "together-meter-admin-token";
const REFRESH_MS = 10000;
const PLACES = 12; // the API's amounts are exact decimals of at most 12 places (pico-USD)
let timer = null;

const $ = (id) => document.getElementById(id);

// Exact decimal strings <-> BigInt pico-USD, so totals are exact like the API's own sums.
function toPico(text) {
  const negative = text.startsWith("-");
  const [whole, frac = ""] = text.replace(/^-/, "").split(".");
  const pico = BigInt(whole || "0") * 10n ** BigInt(PLACES) + BigInt((frac + "0".repeat(PLACES)).slice(0, PLACES));
  return negative ? -pico : pico;
}

function fromPico(pico) {
  const negative = pico < 0n;
  const digits = (negative ? -pico : pico).toString().padStart(PLACES + 1, "0");
  const whole = digits.slice(0, -PLACES);
  const frac = digits.slice(-PLACES).replace(/0+$/, "");
  return (negative ? "-" : "") + whole + (frac ? "." + frac : "");
}

function cell(tag, text, cls) {
  const el = document.createElement(tag);
  if (text !== undefined && text !== null) el.textContent = text;
  if (cls) el.className = cls;
  return el;
}

function level(ratio, alertAt) {
  const marks = alertAt.length ? alertAt : [1];
  if (ratio >= 1 || ratio >= Math.max(...marks)) return "over";
  if (ratio >= Math.min(...marks)) return "warn";
  return "ok";
}

function bar(view) {
  const track = cell("div", null, "track");
  const ratio = view.used_ratio ?? 0;
  const used = Math.min(Math.max(ratio, 0), 1);
  const budget = toPico(view.budget_usd);
  const reservedRatio = budget > 0n ? Number((toPico(view.reserved_usd) * 1000000n) / budget) / 1e6 : 0;
  const fill = cell("div", null, "used " + level(ratio, view.alert_at));
  fill.style.width = used * 100 + "%";
  fill.dataset.usedPct = String(ratio * 100);
  const held = cell("div", null, "held");
  held.style.left = used * 100 + "%";
  held.style.width = Math.min(reservedRatio, 1 - used) * 100 + "%";
  track.title = `${(ratio * 100).toFixed(2)} % used, alerts at ${view.alert_at.map((t) => t * 100 + " %").join(", ")}`;
  track.append(fill, held);
  const box = cell("td", null, "bar-col");
  box.append(track, cell("span", `${(ratio * 100).toFixed(1)} % used` + (view.hard_limit ? " · hard limit" : " · soft"), "pct"));
  return box;
}

function projected(text, view) {
  const td = cell("td", text, "num projected");
  const share = cell("td", "", "num share");
  if (view) {
    const budget = toPico(view.budget_usd);
    if (budget > 0n) share.textContent = `${(Number((toPico(text) * 10000n) / budget) / 100).toFixed(0)} %`;
    if (toPico(text) > budget) {
      td.classList.add("over-budget");
      share.classList.add("over-budget");
      td.title = "projected to exceed the budget";
    }
  }
  return [td, share];
}

function row(name, spent, view, projection, cls) {
  const tr = cell("tr", null, cls);
  tr.dataset.tenant = name;
  tr.append(cell("th", name), cell("td", spent, "num spent"));
  if (view) {
    tr.append(cell("td", view.budget_usd, "num budget"), bar(view));
    tr.append(cell("td", view.reserved_usd, "num reserved"), cell("td", view.remaining_usd, "num remaining"));
  } else {
    tr.append(cell("td", "—", "num budget"), cell("td", "no budget", "muted bar-col"));
    tr.append(cell("td", "—", "num reserved"), cell("td", "—", "num remaining"));
  }
  tr.append(...projected(projection, view));
  return tr;
}

function render(data) {
  const day = (seconds) => new Date(seconds * 1000).toLocaleDateString("en-CA", { timeZone: data.timezone });
  $("period").textContent = `Period ${data.period}: ${day(data.period_start)} to ${day(data.period_end)} (${data.timezone})`;
  const body = $("rows");
  const sums = { spent: 0n, budget: 0n, reserved: 0n, projected: 0n };
  const rows = [];
  for (const [name, t] of Object.entries(data.tenants)) {
    rows.push(row(name, t.spent_usd, t.budget, t.projected_month_end_usd, "tenant"));
    sums.spent += toPico(t.spent_usd);
    sums.projected += toPico(t.projected_month_end_usd);
    if (t.budget) {
      sums.budget += toPico(t.budget.budget_usd);
      sums.reserved += toPico(t.budget.reserved_usd);
    }
    for (const [feature, fb] of Object.entries(t.feature_budgets)) {
      const tr = row(`feature ${feature}`, fb.spent_usd, fb, fb.projected_month_end_usd, "feature");
      tr.dataset.tenant = name;
      tr.dataset.feature = feature;
      rows.push(tr);
    }
  }
  body.replaceChildren(...rows);
  for (const [field, value] of Object.entries(sums)) {
    document.querySelector(`#totals [data-field="${field}"]`).textContent = fromPico(value);
  }
  $("footnote").textContent = `Projection: ${data.projection}. Budget total counts tenant budgets only. Refreshes every ${REFRESH_MS / 1000} s.`;
  $("view").hidden = false;
}

function showLogin(message) {
  clearTimeout(timer);
  $("view").hidden = true;
  $("login").hidden = false;
  status(message, Boolean(message));
}

function status(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "muted";
}

async function refresh() {
  clearTimeout(timer);
  const token = sessionStorage.getItem(KEY);
  if (!token) return showLogin("Paste the operator token to see spend.");
  try {
    const r = await fetch("budgets", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      return showLogin("The token was refused (401). Paste the operator token.");
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    render(await r.json());
    $("login").hidden = true;
    status(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    status(`Could not load /admin/budgets: ${err.message}; retrying.`, true);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function start() {
  // #token=... in the URL: take it, then drop it from the address bar and history
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {
    sessionStorage.setItem(KEY, hash.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("token").value.trim());
    $("token").value = "";
    refresh();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("Token forgotten.");
  });
  refresh();
}

start();
