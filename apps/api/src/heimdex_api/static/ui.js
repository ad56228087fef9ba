// Live updates for the Heimdex dashboard: every few seconds, fetch this page again and swap in
// the parts marked data-live (by id). Forms are never inside them, so typing is not disturbed.
(function () {
  "use strict";
  var every = parseInt(document.body.getAttribute("data-poll") || "0", 10);
  if (!every || !window.fetch || !window.DOMParser) return;
  var busy = false;

  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Heimdex-Poll": "1" } })
      .then(function (resp) {
        if (resp.redirected || resp.status === 401 || resp.status === 403) {
          window.location.reload(); // the session ended: show the sign-in page
          return null;
        }
        return resp.ok ? resp.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (old) {
          if (old.querySelector("input:checked")) return; // keep what the operator selected
          var next = fresh.getElementById(old.id);
          if (next && next.innerHTML !== old.innerHTML) old.innerHTML = next.innerHTML;
        });
        document.body.setAttribute("data-refreshed", new Date().toISOString());
      })
      .catch(function () { /* the API is restarting: try again next time */ })
      .then(function () { busy = false; });
  }

  setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
})();
