"""The tree view in a real browser: headless Chromium driven by Playwright.

Pages are written from synthetic trees (treeview_trees.py: tiny, 600 and 5,000
nodes, one per strategy, a fallback answer, hostile text) and from a real search
on the tiny models. Chromium comes from the system (see browser.py); without
it these tests skip and say why. One browser serves the whole session.
"""

from __future__ import annotations

import re

import pytest

from support import browser
from support import treeview_trees as trees
from support.search_models import run
from w2s_langchain.cli.treeview import tree_to_html

pytestmark = pytest.mark.skipif(browser.missing_reason() is not None, reason=str(browser.missing_reason()))

SCREEN = {"width": 1366, "height": 768}


@pytest.fixture(scope="module")
def chromium():
    # Module-scoped: Playwright's sync API keeps an asyncio loop running in this
    # thread until it stops, and later tests' asyncio.run() would refuse to start.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = browser.launch(playwright)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def real_tree(tiny_models) -> dict:
    """A real search on the tiny models that ends in stage 2."""
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2)
    assert result.source == "stage2"
    return result.tree_dict()


TREES = {
    "tiny": trees.tiny_tree,
    "600": lambda: trees.w2s_tree(600),
    "5000": lambda: trees.w2s_tree(5000),
    "hostile": trees.hostile_tree,
    "fallback": trees.fallback_tree,
    "bon": trees.bon_tree,
    "cbs": trees.cbs_tree,
    "base": trees.base_tree,
}
_built: dict[str, dict] = {}


def tree_named(name: str, request) -> dict:
    if name == "real":
        return request.getfixturevalue("real_tree")
    if name not in _built:
        _built[name] = TREES[name]()
    return _built[name]


class Page:
    """A tab showing a tree's page, recording every console message, page error and dialog."""

    def __init__(self, chromium, tmp_path, tree: dict, fragment: str = "", javascript: bool = True):
        self.tree = tree
        self.problems: list[str] = []
        self.context = chromium.new_context(viewport=SCREEN, java_script_enabled=javascript)
        self.context.set_default_timeout(5000)  # a missing element fails the test in seconds, not 30
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        path = tmp_path / "tree.html"
        path.write_text(tree_to_html(tree), encoding="utf-8")
        self.page.goto(path.as_uri() + fragment)

    def close(self):
        self.context.close()

    def chosen_end(self) -> int:
        return max(i for i, n in enumerate(self.tree["nodes"]) if n["chosen"])

    def selected(self) -> int:
        return int(self.page.get_attribute("[role=tree] [aria-selected=true]", "data-node"))


@pytest.fixture
def open_page(chromium, tmp_path):
    pages = []

    def open_(tree: dict, **kwargs) -> Page:
        page = Page(chromium, tmp_path, tree, **kwargs)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()


ALL = [*TREES, "real"]


@pytest.mark.parametrize("name", ALL)
def test_no_console_message_page_error_or_dialog(open_page, request, name):
    view = open_page(tree_named(name, request))
    page = view.page
    # Use every view, so each runs its code on this tree.
    for tab in page.query_selector_all("[role=tab]"):
        tab.click()
    page.fill("#find-text", "e")
    page.click("#find-results button")
    page.check("#find-finished")
    page.keyboard.press("Tab")

    assert view.problems == []


@pytest.mark.parametrize("name", ["tiny", "600", "hostile", "fallback", "bon", "cbs", "base", "real"])
def test_chunks_along_the_outline_join_to_the_answer(open_page, request, name):
    tree = tree_named(name, request)
    page = open_page(tree).page
    chunks = page.eval_on_selector_all("[role=tree] > [role=treeitem] > .row .main > .chunk", "els => els.map(e => e.textContent)")
    header = page.eval_on_selector_all("#answer .chunk", "els => els.map(e => e.textContent)")

    assert chunks[0] == "(prompt)"
    assert "".join(chunks[1:]) == tree["answer"] == "".join(header)


def test_a_long_chosen_path_starts_with_its_first_rows_and_shows_the_rest_on_demand(open_page):
    tree = trees.chain_tree(150)
    page = open_page(tree).page
    spine = "[role=tree] > [role=treeitem].on-path"

    assert page.locator(spine).count() == 60
    assert page.evaluate("document.getElementsByTagName('*').length") < 2000
    page.click("[role=tree] > .more")
    chunks = page.eval_on_selector_all(f"{spine} > .row .main > .chunk", "els => els.map(e => e.textContent)")
    assert "".join(chunks[1:]) == tree["answer"] and page.locator("[role=tree] > .more").count() == 0
    # A node past the first rows is built and shown when the address names it.
    page.goto(page.url.split("#")[0] + "#node-300")  # the rejected sibling at depth 150
    page.reload()
    assert page.locator("#t-300").get_attribute("aria-selected") == "true" and page.locator("#t-300").is_visible()


