"""Synthetic exported trees for the tree view, built without models.

`w2s_tree` grows a tree the way W2S-AlignTree does (select by EA-PUCT, expand K
children, back up the max, rank stage-2 candidates, eos-score the finalists),
with made-up chunks and values from a seeded generator, so trees of any size are
cheap and the same every time. The other builders give one tree per strategy and
the odd cases: a fallback answer, hostile text. All return the schema of
`SearchResult.tree_dict()`.
"""

from __future__ import annotations

import math
import random

WORDS = (
    "the room was quiet and clean with a view over the old harbour where boats rocked gently "
    "staff smiled warmly breakfast came late but the coffee was strong beds felt soft comfortable "
    "noise from the street faded after midnight"
).split()
HOSTILE_CHUNK = "</script><script>alert(1)</script><!--"
CONTROL_CHUNK = " bell\x07 nul\x00 esc\x1b[31m"
MAX_DEPTH = 25  # 128 new tokens in chunks of 5
RTL_CHUNK = " \u202egnirts desrever\u202c שלום \u2066iso\u2069"


def settings(**changes) -> dict:
    base = dict(
        strategy="w2s", iterations=100, children=3, chunk_tokens=5, selection="ea-puct", c=2.0, entropy_weight=0.2,
        token_budget=None, parallel_leaves=1, num_select=10, samples=4, beam_width=2, max_new_tokens=128, stop=[],
        temperature=0.7, top_k=50, top_p=1.0, seed=0, beta=1.0, backup="max", terminal_reward="-inf",
        stage2_nonterminal=True, fallback="truncate", timeout=None, partial_answer=False, naive=False,
    )
    return base | changes


def cost(nodes: list[dict], iterations: int = 0) -> dict:
    return {
        "prompt_tokens": 5, "strong_tokens_sampled": 5 * len(nodes), "answer_tokens": 20,
        "strong_tokens_decoded": 6 * len(nodes), "weak_tokens_scored": 10 * len(nodes), "tokens_from_cache": 100,
        "decode_calls": len(nodes), "decode_seconds": 1.25, "iterations": iterations, "steps": iterations,
        "tree_nodes": len(nodes), "seconds": {"select": 0.1, "expand": 1.0, "evaluate": 0.5, "total": 1.7},
    }


def node(i: int, parent: int | None, chunk: str = "", **fields) -> dict:
    return {
        "id": i, "parent": parent, "chunk": chunk, "answer": "", "visits": 1, "value": 0.0, "own_value": 0.0,
        "prior": 0.5, "entropy": 1.0, "terminal": False, "finish_reason": None, "eos_value": None, "chosen": False,
        "selection_score": None, "expanded_at": None, "stage2_score": None, "stage2_rank": None, "final_rank": None,
        "fallback": False, "beam_steps": [],
    } | fields


def finish(nodes: list[dict], prompt: str, strategy: str, source: str, end: int, value: float | None, **extra) -> dict:
    """Fill in answers and the chosen path; wrap the nodes as tree_dict() does."""
    for n in nodes:
        n["answer"] = (nodes[n["parent"]]["answer"] if n["parent"] is not None else "") + n["chunk"]
    i: int | None = end
    while i is not None:
        nodes[i]["chosen"] = True
        i = nodes[i]["parent"]
    end_node = nodes[end]
    return {
        "prompt": prompt, "strategy": strategy, "answer": end_node["answer"],
        "result": {"value": value, "source": source, "finish_reason": end_node["finish_reason"], "stopped": extra.get("stopped")},
        "settings": settings(strategy=strategy, **extra.get("settings", {})),
        "cost": cost(nodes, extra.get("iterations", 0)), "nodes": nodes,
    }


