"""A RAG prompt of about 1,000 tokens on the chat preset, through the public
paths a RAG user takes (a LangChain chain, a LlamaIndex query engine): the
contexts are sized for it before the search, so no branch is evicted and read
again (the weak model holds both its roles' prompts in one context)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaged

GUIDE = (Path(__file__).resolve().parents[2] / "examples" / "town_guide.txt").read_text(encoding="utf-8")
QUESTION = "When does the library open on Saturday?"
SMALL = dict(iterations=2, max_tokens=8, n_threads=1)


def test_a_langchain_rag_chain_on_the_chat_preset_evicts_nothing(packaged_models):
    from langchain_core.prompts import ChatPromptTemplate

    from w2s_langchain.chat_models import ChatW2SAligned

    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context only.\nContext:\n{context}"), ("human", "{question}")]
    )
    chat = ChatW2SAligned(preset="chat", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an eviction (or the fear of one) fails the test
        message = (prompt | chat).invoke({"context": GUIDE, "question": QUESTION})
    prompt_tokens = message.usage_metadata["input_tokens"]
    assert prompt_tokens > 1000
    # Each weak role reads its prompt once (the weak model's chat template adds its
    # system message) and the few answer tokens: nothing read again.
    assert message.response_metadata["cost"]["weak_tokens_scored"] < 2 * (prompt_tokens + 40) + 100


def test_a_llamaindex_query_engine_packs_what_a_search_can_use(packaged_models):
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, SummaryIndex

    from w2s_langchain.service.aligner import prompt_room
    from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM

    llm = W2SAlignedLlamaIndexLLM(preset="chat", **SMALL)
    assert llm.metadata.context_window == prompt_room(llm._config) + 8
    engine = SummaryIndex.from_documents([Document(text=GUIDE)]).as_query_engine(llm=llm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        response = engine.query(QUESTION)
    assert response.response and "\ufffd" not in response.response