@pytest.mark.parametrize("name", ["600", "real"])
def test_the_whole_chosen_answer_is_on_the_first_screen(open_page, request, name):
    page = open_page(tree_named(name, request)).page
    box = page.locator("#answer").bounding_box()

    assert box["x"] >= 0 and box["y"] >= 0
    assert box["x"] + box["width"] <= SCREEN["width"] and box["y"] + box["height"] <= SCREEN["height"]
    # Nothing to scroll: the answer box shows all its text, and the page never scrolls sideways.
    assert page.eval_on_selector("#answer", "e => e.scrollHeight <= e.clientHeight")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_keyboard_moves_through_the_outline_and_the_panel_follows(open_page):
    view = open_page(tree_named("600", None))
    page = view.page
    for _ in range(40):  # Tab through the header's links until the outline has the focus
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.getAttribute('role')") == "treeitem":
            break
    assert page.evaluate("document.activeElement.getAttribute('role')") == "treeitem"
    # The selected row (at first the answer's) holds the outline's one tab stop.
    assert page.evaluate("document.activeElement.dataset.node") == str(view.chosen_end())

    page.keyboard.press("Home")
    assert view.selected() == 0
    page.keyboard.press("ArrowDown")
    first = view.selected()
    assert view.tree["nodes"][first]["parent"] == 0 and view.tree["nodes"][first]["chosen"]
    assert page.evaluate("document.activeElement.dataset.node") == str(first)
    assert page.get_attribute(f"#t-{first}", "aria-expanded") == "false"

    page.keyboard.press("Enter")
    assert page.get_attribute(f"#t-{first}", "aria-expanded") == "true"
    page.keyboard.press("ArrowDown")  # into the other children at depth 1
    sibling = view.selected()
    node = view.tree["nodes"][sibling]
    assert not node["chosen"] and node["parent"] == 0
    assert page.text_content("#panel-chunk").startswith("Chunk: " + node["chunk"])
    page.keyboard.press("ArrowLeft")  # to the row that holds it
    assert view.selected() == first
    page.keyboard.press("Enter")
    assert page.get_attribute(f"#t-{first}", "aria-expanded") == "false"
    # Each row says what it is (its accessible name, as the browser computes it).
    name = page.locator(f"#t-{first}").aria_snapshot()
    chunk = re.escape(view.tree["nodes"][first]["chunk"].strip())
    assert re.search(rf"treeitem \"depth 1 ?, ' ?{chunk} ?' ?, \d+ visits, value -?\d+\.\d\d ?, on the chosen path", name), name


def test_finding_a_rejected_chunk_shows_it_and_selecting_reveals_it(open_page):
    tree = trees.w2s_tree(600)
    hidden = next(n for n in reversed(tree["nodes"]) if not n["chosen"] and n["parent"] and not tree["nodes"][n["parent"]]["chosen"])
    hidden["chunk"] = " zanzibar"
    view = open_page(tree)
    page = view.page

    page.fill("#find-text", "zanzib")
    match = page.locator("#find-results mark")
    assert match.count() == 1 and match.is_visible() and match.text_content() == "zanzib"
    assert page.text_content("#find-status").startswith("1 node matches")
    page.click("#find-results button")
    row = page.locator(f"#t-{hidden['id']}")
    assert row.is_visible() and row.get_attribute("aria-selected") == "true"
    assert page.evaluate("location.hash") == f"#node-{hidden['id']}"
    # The panel compares it with the chosen answer.
    assert "They diverge after depth" in page.text_content("#panel")


@pytest.mark.parametrize("name", ["600", "hostile"])
def test_no_text_is_smaller_than_12_px(open_page, name):
    page = open_page(tree_named(name, None)).page
    page.click("[role=tree] > [aria-expanded=false] .row")
    small = page.evaluate("""() => Array.from(document.querySelectorAll('body *')).filter(e =>
        Array.from(e.childNodes).some(c => c.nodeType === 3 && c.textContent.trim()) && e.getClientRects().length
        && !e.closest('.sr, .cc') && parseFloat(getComputedStyle(e).fontSize) < 12).map(e => e.outerHTML.slice(0, 80))""")
    assert small == []


def test_find_filters_by_visits_finished_and_stage2(open_page):
    view = open_page(tree_named("600", None))
    page = view.page
    nodes = view.tree["nodes"]

    def listed() -> list[dict]:
        return [nodes[int(i)] for i in page.eval_on_selector_all("#find-results [data-select]", "els => els.map(e => e.dataset.select)")]

    page.fill("#find-visits", "5")
    assert listed() and all(n["visits"] >= 5 for n in listed())
    page.fill("#find-visits", "0")
    page.check("#find-finished")
    assert listed() and all(n["terminal"] for n in listed())
    page.uncheck("#find-finished")
    page.check("#find-stage2")
    in_stage2 = [n for n in nodes if n["stage2_rank"] is not None or n["final_rank"] is not None]
    assert page.text_content("#find-status").startswith(f"{len(in_stage2)} nodes match")
    assert all(n in in_stage2 for n in listed())


