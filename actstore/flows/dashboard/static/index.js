// The index's feature table: click a column head to sort (numbers start highest first), type in the boxes under
// it to filter by a range (numbers) or a substring (text). Rows that pass the filters keep the sort order in the
// DOM; only one page of them is shown at a time, since laying out a table of 10^4 rows takes the browser seconds.
// Plain DOM, no library, so the page works offline.
(function () {
  "use strict";
  const table = document.getElementById("features");
  if (!table) return;
  const pageRows = parseInt(table.dataset.pageRows, 10);
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const heads = Array.from(table.tHead.rows[0].cells);
  const kinds = heads.map((th) => th.dataset.type);
  const filterCells = Array.from(table.tHead.rows[1].cells);
  const shown = document.getElementById("shown");
  const range = document.getElementById("range");
  // Cell values parsed once: a sort then costs one array sort and one re-append of the rows.
  const values = rows.map((row) => kinds.map((kind, col) => {
    const text = row.cells[col].textContent;
    return kind === "num" ? (text === "" ? NaN : parseFloat(text)) : text;
  }));
  let order = rows.map((_, i) => i);
  let matching = order.slice();
  let page = 0;
  let sorted = -1;
  let direction = 1;

  function show() {
    const pages = Math.max(1, Math.ceil(matching.length / pageRows));
    page = Math.min(Math.max(page, 0), pages - 1);
    const first = page * pageRows;
    const visible = new Set(matching.slice(first, first + pageRows));
    const passing = new Set(matching);
    rows.forEach((row, i) => {
      const hide = !visible.has(i);
      if (row.hidden !== hide) row.hidden = hide;
      const out = !passing.has(i);
      if (row.hasAttribute("data-out") !== out) row.toggleAttribute("data-out", out);
    });
    shown.textContent = String(matching.length);
    range.textContent = matching.length ? `${first + 1}–${Math.min(first + pageRows, matching.length)}` : "none";
  }

  function sortBy(col) {
    const numeric = kinds[col] === "num";
    direction = sorted === col ? -direction : (numeric ? -1 : 1);
    sorted = col;
    order.sort((a, b) => {
      const x = values[a][col], y = values[b][col];
      if (numeric) {
        if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) - Number.isNaN(y);  // missing last
        return direction * (x - y) || a - b;
      }
      return direction * x.localeCompare(y) || a - b;
    });
    const fragment = document.createDocumentFragment();
    for (const i of order) fragment.appendChild(rows[i]);
    body.appendChild(fragment);
    heads.forEach((th, i) => {
      if (i === col) th.setAttribute("aria-sort", direction > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    applyFilters();
  }

  function bound(input, fallback) {
    return input.value === "" ? fallback : parseFloat(input.value);
  }

  function applyFilters() {
    const tests = [];
    filterCells.forEach((cell, col) => {
      const inputs = cell.querySelectorAll("input");
      if (kinds[col] === "num") {
        const low = bound(inputs[0], -Infinity), high = bound(inputs[1], Infinity);
        if (low !== -Infinity || high !== Infinity) tests.push((v) => v[col] >= low && v[col] <= high);
      } else if (inputs[0].value !== "") {
        const needle = inputs[0].value.toLowerCase();
        tests.push((v) => v[col].toLowerCase().includes(needle));
      }
    });
    matching = order.filter((i) => tests.every((test) => test(values[i])));
    show();
  }

  heads.forEach((th, col) => {
    th.addEventListener("click", () => { page = 0; sortBy(col); });
    th.addEventListener("keydown", (event) => { if (event.key === "Enter") { page = 0; sortBy(col); } });
  });
  filterCells.forEach((cell) => cell.querySelectorAll("input").forEach((input) => {
    input.addEventListener("input", () => { page = 0; applyFilters(); });
  }));
  document.getElementById("previous").addEventListener("click", () => { page -= 1; show(); });
  document.getElementById("next").addEventListener("click", () => { page += 1; show(); });
  show();
})();
