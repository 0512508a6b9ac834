"use strict";
// Where to go after signing in: a page of this server named by ?next= (only a path here:
// never another site), else the worklist.
function backTo() {
  const next = new URLSearchParams(location.search).get("next") || "/";
  return /^\/[A-Za-z0-9_\-\/]*$/.test(next) && !next.startsWith("//") ? next : "/";
}
// Why the single sign-on came back here (/login?error=...).
const SSO_PROBLEMS = {
  bad_state: "The sign-in expired or was started elsewhere: try again.",
  provider_error: "The sign-in was cancelled or refused at the provider.",
  provider_unavailable: "The single sign-on provider cannot be reached.",
  bad_token: "The provider's answer could not be verified.",
  no_username: "The provider did not say who you are.",
  no_role: "None of your groups may use triage.",
  taken: "An account of another kind holds your name here: ask an administrator.",
  disabled: "This account is disabled.",
};
const ssoProblem = new URLSearchParams(location.search).get("error");
if (ssoProblem) {
  document.getElementById("problem").textContent = SSO_PROBLEMS[ssoProblem] || "Single sign-on failed.";
}
fetch("/api/auth/methods", {cache: "no-store"}).then(res => res.json()).then(methods => {
  if (methods.oidc) {
    const link = document.getElementById("sso-link");
    link.textContent = `Sign in with ${methods.oidc.name}`;
    link.href = `${methods.oidc.start}?next=${encodeURIComponent(backTo() + location.hash)}`;
    document.getElementById("sso").hidden = false;
  }
}).catch(() => {});
// The sign-in form: POST /api/auth/login, then back to the page (keeping a #study= link).
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const problem = document.getElementById("problem");
  const button = document.getElementById("submit");
  problem.textContent = "";
  button.disabled = true;
  try {
    const res = await fetch("/api/auth/login", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({
        username: document.getElementById("username").value.trim(),
        password: document.getElementById("password").value,
      }),
    });
    if (res.ok) { location.href = backTo() + location.hash; return; }
    let detail = `sign-in failed (${res.status})`;
    try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
    problem.textContent = typeof detail === "string" ? detail : "username and password are needed";
  } catch (e) {
    problem.textContent = "the server cannot be reached";
  } finally {
    button.disabled = false;
  }
});
