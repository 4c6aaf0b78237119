// The session page's live timeline: server-sent events append steps; each step asks
// htmx to refresh the panels (board, proposals, tasks, locks). No build step.
(function () {
  "use strict";
  function start() {
    var list = document.getElementById("timeline");
    if (!list) return;
    var status = document.getElementById("timeline-status");
    var count = 0;
    var source = new EventSource(list.dataset.stream);
    source.addEventListener("open", function () {
      status.textContent = "Live: following the event stream.";
    });
    source.addEventListener("step", function (event) {
      list.insertAdjacentHTML("beforeend", event.data);
      count += 1;
      status.textContent = "Live: " + count + " event" + (count === 1 ? "" : "s") + " so far.";
      if (window.htmx) window.htmx.trigger(document.body, "swarm-changed");
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
