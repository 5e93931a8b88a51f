"""Datasets: registry, download, extraction, splits, synthetic data, frames, clips."""
