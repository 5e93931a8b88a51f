"""Video-level accuracy: logits averaged over a video's clips, not a majority vote (spec 11)."""

import numpy as np
import pytest
import torch

from iicrepro.evaluate.recognition import clip_accuracy, video_accuracy, video_predictions


def test_logit_average_disagrees_with_majority_vote():
    # Two of three clips narrowly prefer class 0; one clip strongly prefers class 1.
    # Majority vote says 0, the averaged logits say 1 (upstream's rule).
    clips = np.array([[[1.0, 0.9], [1.0, 0.9], [0.0, 5.0]]])
    assert np.bincount(clips[0].argmax(axis=1)).argmax() == 0
    assert video_predictions(clips).tolist() == [1]
    assert video_accuracy(clips, [1]) == 100.0
    assert video_accuracy(clips, [0]) == 0.0
    assert clip_accuracy(clips, [0]) == pytest.approx(200 / 3)
    assert clip_accuracy(clips, [1]) == pytest.approx(100 / 3)


def test_accuracy_over_several_videos_accepts_torch():
    logits = torch.zeros(4, 2, 3)
    logits[0, :, 0] = 1  # predicted 0
    logits[1, :, 2] = 1  # predicted 2
    logits[2, 0, 1] = 3  # clip 0 says 1, clip 1 says 0 (tie broken to 0 at 0), mean says 1
    logits[3, :, 1] = 1  # predicted 1
    labels = torch.tensor([0, 2, 0, 0])
    assert video_predictions(logits).tolist() == [0, 2, 1, 1]
    assert video_accuracy(logits, labels) == 50.0
    # clips: v0 2 hits, v1 2 hits, v2 clip 1 (argmax 0) hits, v3 none -> 5 of 8
    assert clip_accuracy(logits, labels) == pytest.approx(62.5)


def test_shape_errors():
    with pytest.raises(ValueError, match="videos, clips, classes"):
        video_accuracy(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="labels"):
        video_accuracy(np.zeros((2, 1, 3)), [0])
