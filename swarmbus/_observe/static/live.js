// The session page's live timeline: server-sent events append steps; each step asks
// htmx to refresh the panels (board, proposals, tasks, locks). No build step.
(function () {
  "use strict";
  function start() {
    var list = document.getElementById("timeline");
    if (!list) return;
    var status = document.getElementById("timeline-status");
    var count = 0;
    var refresh = null;
    // Trailing-edge batching: one panel refresh per burst of steps, never a lost last one.
    function changed() {
      if (refresh !== null) return;
      refresh = setTimeout(function () {
        refresh = null;
        if (window.htmx) window.htmx.trigger(document.body, "swarm-changed");
      }, 400);
    }
    var source = new EventSource(list.dataset.stream);
    source.addEventListener("open", function () {
      status.textContent = "Live: following the event stream.";
    });
    source.addEventListener("step", function (event) {
      list.insertAdjacentHTML("beforeend", event.data);
      count += 1;
      status.textContent = "Live: " + count + " event" + (count === 1 ? "" : "s") + " so far.";
      changed();
    });
    source.addEventListener("error", function () {
      status.textContent = "Disconnected from the event stream; reconnecting…";
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
