"""w2s_langchain: a strong local model answers the way a small aligned model prefers.

W2S-AlignTree (arXiv 2511.11518) over llama.cpp GGUF models.
"""

__version__ = "0.1.0"
