"""Several prompts at once with `abatch`: the searches run in worker threads
(one at a time per set of models), so the event loop stays free.

    python examples/async_batch.py
"""

import asyncio

from _budget import ITERATIONS, THREADS

from w2s_langchain.llms import W2SAlignedLLM

OPENINGS = ["The train ride was", "My new phone is", "The concert last night"]


async def main():
    llm = W2SAlignedLLM(preset="sentiment", iterations=ITERATIONS, chunk_tokens=4, max_tokens=32, n_threads=THREADS)
    for opening, answer in zip(OPENINGS, await llm.abatch(OPENINGS)):
        print(f"{opening}{answer}\n")


asyncio.run(main())
