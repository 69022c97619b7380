// The interactive part of the search tree page (treeview.py). It reads the tree
// from the JSON in #tree-data and builds: the tabs, the chosen path as an ARIA
// tree outline (rows made when expanded), the panel of the selected node, the
// icicle shape view and the find box. All model text goes in as text nodes.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("tree-data").textContent);
  const n = D.parent.length;
  if (!n) return;
  const kids = Array.from({ length: n }, () => []);
  const depth = new Int32Array(n);
  for (let i = 1; i < n; i++) { kids[D.parent[i]].push(i); depth[i] = depth[D.parent[i]] + 1; }
  const byVisits = (a, b) => (D.visits[b] - D.visits[a]) || (a - b);
  for (const k of kids) k.sort(byVisits);
  const onPath = new Uint8Array(n);
  for (const i of D.path) onPath[i] = 1;
  const answerEnd = D.path[D.path.length - 1];
  const fallback = new Set(D.fallback);
  const answers = new Array(n);
  const w2s = D.strategy === "w2s";

  // --- text ------------------------------------------------------------------
  const MARKED = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]|\n|\t|^ +| +$| {2,}/g;
  function el(tag, attrs, ...content) {
    const e = document.createElement(tag);
    if (attrs) for (const k in attrs) { if (attrs[k] !== null && attrs[k] !== undefined) e.setAttribute(k, attrs[k]); }
    for (const c of content) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  // Model text with its whitespace and marked characters visible; the element's
  // textContent is exactly the text.
  function textInto(parent, s) {
    let last = 0;
    s.replace(MARKED, (m, at) => {
      if (at > last) parent.append(s.slice(last, at));
      if (m === "\n") parent.append(el("span", { class: "nl" }, "\n"));
      else if (m === "\t") parent.append(el("span", { class: "tab" }, "\t"));
      else if (m[0] === " ") parent.append(el("span", { class: "sp" }, m));
      else {
        const code = "U+" + m.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0");
        parent.append(el("span", { class: "cc", "data-code": code, title: "character " + code }, m));
      }
      last = at + m.length;
      return m;
    });
    if (last < s.length) parent.append(s.slice(last));
    return parent;
  }
  const chunkEl = (i) => textInto(el("span", { class: "chunk" }), D.chunk[i]);
  function answerOf(i) {
    if (answers[i] === undefined) {
      const stack = [];
      let j = i;
      while (j > 0 && answers[j] === undefined) { stack.push(j); j = D.parent[j]; }
      let s = j > 0 ? answers[j] : "";
      answers[0] = "";
      while (stack.length) { const k = stack.pop(); s += D.chunk[k]; answers[k] = s; }
    }
    return answers[i];
  }
  const fmt = (v) => (v === null || v === undefined ? "−∞" : v.toFixed(2));
  const quoted = (s) => "'" + (s.length > 40 ? s.slice(0, 39) + "…" : s) + "'";
  function pathTo(i) { const p = []; for (let j = i; j >= 0; j = D.parent[j]) p.push(j); return p.reverse(); }

  // --- numbers of a node -------------------------------------------------------
  function bonus(i) {
    return D.score[i] === null || D.value[i] === null ? null : D.score[i] - D.value[i];
  }
  function badges(i) {
    const b = [];
    if (i === answerEnd) b.push(["answer", "answer"]);
    if (D.terminal[i]) b.push(["", "finished: " + (D.finish[i] || "?")]);
    if (D.final[i] !== undefined) b.push(["", "finalist #" + D.final[i] + ", eos V " + fmt(D.eos[i])]);
    else if (D.eos[i] !== undefined) b.push(["", "eos V " + fmt(D.eos[i])]);
    if (D.s2rank[i] !== undefined) b.push(["", "stage-2 candidate #" + D.s2rank[i]]);
    if (fallback.has(i)) b.push(["", "added by the fallback"]);
    if (D.value[i] === null && i > 0 && D.eos[i] === undefined) b.push(["", "V −∞: not judged"]);
    return b;
  }
  function name(i) {
    const parts = ["depth " + depth[i], i === 0 ? "the prompt" : quoted(D.chunk[i]), D.visits[i] + " visits",
      "value " + (D.value[i] === null ? "not judged" : fmt(D.value[i]))];
    parts.push(onPath[i] ? "on the chosen path" : "not chosen");
    for (const [, text] of badges(i)) parts.push(text);
    return parts.join(", ");
  }
  function numsText(i) {
    let s = "N " + D.visits[i] + "  V " + fmt(D.value[i]);
    if (i > 0) s += "  P " + (D.prior[i] === null ? "?" : D.prior[i].toFixed(3));
    if (D.entropy[i] !== null) s += "  H " + D.entropy[i].toFixed(2);
    const b = bonus(i);
    if (b !== null) s += "  score " + fmt(D.value[i]) + " + " + b.toFixed(2) + " = " + fmt(D.score[i]);
    return s;
  }

  // --- selection, fragment -----------------------------------------------------
  let selected = -1;
  const listeners = [];
  function select(i, opts) {
    opts = opts || {};
    if (!(i >= 0 && i < n)) return;
    selected = i;
    for (const f of listeners) f(i, opts);
    const hash = "#node-" + i;
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }
  function fromHash() {
    const m = /^#node-(\d+)$/.exec(location.hash);
    return m && +m[1] < n ? +m[1] : -1;
  }
  document.addEventListener("click", (e) => {
    const a = e.target.closest("a[data-node], tr[data-node]");
    if (!a || e.defaultPrevented) return;
    e.preventDefault();
    select(+a.getAttribute("data-node"), { reveal: true });
  });
  window.addEventListener("hashchange", () => { const i = fromHash(); if (i >= 0 && i !== selected) select(i, { reveal: true }); });

  // --- tabs ----------------------------------------------------------------------
  const views = Array.from(document.querySelectorAll("section.view"));
  const tablist = el("div", { role: "tablist", class: "tabs", "aria-label": "Views" });
  const tabs = views.map((v, k) => {
    const b = el("button", { role: "tab", id: "tab-" + v.id, "aria-controls": v.id, "aria-selected": String(k === 0), tabindex: k === 0 ? "0" : "-1", type: "button" }, v.getAttribute("data-tab"));
    v.setAttribute("role", "tabpanel");
    v.setAttribute("aria-labelledby", b.id);
    v.hidden = k !== 0;
    tablist.append(b);
    return b;
  });
  const shown = new Set();
  function showTab(k, focus) {
    tabs.forEach((b, j) => { b.setAttribute("aria-selected", String(j === k)); b.tabIndex = j === k ? 0 : -1; views[j].hidden = j !== k; });
    if (focus) tabs[k].focus();
    if (views[k].id === "view-shape" && !shown.has(k)) { shown.add(k); shape.draw(); }
  }
  tablist.addEventListener("click", (e) => { const k = tabs.indexOf(e.target.closest("[role=tab]")); if (k >= 0) showTab(k); });
  tablist.addEventListener("keydown", (e) => {
    const k = tabs.indexOf(document.activeElement);
    const to = { ArrowRight: k + 1, ArrowLeft: k - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (to === undefined || k < 0) return;
    e.preventDefault();
    showTab((to + tabs.length) % tabs.length, true);
  });
  document.querySelector(".views").prepend(tablist);

  // --- the outline: an ARIA tree -------------------------------------------------
  // A flat list of treeitems with aria-level (rows of an expanded item follow it),
  // so each row's name is its own content. The level-1 rows are the chosen path;
  // expanding one shows the other children at its depth, and expanding any other
  // row shows its own children. Rows are built the first time they are shown.
  const tree = el("ul", { role: "tree", "aria-label": "Chosen path; expand a row for the other children at its depth" });
  const rows = new Map(); // node -> its treeitem, once built
  const SIBLINGS_SHOWN = 6; // on a chosen-path row's "others" line, the most visited first
  function others(i) { return i === 0 ? [] : kids[D.parent[i]].filter((j) => j !== i); }
  // A row shows "d 3 ' comfortable' N 198 V 8.68 ..." and tells a screen reader
  // "depth 3, ' comfortable', 198 visits, value 8.68, on the chosen path, ...".
  function spoken(i) {
    const parts = [name(i)];
    if (i > 0 && D.prior[i] !== null) parts.push("prior " + D.prior[i].toFixed(3));
    if (D.entropy[i] !== null) parts.push("entropy " + D.entropy[i].toFixed(2));
    const b = bonus(i);
    if (b !== null) parts.push("score " + fmt(D.score[i]) + " = value + bonus " + b.toFixed(2));
    return parts.join(", ");
  }
  function itemFor(i, level, spine, parentRow, pos, size) {
    const groupOf = spine ? others(i) : kids[i];
    const li = el("li", { role: "treeitem", id: "t-" + i, "aria-level": level, "aria-posinset": pos, "aria-setsize": size, "aria-selected": "false", tabindex: "-1", "data-node": i });
    li.style.paddingLeft = (level - 1) * 18 + "px";
    if (onPath[i]) li.classList.add("on-path");
    if (groupOf.length) li.setAttribute("aria-expanded", "false");
    const main = el("span", { class: "main" }, i === 0 ? el("span", { class: "chunk" }, "(prompt)") : chunkEl(i));
    for (const [cls, text] of badges(i)) main.append(el("span", { class: "badge " + cls }, text));
    const row = el("div", { class: "row" },
      el("span", { class: "sr" }, spoken(i)),
      el("span", { class: "tog", "aria-hidden": "true" }, groupOf.length ? "▸" : ""),
      el("span", { class: "dep", "aria-hidden": "true" }, "d " + depth[i]),
      main, el("span", { class: "nums", "aria-hidden": "true" }, numsText(i)));
    main.setAttribute("aria-hidden", "true");
    if (spine && groupOf.length) {
      const line = el("div", { class: "others", "aria-hidden": "true" }, "others: ");
      groupOf.slice(0, SIBLINGS_SHOWN).forEach((j, k) => {
        if (k) line.append(" · ");
        line.append(chunkEl(j), " N " + D.visits[j] + " V " + fmt(D.value[j]));
      });
      if (groupOf.length > SIBLINGS_SHOWN) line.append(" · +" + (groupOf.length - SIBLINGS_SHOWN) + " more");
      row.append(line);
    }
    li.append(row);
    li._group = groupOf;
    li._level = level;
    li._parentRow = parentRow;
    li._rows = null; // the rows of its group, once built
    rows.set(i, li);
    return li;
  }
  // Show or hide the rows below an item, following the expanded ones down.
  function showBelow(li, show) {
    for (const child of li._rows || []) {
      child.hidden = !show;
      if (child.getAttribute("aria-expanded") === "true") showBelow(child, show);
    }
  }
  function setExpanded(li, open) {
    if (!li.hasAttribute("aria-expanded")) return;
    if (open && !li._rows) {
      li._rows = li._group.map((j, k) => itemFor(j, li._level + 1, false, li, k + 1, li._group.length));
      li.after(...li._rows);
    }
    li.setAttribute("aria-expanded", String(open));
    li.querySelector(".tog").textContent = open ? "▾" : "▸";
    showBelow(li, open);
  }
  // A long chosen path starts with its first rows; a last row builds the rest.
  const SPINE_AT_LOAD = 60;
  let spineBuilt = 0;
  const moreRow = el("li", { role: "treeitem", "aria-level": 1, tabindex: "-1", "aria-selected": "false", class: "more" });
  function buildSpine(upTo) {
    upTo = Math.min(upTo, D.path.length);
    if (upTo <= spineBuilt) return;
    const items = [];
    for (let k = spineBuilt; k < upTo; k++) items.push(itemFor(D.path[k], 1, true, null, k + 1, D.path.length));
    spineBuilt = upTo;
    moreRow.before(...items);
    if (spineBuilt === D.path.length) moreRow.remove();
    else moreRow.replaceChildren(el("div", { class: "row" }, el("span"), el("span"),
      el("span", { class: "main" }, "Show depths " + spineBuilt + " to " + (D.path.length - 1) + " of the chosen path (" + (D.path.length - spineBuilt) + " more rows)")));
  }
  tree.append(moreRow);
  buildSpine(SPINE_AT_LOAD);
  function showAllSpine() {
    const first = spineBuilt;
    buildSpine(D.path.length);
    select(D.path[first], { focus: true });
  }
  const outline = document.getElementById("outline");
  outline.append(tree);
  document.getElementById("outline-static").remove();

  let current = null; // the treeitem holding the tab stop
  function setCurrent(li, focus) {
    if (current && current !== li) { current.tabIndex = -1; }
    current = li;
    li.tabIndex = 0;
    if (focus) li.focus();
  }
  setCurrent(rows.get(D.path[0]), false);
  // The row of a node, expanding what hides it (built on demand).
  function reveal(i) {
    const p = pathTo(i);
    let k = 0;
    while (k < p.length && onPath[p[k]]) k++;
    buildSpine(k + 1);
    if (k === p.length) return rows.get(i);
    const spine = rows.get(D.path[k]) || rows.get(D.path[D.path.length - 1]);
    setExpanded(spine, true);
    for (let m = k; m < p.length - 1; m++) setExpanded(rows.get(p[m]), true);
    return rows.get(i);
  }
  listeners.push((i, opts) => {
    const old = tree.querySelector("[aria-selected=true]");
    if (old) old.setAttribute("aria-selected", "false");
    const li = opts.reveal || rows.has(i) ? reveal(i) : null;
    if (!li) return;
    li.setAttribute("aria-selected", "true");
    setCurrent(li, !!opts.focus);
    if (opts.reveal) li.scrollIntoView({ block: "nearest" });
  });
  const visible = () => Array.from(tree.children).filter((li) => !li.hidden);
  tree.addEventListener("keydown", (e) => {
    const li = e.target.closest("[role=treeitem]");
    if (!li) return;
    if (li === moreRow && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); showAllSpine(); return; }
    const i = +li.getAttribute("data-node");
    const expanded = li.getAttribute("aria-expanded");
    let to = null;
    if (e.key === "ArrowDown" || e.key === "ArrowUp" || e.key === "Home" || e.key === "End") {
      const all = visible();
      const k = all.indexOf(li);
      to = all[{ ArrowDown: Math.min(k + 1, all.length - 1), ArrowUp: Math.max(k - 1, 0), Home: 0, End: all.length - 1 }[e.key]];
    } else if (e.key === "ArrowRight") {
      if (expanded === "false") setExpanded(li, true);
      else if (expanded === "true") to = li._rows[0];
    } else if (e.key === "ArrowLeft") {
      if (expanded === "true") setExpanded(li, false);
      else to = li._parentRow;
    } else if (e.key === "Enter") {
      setExpanded(li, expanded !== "true");
      select(i, { focus: true });
    } else if (e.key === " ") {
      select(i, { focus: true });
    } else return;
    e.preventDefault();
    if (to === moreRow) setCurrent(moreRow, true);
    else if (to) { select(+to.getAttribute("data-node"), { focus: true }); to.scrollIntoView({ block: "nearest" }); }
  });
  tree.addEventListener("click", (e) => {
    const li = e.target.closest("[role=treeitem]");
    if (!li) return;
    if (li === moreRow) { showAllSpine(); return; }
    if (e.target.closest(".tog") || li.getAttribute("aria-expanded") === "false") setExpanded(li, li.getAttribute("aria-expanded") !== "true");
    select(+li.getAttribute("data-node"), { focus: true });
  });

  // --- the answer's chunks in the header ---------------------------------------
  const headerChunks = new Map(Array.from(document.querySelectorAll("#answer .chunk")).map((a) => [+a.getAttribute("data-node"), a]));
  // The markup shows marked characters by their code; here they become the text itself, marked.
  for (const [i, a] of headerChunks) textInto(a.replaceChildren() || a, D.chunk[i]);
  listeners.push((i) => {
    for (const a of headerChunks.values()) a.classList.remove("selected");
    if (headerChunks.has(i)) headerChunks.get(i).classList.add("selected");
  });

  // --- the panel ---------------------------------------------------------------------
  const panel = document.getElementById("panel");
  const panelBody = el("div", { id: "panel-body", "aria-live": "polite" });
  panel.append(panelBody);
  function facts(rowsList) {
    const dl = el("dl");
    for (const [k, v] of rowsList) if (v !== null && v !== undefined) dl.append(el("dt", null, k), el("dd", null, v));
    return dl;
  }
  function wholeAnswer(i) {
    const box = el("div", { class: "whole text" });
    const parent = i > 0 ? answerOf(D.parent[i]) : "";
    textInto(box, parent);
    if (i > 0) box.append(textInto(el("mark", { class: "chunk" }), D.chunk[i]));
    return box;
  }
  let childSort = { key: "visits", down: true };
  const COLUMNS = [["chunk", "Chunk"], ["visits", "N"], ["value", "V"], ["prior", "P"], ["score", "Score"]];
  function childrenTable(i) {
    const list = kids[i].slice();
    const key = childSort.key;
    const val = (j) => (key === "chunk" ? D.chunk[j] : D[key][j] === null ? -Infinity : D[key][j]);
    list.sort((a, b) => { const x = val(a), y = val(b); const c = x < y ? -1 : x > y ? 1 : a - b; return childSort.down ? -c : c; });
    const head = el("tr");
    for (const [k, label] of COLUMNS) {
      const th = el("th", { scope: "col", "aria-sort": k === key ? (childSort.down ? "descending" : "ascending") : "none" });
      th.append(el("button", { type: "button", "data-sort": k }, label + (k === key ? (childSort.down ? " ▼" : " ▲") : "")));
      head.append(th);
    }
    const body = el("tbody");
    for (const j of list) {
      const cell = el("td", { class: "text" }, el("a", { href: "#node-" + j, "data-node": j }, chunkEl(j)));
      for (const [, text] of badges(j)) cell.append(el("span", { class: "badge" }, text));
      body.append(el("tr", null, cell, el("td", null, String(D.visits[j])), el("td", null, fmt(D.value[j])),
        el("td", null, D.prior[j] === null ? "?" : D.prior[j].toFixed(3)), el("td", null, D.score[j] === null ? "–" : fmt(D.score[j]))));
    }
    const t = el("table", { class: "children" }, el("caption", null, kids[i].length + " children; sort by a column's button"), el("thead", null, head), body);
    t.addEventListener("click", (e) => {
      const b = e.target.closest("[data-sort]");
      if (!b) return;
      const k = b.getAttribute("data-sort");
      childSort = { key: k, down: childSort.key === k ? !childSort.down : k !== "chunk" };
      t.replaceWith(childrenTable(i));
      panel.querySelector("[data-sort=" + k + "]").focus();
    });
    return t;
  }
  // Best eos-scored answer in a subtree: what stage 2 saw there.
  function bestEos(i) {
    let best = -1;
    const stack = [i];
    while (stack.length) {
      const j = stack.pop();
      if (D.eos[j] !== undefined && (best < 0 || D.eos[j] > D.eos[best])) best = j;
      stack.push(...kids[j]);
    }
    return best;
  }
  function compare(i) {
    const box = el("section", { "aria-labelledby": "cmp-h" }, el("h3", { id: "cmp-h" }, "Compare with the chosen answer"));
    if (onPath[i]) { box.append(el("p", null, i === answerEnd ? "This is the chosen answer." : "This node is on the chosen path.")); return box; }
    const p = pathTo(i);
    let k = 0;
    while (k < p.length && onPath[p[k]]) k++;
    const fork = p[k - 1], mine = p[k], theirs = D.path[k];
    const common = answerOf(fork);
    const intro = el("p", null, "They diverge after depth " + (k - 1) + (common ? ", after: " : " (at the first chunk)."));
    if (common) intro.append(textInto(el("span", { class: "chunk" }), common.length > 80 ? "…" + common.slice(-80) : common));
    box.append(intro);
    const line = (label, f) => el("tr", null, el("th", { scope: "row" }, label), el("td", { class: "text" }, f(i, mine)), el("td", { class: "text" }, f(answerEnd, theirs)));
    const rest = (end) => textInto(el("span", { class: "chunk" }), answerOf(end).slice(common.length));
    const eosOf = (end, first) => {
      const b = bestEos(first);
      return b < 0 ? "none judged" : fmt(D.eos[b]) + (D.final[b] !== undefined ? " (finalist #" + D.final[b] + ")" : "");
    };
    const t = el("table", { class: "compare" },
      el("thead", null, el("tr", null, el("td"), el("th", { scope: "col" }, "This branch"), el("th", { scope: "col" }, "Chosen"))),
      el("tbody", null,
        line("Continuation", (end) => rest(end)),
        line("First chunk after the fork", (end, first) => el("a", { href: "#node-" + first, "data-node": first }, chunkEl(first))),
        line("N there", (end, first) => String(D.visits[first])),
        line("V there", (end, first) => fmt(D.value[first])),
        line("Score there", (end, first) => (D.score[first] === null ? "–" : fmt(D.score[first]))),
        line("Best eos V below", eosOf)));
    box.append(t);
    return box;
  }
  listeners.push((i) => {
    panelBody.replaceChildren();
    panelBody.append(el("h3", null, "Depth " + depth[i] + (onPath[i] ? ", on the chosen path" : ", not chosen")));
    const chunkLine = el("p", { id: "panel-chunk" }, "Chunk: ", i === 0 ? "(the prompt)" : chunkEl(i));
    for (const [, text] of badges(i)) chunkLine.append(el("span", { class: "badge" }, text));
    panelBody.append(chunkLine, el("h3", null, "Answer up to here"), wholeAnswer(i));
    const b = bonus(i);
    panelBody.append(facts([
      ["Visits N", String(D.visits[i])],
      ["Value V", D.value[i] === null ? (D.terminal[i] ? "−∞ (finished: judged only by its eos V)" : "−∞ (not judged)") : fmt(D.value[i])],
      ["Own value", D.own[i] !== undefined ? fmt(D.own[i]) : null],
      ["eos-scored V", D.eos[i] !== undefined ? fmt(D.eos[i]) : null],
      ["Prior P", i > 0 && D.prior[i] !== null ? D.prior[i].toFixed(4) : null],
      ["Entropy H", D.entropy[i] !== null ? D.entropy[i].toFixed(3) + " bits" : null],
      ["Selection score", b !== null ? fmt(D.value[i]) + " + bonus " + b.toFixed(3) + " = " + fmt(D.score[i]) : null],
      ["Expanded at", D.expanded[i] !== undefined ? (w2s ? "iteration " : "step ") + D.expanded[i] : "not expanded"],
      ["Stage-2 candidate", D.s2rank[i] !== undefined ? "#" + D.s2rank[i] + ", score " + fmt(D.s2score[i]) : null],
      ["Finalist", D.final[i] !== undefined ? "#" + D.final[i] : null],
      ["Kept as a beam", D.beams[i] ? "after step " + D.beams[i].join(", ") : null],
      ["Finished by", D.terminal[i] ? D.finish[i] || "?" : null],
    ]));
    panelBody.append(compare(i));
    if (kids[i].length) panelBody.append(el("h3", null, "Children"), childrenTable(i));
  });

  // --- find and filters ------------------------------------------------------------
  const find = document.querySelector(".find");
  const box = el("input", { type: "search", id: "find-text", placeholder: "a word of a chunk or answer" });
  const minVisits = el("input", { type: "number", id: "find-visits", min: "0", value: "0" });
  const finishedOnly = el("input", { type: "checkbox", id: "find-finished" });
  const stage2Only = el("input", { type: "checkbox", id: "find-stage2" });
  const status = el("p", { id: "find-status", role: "status" });
  const results = el("ul", { id: "find-results", "aria-label": "Matching nodes" });
  find.append(el("label", { for: "find-text" }, "Find "), box,
    el("label", null, "min visits ", minVisits),
    el("label", null, finishedOnly, " finished only"),
    el("label", null, stage2Only, " stage 2 only"), status, results);
  const LIMIT = 50;
  const lower = D.chunk.map((c) => c.toLowerCase());
  function runFind() {
    const q = box.value.toLowerCase();
    const min = +minVisits.value || 0;
    const filtered = min > 0 || finishedOnly.checked || stage2Only.checked;
    results.replaceChildren();
    if (!q && !filtered) { status.textContent = ""; return; }
    // Whether each node's answer holds q, without building the answers: it does if
    // its parent's does, or if q lies in the parent's last q.length - 1 characters
    // and the chunk (parents come before their children).
    const inAnswer = new Uint8Array(n), tail = new Array(n);
    tail[0] = "";
    if (q) for (let i = 1; i < n; i++) {
      const p = D.parent[i], joined = tail[p] + lower[i];
      inAnswer[i] = inAnswer[p] || joined.includes(q) ? 1 : 0;
      tail[i] = joined.slice(-(q.length - 1) || joined.length);
    }
    let count = 0;
    for (let i = 1; i < n; i++) {
      if (D.visits[i] < min || (finishedOnly.checked && !D.terminal[i])) continue;
      if (stage2Only.checked && D.s2rank[i] === undefined && D.final[i] === undefined) continue;
      const inChunk = q && lower[i].includes(q);
      if (q && !inAnswer[i]) continue;
      if (++count > LIMIT) continue;
      const b = el("button", { type: "button", "data-select": i });
      b.append("d " + depth[i] + " ");
      const text = inChunk || !q ? D.chunk[i] : answerOf(i);
      const at = q ? text.toLowerCase().indexOf(q) : -1;
      const shownText = el("span", { class: "chunk" });
      if (at >= 0) {
        const from = Math.max(0, at - 40);
        textInto(shownText, (from ? "…" : "") + text.slice(from, at));
        shownText.append(textInto(el("mark"), text.slice(at, at + q.length)));
        textInto(shownText, text.slice(at + q.length, at + q.length + 40));
      } else textInto(shownText, text);
      b.append(shownText, " N " + D.visits[i] + " V " + fmt(D.value[i]) + (onPath[i] ? " (chosen path)" : ""));
      results.append(el("li", null, b));
    }
    status.textContent = count + " node" + (count === 1 ? "" : "s") + " match" + (count === 1 ? "es" : "") + (count > LIMIT ? "; the first " + LIMIT + " are listed" : "");
  }
  for (const input of [box, minVisits, finishedOnly, stage2Only]) input.addEventListener("input", runFind);
  results.addEventListener("click", (e) => {
    const b = e.target.closest("[data-select]");
    if (b) { showTab(0); select(+b.getAttribute("data-select"), { reveal: true }); }
  });

  // --- shape: an icicle ------------------------------------------------------------
  const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  let lo = Infinity, hi = -Infinity;
  for (const v of D.value) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  function colour(v) {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    const x = t * (RAMP.length - 1), k = Math.min(Math.floor(x), RAMP.length - 2), f = x - k;
    const c = RAMP[k].map((a, m) => Math.round(a + (RAMP[k + 1][m] - a) * f));
    return ["rgb(" + c.join(",") + ")", t > 0.55 ? "#000" : "#fff"];
  }
  // Width follows visits for w2s; for the other strategies (visits 0 or 1) the leaves below.
  const weight = new Float64Array(n);
  for (let i = n - 1; i >= 0; i--) {
    if (!kids[i].length) weight[i] = w2s ? Math.max(D.visits[i], 1) : 1;
    else { let s = 0; for (const j of kids[i]) s += weight[j]; weight[i] = w2s ? Math.max(D.visits[i], s) : s; }
  }
  // Above this many nodes the icicle is drawn on a canvas instead of as boxes in the page.
  const CANVAS_ABOVE = 1500;
  const size = new Int32Array(n).fill(1);
  for (let i = n - 1; i > 0; i--) size[D.parent[i]] += size[i];
  const shape = {
    top: 0,
    draw() {
      const host = document.getElementById("shape");
      host.replaceChildren();
      const top = this.top;
      const width = Math.max(200, host.clientWidth || document.querySelector(".views").clientWidth);
      let maxDepth = 0;
      const boxes = [];
      const stack = [[top, 0, width]];
      while (stack.length) {
        const [i, x, w] = stack.pop();
        if (w < 0.5) continue;
        boxes.push([i, x, w]);
        maxDepth = Math.max(maxDepth, depth[i] - depth[top]);
        let s = 0; for (const j of kids[i]) s += weight[j];
        let at = x;
        for (const j of kids[i]) { const cw = s ? (w * weight[j]) / s : 0; stack.push([j, at, cw]); at += cw; }
      }
      const rowH = Math.max(14, Math.min(22, Math.floor(560 / (maxDepth + 1))));
      const bar = el("div", { class: "shape-bar" },
        el("span", null, "Showing " + (top === 0 ? "the whole tree" : "the subtree of depth " + depth[top] + " " + quoted(D.chunk[top])) + " (" + boxes.length + " boxes drawn)."),
        el("span", null, "Colour: V from " + fmt(lo) + " (dark purple) to " + fmt(hi) + " (yellow); black outline: the chosen path."));
      if (top !== 0) {
        const up = el("button", { type: "button" }, "Zoom out");
        up.addEventListener("click", () => { this.top = D.parent[top]; this.draw(); });
        bar.append(up);
      }
      host.append(bar);
      const height = (maxDepth + 1) * rowH;
      const y = (i) => (depth[i] - depth[top]) * rowH;
      const pick = (i) => { if (kids[i].length && i !== this.top) { this.top = i; this.draw(); } select(i); };
      if (size[top] > CANVAS_ABOVE) {
        const canvas = el("canvas", { width: width, height: height, role: "img", "aria-label": "Shape of the tree: " + boxes.length + " boxes; use the outline to read it" });
        canvas.style.width = width + "px";
        const g = canvas.getContext("2d");
        const hatch = document.createElement("canvas");
        hatch.width = hatch.height = 6;
        const hg = hatch.getContext("2d");
        hg.fillStyle = "#d0d0d0"; hg.fillRect(0, 0, 6, 6); hg.strokeStyle = "#9a9a9a"; hg.beginPath(); hg.moveTo(0, 6); hg.lineTo(6, 0); hg.stroke();
        const pattern = g.createPattern(hatch, "repeat");
        g.font = "12px sans-serif";
        for (const [i, x, w] of boxes) {
          const [fill, ink] = D.value[i] === null ? [pattern, "#000"] : colour(D.value[i]);
          g.fillStyle = fill; g.fillRect(x, y(i), Math.max(w - 0.5, 0.5), rowH - 1);
          if (onPath[i]) { g.strokeStyle = "#000"; g.lineWidth = 2; g.strokeRect(x + 1, y(i) + 1, w - 2, rowH - 3); }
          if (w > 40 && rowH >= 14) { g.fillStyle = ink; g.fillText(D.chunk[i].slice(0, Math.floor(w / 7)), x + 2, y(i) + rowH - 4); }
        }
        canvas.addEventListener("click", (e) => {
          const r = canvas.getBoundingClientRect(), px = e.clientX - r.left, py = e.clientY - r.top;
          const hit = boxes.find(([i, x, w]) => px >= x && px < x + w && py >= y(i) && py < y(i) + rowH);
          if (hit) pick(hit[0]);
        });
        host.append(canvas);
      } else {
        const area = el("div", { class: "icicle", role: "img", "aria-label": "Shape of the tree: " + boxes.length + " boxes; use the outline to read it" });
        area.style.position = "relative"; area.style.height = height + "px";
        for (const [i, x, w] of boxes) {
          const b = el("div", { class: "box" + (onPath[i] ? " on-path" : "") + (D.value[i] === null ? " unjudged" : "") + (i === selected ? " selected" : ""), "data-box": i });
          let css = "left:" + x + "px;top:" + y(i) + "px;width:" + w + "px;height:" + rowH + "px";
          if (D.value[i] !== null) { const [fill, ink] = colour(D.value[i]); css += ";background:" + fill + ";color:" + ink; }
          b.style.cssText = css;
          if (w > 30 && rowH >= 14) b.textContent = i === 0 ? "(prompt)" : D.chunk[i];
          area.append(b);
        }
        area.addEventListener("click", (e) => { const b = e.target.closest("[data-box]"); if (b) pick(+b.getAttribute("data-box")); });
        area.addEventListener("mouseover", (e) => { const b = e.target.closest("[data-box]"); if (b && !b.title) b.title = name(+b.getAttribute("data-box")); });
        host.append(area);
      }
    },
  };

  // --- start ---------------------------------------------------------------------------
  const first = fromHash();
  select(first >= 0 ? first : answerEnd, { reveal: first >= 0 });
})();
