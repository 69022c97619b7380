"""The commands: w2s-align (align.py), w2s-models (models.py), the engine's demo
(engine_demo.py), and what only a terminal needs: the progress bar and the HTML
tree view."""
