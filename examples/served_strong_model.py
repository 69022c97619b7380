"""The strong model on llama.cpp's `llama-server`, the search and the weak models here.

Starts a llama-server with gemma-3-270m on 127.0.0.1 (in production it runs on its
own GPU machine: see docs/serving.md), points the component at its address, and
runs several searches at once: the server batches them across its slots.

    bash .ci/build-llama-server     # once per machine, or put a llama-server on PATH
    python examples/served_strong_model.py
"""

import asyncio

from _budget import ITERATIONS, THREADS

from w2s_langchain.llms import W2SAlignedLLM
from w2s_langchain.engine.local_server import LocalLlamaServer
from w2s_langchain.models.registry import resolve_model

OPENINGS = ["The train ride was", "My new phone is", "The concert last night", "The hotel breakfast"]


async def main():
    with LocalLlamaServer(resolve_model("gemma-3-270m"), parallel=4, ctx=1024, threads=THREADS or 1) as server:
        llm = W2SAlignedLLM(preset="sentiment", strong=server.url, iterations=ITERATIONS, max_tokens=32, n_threads=THREADS)
        answers = await asyncio.gather(*(llm.ainvoke(opening) for opening in OPENINGS))
        for opening, answer in zip(OPENINGS, answers):
            print(f"{opening}{answer}\n")


asyncio.run(main())