def test_the_selected_node_is_in_the_url_fragment(open_page):
    tree = trees.w2s_tree(600)
    rejected = next(n["id"] for n in reversed(tree["nodes"]) if not n["chosen"])
    view = open_page(tree, fragment=f"#node-{rejected}")

    assert view.selected() == rejected
    assert view.page.locator(f"#t-{rejected}").is_visible()


@pytest.mark.parametrize("name", ["600", "real"])
def test_stage2_table_is_sorted_and_starts_with_the_answer(open_page, request, name):
    view = open_page(tree_named(name, request))
    page = view.page
    page.click("[role=tab]:has-text('Stage 2')")
    rows = page.locator("#stage2-table tbody tr")
    values = [float(v) for v in page.eval_on_selector_all("#stage2-table tbody tr td:nth-child(2)", "els => els.map(e => e.textContent)")]

    assert rows.count() > 1 and values == sorted(values, reverse=True)
    assert int(rows.first.get_attribute("data-node")) == view.chosen_end()
    rows.nth(1).click()  # a row selects its node
    assert view.selected() == int(rows.nth(1).get_attribute("data-node"))


def test_per_strategy_tables(open_page):
    bon = open_page(tree_named("bon", None))
    bon.page.click("[role=tab]:has-text('Samples')")
    assert int(bon.page.get_attribute("#samples-table tbody tr:first-child", "data-node")) == bon.chosen_end()
    assert bon.page.locator("#samples-table tbody tr").count() == 6

    cbs = open_page(tree_named("cbs", None))
    cbs.page.click("[role=tab]:has-text('Beams')")
    steps = cbs.page.locator("#beams-table tbody tr")
    assert steps.count() == cbs.tree["cost"]["iterations"]
    assert "none" not in steps.first.text_content()  # the first step prunes W x K - W chunks


def test_a_fallback_answer_says_so_and_marks_the_nodes_it_added(open_page):
    view = open_page(tree_named("fallback", None))
    page = view.page
    added = [n["id"] for n in view.tree["nodes"] if n["fallback"]]

    assert "fallback: no stage-2 candidate" in page.text_content("#result-line")
    for i in added:
        assert "added by the fallback" in page.text_content(f"#t-{i}")
    assert page.locator("text=added by the fallback").count() >= len(added)
    page.click("[role=tab]:has-text('Stage 2')")
    assert "Stage 2 had nothing to rank" in page.text_content("#view-stage2")


def test_without_javascript_the_path_and_the_candidates_are_there(open_page):
    view = open_page(tree_named("600", None), javascript=False)
    page = view.page
    text = page.inner_text("#outline-static")

    for node in view.tree["nodes"]:
        if node["chosen"] and node["parent"] is not None:
            assert node["chunk"].strip() in text
    assert page.locator("#outline-static details").count() == sum(n["chosen"] for n in view.tree["nodes"])
    assert page.locator("#stage2-table tbody tr").count() > 1 and page.locator("#stage2-table").is_visible()
    assert page.locator("#panel").is_hidden() and page.locator("[role=tree]").count() == 0


def test_children_table_sorts_and_compare_shows_both_continuations(open_page):
    view = open_page(tree_named("600", None))
    page = view.page
    page.click("#t-0 .row")
    page.click("#panel [data-sort=value]")
    values = page.eval_on_selector_all("#panel table.children tbody tr td:nth-child(3)", "els => els.map(e => e.textContent)")
    numbers = [float(v.replace("−∞", "-inf")) for v in values]
    assert numbers == sorted(numbers, reverse=True) and len(numbers) > 1
    assert page.get_attribute("#panel th:nth-child(3)", "aria-sort") == "descending"


@pytest.mark.parametrize("name, drawn_as", [("600", "div.icicle"), ("5000", "canvas")])
def test_shape_view_fits_the_width_and_zooms(open_page, name, drawn_as):
    page = open_page(tree_named(name, None)).page
    page.click("[role=tab]:has-text('Shape')")
    shape = page.locator(f"#shape {drawn_as}")

    assert shape.count() == 1
    assert shape.bounding_box()["x"] + shape.bounding_box()["width"] <= SCREEN["width"]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = shape.bounding_box()
    page.mouse.click(box["x"] + 5, box["y"] + 30)  # a box in the second row
    assert "the subtree of depth 1" in page.text_content(".shape-bar")


@pytest.mark.parametrize("name", ["600", "hostile", "bon", "cbs", "fallback", "real"])
def test_axe_finds_nothing_serious(open_page, request, name):
    page = open_page(tree_named(name, request)).page
    # With every part of the first view in use: a row expanded, the find list filled, the panel full.
    page.click("[role=tree] > [aria-expanded=false] .row")
    page.fill("#find-text", "e")
    assert browser.axe_findings(page) == []
    if name == "600":  # the other views, once
        for tab in page.locator("[role=tab]").all()[1:]:
            tab.click()
            assert browser.axe_findings(page) == [], tab.text_content()
