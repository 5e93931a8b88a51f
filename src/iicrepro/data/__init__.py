"""Datasets: registry, download, extraction, splits, synthetic data, frames, clips, and the one
data path every step takes (`datasets`: manifest -> usable videos -> stores -> clip datasets)."""
