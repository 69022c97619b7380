"""What the component tests share besides their fixtures (tests/components/conftest.py)."""

from __future__ import annotations

PROMPT = "Once upon a time"
PLAIN = {"format": "plain"}
CHAT = {"format": "chat"}


def nothing_held(llm) -> bool:
    models = llm._aligner._models
    return all(c.n_resident == 0 and c.kv_cells_used() == 0 for c in [models.strong] + models.proxy.contexts)
