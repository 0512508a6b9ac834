"use strict";
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
    if (res.ok) { location.href = "/" + location.hash; return; }
    let detail = `sign-in failed (${res.status})`;
    try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
    problem.textContent = typeof detail === "string" ? detail : "username and password are needed";
  } catch (e) {
    problem.textContent = "the server cannot be reached";
  } finally {
    button.disabled = false;
  }
});
