"""The tree export (`SearchResult.tree_dict()`) on real searches with the tiny
models, and the page `tree_to_html` writes, read as text. How the page behaves
in a browser is tested in test_treeview_browser.py."""

from __future__ import annotations

import json
import math
import re

import pytest

from support import treeview_trees as trees
from support.search_models import run
from w2s_langchain.search.tree import SELECTIONS
from w2s_langchain.cli.treeview import tree_to_html

# --- the export --------------------------------------------------------------------


def test_export_carries_the_result_settings_and_cost(tiny_models):
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2)
    data = result.tree_dict()

    assert data["result"] == {"value": result.value, "source": "stage2", "finish_reason": result.finish_reason, "stopped": None}
    assert data["settings"] == result.settings and data["settings"]["iterations"] == 40
    assert data["cost"]["tree_nodes"] == len(data["nodes"]) == result.cost.tree_nodes
    json.dumps(data, allow_nan=False)  # plain JSON, no infinities


def test_export_ranks_stage2_candidates_and_finalists(tiny_models):
    result, _ = run(tiny_models, iterations=40, max_new_tokens=9, chunk_tokens=2, num_select=2)
    nodes = result.tree_dict()["nodes"]
    terminal_child = {n["parent"] for n in nodes if n["terminal"]}
    candidates = [n for n in nodes if n["parent"] is not None and not n["terminal"] and n["id"] in terminal_child]

    assert len(candidates) > 2
    assert {n["id"] for n in nodes if n["stage2_rank"] is not None} == {n["id"] for n in candidates}
    by_rank = sorted(candidates, key=lambda n: n["stage2_rank"])
    assert [n["stage2_rank"] for n in by_rank] == list(range(1, len(candidates) + 1))
    assert all(a["stage2_score"] >= b["stage2_score"] for a, b in zip(by_rank, by_rank[1:]))
    top = {n["id"] for n in by_rank[:2]}
    finalists = sorted((n for n in nodes if n["final_rank"] is not None), key=lambda n: n["final_rank"])
    assert finalists and all(n["parent"] in top for n in finalists)
    assert all(a["eos_value"] >= b["eos_value"] for a, b in zip(finalists, finalists[1:]))
    assert finalists[0]["chosen"] and finalists[0]["answer"] == result.text


@pytest.mark.parametrize("parallel_leaves", [1, 3])
def test_export_says_at_which_iteration_each_node_was_expanded(tiny_models, parallel_leaves):
    result, _ = run(tiny_models, iterations=12, parallel_leaves=parallel_leaves)
    nodes = result.tree_dict()["nodes"]
    parents = {n["parent"] for n in nodes}
    expanded = [n for n in nodes if n["id"] in parents]

    assert all(n["expanded_at"] is None for n in nodes if n["id"] not in parents)
    iterations = [n["expanded_at"] for n in expanded]
    # One leaf per iteration: no two expansions share an iteration, all within the run.
    assert len(set(iterations)) == len(iterations) and all(1 <= i <= result.cost.iterations for i in iterations)
    assert nodes[0]["expanded_at"] == 1
    # A parent was expanded before its children.
    by_id = {n["id"]: n for n in nodes}
    assert all(by_id[n["parent"]]["expanded_at"] < n["expanded_at"] for n in expanded if n["parent"] is not None)


def test_export_gives_the_selection_score_of_the_named_rule(tiny_models):
    result, _ = run(tiny_models, iterations=12)
    tree = result.tree_dict()
    c, w = tree["settings"]["c"], tree["settings"]["entropy_weight"]
    nodes = list(result.tree.walk())

    scored = 0
    for node, exported in zip(nodes, tree["nodes"]):
        if node.parent is None or not math.isfinite(node.value):
            assert exported["selection_score"] is None
        else:
            assert exported["selection_score"] == pytest.approx(SELECTIONS["ea-puct"](node, node.parent, c, w))
            scored += 1
    assert scored >= 3