def w2s_tree(size: int = 600, seed: int = 1, children: int = 5, chunk_text=None, with_stage2: bool = True) -> dict:
    """About `size` nodes grown as W2S-AlignTree grows its tree."""
    rng = random.Random(seed)
    c, w, num_select = 2.0, 0.2, 10
    nodes = [node(0, None, visits=0, value=0.0, own_value=None, prior=1.0, entropy=1.5)]
    kids: list[list[int]] = [[]]
    iteration = 0

    def chunk(i: int) -> str:
        return chunk_text(i, rng) if chunk_text else " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))

    def score(j: int, p: int) -> float:
        n = nodes[j]
        bonus = c * n["prior"] * math.sqrt(max(nodes[p]["visits"], 1)) / (1 + n["visits"]) * (1 + w * (nodes[p]["entropy"] or 0))
        return (n["value"] if n["value"] is not None else -math.inf) + bonus

    while len(nodes) + children <= size and iteration < 20 * size:
        path = [0]
        while kids[path[-1]] and not nodes[path[-1]]["terminal"]:
            p = path[-1]
            path.append(max(kids[p], key=lambda j: score(j, p)))
        leaf = path[-1]
        iteration += 1
        if not nodes[leaf]["terminal"]:
            nodes[leaf]["expanded_at"] = iteration
            depth = len(path)
            for k in range(children):
                i = len(nodes)
                at_length = depth >= MAX_DEPTH  # max_new_tokens / chunk_tokens, as a real search stops
                terminal = at_length or rng.random() < min(0.5, 0.0015 * depth * depth)
                text = chunk(i) + ("." if terminal and not at_length else "")
                value = round(rng.gauss(depth * 0.3, 1.5), 4)
                nodes.append(node(i, leaf, text, visits=1, value=None if terminal else value, own_value=None if terminal else value,
                                  prior=round(rng.uniform(0.05, 0.9), 4), entropy=round(rng.uniform(0.2, 4.0), 3),
                                  terminal=terminal, finish_reason=("length" if at_length else "eos") if terminal else None))
                kids.append([])
                kids[leaf].append(i)
        for p in reversed(path):
            nodes[p]["visits"] += 1
            values = [nodes[j]["value"] for j in kids[p] if nodes[j]["value"] is not None]
            if kids[p]:
                nodes[p]["value"] = max(values) if values else None
    for j in range(1, len(nodes)):
        p = nodes[j]["parent"]
        nodes[j]["selection_score"] = None if nodes[j]["value"] is None else round(score(j, p), 4)
    candidates = [j for j in range(1, len(nodes)) if not nodes[j]["terminal"] and any(nodes[k]["terminal"] for k in kids[j])]
    if not with_stage2 or not candidates:
        end = 0
        while kids[end]:
            end = max(kids[end], key=lambda j: nodes[j]["value"] if nodes[j]["value"] is not None else -math.inf)
        return finish(nodes, "The hotel room was", "w2s", "fallback_truncated", end, nodes[end]["value"], iterations=iteration)

    def rank(j: int) -> float:
        return nodes[j]["own_value"] + c * nodes[j]["prior"] * math.sqrt(nodes[nodes[j]["parent"]]["visits"]) / (1 + nodes[j]["visits"])

    ranked = sorted(candidates, key=rank, reverse=True)
    for place, j in enumerate(ranked, start=1):
        nodes[j]["stage2_score"], nodes[j]["stage2_rank"] = round(rank(j), 4), place
    finalists = [k for j in ranked[:num_select] for k in kids[j]]
    for k in finalists:
        nodes[k]["eos_value"] = round(rng.gauss(3.0, 2.0), 4)
    finalists.sort(key=lambda k: nodes[k]["eos_value"], reverse=True)
    for place, k in enumerate(finalists, start=1):
        nodes[k]["final_rank"] = place
    end = finalists[0]
    return finish(nodes, "The hotel room was", "w2s", "stage2", end, nodes[end]["eos_value"], iterations=iteration)


def tiny_tree() -> dict:
    """Root, two children, one finished grandchild: the answer."""
    nodes = [
        node(0, None, visits=3, value=0.75, prior=1.0, expanded_at=1),
        node(1, 0, " Hello", visits=2, value=0.75, own_value=0.5, expanded_at=2, stage2_score=1.1, stage2_rank=1, selection_score=1.9),
        node(2, 0, " Hi", visits=1, value=0.25, own_value=0.25, selection_score=0.9),
        node(3, 1, " there.", visits=1, value=None, own_value=None, terminal=True, finish_reason="eos", eos_value=0.9, final_rank=1),
        node(4, 1, " world", visits=1, value=0.75, own_value=0.75, eos_value=0.4, final_rank=2, selection_score=2.0),
    ]
    return finish(nodes, "Say hi", "w2s", "stage2", 3, 0.9, iterations=2)


def hostile_tree() -> dict:
    """Chunks that try to end the script, control characters, direction overrides,
    the chosen path and a rejected sibling both hostile."""
    def text(i: int, rng: random.Random) -> str:
        return (HOSTILE_CHUNK, CONTROL_CHUNK, RTL_CHUNK, " plain & \"quoted\" 'text'")[i % 4]

    tree = w2s_tree(60, seed=3, chunk_text=text)
    tree["prompt"] = HOSTILE_CHUNK + RTL_CHUNK
    return tree


