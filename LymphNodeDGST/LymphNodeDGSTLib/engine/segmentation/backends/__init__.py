"""Inference backends for the segmenter's per-tile network call: names, choice,
conversion in the background, and the cache beside a model version."""
