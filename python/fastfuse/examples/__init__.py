"""Runnable examples: python -m fastfuse.examples.<name>."""
