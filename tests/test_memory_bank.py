"""Memory banks and loss (spec 7): init, index sampling, logits layout, update rule, gradient
flow, chance level and that the loss falls on a learnable toy problem."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from iicrepro.method.memory_bank import MemoryBank, chance_loss, nce_loss, positive_rank1

pytestmark = pytest.mark.usefixtures("one_thread")


def bank_with_coded_rows(n=10, dim=4, k=5, intra=True, t=0.5, momentum=0.5):
    """Rows whose first coordinate names bank and row: view-1 100+j, view-2 200+j, intra 300+j."""
    bank = MemoryBank(n, dim, k=k, t=t, momentum=momentum, intra=intra)
    rows = torch.arange(n, dtype=torch.float32)
    bank.memory_v1.zero_()[:, 0] = 100 + rows
    bank.memory_v2.zero_()[:, 0] = 200 + rows
    if intra:
        bank.memory_neg.zero_()[:, 0] = 300 + rows
    return bank


def test_init_buffers_and_range():
    torch.manual_seed(0)
    bank = MemoryBank(50, 12, k=7, t=0.07, momentum=0.5)
    s = 1 / math.sqrt(12 / 3)
    names = dict(bank.named_buffers())
    assert set(names) == {"memory_v1", "memory_v2", "memory_neg"}
    for buf in names.values():
        assert buf.shape == (50, 12) and not buf.requires_grad
        assert buf.abs().max() <= s and buf.abs().max() > 0.9 * s
        assert abs(buf.mean()) < 0.05
    assert not torch.equal(names["memory_v1"], names["memory_v2"])
    cmc = MemoryBank(50, 12, k=7, t=0.07, momentum=0.5, intra=False)
    assert set(dict(cmc.named_buffers())) == {"memory_v1", "memory_v2"}


def test_sample_indices_uniform_with_own_index_first():
    bank = MemoryBank(20, 4, k=300, t=0.1, momentum=0.5)
    index = torch.tensor([3, 17, 0])
    idx = bank.sample_indices(index, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 301) and idx.dtype == torch.long
    assert idx[:, 0].tolist() == [3, 17, 0]
    counts = torch.bincount(idx[:, 1:].flatten(), minlength=20)
    assert counts.min() > 20  # every row can be drawn (uniform over 0..N-1, with replacement)
    assert idx.max() < 20 and idx.min() >= 0


def test_logits_layout_and_gather_before_update():
    k, t = 5, 0.5
    bank = bank_with_coded_rows(k=k, t=t)
    index = torch.tensor([2, 7])
    e0 = torch.zeros(2, 4)
    e0[:, 0] = 1.0  # a feature that reads the first coordinate of each row
    idx = bank.sample_indices(index, torch.Generator().manual_seed(4))
    l1, l2 = bank(e0, e0, index, e0, generator=torch.Generator().manual_seed(4))
    assert l1.shape == l2.shape == (2, 2 * k + 2)
    j = idx[:, 1:].float()
    y = index.float().unsqueeze(1)
    # view 1: [positive = view-2 row y, K view-2 rows, intra row y, the same K intra rows] / T
    expected1 = torch.cat([200 + y, 200 + j, 300 + y, 300 + j], 1) / t
    expected2 = torch.cat([100 + y, 100 + j, 300 + y, 300 + j], 1) / t
    assert torch.equal(l1, expected1)
    assert torch.equal(l2, expected2)  # same indices for every bank, memory read before update
    # ...and the update happened afterwards on the own rows
    assert bank.memory_v2[2, 0] < 1.0 + 1e-6


def test_cmc_layout_has_no_intra_block():
    k = 4
    bank = bank_with_coded_rows(k=k, intra=False, t=1.0)
    index = torch.tensor([1, 5, 9])
    f = torch.zeros(3, 4)
    f[:, 0] = 1.0
    idx = bank.sample_indices(index, torch.Generator().manual_seed(1))
    l1, l2 = bank(f, f, index, generator=torch.Generator().manual_seed(1))
    assert torch.equal(l1, 200 + idx.float()) and torch.equal(l2, 100 + idx.float())
    assert bank.chance_loss() == pytest.approx(2 * math.log(k + 1))
    with pytest.raises(ValueError, match="no intra-negative bank"):
        bank(f, f, index, f)
    with pytest.raises(ValueError, match="pass fn"):
        bank_with_coded_rows(k=k)(f, f, index)


def test_update_rule_and_row_normalisation():
    torch.manual_seed(1)
    n, dim, m = 8, 6, 0.5
    bank = MemoryBank(n, dim, k=3, t=0.1, momentum=m)
    before = {name: buf.clone() for name, buf in bank.named_buffers()}
    index = torch.tensor([1, 6])
    f1, f2, fn = (torch.randn(2, dim) * 3 for _ in range(3))
    bank(f1, f2, index, fn)
    for name, f in (("memory_v1", f1), ("memory_v2", f2), ("memory_neg", fn)):
        buf = getattr(bank, name)
        expected = F.normalize(m * before[name][index] + (1 - m) * f, dim=1)
        assert torch.allclose(buf[index], expected, atol=1e-6)
        assert torch.allclose(buf[index].norm(dim=1), torch.ones(2))
        others = [i for i in range(n) if i not in index.tolist()]
        assert torch.equal(buf[others], before[name][others])  # untouched rows


def test_normalize_features_option():
    torch.manual_seed(2)
    f = torch.randn(3, 16) * 10
    index = torch.tensor([0, 1, 2])
    plain = MemoryBank(5, 16, k=4, t=0.1, momentum=0.5)
    normed = MemoryBank(5, 16, k=4, t=0.1, momentum=0.5, normalize_features=True)
    normed.load_state_dict(plain.state_dict())
    l_plain, _ = plain(f, f, index, f, generator=torch.Generator().manual_seed(0))
    l_norm, _ = normed(f, f, index, f, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(l_norm, l_plain)
    assert torch.allclose(l_plain, l_norm * f.norm(dim=1, keepdim=True), atol=1e-4)


def test_gradient_only_through_anchors():
    torch.manual_seed(3)
    bank = MemoryBank(10, 8, k=6, t=0.1, momentum=0.5)
    f1, f2, fn = (torch.randn(4, 8, requires_grad=True) for _ in range(3))
    l1, l2 = bank(f1, f2, torch.arange(4), fn)
    nce_loss(l1, l2).backward()
    assert f1.grad is not None and f1.grad.abs().sum() > 0
    assert f2.grad is not None and f2.grad.abs().sum() > 0
    assert fn.grad is None  # the intra-negative acts only through its bank (spec 7.7)
    assert all(not b.requires_grad for b in bank.buffers())


def test_loss_is_summed_cross_entropy_and_rank_stat():
    l1 = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    l2 = torch.tensor([[3.0, 3.5, 0.0], [4.0, 0.0, 1.0]])
    target = torch.zeros(2, dtype=torch.long)
    expected = F.cross_entropy(l1, target) + F.cross_entropy(l2, target)
    assert torch.allclose(nce_loss(l1, l2), expected)
    assert positive_rank1(l1, l2).item() == pytest.approx(0.5)  # 2 of 4 anchors
    assert chance_loss(1024) == pytest.approx(15.25, abs=0.01)  # spec 7.5
    assert chance_loss(1024, intra=False) == pytest.approx(13.86, abs=0.01)


def test_first_step_loss_is_near_chance():
    torch.manual_seed(4)
    k = 256
    bank = MemoryBank(600, 512, k=k, t=0.1, momentum=0.5, normalize_features=True)
    f1, f2, fn = (torch.relu(torch.randn(32, 512)) for _ in range(3))
    loss = nce_loss(*bank(f1, f2, torch.arange(32), fn)).item()
    assert loss == pytest.approx(chance_loss(k), abs=0.4)
    assert chance_loss(k) == pytest.approx(2 * math.log(2 * k + 2))


def test_loss_falls_on_a_learnable_toy_set():
    """Two noisy views of 64 latent vectors through one shared linear encoder."""
    torch.manual_seed(5)
    n, k = 64, 32
    latent = torch.randn(n, 16)
    mix = torch.randn(16, 16)
    encoder = torch.nn.Linear(16, 32)
    bank = MemoryBank(n, 32, k=k, t=0.1, momentum=0.5, normalize_features=True)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1, momentum=0.9)
    losses, ranks = [], []
    for _ in range(60):
        for batch in torch.randperm(n).split(16):
            v1 = latent[batch] + 0.1 * torch.randn(len(batch), 16)
            v2 = latent[batch] @ mix + 0.1 * torch.randn(len(batch), 16)
            with torch.no_grad():
                fn = encoder(torch.randn(len(batch), 16))
            l1, l2 = bank(encoder(v1), encoder(v2), batch, fn)
            loss = nce_loss(l1, l2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            ranks.append(positive_rank1(l1, l2).item())
    assert sum(losses[-8:]) / 8 < chance_loss(k) - 2.0
    assert sum(ranks[-8:]) / 8 > 0.5
