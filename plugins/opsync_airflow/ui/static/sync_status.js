// Requeue and discard: ask first (in the page: Airflow's frame allows no confirm()), send the CSRF token
// with the POST, then reload to show the figures and the audit as they now are.
"use strict";

const MESSAGE_KEY = "opsync-sync-status-message";
const REFRESH_MS = 30000;  // the figures are live; a person asking, acting or reading steps is not interrupted
let busy = false;  // one action at a time: a double click asks once and posts once

function meta(name) {
  return document.querySelector(`meta[name="${name}"]`).content;
}

function showMessage(text) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.hidden = false;
}

function describe(actions) {
  return actions.map((a) => `${a.txn_id}: ${a.action}${a.changed ? "d" : " had been done already"} by ${a.by} at ${a.at}`).join("\n");
}

function ask(question, verb) {
  const dialog = document.getElementById("confirm-dialog");
  dialog.querySelector("#confirm-question").textContent = question;
  dialog.querySelector("#confirm-yes").textContent = verb;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.showModal();
  });
}

async function act(button) {
  if (busy) {
    return;
  }
  busy = true;
  const { action, txn, question, verb } = button.dataset;
  if (!(await ask(question, verb))) {
    busy = false;
    return;
  }
  document.querySelectorAll("button[data-action]").forEach((b) => { b.disabled = true; });
  const response = await fetch(`api/dead-letters/${encodeURIComponent(txn)}/${action}`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", [meta("csrf-header")]: meta("csrf-token") },
    body: "{}",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    showMessage(`${action} of ${txn} failed (${response.status}): ${body.detail || response.statusText}`);
    document.querySelectorAll("button[data-action]").forEach((b) => { b.disabled = false; });
    busy = false;
    return;
  }
  sessionStorage.setItem(MESSAGE_KEY, describe(body.actions));
  window.location.reload();
}

document.addEventListener("DOMContentLoaded", () => {
  const kept = sessionStorage.getItem(MESSAGE_KEY);
  if (kept) {
    sessionStorage.removeItem(MESSAGE_KEY);
    showMessage(kept);
  }
  document.querySelectorAll("button[data-action]").forEach((button) => {
    button.addEventListener("click", () => act(button));
  });
  setInterval(() => {
    if (!busy && !document.querySelector("details[open]")) {
      window.location.reload();
    }
  }, REFRESH_MS);
});
