// massgen dashboard: live updates over server-sent events, filter/sort, the Stop button.
// Hand-written, no dependencies. The server renders (and escapes) every fragment it sends;
// this script only places them, so untrusted run data never becomes markup here.
(() => {
  "use strict";
  const $ = (sel, root = document) => root.querySelector(sel);
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const liveEl = $("#live");

  function setLive(cls, text) {
    if (liveEl) {
      liveEl.className = "live " + cls;
      liveEl.textContent = text;
    }
  }

  function fmtDur(s) {
    s = Math.max(0, s);
    if (s < 60) return s.toFixed(1) + "s";
    const i = Math.floor(s);
    if (s < 3600) return Math.floor(i / 60) + "m" + String(i % 60).padStart(2, "0") + "s";
    return Math.floor(i / 3600) + "h" + String(Math.floor((i % 3600) / 60)).padStart(2, "0") + "m";
  }

  function fragment(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    return tpl.content;
  }

  // One EventSource at a time, reconnecting with capped exponential backoff and jitter, so a
  // dashboard restart or a flaky link never turns open pages into a reconnect storm.
  function stream(urlFor, handlers) {
    let es = null;
    let delay = 1000;
    let timer = null;
    function connect() {
      timer = null;
      es = new EventSource(urlFor(), { withCredentials: true });
      es.onopen = () => setLive("on", "live");
      for (const [name, fn] of Object.entries(handlers)) {
        es.addEventListener(name, (ev) => {
          delay = 1000;
          fn(JSON.parse(ev.data));
        });
      }
      es.onerror = () => {
        es.close();
        setLive("down", "reconnecting");
        const wait = delay * (0.75 + Math.random() * 0.5);
        delay = Math.min(30000, delay * 2);
        timer = setTimeout(connect, wait);
      };
    }
    window.addEventListener("pagehide", () => {
      if (es) es.close();
      if (timer) clearTimeout(timer);
    });
    connect();
  }

  // -- the runs page -------------------------------------------------------------------------
  const runs = $("#runs");
  if (runs) {
    const tbody = $("#runs-body");
    const filter = $("#filter");
    const stateSel = $("#state");
    const flat = $("#flat");
    let gen = runs.dataset.gen;
    let sortCol = null;
    let sortDir = 1;

    const rowState = (tr) => {
      const s = tr.dataset.state;
      const x = tr.dataset.exit;
      if (s !== "finished") return ["live"];
      return x === "0" ? ["finished", "ok"] : ["finished", "bad"];
    };

    function visible(tr) {
      const q = filter.value.trim().toLowerCase();
      const want = stateSel.value;
      if (want && !rowState(tr).includes(want)) return false;
      return !q || q.split(/\s+/).every((w) => tr.dataset.search.includes(w));
    }

    function refilter() {
      let shown = 0;
      for (const tr of tbody.rows) {
        const v = visible(tr);
        tr.hidden = !v;
        if (v) shown++;
      }
      $("#empty").hidden = shown > 0;
    }

    function recount() {
      let live = 0;
      let failed = 0;
      for (const tr of tbody.rows) {
        const st = rowState(tr);
        if (st.includes("live")) live++;
        if (st.includes("bad")) failed++;
      }
      $("#n-live").textContent = live;
      $("#n-all").textContent = tbody.rows.length;
      $("#n-failed").textContent = failed;
    }

    function key(tr) {
      const v = tr.cells[sortCol].dataset.v;
      const n = Number(v);
      return v !== "" && !Number.isNaN(n) ? n : v;
    }

    function cmp(a, b) {
      const ka = key(a);
      const kb = key(b);
      return (ka < kb ? -1 : ka > kb ? 1 : 0) * sortDir;
    }

    // Sorting moves whole trees (a run and its nested runs) unless "flat" is ticked.
    function resort() {
      if (sortCol === null) return;
      const rows = Array.from(tbody.rows);
      if (flat.checked) {
        rows.sort(cmp);
        for (const r of rows) tbody.appendChild(r);
        return;
      }
      const groups = new Map();
      for (const r of rows) {
        const root = r.dataset.root;
        if (!groups.has(root)) groups.set(root, []);
        groups.get(root).push(r);
      }
      const heads = Array.from(groups.values()).map((g) => g.find((r) => r.dataset.run === r.dataset.root) || g[0]);
      heads.sort(cmp);
      for (const h of heads) for (const r of groups.get(h.dataset.root)) tbody.appendChild(r);
    }

    for (const th of runs.tHead.rows[0].cells) {
      const activate = () => {
        const col = Number(th.dataset.col);
        sortDir = sortCol === col ? -sortDir : 1;
        sortCol = col;
        for (const h of runs.tHead.rows[0].cells) h.classList.remove("asc", "desc");
        th.classList.add(sortDir > 0 ? "asc" : "desc");
        resort();
      };
      th.addEventListener("click", activate);
      th.addEventListener("keydown", (e) => {
        if (e.key === "Enter") activate();
      });
    }
    filter.addEventListener("input", refilter);
    stateSel.addEventListener("change", refilter);
    flat.addEventListener("change", resort);

    function place(tr, msg) {
      const parent = msg.parent && document.getElementById("r-" + msg.parent);
      if (parent) {
        // after the parent's last descendant
        let after = parent;
        const depth = Number(parent.dataset.depth);
        while (after.nextElementSibling && Number(after.nextElementSibling.dataset.depth) > depth) {
          after = after.nextElementSibling;
        }
        after.after(tr);
      } else {
        tbody.prepend(tr);
      }
    }

    stream(() => "/events?since=" + encodeURIComponent(gen), {
      row: (msg) => {
        gen = msg.gen;
        const tr = fragment(msg.html).firstElementChild;
        const old = document.getElementById("r-" + msg.id);
        if (old) old.replaceWith(tr);
        else place(tr, msg);
        tr.classList.add("flash");
        tr.hidden = !visible(tr);
        recount();
        refilter();
        resort();
      },
      batch: (msg) => {
        const tr = fragment(msg.html).firstElementChild;
        const old = document.getElementById(msg.id);
        if (old) old.replaceWith(tr);
        else $("#batches-body").append(tr);
        $("#batches").hidden = false;
      },
      reload: () => window.location.reload(),
    });
  }

  // -- a run's page --------------------------------------------------------------------------
  const run = $("#run");
  if (run) {
    const log = $("#log");
    const MAX_LOG_CHARS = 400000;
    let offset = log ? log.dataset.offset : "0";

    function wireStop() {
      const form = $("#stop-form");
      if (!form || form.dataset.wired) return;
      form.dataset.wired = "1";
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        if (!window.confirm("Stop this run? It ends with exit 4 (interrupted).")) return;
        const btn = $("#stop");
        btn.disabled = true;
        btn.textContent = "Stopping...";
        try {
          const r = await fetch(form.action, {
            method: "POST",
            credentials: "same-origin",
            headers: { "X-CSRF-Token": csrf },
          });
          const body = await r.json().catch(() => ({}));
          btn.textContent = r.ok ? "Stopping (exit 4)" : "Stop failed: " + (body.detail || r.status);
          if (!r.ok) btn.disabled = false;
        } catch (err) {
          btn.textContent = "Stop failed";
          btn.disabled = false;
        }
      });
    }
    wireStop();

    stream(() => "/events?run=" + encodeURIComponent(run.dataset.run) + "&log=" + encodeURIComponent(offset), {
      sections: (msg) => {
        for (const [name, html] of Object.entries(msg)) {
          const sec = document.getElementById("sec-" + name);
          if (sec) sec.replaceChildren(fragment(html));
        }
        wireStop();
      },
      log: (msg) => {
        if (!log) return;
        const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        if (msg.reset) log.textContent = "";
        log.append(document.createTextNode(msg.text));
        if (log.textContent.length > MAX_LOG_CHARS) log.textContent = log.textContent.slice(-MAX_LOG_CHARS);
        offset = String(msg.offset);
        if (atBottom) log.scrollTop = log.scrollHeight;
      },
    });
    if (log) log.scrollTop = log.scrollHeight;
  }

  // Ages move on the client clock: no request for that.
  setInterval(() => {
    const now = Date.now() / 1000;
    for (const el of document.querySelectorAll(".age[data-start]")) {
      const s = parseFloat(el.dataset.start);
      if (!Number.isNaN(s)) el.textContent = fmtDur(now - s);
    }
  }, 1000);
})();
