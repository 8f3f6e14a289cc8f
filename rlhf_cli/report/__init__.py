"""`rlhf report RUN_DIR...`: plots of every logged metric, the final metrics, held-out accuracy after each
stage, sample generations and resolved configs of one run, a chain or a sweep, as a page with its PNGs.

collect.py finds and reads the runs; plots.py draws them; samples.py generates from their final/ models;
page.py says what the page shows and document.py renders it as HTML or Markdown; build.py writes the
report directory and prints the terminal summary. Only document.py is imported when the CLI starts.
"""
