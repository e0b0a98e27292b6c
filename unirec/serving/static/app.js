// The try-it page: plain fetch calls on the service's own API (no build step, no libraries).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { user: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["X-API-Key"] = key;
  return h;
}

async function call(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${r.status}: ${data.detail || r.statusText}`);
  return data;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "muted";
}

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c);
  return e;
}

function button(label, cls, title, onclick) {
  return el("button", { className: cls, title, onclick, type: "button" }, label);
}

// an item's title, with a "new" tag for an item added at serving time (POST /v1/items)
function titleOf(it) {
  const t = el("span", { className: "title" }, it.title || `item ${it.item_id}`);
  if (it.added) t.append(" ", el("span", { className: "badge", title: "added at serving time: nobody has rated it yet" }, "new"));
  return t;
}

async function refresh() {
  if (!state.user) return;
  localStorage.setItem("unirec-user", state.user);
  const rec = await call("POST", "/v1/recommend", { user_id: state.user, k: 10 });
  $("version").textContent = rec.model_version;
  $("source").textContent = rec.source === "popular" ? "(most popular: no history yet)" :
    `(from ${rec.history_length} events${rec.known_user ? "" : ", a user new to the model"})`;
  const list = $("recs");
  list.replaceChildren(...rec.items.map((it) => {
    const li = el("li", {});
    li.dataset.itemId = it.item_id;
    li.append(el("div", { className: "row" },
      titleOf(it),
      el("span", { className: "score" }, it.score === null ? "" : it.score.toFixed(2)),
      button("Like", "like", "more like this", () => feedback(it, "like")),
      button("Dislike", "dislike", "less like this", () => feedback(it, "dislike")),
      button("Not interested", "dismiss", "never show this again; similar items move down", () => feedback(it, "dismiss"))));
    return li;
  }));
  await showHistory();
}

async function showHistory() {
  try {
    const h = await call("GET", `/v1/users/${encodeURIComponent(state.user)}/history`);
    const last = h.events.slice(-20).reverse();
    $("history").replaceChildren(...last.map((e) => el("li", {},
      el("span", { className: "kind" }, e.source === "live" ? e.kind : "data set"),
      el("span", { className: "title" }, e.title || `item ${e.item_id}`),
      el("span", { className: "score" }, e.rating === null || e.rating === undefined ? "" : `rated ${e.rating}`))));
  } catch (err) {
    $("history").replaceChildren(el("li", { className: "muted" }, `history not shown: ${err.message}`));
  }
}

async function feedback(item, kind) {
  try {
    await call("POST", "/v1/events", { user_id: state.user, item_id: item.item_id, kind });
    status(`${kind}: ${item.title || item.item_id}`);
    await refresh();
  } catch (err) { status(err.message, true); }
}

async function pick(user) {
  state.user = user;
  $("user").value = user;
  try { status(`user ${user}`); await refresh(); } catch (err) { status(err.message, true); }
}

async function search(ev) {
  ev.preventDefault();
  const q = $("search").value.trim();
  if (!q) return;
  try {
    const r = await call("GET", `/v1/items?q=${encodeURIComponent(q)}&k=15`);
    $("search-results").replaceChildren(...(r.items.length ? r.items.map((it) => {
      const li = el("li", {}, titleOf(it),
        button("Add to history", "add", "record a view of this item", async () => {
          if (!state.user) { status("pick a user first", true); return; }
          await feedback(it, "view");
        }));
      li.dataset.itemId = it.item_id;
      return li;
    }) : [el("li", { className: "muted" }, "no match")]));
  } catch (err) { status(err.message, true); }
}

async function init() {
  $("key").value = sessionStorage.getItem("unirec-key") || "";
  $("key").addEventListener("change", () => sessionStorage.setItem("unirec-key", $("key").value));
  $("load").addEventListener("click", () => { const u = $("user").value.trim(); if (u) pick(u); });
  $("user").addEventListener("keydown", (e) => { if (e.key === "Enter") $("load").click(); });
  $("new-user").addEventListener("click", () => pick(`guest-${Math.random().toString(36).slice(2, 8)}`));
  $("search-form").addEventListener("submit", search);
  try {
    const h = await call("GET", "/healthz");
    $("version").textContent = h.model_version;
    $("user").placeholder = `e.g. ${h.example_users.slice(0, 3).join(", ")}`;
    $("user").value = localStorage.getItem("unirec-user") || h.example_users[0] || "";
  } catch (err) { status(err.message, true); }
}

init();
