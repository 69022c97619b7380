"""Tests of ``tree_to_html``: the HTML page that draws an exported search tree.

Trees are built by hand in the exporter's schema; the page is checked as XML
(it is written to be well-formed), so shapes, classes and text can be counted.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

import pytest

from w2s_langchain.cli.treeview import tree_to_html

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "</svg><script>alert(1)</script> & \"quotes\" 'single'"
EMOJI_RTL = "🙂🇫🇷 مرحبا بالعالم \u202eevil\u202c שלום"


def make_node(node_id: int, parent: int | None, chunk: str = "", **fields) -> dict:
    node = {
        "id": node_id,
        "parent": parent,
        "chunk": chunk,
        "answer": chunk,
        "visits": 1,
        "value": 0.0,
        "prior": 0.5,
        "entropy": 1.0,
        "terminal": False,
        "finish_reason": None,
        "eos_value": None,
        "chosen": False,
    }
    node.update(fields)
    return node


def make_tree(nodes: list[dict], answer: str = "the answer", prompt: str = "a prompt") -> dict:
    return {"prompt": prompt, "strategy": "mcts", "answer": answer, "nodes": nodes}


def tiny_tree() -> dict:
    return make_tree(
        [
            make_node(0, None, visits=3, value=0.5),
            make_node(1, 0, " Hello", visits=2, value=0.75),
            make_node(2, 0, " Hi", visits=1, value=0.25),
        ]
    )


def unjudged_tree() -> dict:
    """None values (not judged yet) next to judged ones, and terminal nodes."""
    return make_tree(
        [
            make_node(0, None, visits=4, value=None),
            make_node(1, 0, " a", visits=2, value=0.1),
            make_node(2, 1, ".", visits=1, value=None, terminal=True, finish_reason="stop", eos_value=0.3),
            make_node(3, 0, " b", visits=1, value=None, terminal=True, finish_reason="length"),
        ]
    )


def chosen_tree() -> dict:
    """Root -> 1 -> 3 is the returned answer's path; 2 and 4 are not."""
    return make_tree(
        [
            make_node(0, None, visits=5, value=0.4, chosen=True),
            make_node(1, 0, " Paris", answer=" Paris", visits=3, value=0.8, chosen=True),
            make_node(2, 0, " Lyon", answer=" Lyon", visits=2, value=-0.2),
            make_node(3, 1, ".", answer=" Paris.", visits=2, value=0.9, terminal=True, chosen=True),
            make_node(4, 1, "!", answer=" Paris!", visits=1, value=0.6),
        ],
        answer=" Paris.",
    )


CHAIN_LENGTH = 60


def big_tree(size: int = 500) -> dict:
    """A chosen chain CHAIN_LENGTH deep, and the remaining nodes hung under earlier
    nodes picked by a fixed hash, so the tree is both deep and bushy."""
    nodes = [make_node(0, None, visits=size, value=0.0, chosen=True)]
    for node_id in range(1, size):
        on_chain = node_id <= CHAIN_LENGTH
        parent = node_id - 1 if on_chain else (node_id * 2654435761 >> 7) % node_id
        nodes.append(
            make_node(
                node_id,
                parent,
                f" chunk {node_id} <&>",
                answer=f"answer of node {node_id}",
                visits=size // (node_id + 1),
                value=None if node_id % 11 == 0 else (node_id % 13) / 6.0 - 1.0,
                terminal=node_id % 5 == 0 and not on_chain,
                chosen=on_chain,
            )
        )
    return make_tree(nodes)


def hostile_tree() -> dict:
    return make_tree(
        [
            make_node(0, None, visits=2, value=0.1, chosen=True),
            make_node(1, 0, HOSTILE, answer=HOSTILE, visits=1, value=0.2, chosen=True),
            make_node(2, 0, EMOJI_RTL, answer=EMOJI_RTL + "\n\x00\x1b[31m\ud800", visits=1, value=None),
        ],
        answer=HOSTILE,
        prompt=HOSTILE + "\n" + EMOJI_RTL,
    )


