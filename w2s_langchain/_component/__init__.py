"""What the three components share: their fields (fields.py), the search call
behind them (search_call.py) and LangChain's side of it (langchain_base.py)."""
