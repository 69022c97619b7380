"""Render an exported search tree as one self-contained HTML page.

``tree_to_html`` takes the exporter's dict (prompt, strategy, answer and a flat
list of nodes, parents before children) and returns a page with the prompt, the
returned answer, a legend and the tree drawn as inline SVG: root at the top, one
row per depth, leaves side by side. Fill shows a node's value, size its visits,
squares are finished answers and the path of the returned answer is drawn in red.
Hovering a node shows its chunk, answer and statistics (an SVG ``<title>``).

The page needs no scripts, fonts or network, and the same tree always gives the
same string. All text is model output, so every piece is cleaned and escaped.
The markup is also well-formed XML, so the SVG can be cut out and reused.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["tree_to_html"]

# --- drawing constants (pixels) ------------------------------------------------

LEVEL_HEIGHT = 54
MIN_SLOT_WIDTH = 30
LABEL_FONT_SIZE = 9
# Rough width of a digit at LABEL_FONT_SIZE in a sans-serif font: slots are
# widened so neighbouring labels do not run into each other.
LABEL_CHAR_WIDTH = 5.5
LABEL_PADDING = 8
RULER_WIDTH = 40  # left strip with the depth numbers
MARGIN = 16
# Wider trees also get a scaled-down copy on top, so their shape is seen at once.
OVERVIEW_MIN_WIDTH = 1000
RADIUS_MIN = 3.0
RADIUS_MAX = 9.0
# A square with side r * sqrt(pi) has the area of a circle of radius r, so
# terminal nodes do not look heavier than open ones with the same visits.
SQUARE_SIDE_PER_RADIUS = math.sqrt(math.pi)

# --- colours -----------------------------------------------------------------

# Viridis at five stops: ordered dark to light, readable for colour-blind
# viewers, and it never comes near the grey of unjudged nodes or the red path.
VALUE_RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
UNJUDGED_FILL = "#bdbdbd"
CHOSEN_COLOUR = "#d62728"

CSS = f"""
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 8px; }}
h2 {{ font-size: 15px; margin: 14px 0 4px; }}
pre {{ white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6;
      border: 1px solid #ddd; padding: 8px; margin: 0; max-height: 16em; overflow: auto; }}
.facts span {{ margin-right: 18px; }}
.overview {{ max-width: 100%; height: auto; max-height: 40vh; border: 1px solid #ddd; }}
.scroll {{ overflow: auto; max-height: 85vh; border: 1px solid #ddd; margin-top: 8px; }}
svg text {{ font-family: sans-serif; }}
/* Edges keep their width in the scaled-down overview. */
.edge {{ stroke: #a8a8a8; stroke-width: 1; vector-effect: non-scaling-stroke; }}
.edge.chosen {{ stroke: {CHOSEN_COLOUR}; stroke-width: 3; }}
.shape {{ stroke: #333; stroke-width: 1; }}
.chosen > .shape {{ stroke: {CHOSEN_COLOUR}; stroke-width: 2.5; }}
.node {{ cursor: help; }}
.node:hover > .shape {{ stroke-width: 3.5; }}
/* A white halo, so edges pass behind the labels instead of through them. */
.label {{ font-size: {LABEL_FONT_SIZE}px; fill: #444; text-anchor: middle;
          paint-order: stroke; stroke: #fff; stroke-width: 3px; }}
.chosen > .label {{ fill: {CHOSEN_COLOUR}; font-weight: bold; }}
.ruler {{ font-size: 10px; fill: #999; }}
.ruler-line {{ stroke: #eee; stroke-width: 1; }}
.legend text {{ font-size: 11px; fill: #333; }}
"""

# Characters XML 1.0 forbids (most control characters, lone surrogates,
# U+FFFE/U+FFFF). Model output can contain them; they would break the page.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def tree_to_html(tree: dict) -> str:
    """Return one self-contained HTML page that draws the exported search ``tree``."""
    nodes = tree["nodes"]
    layout = _layout(nodes)
    return "\n".join(
        [
            '<!DOCTYPE html>',
            '<html xmlns="http://www.w3.org/1999/xhtml" lang="en">',
            "<head>",
            '<meta charset="utf-8"/>',
            f"<title>Search tree ({_text(tree['strategy'])})</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            _header(tree, layout),
            _legend(_value_bounds(nodes)),
            _overview(layout),
            "<h2>Tree</h2>",
            '<div class="scroll">',
            _tree_svg(nodes, layout),
            "</div>",
            "</body>",
            "</html>",
            "",
        ]
    )


# --- structure and layout ------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where everything goes, in pixels."""

    depth_of: dict[int, int]
    centre_of: dict[int, tuple[float, float]]
    levels: int
    width: float
    height: float


def _layout(nodes: Sequence[dict]) -> _Layout:
    depth_of = _depths(nodes)
    slot_of = _leaf_slots(nodes, _children(nodes))
    slot_width = _slot_width(nodes)
    levels = max(depth_of.values(), default=0) + 1
    slots = int(max(slot_of.values(), default=0)) + 1
    centre_of = {
        node_id: (RULER_WIDTH + (slot + 0.5) * slot_width, _row_y(depth_of[node_id]))
        for node_id, slot in slot_of.items()
    }
    return _Layout(
        depth_of=depth_of,
        centre_of=centre_of,
        levels=levels,
        width=RULER_WIDTH + slots * slot_width + MARGIN,
        height=_row_y(levels - 1) + LEVEL_HEIGHT,
    )


def _row_y(depth: int) -> float:
    return MARGIN + RADIUS_MAX + depth * LEVEL_HEIGHT


def _slot_width(nodes: Sequence[dict]) -> float:
    """Slot wide enough for the longest label, so labels of neighbours don't touch."""
    labels = [str(node["visits"]) for node in nodes]
    labels += [_format_value(node["value"]) for node in nodes]
    longest = max((len(label) for label in labels), default=0)
    return max(MIN_SLOT_WIDTH, longest * LABEL_CHAR_WIDTH + LABEL_PADDING)


def _depths(nodes: Sequence[dict]) -> dict[int, int]:
    """Depth of every node id; checks that parents come before their children."""
    depth_of: dict[int, int] = {}
    for node in nodes:
        node_id, parent = node["id"], node["parent"]
        if node_id in depth_of:
            raise ValueError(f"node id {node_id} appears twice")
        if parent is not None and parent not in depth_of:
            raise ValueError(f"node {node_id}: parent {parent} must come before it")
        depth_of[node_id] = 0 if parent is None else depth_of[parent] + 1
    return depth_of


def _children(nodes: Sequence[dict]) -> dict[int, list[int]]:
    """Children of every node id, in the order the exporter listed them."""
    children_of: dict[int, list[int]] = {node["id"]: [] for node in nodes}
    for node in nodes:
        if node["parent"] is not None:
            children_of[node["parent"]].append(node["id"])
    return children_of


def _preorder(nodes: Sequence[dict], children_of: dict[int, list[int]]) -> Iterator[int]:
    """Node ids depth first, children left to right (a stack, not recursion:
    a chain of a thousand chunks would pass Python's recursion limit)."""
    stack = [node["id"] for node in reversed(nodes) if node["parent"] is None]
    while stack:
        node_id = stack.pop()
        yield node_id
        stack.extend(reversed(children_of[node_id]))


def _leaf_slots(nodes: Sequence[dict], children_of: dict[int, list[int]]) -> dict[int, float]:
    """Horizontal position of every node, in slots: leaves take the next free slot
    from left to right, a parent sits midway between its first and last child."""
    leaves = (node_id for node_id in _preorder(nodes, children_of) if not children_of[node_id])
    slot_of: dict[int, float] = {leaf: float(slot) for slot, leaf in enumerate(leaves)}
    # Children come after their parents in the list, so walking it backwards
    # places every child before the parent that is centred over it.
    for node in reversed(nodes):
        kids = children_of[node["id"]]
        if kids:
            slot_of[node["id"]] = (slot_of[kids[0]] + slot_of[kids[-1]]) / 2
    return slot_of


# --- what a node looks like -----------------------------------------------------


def _finite_value(node: dict) -> float | None:
    value = node["value"]
    return value if value is not None and math.isfinite(value) else None


def _value_bounds(nodes: Sequence[dict]) -> tuple[float, float] | None:
    """Lowest and highest finite value, or None when no node has one yet."""
    values = [v for v in map(_finite_value, nodes) if v is not None]
    return (min(values), max(values)) if values else None


def _fill(value: float | None, bounds: tuple[float, float] | None) -> str:
    if value is None or bounds is None:
        return UNJUDGED_FILL
    low, high = bounds
    # With a single distinct value there is no scale: show the middle colour.
    share = 0.5 if high == low else (value - low) / (high - low)
    return _ramp_colour(share)


def _ramp_colour(share: float) -> str:
    """Colour at ``share`` (0..1) along VALUE_RAMP, interpolated linearly."""
    position = min(max(share, 0.0), 1.0) * (len(VALUE_RAMP) - 1)
    index = min(int(position), len(VALUE_RAMP) - 2)
    fraction = position - index
    start, end = VALUE_RAMP[index], VALUE_RAMP[index + 1]
    red, green, blue = (round(a + (b - a) * fraction) for a, b in zip(start, end))
    return f"#{red:02x}{green:02x}{blue:02x}"


def _radius(visits: int, max_visits: int) -> float:
    """Radius grows with log(1 + visits): root visits dwarf leaf visits otherwise."""
    if max_visits <= 0:
        return RADIUS_MIN
    share = math.log1p(max(visits, 0)) / math.log1p(max_visits)
    return RADIUS_MIN + (RADIUS_MAX - RADIUS_MIN) * share


def _format_value(value: float | None) -> str:
    return "−∞" if value is None else f"{value:.2f}"


def _format_optional(number: float | None, digits: int) -> str:
    return "–" if number is None else f"{number:.{digits}f}"


def _tooltip(node: dict, depth: int) -> str:
    """Everything about a node, one fact a line, for the hover text."""
    chosen = " — on the returned answer's path" if node["chosen"] else ""
    unjudged = " (finished, not judged yet)" if node["value"] is None else ""
    return "\n".join(
        [
            f"node {node['id']}, depth {depth}{chosen}",
            f"visits: {node['visits']}",
            f"value: {_format_value(node['value'])}{unjudged}",
            f"prior: {node['prior']:.4f}",
            f"entropy: {_format_optional(node['entropy'], 3)}",
            f"terminal: {'yes' if node['terminal'] else 'no'}",
            f"finish_reason: {node['finish_reason'] or '–'}",
            f"eos_value: {_format_optional(node['eos_value'], 3)}",
            "",
            # repr shows the chunk's exact edges and whitespace ('\n', '  ').
            f"chunk: {node['chunk']!r}",
            "",
            "answer:",
            node["answer"],
        ]
    )


# --- SVG and HTML pieces ---------------------------------------------------------


def _text(value: object) -> str:
    """``value`` as text that is safe anywhere in the page, markup or attribute."""
    return html.escape(_NOT_XML_CHAR.sub("\ufffd", str(value)), quote=True)


def _px(number: float) -> str:
    return f"{number:.1f}"


def _tree_svg(nodes: Sequence[dict], layout: _Layout) -> str:
    bounds = _value_bounds(nodes)
    max_visits = max((node["visits"] for node in nodes), default=0)
    width, height = _px(layout.width), _px(layout.height)
    parts = [
        f'<svg class="tree" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        # The overview draws this group again, scaled down.
        '<g id="tree-drawing">',
    ]
    parts += _depth_ruler(layout.levels, layout.width)
    parts += _edges(nodes, layout.centre_of)
    for node in nodes:
        x, y = layout.centre_of[node["id"]]
        radius = _radius(node["visits"], max_visits)
        fill = _fill(_finite_value(node), bounds)
        parts.append(_node_group(node, layout.depth_of[node["id"]], x, y, radius, fill))
    parts += ["</g>", "</svg>"]
    return "\n".join(parts)


def _overview(layout: _Layout) -> str:
    """The whole tree shrunk to the page width; nothing for trees that fit anyway."""
    if layout.width <= OVERVIEW_MIN_WIDTH:
        return ""
    width, height = _px(layout.width), _px(layout.height)
    return (
        "<h2>Overview</h2>\n"
        f'<svg class="overview" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        '<use href="#tree-drawing"/></svg>'
    )


def _depth_ruler(levels: int, width: float) -> list[str]:
    """A faint line and number per depth, so deep rows can be told apart."""
    parts = []
    for depth in range(levels):
        y = _row_y(depth)
        parts.append(
            f'<line class="ruler-line" x1="{RULER_WIDTH}" y1="{_px(y)}" x2="{_px(width)}" y2="{_px(y)}"/>'
        )
        parts.append(f'<text class="ruler" x="4" y="{_px(y + 3)}">{depth}</text>')
    return parts


def _edges(nodes: Sequence[dict], centre_of: dict[int, tuple[float, float]]) -> list[str]:
    """One line per parent-child pair; the chosen path last so it lies on top."""
    chosen_ids = {node["id"] for node in nodes if node["chosen"]}
    children = [node for node in nodes if node["parent"] is not None]
    parts = []
    for child in sorted(children, key=lambda node: node["chosen"]):
        x1, y1 = centre_of[child["parent"]]
        x2, y2 = centre_of[child["id"]]
        on_path = child["id"] in chosen_ids and child["parent"] in chosen_ids
        css_class = "edge chosen" if on_path else "edge"
        parts.append(
            f'<line class="{css_class}" x1="{_px(x1)}" y1="{_px(y1)}" x2="{_px(x2)}" y2="{_px(y2)}"/>'
        )
    return parts


def _node_group(node: dict, depth: int, x: float, y: float, radius: float, fill: str) -> str:
    """A node's shape, its two labels (visits over value) and its hover text."""
    classes = ["node"]
    if node["chosen"]:
        classes.append("chosen")
    if node["terminal"]:
        classes.append("terminal")
    label_y = y + RADIUS_MAX + LABEL_FONT_SIZE + 1
    return (
        f'<g class="{" ".join(classes)}" id="node-{node["id"]}">'
        f"<title>{_text(_tooltip(node, depth))}</title>"
        f"{_shape(node['terminal'], x, y, radius, fill)}"
        f'<text class="label" x="{_px(x)}" y="{_px(label_y)}">{node["visits"]}</text>'
        f'<text class="label" x="{_px(x)}" y="{_px(label_y + LABEL_FONT_SIZE + 1)}">'
        f"{_text(_format_value(node['value']))}</text>"
        "</g>"
    )


def _shape(terminal: bool, x: float, y: float, radius: float, fill: str) -> str:
    """A square for a finished answer, a circle for a chunk the search can extend."""
    if terminal:
        side = radius * SQUARE_SIDE_PER_RADIUS
        return (
            f'<rect class="shape" x="{_px(x - side / 2)}" y="{_px(y - side / 2)}" '
            f'width="{_px(side)}" height="{_px(side)}" fill="{fill}"/>'
        )
    return f'<circle class="shape" cx="{_px(x)}" cy="{_px(y)}" r="{_px(radius)}" fill="{fill}"/>'


def _header(tree: dict, layout: _Layout) -> str:
    nodes = tree["nodes"]
    root_visits = sum(node["visits"] for node in nodes if node["parent"] is None)
    finished = sum(1 for node in nodes if node["terminal"])
    facts = [
        f"strategy: <b>{_text(tree['strategy'])}</b>",
        f"nodes: {len(nodes)}",
        f"depth: {layout.levels - 1}",
        f"root visits: {root_visits}",
        f"finished answers: {finished}",
        _jump_links(nodes),
    ]
    return "\n".join(
        [
            "<h1>Search tree</h1>",
            '<div class="facts">' + "".join(f"<span>{fact}</span>" for fact in facts) + "</div>",
            "<h2>Prompt</h2>",
            f"<pre>{_text(tree['prompt'])}</pre>",
            "<h2>Returned answer</h2>",
            f"<pre>{_text(tree['answer'])}</pre>",
        ]
    )


def _jump_links(nodes: Sequence[dict]) -> str:
    """Links that scroll the picture to the root and to the returned answer's last
    node: a wide tree opens on its left edge, far from both."""
    targets = [(node["id"], "root") for node in nodes if node["parent"] is None][:1]
    chosen = [node["id"] for node in nodes if node["chosen"]]
    if chosen:
        # Parents come first, so the last chosen node ends the path.
        targets.append((chosen[-1], "end of the returned answer"))
    links = " · ".join(f'<a href="#node-{node_id}">{name}</a>' for node_id, name in targets)
    return f"jump to: {links}" if links else ""


def _legend(bounds: tuple[float, float] | None) -> str:
    """Key to fill, shape, size and the red path, as a small SVG of its own."""
    shares = [i / (len(VALUE_RAMP) - 1) for i in range(len(VALUE_RAMP))]
    stops = "".join(f'<stop offset="{share:.2f}" stop-color="{_ramp_colour(share)}"/>' for share in shares)
    low, high = ("–", "–") if bounds is None else (f"{bounds[0]:.2f}", f"{bounds[1]:.2f}")
    side = RADIUS_MAX * SQUARE_SIDE_PER_RADIUS
    return "\n".join(
        [
            "<h2>Legend</h2>",
            '<svg class="legend" xmlns="http://www.w3.org/2000/svg" '
            'width="900" height="46" viewBox="0 0 900 46">',
            f'<defs><linearGradient id="value-ramp">{stops}</linearGradient></defs>',
            # value scale
            '<rect x="4" y="6" width="130" height="12" fill="url(#value-ramp)" stroke="#333"/>',
            f'<text x="4" y="32">{_text(low)}</text>',
            f'<text x="134" y="32" text-anchor="end">{_text(high)}</text>',
            '<text x="69" y="44" text-anchor="middle">value (fill)</text>',
            # unjudged
            f'<circle class="shape" cx="168" cy="12" r="{RADIUS_MAX}" fill="{UNJUDGED_FILL}"/>',
            '<text x="182" y="16">−∞, not judged yet</text>',
            # terminal
            f'<rect class="shape" x="{_px(318 - side / 2)}" y="{_px(12 - side / 2)}" '
            f'width="{_px(side)}" height="{_px(side)}" fill="{UNJUDGED_FILL}"/>',
            '<text x="332" y="16">finished answer (terminal)</text>',
            # visits
            f'<circle class="shape" cx="500" cy="12" r="{RADIUS_MIN}" fill="#fff"/>',
            f'<circle class="shape" cx="516" cy="12" r="{RADIUS_MAX}" fill="#fff"/>',
            '<text x="532" y="16">size: visits (log scale)</text>',
            # chosen path
            '<line class="edge chosen" x1="686" y1="12" x2="712" y2="12"/>',
            '<g class="chosen"><circle class="shape" cx="720" cy="12" r="6" fill="#fff"/></g>',
            '<text x="734" y="16">path of the returned answer</text>',
            '<text x="168" y="40">under each node: visits, then value · hover a node for its chunk, '
            "answer, prior, entropy</text>",
            "</svg>",
        ]
    )
