"""The search budget the examples use: small enough for a laptop CPU.
CI runs them with W2S_ITERATIONS=2 and W2S_THREADS=1."""

import os

ITERATIONS = int(os.environ.get("W2S_ITERATIONS", "20"))
THREADS = int(os.environ["W2S_THREADS"]) if "W2S_THREADS" in os.environ else None
