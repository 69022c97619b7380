"""A fully local RAG pipeline: a keyword retriever over the paragraphs of a town
guide, a chat prompt, and the aligned chat model (the "chat" preset:
SmolLM2-135M-Instruct answers, steered toward a warm, encouraging tone). No
hosted API anywhere. The retrieved context makes a prompt of about 1,000 tokens;
the contexts are sized for it before the search starts, so nothing is evicted.

The answer streams in the streaming mode (`commit_every`): the search commits
its answer chunk by chunk, and each chunk is printed when it is committed.

    python examples/rag_pipeline.py
"""

import re
import time
from pathlib import Path

from _budget import ITERATIONS, THREADS
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough

from w2s_langchain.chat_models import ChatW2SAligned

GUIDE = Path(__file__).with_name("town_guide.txt").read_text(encoding="utf-8")
DOCUMENTS = [Document(paragraph) for paragraph in GUIDE.split("\n\n")]


class KeywordRetriever(BaseRetriever):
    """Ranks documents by the words they share with the question."""

    documents: list[Document]
    k: int = 9

    def _get_relevant_documents(self, query, *, run_manager):
        words = set(re.findall(r"\w+", query.lower()))
        overlap = lambda d: len(words & set(re.findall(r"\w+", d.page_content.lower())))  # noqa: E731
        return sorted(self.documents, key=overlap, reverse=True)[: self.k]


prompt = ChatPromptTemplate.from_messages(
    [("system", "Answer from the context only.\nContext:\n{context}"), ("human", "{question}")]
)
# Commit a chunk of the answer every fifth of the search (at least every iteration).
chat = ChatW2SAligned(preset="chat", iterations=ITERATIONS, commit_every=max(1, ITERATIONS // 5), n_threads=THREADS)
chain = (
    {"context": KeywordRetriever(documents=DOCUMENTS) | (lambda docs: "\n\n".join(d.page_content for d in docs)),
     "question": RunnablePassthrough()}
    | prompt
    | chat
    | StrOutputParser()
)

started = time.perf_counter()
first_token = None
for piece in chain.stream("When does the library open on Saturday?"):
    if piece and first_token is None:
        first_token = time.perf_counter() - started
    print(piece, end="", flush=True)
print(f"\n\n(first token after {first_token:.1f} s, answer complete after {time.perf_counter() - started:.1f} s)")