def fallback_tree() -> dict:
    """No stage-2 candidate: the best path, finished by the fallback (its last nodes marked)."""
    tree = w2s_tree(40, seed=4, with_stage2=False)
    nodes = tree["nodes"]
    end = next(n for n in reversed(nodes) if n["chosen"])["id"]
    for k, text in enumerate((" and then", " it ended.")):
        i = len(nodes)
        nodes.append(node(i, end, text, visits=1, value=2.0 + k, own_value=2.0 + k, eos_value=2.0 + k if k else None,
                          terminal=k == 1, finish_reason="eos" if k else None, fallback=True))
        nodes[end]["expanded_at"] = tree["cost"]["iterations"] + 1
        end = i
    for n in nodes:
        n["chosen"] = False
    return finish(nodes, tree["prompt"], "w2s", "fallback_finished", end, 3.0, iterations=tree["cost"]["iterations"],
                  settings={"fallback": "finish"})


def bon_tree(samples: int = 6) -> dict:
    rng = random.Random(6)
    nodes = [node(0, None, visits=0, value=0.0, prior=1.0, expanded_at=1)]
    for i in range(1, samples + 1):
        value = round(rng.gauss(2, 2), 4)
        text = " " + " ".join(rng.choice(WORDS) for _ in range(12)) + "."
        nodes.append(node(i, 0, text, visits=1, value=value, own_value=value, eos_value=value, terminal=True, finish_reason="eos"))
    best = max(range(1, samples + 1), key=lambda i: nodes[i]["value"])
    return finish(nodes, "The film was", "bon", "best_of_n", best, nodes[best]["value"], settings={"samples": samples})


def cbs_tree(width: int = 2, k: int = 3, steps: int = 6) -> dict:
    """Beam search as _cbs runs it: W x K chunks first, then K per unfinished beam."""
    rng = random.Random(7)
    nodes = [node(0, None, visits=0, value=0.0, prior=1.0)]
    beams = [0]
    for step in range(1, steps + 1):
        pool = []
        for b in beams:
            if nodes[b]["terminal"]:
                pool.append(b)
                continue
            nodes[b]["expanded_at"] = step
            for _ in range(width * k if b == 0 else k):
                i = len(nodes)
                terminal = step == steps or rng.random() < 0.1 * step
                value = round(rng.gauss(step * 0.5, 1), 4)
                nodes.append(node(i, b, " " + rng.choice(WORDS) + ("." if terminal else ""), visits=1, value=value, own_value=value,
                                  eos_value=value if terminal else None, terminal=terminal, finish_reason="eos" if terminal else None))
                pool.append(i)
        beams = sorted(dict.fromkeys(pool), key=lambda i: nodes[i]["value"], reverse=True)[:width]
        for b in beams:
            nodes[b]["beam_steps"].append(step)
        if all(nodes[b]["terminal"] for b in beams):
            break
    return finish(nodes, "The film was", "cbs", "beam", beams[0], nodes[beams[0]]["value"], iterations=step,
                  settings={"beam_width": width, "children": k})


def base_tree() -> dict:
    nodes = [node(0, None, visits=0, value=0.0, prior=1.0, expanded_at=1),
             node(1, 0, " was long and slow, but the ending saved it.", visits=0, value=1.5, eos_value=1.5, terminal=True, finish_reason="eos")]
    return finish(nodes, "The film was", "base", "sample", 1, 1.5)


def chain_tree(depth: int = 150) -> dict:
    """A chosen path `depth` chunks long (one token per chunk, a long answer), one
    rejected sibling at each depth."""
    nodes = [node(0, None, visits=depth, value=0.0, prior=1.0, expanded_at=1)]
    parent = 0
    for d in range(1, depth + 1):
        chosen = len(nodes)
        last = d == depth
        nodes.append(node(chosen, parent, f" w{d}" + ("." if last else ""), visits=depth - d + 1, value=d / 10,
                          terminal=last, finish_reason="eos" if last else None, expanded_at=None if last else d + 1))
        nodes.append(node(chosen + 1, parent, f" x{d}", visits=1, value=-d / 10))
        parent = chosen
    return finish(nodes, "Count", "w2s", "fallback_truncated", parent, depth / 10, iterations=depth)
