// Live counts on the queues page: every few seconds, ask the JSON API and update the cells in
// place. Only reads; the pages work without it.
"use strict";
(function () {
  const PERIOD = 3000;
  const table = document.getElementById("queues");
  if (!table) return;
  const body = document.body;
  const rows = new Map();
  for (const row of table.querySelectorAll("tr[data-queue]")) rows.set(row.dataset.queue, row);
  const note = document.getElementById("live");
  const KEYS = ["waiting", "running", "scheduled", "stalled", "depends", "recurring"];

  function put(cell, value) {
    if (!cell) return;
    const text = String(value);
    if (cell.textContent !== text) {
      cell.textContent = text;
      cell.classList.add("changed");
      setTimeout(() => cell.classList.remove("changed"), 1200);
    }
  }

  async function refresh() {
    if (document.hidden) return;
    try {
      const [queues, failed] = await Promise.all([
        fetch(body.dataset.queuesApi, { credentials: "same-origin" }).then(check),
        fetch(body.dataset.failedApi, { credentials: "same-origin" }).then(check),
      ]);
      const totals = Object.fromEntries(KEYS.map((k) => [k, 0]));
      let unseen = 0;
      for (const q of queues) {
        KEYS.forEach((k) => (totals[k] += q[k]));
        const row = rows.get(q.name);
        if (!row) { unseen += 1; continue; }
        KEYS.forEach((k) => put(row.querySelector(`td[data-count="${k}"]`), q[k]));
        put(row.querySelector('td[data-count="paused"]'), q.paused ? "paused" : "");
      }
      KEYS.forEach((k) => put(document.querySelector(`[data-total="${k}"]`), totals[k]));
      const failedTotal = Object.values(failed).reduce((a, b) => a + b, 0);
      put(document.querySelector('[data-total="failed"]'), failedTotal);
      for (const row of document.querySelectorAll("#groups tr[data-group]")) {
        put(row.querySelector('td[data-count="failed"]'), Object.prototype.hasOwnProperty.call(failed, row.dataset.group) ? failed[row.dataset.group] : 0);
      }
      const time = new Date().toLocaleTimeString();
      note.textContent = `Counts as of ${time}` + (unseen ? ` (${unseen} new queue(s): reload to see them)` : "");
    } catch (error) {
      note.textContent = `Counts not refreshed: ${error.message}`;
    }
  }

  function check(answer) {
    if (!answer.ok) throw new Error(`the server answered ${answer.status}`);
    return answer.json();
  }

  setInterval(refresh, PERIOD);
})();
