"""Data preparation: the clip index and splits, the embedded dataset, downloads."""
