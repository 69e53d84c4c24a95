"use strict";
// Record every error and console warning in the page itself, so a test reading the DOM sees them.
(function () {
  function record(kind, message) {
    document.body.setAttribute("data-status", "error");
    const item = document.createElement("li");
    item.textContent = kind + ": " + message;
    const list = document.getElementById("errors");
    if (list) list.append(item);
    else window.addEventListener("DOMContentLoaded", () => document.getElementById("errors").append(item));
  }
  window.addEventListener("error", (e) => record("error", (e.message || String(e.error)) + " (" + (e.filename || "") + ":" + (e.lineno || 0) + ")"));
  window.addEventListener("unhandledrejection", (e) => record("unhandled rejection", String(e.reason)));
  document.addEventListener("securitypolicyviolation", (e) => record("blocked by the content security policy", e.violatedDirective + " " + (e.sourceFile || "") + ":" + (e.lineNumber || 0)));
  for (const level of ["error", "warn"]) {
    const original = console[level].bind(console);
    console[level] = (...args) => { record("console." + level, args.map(String).join(" ")); original(...args); };
  }
})();
