"""Action-recognition accuracy from per-clip logits (spec 11).

The test protocol scores a video by averaging its clips' logits *before* the softmax and taking the
argmax; this is not a majority vote over clip predictions. Clip accuracy (every clip scored on its
own) is reported beside it, although upstream did not report it.
Accuracies are percentages. Inputs may be numpy arrays or torch tensors.
"""

from __future__ import annotations

import numpy as np


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check(clip_logits, labels) -> tuple[np.ndarray, np.ndarray]:
    logits = _as_numpy(clip_logits).astype(np.float64, copy=False)
    labels = _as_numpy(labels).astype(np.int64, copy=False).reshape(-1)
    if logits.ndim != 3:
        raise ValueError(f"clip_logits must be (videos, clips, classes), got shape {logits.shape}")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} videos of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("no videos to score")
    return logits, labels


def video_predictions(clip_logits) -> np.ndarray:
    """Predicted class per video: argmax of the logits averaged over the video's clips."""
    logits = _as_numpy(clip_logits).astype(np.float64, copy=False)
    return logits.mean(axis=1).argmax(axis=1)


def video_accuracy(clip_logits, labels) -> float:
    """Video-level top-1 (%) from clip logits of shape (V, N, C) and labels of shape (V,)."""
    logits, labels = _check(clip_logits, labels)
    return float(100.0 * np.mean(video_predictions(logits) == labels))


def clip_accuracy(clip_logits, labels) -> float:
    """Clip-level top-1 (%): each of the V*N clips scored against its video's label."""
    logits, labels = _check(clip_logits, labels)
    hits = logits.argmax(axis=2) == labels[:, None]
    return float(100.0 * hits.mean())
