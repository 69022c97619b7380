"""How heavy the tree view's page is, in headless Chromium: bytes, DOM elements at
load, load time and the time of each interaction, on synthetic trees of 600 and
5,000 nodes (tests/support/treeview_trees.py) and, with --tree, on an exported search.
Also takes the README's screenshot (--screenshot).

    python benchmarks/treeview_page.py --tree tree.json --screenshot docs/images/tree-view.png

Chromium is found as the browser tests find it ($W2S_CHROMIUM, or `chromium` on
PATH). Times are medians over --repeats runs, measured inside the page with
performance.now(): an interaction's time runs from the event to the end of the
style and layout it caused (a forced layout), not counting paint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import browser, treeview_trees  # noqa: E402  (tests/support/)
from w2s_langchain.cli.treeview import tree_to_html  # noqa: E402

SCREEN = {"width": 1366, "height": 768}

# Each interaction runs in the page and returns its milliseconds; `node` is a
# rejected node two levels below the chosen path (the deepest case to reveal).
INTERACTIONS = {
    "expand a chosen-path row": """() => { const li = document.querySelector('[role=tree] > [aria-expanded=false]');
        const t = performance.now(); li.querySelector('.row').click(); document.body.offsetHeight; return performance.now() - t; }""",
    "arrow key to the next row": """() => { const li = document.querySelector('[role=treeitem][tabindex="0"]'); li.focus();
        const t = performance.now(); li.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown', bubbles: true}));
        document.body.offsetHeight; return performance.now() - t; }""",
    "select a hidden node (reveal + panel)": """(node) => { const t = performance.now(); location.hash = '#node-' + node;
        window.dispatchEvent(new HashChangeEvent('hashchange')); document.body.offsetHeight; return performance.now() - t; }""",
    "type a word in find": """() => { const box = document.getElementById('find-text'); box.value = '';
        const t = performance.now(); box.value = 'the'; box.dispatchEvent(new Event('input', {bubbles: true}));
        document.body.offsetHeight; return performance.now() - t; }""",
    "sort the children table": """() => { document.querySelector('#t-0 .row').click(); const b = document.querySelector('#panel [data-sort=value]');
        const t = performance.now(); b.click(); document.body.offsetHeight; return performance.now() - t; }""",
    "open the shape view": """() => { const tab = Array.from(document.querySelectorAll('[role=tab]')).find(b => b.textContent === 'Shape');
        document.getElementById('shape').replaceChildren(); const t = performance.now(); tab.click(); document.body.offsetHeight;
        const ms = performance.now() - t; document.querySelector('[role=tab]').click(); return ms; }""",
}


def measure(chromium, name: str, tree: dict, repeats: int, folder: Path) -> dict:
    path = folder / f"{name}.html"
    path.write_text(tree_to_html(tree), encoding="utf-8")
    nodes = tree["nodes"]
    hidden = next(n["id"] for n in reversed(nodes) if not n["chosen"] and n["parent"] and not nodes[n["parent"]]["chosen"])
    loads, doms, times = [], [], {k: [] for k in INTERACTIONS}
    for _ in range(repeats):
        context = chromium.new_context(viewport=SCREEN)
        page = context.new_page()
        page.goto(path.as_uri(), wait_until="load")
        loads.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
        doms.append(page.evaluate("document.getElementsByTagName('*').length"))
        for label, script in INTERACTIONS.items():
            times[label].append(page.evaluate(script, hidden))
        context.close()
    return {
        "page": name, "nodes": len(nodes), "bytes": path.stat().st_size, "dom_at_load": statistics.median(doms),
        "load_ms": statistics.median(loads), **{k: statistics.median(v) for k, v in times.items()},
    }


def screenshot(chromium, tree: dict, out: Path, folder: Path) -> None:
    """The first screen at 1366x768 with a rejected alternative at depth 2 selected,
    so the outline, its expanded row and the comparison panel all show."""
    path = folder / "screenshot.html"
    path.write_text(tree_to_html(tree), encoding="utf-8")
    nodes = tree["nodes"]
    chosen = [n["id"] for n in nodes if n["chosen"]]
    second = chosen[2] if len(chosen) > 2 else chosen[-1]
    rival = next((n["id"] for n in nodes if n["parent"] == nodes[second]["parent"] and not n["chosen"]), second)
    context = chromium.new_context(viewport=SCREEN)
    page = context.new_page()
    page.goto(path.as_uri() + f"#node-{rival}")
    page.evaluate("window.scrollTo(0, 0)")
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, help="an exported search (w2s-align ... --tree tree.json) to measure too")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, help="write the README's screenshot here (of --tree if given)")
    args = parser.parse_args()
    reason = browser.missing_reason()
    if reason:
        sys.exit(f"cannot run: {reason}")
    from playwright.sync_api import sync_playwright

    trees = {"synthetic 600": treeview_trees.w2s_tree(600), "synthetic 5,000": treeview_trees.w2s_tree(5000)}
    if args.tree:
        trees[f"search ({args.tree.name})"] = json.loads(args.tree.read_text())
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser.find_chromium(), args=browser.CHROMIUM_FLAGS)
        version = chromium.version
        rows = [measure(chromium, name, tree, args.repeats, Path(tmp)) for name, tree in trees.items()]
        if args.screenshot:
            screenshot(chromium, trees[list(trees)[-1]] if args.tree else trees["synthetic 600"], args.screenshot, Path(tmp))
        chromium.close()
    print(f"# Tree view page, headless Chromium {version}\n")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; medians of {args.repeats} runs; viewport 1366x768\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:,.1f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
