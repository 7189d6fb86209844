// xpando dashboard: live parts over Server-Sent Events, and the sign-in link's key.
(function () {
  "use strict";
  function apply(ops) {
    for (const op of ops) {
      const el = document.getElementById(op.target);
      if (!el) continue;
      if (op.mode === "append") el.insertAdjacentHTML("beforeend", op.html);
      else el.innerHTML = op.html;
    }
  }
  function follow(url) {
    const source = new EventSource(url);
    source.addEventListener("ops", (e) => apply(JSON.parse(e.data)));
    source.addEventListener("end", () => source.close());
    return source;
  }
  function signInFromFragment() {
    // The link `xpando dev` prints carries the key in its fragment (#key=…), which no server
    // ever receives; post it like the form would, and drop it from the address bar.
    const form = document.getElementById("signin");
    const found = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (!form || !found) return;
    history.replaceState(null, "", location.pathname + location.search);
    form.elements.key.value = decodeURIComponent(found[1]);
    form.submit();
  }
  document.addEventListener("DOMContentLoaded", () => {
    signInFromFragment();
    const body = document.body;
    if (body.dataset.live) follow(body.dataset.live);
    if (body.dataset.stream) follow(body.dataset.stream);
  });
})();
