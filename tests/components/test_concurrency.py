"""Many callers on one component at once, on the tiny models (real llama.cpp):
8 threads, or 8 asyncio tasks, mixing invoke, stream and batch with their own
prompts and settings. Each caller must get, whole, the answer its call gives
alone, and nothing may stay held in the KV cache afterwards."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from support.components import PROMPT, nothing_held

@dataclass(frozen=True)
class Call:
    """One caller's call: how, on which prompts (several for a batch), with which settings."""

    how: str  # "invoke", "stream" or "batch"
    prompts: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)


# Eight callers. Streams get long answers, so that they come in several pieces
# and a mix-up between callers would show inside one.
CALLS = [
    Call("invoke", (PROMPT,)),
    Call("stream", ("The cat sat",), {"iterations": 3, "max_new_tokens": 64}),
    Call("batch", ("Hello there", "Once upon a time"), {"seed": 7}),
    Call("invoke", ("A long way from home",), {"strategy": "bon", "samples": 2}),
    Call("stream", (PROMPT,), {"temperature": 1.3, "seed": 1, "max_new_tokens": 64}),
    Call("batch", ("The cat sat", "The dog ran"), {"strategy": "cbs", "beam_width": 2}),
    Call("invoke", ("The dog ran",), {"children": 2, "chunk_tokens": 2, "stop": ["e"]}),
    Call("stream", ("Hello there",), {"strategy": "base", "seed": 1, "stop": ["!?"], "max_new_tokens": 64}),
]


def text(output) -> str:
    """The answer's text: an LLM answers with a string, a chat model with a message."""
    return output if isinstance(output, str) else output.content


def run(component, call: Call) -> list[list[str]]:
    """What the caller receives: for each prompt, the answer in the pieces it came in."""
    if call.how == "batch":
        return [[text(out)] for out in component.batch(list(call.prompts), **call.settings)]
    if call.how == "stream":
        return [[text(piece) for piece in component.stream(call.prompts[0], **call.settings)]]
    return [[text(component.invoke(call.prompts[0], **call.settings))]]


async def arun(component, call: Call) -> list[list[str]]:
    """`run` with the async forms."""
    if call.how == "batch":
        return [[text(out)] for out in await component.abatch(list(call.prompts), **call.settings)]
    if call.how == "stream":
        return [[text(piece) async for piece in component.astream(call.prompts[0], **call.settings)]]
    return [[text(await component.ainvoke(call.prompts[0], **call.settings))]]


def streamed_in_several_pieces(answers: list[list[list[str]]]) -> bool:
    return all(len(pieces) > 1 for call, (pieces, *_) in zip(CALLS, answers) if call.how == "stream")


def run_in_threads(calls: list[tuple[Any, Call]]) -> list[list[list[str]]]:
    """Each (component, call) in a thread of its own, all released at once."""
    start = threading.Barrier(len(calls))

    def caller(component, call):
        start.wait()
        return run(component, call)

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(caller, component, call) for component, call in calls]
        return [f.result() for f in futures]


@pytest.fixture(params=["llm", "chat"])
def component(request, make_llm, make_chat, tiny_models):
    # tiny_b's vocabulary has many tokens that start with a space: its answers
    # have words, and streams come in several pieces.
    return make_llm(strong=str(tiny_models.tiny_b)) if request.param == "llm" else make_chat()


def test_threads_calling_one_component_each_get_their_answer_alone(component):
    alone = [run(component, call) for call in CALLS]
    assert streamed_in_several_pieces(alone)
    together = run_in_threads([(component, call) for call in CALLS])
    assert together == alone  # every piece of every answer
    assert nothing_held(component)


async def test_async_tasks_calling_one_component_each_get_their_answer_alone(component):
    alone = [await arun(component, call) for call in CALLS]
    assert streamed_in_several_pieces(alone)
    together = await asyncio.gather(*(arun(component, call) for call in CALLS))
    assert together == alone
    assert nothing_held(component)


@pytest.mark.parametrize("contexts", ["shared", "own"])
def test_two_components_on_the_same_models_in_threads_at_once(make_llm, contexts):
    # The same runtime settings share one set of contexts; another n_ctx gets
    # contexts of its own on the same weights, so two searches really run at once.
    first = make_llm()
    second = make_llm(iterations=4, n_ctx=512 if contexts == "shared" else 256)
    calls = [(first if i % 2 else second, call) for i, call in enumerate(CALLS)]
    alone = [run(component, call) for component, call in calls]
    assert (first._aligner is second._aligner) == (contexts == "shared")
    assert run_in_threads(calls) == alone
    assert nothing_held(first) and nothing_held(second)


def test_callers_waiting_for_a_lane_get_it_in_the_order_they_came(tiny_models):
    # 12 threads on one slot: one thread got 3 calls in a row while others waited.
    import time

    from w2s_langchain.service.aligner import Aligner, AlignerConfig, Role

    aligner = Aligner(AlignerConfig(Role(str(tiny_models.tiny_c)), Role(str(tiny_models.tiny_a)), Role(str(tiny_models.tiny_b))))
    lane = object()  # what a lane holds does not matter here: only who gets it when
    aligner._models, aligner._lanes = lane, 1
    aligner._give_back(lane)
    taken = aligner._take_lane(lambda: None)  # held while the callers line up
    order: list[int] = []

    def caller(i: int) -> None:
        for _ in range(2):  # gives the lane back, then asks again at once
            held = aligner._take_lane(lambda: None)
            order.append(i)
            aligner._give_back(held)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # they arrive in this order
    aligner._give_back(taken)
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4, 5] * 2
