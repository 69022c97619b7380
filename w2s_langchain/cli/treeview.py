"""Render an exported search as one self-contained HTML page, text first.

``tree_to_html`` takes the exporter's dict (`SearchResult.tree_dict()`: prompt,
answer, result, settings, cost and a flat list of nodes, parents before
children) and returns a page that reads without any script: the prompt, the
answer split into its chunks, how and why it was chosen, the settings and the
cost, the chosen path as nested ``<details>`` and the strategy's own ranking as
tables (stage 2's finalists and candidates, Best-of-N's samples, beam search's
kept and pruned beams). A small inline script (treeview.js) then builds the
interactive views from the tree's data, embedded once as JSON: the chosen path
as an ARIA tree outline whose rows are built when expanded, a panel with the
selected node's numbers, children and its comparison with the chosen answer,
an icicle of the whole tree, and a search with filters.

The page loads nothing from the network, and the same tree always gives the
same string. All text is model output: it is escaped, control and
direction-changing characters are shown as visible marks, and the JSON is
escaped so no text can end its script element.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

__all__ = ["tree_to_html"]

_HERE = Path(__file__).resolve().parent
_WINNER = ' class="winner"'
# How many stage-2 candidates the no-script table lists beyond those judged.
CANDIDATES_SHOWN = 20

SOURCES = {
    "stage2": "stage 2: the best eos-scored finalist",
    "best_of_n": "Best-of-N: the sample with the highest value",
    "beam": "chunk-level beam search: the top beam",
    "sample": "one plain sample (nothing was chosen)",
    "fallback_truncated": "fallback: no finished answer, the best unfinished one as it is",
    "fallback_finished": "fallback: no stage-2 candidate, the best path finished by the strong model",
    "partial": "partial: the search was cut short, the best path so far",
}
FINISH_REASONS = {"eos": "end of text (eos)", "length": "length limit", "stop": "stop string", None: "not finished"}

# Characters shown as a visible mark instead of acting: controls (C0 but tab and
# newline, DEL, C1), direction marks and overrides, zero-width ones, and what
# cannot be written as UTF-8 (lone surrogates).
_MARKED = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def tree_to_html(tree: dict) -> str:
    """The page for an exported tree (see the module's docstring)."""
    view = _View(tree)
    head = (
        '<!DOCTYPE html>\n<html lang="en" class="nojs">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Search tree: {_plain(_shorten(view.prompt, 60))}</title>\n"
        f"<style>\n{_asset('treeview.css')}</style>\n"
        "<script>document.documentElement.className = 'js';</script>\n</head>\n<body>\n"
    )
    body = view.header() + view.main() + view.footer()
    data = f'<script type="application/json" id="tree-data">{_script_json(view.data())}</script>\n'
    return head + body + data + f"<script>\n{_asset('treeview.js')}</script>\n</body>\n</html>\n"


class _View:
    """The tree's nodes indexed by position, and the page's server-written parts."""

    def __init__(self, tree: dict):
        self.tree = tree
        self.nodes: list[dict] = list(tree.get("nodes", []))
        self.prompt: str = tree.get("prompt", "")
        self.answer: str = tree.get("answer", "")
        self.strategy: str = tree.get("strategy", "")
        self.result: dict = tree.get("result") or {}
        self.settings: dict = tree.get("settings") or {}
        self.cost: dict = tree.get("cost") or {}
        index: dict[Any, int] = {}
        self.parent: list[int] = []
        for i, node in enumerate(self.nodes):
            if node["id"] in index:
                raise ValueError(f"node id {node['id']} appears twice")
            index[node["id"]] = i
            if node["parent"] is None:
                if i:
                    raise ValueError(f"node {node['id']} has no parent: only the first node (the root) may")
                self.parent.append(-1)
            elif node["parent"] not in index:
                raise ValueError(f"node {node['id']}: parent {node['parent']} must come before it")
            else:
                self.parent.append(index[node["parent"]])
        self.children: list[list[int]] = [[] for _ in self.nodes]
        self.depth: list[int] = []
        for i, p in enumerate(self.parent):
            self.depth.append(0 if p < 0 else self.depth[p] + 1)
            if p >= 0:
                self.children[p].append(i)
        chosen = [i for i, node in enumerate(self.nodes) if node.get("chosen")]
        end = max(chosen, key=lambda i: self.depth[i], default=0 if self.nodes else None)
        self.path: list[int] = []
        while end is not None and end >= 0:
            self.path.append(end)
            end = self.parent[end]
        self.path.reverse()

    # --- the embedded data -----------------------------------------------------

    def data(self) -> dict:
        """What the script needs, once: columns of numbers, chunks (not answers:
        the script joins them along a path), sparse columns as {position: value}."""
        def column(key: str, digits: int | None = 3) -> list:
            return [_number(node.get(key), digits) for node in self.nodes]

        def sparse(key: str, digits: int | None = 3) -> dict:
            return {str(i): _number(node[key], digits) for i, node in enumerate(self.nodes) if node.get(key) is not None}

        nodes = self.nodes
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "strategy": self.strategy,
            "result": self.result,
            "settings": self.settings,
            "path": self.path,
            "parent": self.parent,
            "chunk": [node.get("chunk", "") for node in nodes],
            "visits": column("visits", None),
            "value": column("value"),
            "prior": column("prior"),
            "entropy": column("entropy"),
            "score": column("selection_score"),
            "terminal": [1 if node.get("terminal") else 0 for node in nodes],
            "finish": sparse("finish_reason", None),
            "own": sparse("own_value"),
            "eos": sparse("eos_value"),
            "expanded": sparse("expanded_at", None),
            "s2score": sparse("stage2_score"),
            "s2rank": sparse("stage2_rank", None),
            "final": sparse("final_rank", None),
            "fallback": [i for i, node in enumerate(nodes) if node.get("fallback")],
            "beams": {str(i): node["beam_steps"] for i, node in enumerate(nodes) if node.get("beam_steps")},
        }

    # --- header -------------------------------------------------------------------

    def header(self) -> str:
        n = len(self.nodes)
        chunks = "".join(
            f'<a class="chunk" href="#node-{i}" data-node="{i}">{_text(self.nodes[i].get("chunk", ""))}</a>'
            for i in self.path[1:]
        )
        return (
            '<header>\n'
            f'<h1>Search tree <span class="sub">{_plain(self.strategy)} · {n} node{"s" if n != 1 else ""}</span></h1>\n'
            f'<p class="result" id="result-line">{self.result_line()}</p>\n'
            f'<h2 class="label" id="prompt-label">Prompt</h2>\n<div class="prompt text" aria-labelledby="prompt-label">{_text(self.prompt)}</div>\n'
            '<h2 class="label" id="answer-label">Answer <span class="hint">one box per chunk of the chosen path; '
            'select one to see its node</span></h2>\n'
            f'<p class="answer text" id="answer" aria-labelledby="answer-label">{chunks or _text(self.answer)}</p>\n'
            f'<div class="facts">{self.settings_html()}{self.cost_html()}</div>\n'
            '</header>\n'
        )

    def result_line(self) -> str:
        source = self.result.get("source")
        how = SOURCES.get(source, source or "unknown")
        if source == "stage2":
            finalists = sum(1 for node in self.nodes if node.get("final_rank") is not None)
            candidates = sum(1 for node in self.nodes if node.get("stage2_rank") is not None)
            judged = min(candidates, self.settings.get("num_select", candidates))
            how = f"stage 2: best of {finalists} eos-scored finalists, children of the top {judged} of {candidates} candidates"
        if self.result.get("stopped"):
            how += f" ({_plain(self.result['stopped'])})"
        finish = FINISH_REASONS.get(self.result.get("finish_reason"), self.result.get("finish_reason"))
        return (
            f'<span><b>Value</b> {"none" if self.result.get("value") is None else _fmt(self.result["value"])}</span>'
            f' <span><b>Chosen by</b> {_plain(how)}</span>'
            f' <span><b>Finished by</b> {_plain(finish)}</span>'
        )

    def settings_html(self) -> str:
        if not self.settings:
            return ""
        items = "".join(f"<dt>{_plain(k)}</dt><dd>{_plain(_setting(v))}</dd>" for k, v in self.settings.items())
        return f'<details class="settings"><summary>Settings</summary><dl>{items}</dl></details>'

    def cost_html(self) -> str:
        if not self.cost:
            return ""
        items = []
        for key, value in self.cost.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_fmt(v)} s" for k, v in value.items())
            items.append(f"<dt>{_plain(key.replace('_', ' '))}</dt><dd>{_plain(_setting(value))}</dd>")
        seconds = (self.cost.get("seconds") or {}).get("total")
        summary = f"Cost: {self.cost.get('strong_tokens_sampled', '?')} strong tokens sampled" + (
            f", {_fmt(seconds)} s" if seconds is not None else ""
        )
        return f'<details class="cost"><summary>{_plain(summary)}</summary><dl>{"".join(items)}</dl></details>'

    # --- main: the views -----------------------------------------------------------

    def main(self) -> str:
        views = [self.outline_view()]
        if self.strategy == "w2s":
            views.append(self.stage2_view())
        elif self.strategy == "bon":
            views.append(self.samples_view())
        elif self.strategy == "cbs":
            views.append(self.beams_view())
        views.append(
            '<section class="view" id="view-shape" aria-labelledby="h-shape" data-tab="Shape">\n'
            '<h2 id="h-shape">Shape of the tree</h2>\n'
            '<p class="js-only">Each node is a box under its parent, as wide as its share of the '
            f'{"visits" if self.strategy == "w2s" else "leaves below"}; colour is the value V '
            "(hatched: not judged). Click a box to zoom into its subtree.</p>\n"
            '<p class="no-js">The shape view needs JavaScript.</p>\n<div id="shape"></div>\n</section>\n'
        )
        return (
            '<main>\n<div class="find js-only" role="search" aria-label="Find nodes"></div>\n'
            '<div class="layout">\n<div class="views">\n'
            + "".join(views)
            + '</div>\n<aside id="panel" aria-labelledby="panel-title" class="js-only">'
            '<h2 id="panel-title">Selected node</h2></aside>\n</div>\n</main>\n'
        )

    def outline_view(self) -> str:
        return (
            '<section class="view" id="view-outline" aria-labelledby="h-outline" data-tab="Chosen path">\n'
            '<h2 id="h-outline">Chosen path, one row per depth</h2>\n'
            '<p class="hint js-only">N visits, V value, P prior, H entropy (bits), score = V + exploration bonus '
            "(what selection compared). Expand a row (Enter, or the arrow keys) to see the other children at that depth.</p>\n"
            f'<div id="outline-static">{self.static_path()}</div>\n<div id="outline"></div>\n</section>\n'
        )

    def static_path(self) -> str:
        """The chosen path as nested <details>: the no-script outline."""
        if not self.path:
            return "<p>The tree is empty.</p>"
        parts = []
        for i in self.path:
            node = self.nodes[i]
            label = "(prompt)" if self.parent[i] < 0 else f"<span class=\"chunk\">{_text(node.get('chunk', ''))}</span>"
            siblings = [j for j in self.children[self.parent[i]] if j != i] if self.parent[i] >= 0 else []
            siblings.sort(key=lambda j: -(self.nodes[j].get("visits") or 0))
            others = "; ".join(
                f'<span class="chunk">{_text(self.nodes[j].get("chunk", ""))}</span> {self.stats(j)}' for j in siblings
            )
            parts.append(
                f'<details open id="node-{i}"><summary>depth {self.depth[i]} {label} {self.stats(i)}</summary>'
                + (f'<div class="others">others: {others}</div>' if others else "")
            )
        return "".join(parts) + "</details>" * len(self.path)

    def stats(self, i: int) -> str:
        node = self.nodes[i]
        bits = [f"N {node.get('visits', 0)}", f"V {_fmt(node.get('value'))}"]
        if node.get("terminal"):
            bits.append(f"finished ({_plain(node.get('finish_reason') or '?')})")
        if node.get("eos_value") is not None:
            bits.append(f"eos V {_fmt(node['eos_value'])}")
        return f'<span class="stats">{" · ".join(bits)}</span>'

    def select_link(self, i: int, text: str) -> str:
        return f'<a href="#node-{i}" data-node="{i}">{text}</a>'

    def stage2_view(self) -> str:
        finalists = sorted((i for i, n in enumerate(self.nodes) if n.get("final_rank") is not None), key=lambda i: self.nodes[i]["final_rank"])
        candidates = sorted((i for i, n in enumerate(self.nodes) if n.get("stage2_rank") is not None), key=lambda i: self.nodes[i]["stage2_rank"])
        source = self.result.get("source")
        if not candidates:
            why = SOURCES.get(source, source or "")
            return (
                '<section class="view" id="view-stage2" aria-labelledby="h-stage2" data-tab="Stage 2">\n'
                '<h2 id="h-stage2">Stage 2</h2>\n'
                f'<p>Stage 2 had nothing to rank. The answer came from {_plain(why)}.</p>\n</section>\n'
            )
        num_select = self.settings.get("num_select", len(candidates))
        rows = []
        for i in finalists:
            node = self.nodes[i]
            parent = self.nodes[self.parent[i]]
            won = node.get("chosen") and node["final_rank"] == 1
            rows.append(
                f'<tr data-node="{i}"{_WINNER if won else ""}><td>{node["final_rank"]}{" ✓ answer" if won else ""}</td>'
                f'<td>{self.select_link(i, _fmt(node.get("eos_value")))}</td>'
                f'<td class="text">{self.answer_html(i)}</td>'
                f'<td>{"finished" if node.get("terminal") else "unfinished"}</td>'
                f'<td>#{parent.get("stage2_rank")}</td></tr>'
            )
        shown = candidates[: max(num_select, CANDIDATES_SHOWN)]
        candidate_rows = []
        for i in shown:
            node = self.nodes[i]
            bonus = None if node.get("stage2_score") is None or node.get("own_value") is None else node["stage2_score"] - node["own_value"]
            candidate_rows.append(
                f'<tr data-node="{i}"><td>{node["stage2_rank"]}</td>'
                f'<td>{self.select_link(i, _fmt(node.get("stage2_score")))}</td>'
                f'<td>{_fmt(node.get("own_value"))}</td><td>{_fmt(bonus)}</td><td>{node.get("visits", 0)}</td>'
                f'<td>{"yes" if node["stage2_rank"] <= num_select else "no"}</td>'
                f'<td class="text">{self.answer_html(i)}</td></tr>'
            )
        more = len(candidates) - len(shown)
        return (
            '<section class="view" id="view-stage2" aria-labelledby="h-stage2" data-tab="Stage 2">\n'
            '<h2 id="h-stage2">Stage 2 ranking</h2>\n'
            f"<p>After the search, every unfinished node with a finished child is a candidate ({len(candidates)}). "
            f"Candidates are ranked by their own value + exploration bonus; the children of the top {min(num_select, len(candidates))} "
            f"are the finalists, scored with the end of text (eos V), and the best one is the answer.</p>\n"
            '<table id="stage2-table" class="rank"><caption>Finalists, best first</caption>'
            '<thead><tr><th scope="col">Rank</th><th scope="col">eos V</th><th scope="col">Answer (last chunk marked)</th>'
            '<th scope="col">State</th><th scope="col">Candidate</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>\n'
            '<table id="candidates-table" class="rank"><caption>Candidates, ranked</caption>'
            '<thead><tr><th scope="col">Rank</th><th scope="col">Score</th><th scope="col">Own V</th>'
            '<th scope="col">Bonus</th><th scope="col">N</th><th scope="col">Judged</th><th scope="col">Answer so far</th></tr></thead>'
            f'<tbody>{"".join(candidate_rows)}</tbody></table>\n'
            + (f"<p>{more} lower-ranked candidates are not listed.</p>\n" if more > 0 else "")
            + "</section>\n"
        )

    def samples_view(self) -> str:
        samples = sorted(self.children[0] if self.nodes else [], key=lambda i: -_sortable(self.nodes[i].get("value")))
        rows = []
        for place, i in enumerate(samples, start=1):
            node = self.nodes[i]
            won = bool(node.get("chosen"))
            rows.append(
                f'<tr data-node="{i}"{_WINNER if won else ""}><td>{place}{" ✓ answer" if won else ""}</td>'
                f'<td>{self.select_link(i, _fmt(node.get("value")))}</td><td class="text">{_text(node.get("chunk", ""))}</td>'
                f'<td>{_plain(FINISH_REASONS.get(node.get("finish_reason"), node.get("finish_reason")))}</td></tr>'
            )
        return (
            '<section class="view" id="view-samples" aria-labelledby="h-samples" data-tab="Samples">\n'
            '<h2 id="h-samples">Best-of-N samples</h2>\n'
            f"<p>{len(samples)} complete samples, each scored with the end of text; the highest value is the answer.</p>\n"
            '<table id="samples-table" class="rank"><caption>Samples, best first</caption>'
            '<thead><tr><th scope="col">Rank</th><th scope="col">V</th><th scope="col">Sample</th><th scope="col">Finished by</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>\n</section>\n'
        )

    def beams_view(self) -> str:
        kept_at: dict[int, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for step in node.get("beam_steps") or []:
                kept_at.setdefault(step, []).append(i)
        rows = []
        previous = [0] if self.nodes else []
        for step in sorted(kept_at):
            pool = [c for b in previous for c in (self.children[b] if not self.nodes[b].get("terminal") else [b])]
            kept = set(kept_at[step])
            pruned = sorted((i for i in dict.fromkeys(pool) if i not in kept), key=lambda i: -_sortable(self.nodes[i].get("value")))
            kept_html = "".join(
                f'<li>{self.select_link(i, "V " + _fmt(self.nodes[i].get("value")))} {self.answer_html(i, tail=80)}</li>'
                for i in sorted(kept, key=lambda i: -_sortable(self.nodes[i].get("value")))
            )
            pruned_html = " · ".join(
                f'{self.select_link(i, "V " + _fmt(self.nodes[i].get("value")))} <span class="chunk">{_text(self.nodes[i].get("chunk", ""))}</span>'
                for i in pruned
            )
            rows.append(f'<tr><td>{step}</td><td><ul class="plain">{kept_html}</ul></td><td class="text">{pruned_html or "none"}</td></tr>')
            previous = kept_at[step]
        return (
            '<section class="view" id="view-beams" aria-labelledby="h-beams" data-tab="Beams">\n'
            '<h2 id="h-beams">Beams kept and pruned per step</h2>\n'
            f"<p>Each step extends every unfinished beam by {self.settings.get('children', 'K')} chunks and keeps the "
            f"{self.settings.get('beam_width', 'W')} with the highest value; a finished beam stays in the running.</p>\n"
            '<table id="beams-table" class="rank"><caption>Steps</caption>'
            '<thead><tr><th scope="col">Step</th><th scope="col">Kept (end of each beam; last chunk marked)</th>'
            '<th scope="col">Pruned (their last chunk)</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>\n</section>\n'
        )

    def answer_html(self, i: int, tail: int | None = None) -> str:
        """Node i's whole answer with its own chunk marked (optionally only the end)."""
        chunks = []
        j = i
        while self.parent[j] >= 0:
            chunks.append(self.nodes[j].get("chunk", ""))
            j = self.parent[j]
        last = chunks[0] if chunks else ""
        before = "".join(reversed(chunks[1:]))
        if tail is not None and len(before) > tail:
            before = "…" + before[-tail:]
        return f"{_text(before)}<mark>{_text(last)}</mark>"

    def footer(self) -> str:
        return (
            "<footer>\n<p>N: visits. V: the weak models' value of the answer so far (log-likelihood ratio); "
            "not judged: a finished answer the search valued as −∞ until stage 2. P: the strong model's prior for the chunk. "
            "H: entropy of the strong model's next token, in bits. Score: V + exploration bonus, what selection compared "
            "at the end of the search. eos V: the value with the end of text.</p>\n</footer>\n"
        )


# --- text helpers ---------------------------------------------------------------------


def _asset(name: str) -> str:
    return (_HERE / name).read_text(encoding="utf-8")


def _script_json(data: dict) -> str:
    """JSON that stays inside its <script>: ASCII only (lone surrogates, U+2028
    included), and no <, > or & that could start a tag or a comment."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _mark(match: re.Match) -> str:
    char = match.group(0)
    code = f"U+{ord(char):04X}"
    name = unicodedata.name(char, "control character")
    return f'<span class="cc" title="{html.escape(name.lower())}">{code}</span>'


def _text(text: str) -> str:
    """Model text as HTML: escaped, leading/trailing and repeated spaces, newlines
    and tabs made visible, marked characters shown as their code point."""
    out = []
    last = 0
    for match in re.finditer(_MARKED.pattern + r"|\n|\t|^ +| +$| {2,}", text):
        out.append(html.escape(text[last : match.start()]))
        piece = match.group(0)
        if piece == "\n":
            out.append('<span class="nl"></span>\n')
        elif piece == "\t":
            out.append('<span class="tab">\t</span>')
        elif piece.startswith(" "):
            out.append(f'<span class="sp">{piece}</span>')
        else:
            out.append(_mark(match))
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def _plain(text: Any) -> str:
    """Short text (names, settings) escaped, marked characters shown as code points."""
    return _MARKED.sub(lambda m: f"U+{ord(m.group(0)):04X}", html.escape(str(text)))


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _setting(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(repr(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _number(value: Any, digits: int | None) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return round(value, digits) if digits is not None and isinstance(value, float) else value


def _sortable(value: float | None) -> float:
    return -math.inf if value is None else value


def _fmt(value: Any) -> str:
    """A number as the page shows it: two decimals, −∞ for a value not judged."""
    if value is None:
        return "−∞ (not judged)"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
