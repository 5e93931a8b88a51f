"""Intra-negatives (spec 6): repeat gives a static clip of one input frame; shuffle swaps
exactly one pair of the four chunks and keeps the order inside each chunk."""

from __future__ import annotations

import pytest
import torch

from iicrepro.method.intra_negative import intra_negative


def frame_coded(b: int, t: int, hw: int = 3) -> torch.Tensor:
    """B x 3 x T x hw x hw whose frame t of sample i holds the value i * 100 + t everywhere."""
    v = torch.arange(b).view(b, 1, 1, 1, 1) * 100 + torch.arange(t).view(1, 1, t, 1, 1)
    return v.float().expand(b, 3, t, hw, hw).contiguous()


def frame_ids(clip: torch.Tensor) -> list[list[int]]:
    ids = clip[:, 0, :, 0, 0].long() % 100
    # every pixel and channel of a frame comes from one source frame
    assert torch.equal(clip, clip[:, :1, :, :1, :1].expand_as(clip))
    return ids.tolist()


def test_repeat_is_one_input_frame_repeated():
    x = frame_coded(64, 16)
    g = torch.Generator().manual_seed(0)
    neg = intra_negative(x, "repeat", generator=g)
    assert neg.shape == x.shape
    chosen = set()
    for i, ids in enumerate(frame_ids(neg)):
        assert len(set(ids)) == 1  # static: the same frame T times
        assert torch.equal(neg[i, :, 0], x[i, :, ids[0]])  # equal to that frame of the input
        chosen.add(ids[0])
    assert chosen <= set(range(16)) and len(chosen) > 8  # t ~ U{0..T-1}, per sample


def test_shuffle_swaps_exactly_one_pair_of_chunks():
    b, t = 400, 16
    x = frame_coded(b, t)
    neg = intra_negative(x, "shuffle", generator=torch.Generator().manual_seed(1))
    pairs = set()
    for ids in frame_ids(neg):
        chunks = [ids[4 * c : 4 * c + 4] for c in range(4)]
        order = []
        for chunk in chunks:
            start = chunk[0]
            assert start % 4 == 0 and chunk == list(range(start, start + 4))  # order kept
            order.append(start // 4)
        assert sorted(order) == [0, 1, 2, 3]
        moved = [c for c in range(4) if order[c] != c]
        assert len(moved) == 2  # exactly one pair swapped, never the identity
        a, other = moved
        assert order[a] == other and order[other] == a
        pairs.add((a, other))
    assert pairs == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}  # adjacent or not


def test_shuffle_of_eight_frames_uses_chunks_of_two():
    neg = intra_negative(frame_coded(50, 8), "shuffle", generator=torch.Generator().manual_seed(2))
    for ids in frame_ids(neg):
        assert sorted(ids) == list(range(8)) and ids != list(range(8))
        assert all(ids[2 * c + 1] == ids[2 * c] + 1 for c in range(4))


def test_none_and_reproducibility():
    x = torch.rand(4, 3, 8, 5, 5)
    assert intra_negative(x, "none") is None
    a = intra_negative(x, "shuffle", generator=torch.Generator().manual_seed(3))
    b = intra_negative(x, "shuffle", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c = intra_negative(x, "repeat")
    torch.manual_seed(5)
    assert torch.equal(c, intra_negative(x, "repeat"))  # global RNG when no generator
    with pytest.raises(ValueError, match="divisible"):
        intra_negative(torch.rand(1, 3, 6, 2, 2), "shuffle")
    with pytest.raises(ValueError, match="unknown"):
        intra_negative(x, "blur")
