"""A LlamaIndex query engine over a few documents, answered by the aligned model
(the "chat" preset). Fully local: a summary index needs no embedding model, and
token counting uses the strong model's own tokenizer.

    pip install "w2s-langchain[llamaindex]"; python examples/llamaindex_query.py
"""

from _budget import ITERATIONS, THREADS
from llama_index.core import Document, Settings, SummaryIndex

from w2s_langchain.llamaindex_llm import W2SAlignedLlamaIndexLLM

llm = W2SAlignedLlamaIndexLLM(preset="chat", iterations=ITERATIONS, max_tokens=48, n_threads=THREADS)
Settings.llm = llm
Settings.tokenizer = lambda text: [0] * llm.get_num_tokens(text)  # only the count matters

documents = [
    Document(text="Our bakery opens at 7 am and sells sourdough bread, croissants and apple pie."),
    Document(text="On Sundays the bakery closes at noon. Orders for cakes need two days' notice."),
]
engine = SummaryIndex.from_documents(documents).as_query_engine(response_mode="compact")
print(engine.query("What does the bakery sell?"))
