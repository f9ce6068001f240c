"""The hans_accuracy evaluate metric (loaded by path with `evaluate.load`; see hans_accuracy.py)."""