def test_export_marks_the_nodes_the_fallback_added(tiny_models):
    result, _ = run(tiny_models, iterations=2, max_new_tokens=12, chunk_tokens=2, fallback="finish")
    assert result.source == "fallback_finished"
    nodes = result.tree_dict()["nodes"]
    chosen = [n["id"] for n in nodes if n["chosen"]]  # root to answer: a walk lists parents first
    searched = [i for i in chosen if not nodes[i]["fallback"]]
    grown_by_fallback = set(chosen[len(searched) - 1 :])  # the tree's best-path end, and what the fallback added

    assert len(chosen) > len(searched)  # the answer and its way there came from the fallback
    assert {n["id"] for n in nodes if n["fallback"]} == {n["id"] for n in nodes if n["parent"] in grown_by_fallback}
    assert nodes[chosen[-1]]["answer"] == result.text


def test_export_lists_the_beams_kept_after_each_step(tiny_models):
    result, _ = run(tiny_models, strategy="cbs", beam_width=2, children=2, chunk_tokens=3, max_new_tokens=12)
    nodes = result.tree_dict()["nodes"]
    steps = result.cost.iterations
    kept = {step: [n for n in nodes if step in n["beam_steps"]] for step in range(1, steps + 1)}

    assert all(1 <= len(beams) <= 2 for beams in kept.values())
    assert any(n["chosen"] and n["answer"] == result.text for n in kept[steps])
    # A kept unfinished beam is what the next step grew.
    for step in range(1, steps):
        for beam in kept[step]:
            if not beam["terminal"]:
                assert beam["expanded_at"] == step + 1


# --- the page, as text -------------------------------------------------------------------


ALL_TREES = [trees.tiny_tree, trees.hostile_tree, trees.fallback_tree, trees.bon_tree, trees.cbs_tree, trees.base_tree,
             lambda: trees.w2s_tree(600)]


@pytest.mark.parametrize("make", ALL_TREES)
def test_same_tree_gives_the_same_page(make):
    assert tree_to_html(make()) == tree_to_html(make())


@pytest.mark.parametrize("make", ALL_TREES)
def test_page_loads_nothing_from_outside(make):
    page = tree_to_html(make())

    assert not re.search(r"""\bsrc\s*=|href\s*=\s*["'](?!#)|@import|url\(|https?://|//cdn""", page)
    # Three scripts: the class switch, the data, the page's own code; no text ends one early.
    assert page.count("<script") == 3 and page.count("</script") == 3


def test_hostile_text_stays_inside_the_data_and_is_escaped_in_the_markup():
    tree = trees.hostile_tree()
    page = tree_to_html(tree)
    data = re.search(r'<script type="application/json" id="tree-data">(.*?)</script>', page, re.S).group(1)

    assert "<" not in data and "\u202e" not in data and "\x00" not in data
    assert json.loads(data)["chunk"] == [n["chunk"] for n in tree["nodes"]]
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text in the markup
    # Controls and direction overrides are shown as their code points, not sent raw.
    assert "\x07" not in page and "\x1b" not in page and "\u202e" not in page
    assert ">U+202E</span>" in page and ">U+0000</span>" in page
    page.encode("utf-8")


def test_page_without_script_has_the_chosen_path_and_the_stage2_table():
    tree = trees.w2s_tree(600)
    page = tree_to_html(tree)
    chosen = [n for n in tree["nodes"] if n["chosen"]]
    static = re.search(r'<div id="outline-static">(.*?)<div id="outline">', page, re.S).group(1)

    assert static.count("<details open") == len(chosen)
    text = re.sub(r"<[^>]+>", "", static)
    assert all(n["chunk"].strip() in text for n in chosen[1:])
    finalists = re.search(r'<table id="stage2-table".*?</table>', page, re.S).group(0)
    ranks = [int(r) for r in re.findall(r"<tr data-node=\"\d+\"(?: class=\"winner\")?><td>(\d+)", finalists)]
    assert ranks == sorted(ranks) and ranks[0] == 1 and len(ranks) == sum(n["final_rank"] is not None for n in tree["nodes"])


def test_a_5000_node_page_is_under_a_megabyte():
    page = tree_to_html(trees.w2s_tree(5000))
    assert len(page.encode("utf-8")) < 1_000_000


def test_parent_listed_after_its_child_is_rejected():
    tree = trees.tiny_tree()
    tree["nodes"][1]["parent"] = 4
    with pytest.raises(ValueError, match="parent 4 must come before it"):
        tree_to_html(tree)