ALL_TREES = [tiny_tree, unjudged_tree, chosen_tree, big_tree, hostile_tree]


def tree_svg(page: str) -> ET.Element:
    """The picture of the tree: the <svg class="tree"> element, parsed as XML."""
    match = re.search(r'<svg class="tree".*?</svg>', page, flags=re.DOTALL)
    assert match, "no tree <svg> in the page"
    return ET.fromstring(match.group(0))


def shapes(svg: ET.Element) -> list[ET.Element]:
    return [element for element in svg.iter() if element.tag in (SVG + "circle", SVG + "rect")]


def node_groups(svg: ET.Element) -> dict[int, ET.Element]:
    groups = [g for g in svg.iter(SVG + "g") if "node" in g.get("class", "").split()]
    return {int(g.get("id").removeprefix("node-")): g for g in groups}


@pytest.mark.parametrize("make", ALL_TREES)
def test_page_is_well_formed_and_has_one_shape_per_node(make) -> None:
    tree = make()
    page = tree_to_html(tree)

    ET.fromstring(page.removeprefix("<!DOCTYPE html>"))  # the whole page parses
    svg = tree_svg(page)
    assert len(shapes(svg)) == len(tree["nodes"])
    assert sorted(node_groups(svg)) == sorted(node["id"] for node in tree["nodes"])


@pytest.mark.parametrize("make", ALL_TREES)
def test_same_tree_gives_the_same_page(make) -> None:
    assert tree_to_html(make()) == tree_to_html(make())


def test_page_is_self_contained() -> None:
    page = tree_to_html(big_tree())

    assert "<script" not in page
    # Links may only point inside the page (the overview reuses the drawing).
    assert not re.search(r"""src\s*=|href\s*=\s*"(?!#)|@import|url\((?!#)""", page)
    assert '<use href="#tree-drawing"/>' in page


def test_links_jump_to_the_root_and_the_end_of_the_chosen_path() -> None:
    page = tree_to_html(chosen_tree())

    assert '<a href="#node-0">root</a>' in page
    assert '<a href="#node-3">end of the returned answer</a>' in page


def test_small_tree_has_no_overview() -> None:
    assert "<use" not in tree_to_html(tiny_tree())


def test_terminal_nodes_are_squares_and_others_circles() -> None:
    tree = unjudged_tree()
    groups = node_groups(tree_svg(tree_to_html(tree)))

    for node in tree["nodes"]:
        (shape,) = [child for child in groups[node["id"]] if child.tag in (SVG + "circle", SVG + "rect")]
        assert shape.tag == (SVG + "rect" if node["terminal"] else SVG + "circle")


def test_unjudged_nodes_are_grey_and_values_span_the_colour_scale() -> None:
    tree = make_tree(
        [
            make_node(0, None, visits=3, value=None),
            make_node(1, 0, visits=1, value=-1.0),
            make_node(2, 0, visits=1, value=0.0),
            make_node(3, 0, visits=1, value=1.0),
        ]
    )
    groups = node_groups(tree_svg(tree_to_html(tree)))
    fills = [groups[node_id].find(SVG + "circle").get("fill") for node_id in range(4)]

    assert fills[0] == "#bdbdbd"
    assert fills[1] == "#440154" and fills[3] == "#fde725"  # ends of the scale
    assert len(set(fills)) == 4


def test_more_visits_draw_a_bigger_node() -> None:
    groups = node_groups(tree_svg(tree_to_html(tiny_tree())))
    radius = {node_id: float(g.find(SVG + "circle").get("r")) for node_id, g in groups.items()}

    assert radius[0] > radius[1] > radius[2]


def test_labels_show_visits_and_value_with_two_decimals() -> None:
    groups = node_groups(tree_svg(tree_to_html(unjudged_tree())))
    labels = {node_id: [t.text for t in g.iter(SVG + "text")] for node_id, g in groups.items()}

    assert labels[1] == ["2", "0.10"]
    assert labels[2] == ["1", "−∞"]


