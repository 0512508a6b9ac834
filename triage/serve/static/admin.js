"use strict";
// The admin page: accounts, tokens and the audit trail through /api/accounts, /api/tokens
// and /api/audit. Values are shown with textContent only (never parsed as HTML).
let me = null;

async function api(url, options = {}) {
  const opts = {cache: "no-store", ...options, headers: {...(options.headers || {})}};
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = me ? me.csrf_token : "";
    if (opts.body !== undefined) { opts.headers["Content-Type"] = "application/json"; }
  }
  const res = await fetch(url, opts);
  if (res.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  return res;
}

async function problem(res) {
  try {
    const detail = (await res.json()).detail;
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch (e) { return `failed (${res.status})`; }
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) { td.className = cls; }
  return td;
}

function when(iso) { return iso ? String(iso).replace("T", " ").slice(0, 19) : ""; }

async function change(username, body, message) {
  const res = await api(`/api/accounts/${encodeURIComponent(username)}`,
                        {method: "PATCH", body: JSON.stringify(body)});
  message.textContent = res.ok ? `${username}: changed` : await problem(res);
  await loadAccounts();
}

async function loadAccounts() {
  const res = await api("/api/accounts");
  if (!res.ok) { return; }
  const message = document.getElementById("accounts-message");
  const rows = (await res.json()).accounts.map(a => {
    const tr = document.createElement("tr");
    tr.dataset.username = a.username;
    const role = document.createElement("select");
    for (const r of ["radiologist", "admin", "integration"]) {
      const o = document.createElement("option");
      o.textContent = r; o.selected = r === a.role; role.appendChild(o);
    }
    role.onchange = () => change(a.username, {role: role.value}, message);
    const roleCell = document.createElement("td"); roleCell.appendChild(role);
    const toggle = document.createElement("button");
    toggle.type = "button";
    toggle.textContent = a.disabled ? "Enable" : "Disable";
    toggle.onclick = () => change(a.username, {disabled: !a.disabled}, message);
    const state = cell(a.disabled ? "disabled " : "enabled ", a.disabled ? "failure" : "ok");
    state.appendChild(toggle);
    tr.append(cell(a.username), cell(a.display_name), cell(a.source), roleCell,
              cell((a.grants || []).join(", ")), state, cell(when(a.last_login_at)));
    return tr;
  });
  document.getElementById("accounts").replaceChildren(...rows);
}

async function loadTokens() {
  const res = await api("/api/tokens");
  if (!res.ok) { return; }
  const rows = (await res.json()).tokens.map(t => {
    const tr = document.createElement("tr");
    const last = document.createElement("td");
    if (!t.revoked_at) {
      const revoke = document.createElement("button");
      revoke.type = "button"; revoke.textContent = "Revoke";
      revoke.onclick = async () => {
        const r = await api(`/api/tokens/${t.id}`, {method: "DELETE"});
        document.getElementById("tokens-message").textContent = r.ok ? `token ${t.id} revoked` : await problem(r);
        loadTokens();
      };
      last.appendChild(revoke);
    } else { last.textContent = `revoked ${when(t.revoked_at)}`; }
    tr.append(cell(t.id), cell(t.username), cell(t.name), cell(t.prefix), cell(when(t.created_at)),
              cell(when(t.expires_at)), cell(when(t.last_used_at)), last);
    return tr;
  });
  document.getElementById("tokens").replaceChildren(...rows);
}

async function loadAudit() {
  const params = new URLSearchParams();
  for (const [id, key] of [["f-actor", "actor"], ["f-action", "action"], ["f-target", "target"]]) {
    const v = document.getElementById(id).value.trim();
    if (v) { params.set(key, v); }
  }
  const res = await api(`/api/audit?${params}`);
  const message = document.getElementById("audit-message");
  if (!res.ok) { message.textContent = await problem(res); return; }
  const rows = (await res.json()).records.map(r => {
    const tr = document.createElement("tr");
    tr.append(cell(r.id), cell(when(r.at)), cell(r.actor ? `${r.actor}${r.actor_role ? " (" + r.actor_role + ")" : ""}` : ""),
              cell(r.action), cell(r.outcome, r.outcome === "failure" ? "failure" : ""),
              cell(r.target), cell(r.source_address),
              cell(Object.keys(r.detail || {}).length ? JSON.stringify(r.detail) : ""));
    return tr;
  });
  document.getElementById("audit").replaceChildren(...rows);
}

document.getElementById("new-account").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {
    username: document.getElementById("new-username").value.trim(),
    role: document.getElementById("new-role").value,
    display_name: document.getElementById("new-name").value.trim() || null,
    password: document.getElementById("new-password").value || null,
  };
  const res = await api("/api/accounts", {method: "POST", body: JSON.stringify(body)});
  document.getElementById("accounts-message").textContent = res.ok ? `${body.username}: created` : await problem(res);
  if (res.ok) { event.target.reset(); loadAccounts(); }
});

document.getElementById("new-token").addEventListener("submit", async (event) => {
  event.preventDefault();
  const days = document.getElementById("token-days").value;
  const body = {
    username: document.getElementById("token-username").value.trim(),
    name: document.getElementById("token-name").value.trim(),
    days: days ? Number(days) : null,
  };
  const res = await api("/api/tokens", {method: "POST", body: JSON.stringify(body)});
  const message = document.getElementById("tokens-message");
  if (!res.ok) { message.textContent = await problem(res); return; }
  const made = await res.json();
  message.textContent = "The new token, shown this once: ";
  const secret = document.createElement("span");
  secret.className = "secret"; secret.id = "new-token-value"; secret.textContent = made.token;
  message.appendChild(secret);
  event.target.reset();
  loadTokens();
});

document.getElementById("audit-filter").addEventListener("submit", (event) => {
  event.preventDefault();
  loadAudit();
});

document.getElementById("verify").onclick = async () => {
  const res = await api("/api/audit/verify");
  const doc = await res.json();
  const message = document.getElementById("audit-message");
  message.textContent = doc.ok ? `The chain is intact: ${doc.checked} record(s) checked.`
    : `The chain is broken at record ${doc.first_bad_id}: ${doc.problem}`;
  message.className = doc.ok ? "message ok" : "message failure";
  loadAudit();
};

document.getElementById("signout").onclick = async () => {
  try { await api("/api/auth/logout", {method: "POST"}); } catch (e) { /* ended already */ }
  location.href = "/login";
};

(async () => {
  me = await (await api("/api/auth/me")).json();
  document.getElementById("who").textContent = `${me.display_name || me.username} (${me.role})`;
  const may = new Set(me.permissions);
  if (may.has("manage_accounts")) {
    document.getElementById("accounts-section").hidden = false;
    document.getElementById("tokens-section").hidden = false;
    loadAccounts();
    loadTokens();
  }
  if (may.has("read_audit")) {
    document.getElementById("audit-section").hidden = false;
    loadAudit();
  }
})().catch(() => {});
