"""An LCEL chain: prompt | aligned LLM | parser.

gemma-3-270m continues a review opening; SmolLM2-135M steers it toward a warm
review (the "sentiment" preset).    python examples/lcel_chain.py
"""

from _budget import ITERATIONS, THREADS
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from w2s_langchain.llms import W2SAlignedLLM

llm = W2SAlignedLLM(preset="sentiment", iterations=ITERATIONS, chunk_tokens=4, max_tokens=40, n_threads=THREADS)
chain = PromptTemplate.from_template("{opening}") | llm | StrOutputParser()

opening = "The hotel room was"
print(opening + chain.invoke({"opening": opening}))
