"""A component whose strong model a llama-server serves, the weak ones in process."""

from __future__ import annotations

from w2s_langchain.llms import W2SAlignedLLM

PLAIN = {"format": "plain"}


def served_component(tiny_models, url: str, **fields) -> W2SAlignedLLM:
    """The strong model at `url`, tiny_a / tiny_b as the weak pair, plain prompts,
    one thread; `fields` set the search."""
    settings = dict(
        strong=url, weak=str(tiny_models.tiny_a), weak_ref=str(tiny_models.tiny_b),
        strong_prompt=PLAIN, weak_prompt=PLAIN, weak_ref_prompt=PLAIN, n_threads=1, seed=3,
    )
    return W2SAlignedLLM(**{**settings, **fields})
