"""A fully local RAG pipeline: a keyword retriever over a few documents, a chat
prompt, and the aligned chat model (the "chat" preset: SmolLM2-135M-Instruct
answers, steered toward a warm, encouraging tone). No hosted API anywhere.

    python examples/rag_pipeline.py
"""

import re

from _budget import ITERATIONS, THREADS
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough

from w2s_langchain.chat_models import ChatW2SAligned

DOCUMENTS = [
    Document("The town library opens at 9 am on weekdays and at 10 am on Saturdays. It is closed on Sundays."),
    Document("The swimming pool offers free lessons for children every Wednesday afternoon."),
    Document("Bus line 4 runs from the station to the library every 20 minutes."),
    Document("The farmers' market takes place on the main square every Saturday morning."),
]


class KeywordRetriever(BaseRetriever):
    """Ranks documents by the words they share with the question."""

    documents: list[Document]
    k: int = 2

    def _get_relevant_documents(self, query, *, run_manager):
        words = set(re.findall(r"\w+", query.lower()))
        overlap = lambda d: len(words & set(re.findall(r"\w+", d.page_content.lower())))  # noqa: E731
        return sorted(self.documents, key=overlap, reverse=True)[: self.k]


prompt = ChatPromptTemplate.from_messages(
    [("system", "Answer from the context only.\nContext:\n{context}"), ("human", "{question}")]
)
chat = ChatW2SAligned(preset="chat", iterations=ITERATIONS, max_tokens=48, n_threads=THREADS)
chain = (
    {"context": KeywordRetriever(documents=DOCUMENTS) | (lambda docs: "\n".join(d.page_content for d in docs)),
     "question": RunnablePassthrough()}
    | prompt
    | chat
    | StrOutputParser()
)

print(chain.invoke("When does the library open on Saturday?"))