def test_chosen_path_nodes_and_edges_are_highlighted() -> None:
    page = tree_to_html(chosen_tree())
    svg = tree_svg(page)
    groups = node_groups(svg)
    chosen_edges = [
        line for line in svg.iter(SVG + "line") if "chosen" in line.get("class", "").split()
    ]

    assert {node_id for node_id, g in groups.items() if "chosen" in g.get("class").split()} == {0, 1, 3}
    assert len(chosen_edges) == 2  # 0 -> 1 -> 3
    assert "chosen" not in groups[2].get("class") and "chosen" not in groups[4].get("class")
    # The class carries the highlight: thicker and red.
    assert ".edge.chosen { stroke: #d62728; stroke-width: 3; }" in page
    assert ".chosen > .shape { stroke: #d62728; stroke-width: 2.5; }" in page


def test_tooltip_holds_chunk_answer_and_statistics() -> None:
    tree = unjudged_tree()
    tree["nodes"][2].update(chunk=" the end", answer="a whole answer", prior=0.125, entropy=2.5)
    title = node_groups(tree_svg(tree_to_html(tree)))[2].find(SVG + "title").text

    for expected in ("' the end'", "a whole answer", "prior: 0.1250", "entropy: 2.500",
                     "finish_reason: stop", "eos_value: 0.300", "not judged yet"):
        assert expected in title


def test_hostile_text_is_escaped_everywhere() -> None:
    page = tree_to_html(hostile_tree())

    assert "<script" not in page
    assert "alert(1)" in page  # the text survives, only as text
    assert "&lt;/svg&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # The returned answer is shown above the picture, escaped.
    assert "<pre>&lt;/svg&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "🙂🇫🇷 مرحبا بالعالم" in page


def test_characters_xml_forbids_are_replaced() -> None:
    page = tree_to_html(hostile_tree())

    assert "\x00" not in page and "\x1b" not in page
    page.encode("utf-8")  # a lone surrogate would fail here
    title = node_groups(tree_svg(page))[2].find(SVG + "title").text
    assert title.endswith("\ufffd[31m\ufffd")


def test_deep_chain_does_not_hit_the_recursion_limit() -> None:
    nodes = [make_node(0, None)] + [make_node(i, i - 1, "x") for i in range(1, 1500)]
    svg = tree_svg(tree_to_html(make_tree(nodes)))

    assert len(shapes(svg)) == 1500


def centre_x(group: ET.Element) -> float:
    circle = group.find(SVG + "circle")
    if circle is not None:
        return float(circle.get("cx"))
    square = group.find(SVG + "rect")
    return float(square.get("x")) + float(square.get("width")) / 2


def test_parents_are_centred_over_their_children() -> None:
    groups = node_groups(tree_svg(tree_to_html(chosen_tree())))
    x = {node_id: centre_x(group) for node_id, group in groups.items()}

    assert x[2] > x[1]  # children left to right in list order
    assert x[1] == pytest.approx((x[3] + x[4]) / 2, abs=0.1)
    assert x[0] == pytest.approx((x[1] + x[2]) / 2, abs=0.1)


def test_parent_listed_after_its_child_is_rejected() -> None:
    tree = make_tree([make_node(0, None), make_node(1, 2), make_node(2, 0)])

    with pytest.raises(ValueError, match="parent 2"):
        tree_to_html(tree)


def test_big_tree_renders_fast_and_the_svg_grows_with_it() -> None:
    tree = big_tree(500)
    started = time.perf_counter()
    page = tree_to_html(tree)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.5
    svg = tree_svg(page)
    # Width and height follow the layout: hundreds of leaves, CHAIN_LENGTH rows.
    assert float(svg.get("width")) > 200 * 30 and float(svg.get("height")) > CHAIN_LENGTH * 50
