// revboot dashboard: follows the live feeds of elements with a data-feed attribute
// (server-sent events, one JSON event per message) and appends their text as text nodes,
// so nothing an instance or a build writes is ever read as HTML.
"use strict";

function follow(element) {
  const source = new EventSource(element.dataset.feed);
  const build = element.dataset.kind === "build";
  const append = (text) => {
    const atEnd = element.scrollTop + element.clientHeight >= element.scrollHeight - 4;
    element.appendChild(document.createTextNode(text));
    // Bounded: keep the last 2,000 pieces.
    while (element.childNodes.length > 2000) element.removeChild(element.firstChild);
    if (atEnd) element.scrollTop = element.scrollHeight;
  };
  source.onmessage = (message) => {
    let event;
    try { event = JSON.parse(message.data); } catch (_) { return; }
    switch (event.kind) {
      case "started":
        append("--- " + event.instance.slice(0, 12) + " at " + event.address +
          (event.client ? " for " + event.client : "") + " ---\n");
        break;
      case "output":
        append(event.text);
        break;
      case "skipped":
        append("\n--- " + event.chunks + " pieces skipped: this page fell behind ---\n");
        break;
      case "ended":
        if (build) {
          append("\n--- build " + event.state + " ---\n");
          const state = document.getElementById("build-state");
          if (state) state.textContent = event.state;
          source.close();
        } else {
          append("--- " + event.instance.slice(0, 12) + " ended: " + event.state + " ---\n");
        }
        break;
    }
  };
  // A feed opened again (the browser reconnects by itself after a network hiccup or a daemon
  // restart) starts over with what the instances kept: what this page showed is replaced,
  // not shown twice.
  let opened = false;
  source.onopen = () => {
    if (opened) element.replaceChildren();
    opened = true;
    element.classList.add("following");
  };
  source.onerror = () => element.classList.remove("following");
}

// Charts are drawn by the daemon; an element with data-refresh takes a fresh copy of itself
// from its page every data-refresh milliseconds, so the figures move without a reload.
function refresh(element) {
  const every = Math.max(1000, Number(element.dataset.refresh) || 10000);
  const selector = "#" + element.id;
  const fetchFresh = async () => {
    try {
      const response = await fetch(window.location.href, {
        credentials: "same-origin",
        headers: { "accept": "text/html" },
      });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.querySelector(selector);
      if (fresh) element.replaceChildren(...Array.from(fresh.childNodes));
    } catch (_) {
      // The next round tries again.
    }
  };
  setInterval(fetchFresh, every);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-feed]").forEach(follow);
  document.querySelectorAll("[data-refresh][id]").forEach(refresh);
});
