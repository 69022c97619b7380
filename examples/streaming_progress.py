"""Streaming with a progress display: the search reports its iterations as
"w2s_progress" custom events, then the answer arrives in pieces.

    python examples/streaming_progress.py
"""

import sys

from _budget import ITERATIONS, THREADS
from langchain_core.callbacks import BaseCallbackHandler

from w2s_langchain.llms import W2SAlignedLLM


class ProgressBar(BaseCallbackHandler):
    def on_custom_event(self, name, data, **kwargs):
        if name == "w2s_progress":
            done = int(30 * data["done"] / data["total"])
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {data['done']}/{data['total']} {data['what']}")
            if data["done"] == data["total"]:
                sys.stderr.write("\n")


llm = W2SAlignedLLM(preset="sentiment", iterations=ITERATIONS, chunk_tokens=4, max_tokens=40, n_threads=THREADS)
opening = "The museum was"
print(opening, end="", flush=True)
for piece in llm.stream(opening, config={"callbacks": [ProgressBar()]}):
    print(piece, end="", flush=True)
print()
