"""Comparators for the fine-tuned CLIP model (run as `python -m baselines.<name>`)."""
