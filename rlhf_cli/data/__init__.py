"""Data: sources, row formats, tokenisation with the label masks, batching."""
