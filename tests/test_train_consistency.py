"""fastgen.train.consistency (iCT) against float64 formulas from the papers."""

from __future__ import annotations

import math

import pytest
import torch

from fastgen.train.consistency import ConsistencyTrainingObjective, karras_sigmas, pseudo_huber


def test_karras_sigmas():
    s = karras_sigmas(11)
    assert s[0].item() == pytest.approx(0.002, rel=1e-12) and s[-1].item() == pytest.approx(80.0, rel=1e-12)
    assert (s[1:] > s[:-1]).all()
    # i-th point: (lo + i/(N-1) (hi - lo))^7
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    assert s[4].item() == pytest.approx((lo + 0.4 * (hi - lo)) ** 7, rel=1e-12)


def test_improved_curriculum():
    o = ConsistencyTrainingObjective(total_steps=400_000)  # the iCT paper's K, s0 = 10, s1 = 1280
    # K' = floor(400000 / (log2(128) + 1)) = 50000: N doubles every 50k steps from 11 up to 1281
    assert [o.num_scales(k) for k in (0, 49_999, 50_000, 100_000, 300_000, 349_999, 350_000, 400_000)] == \
        [11, 11, 21, 41, 641, 641, 1281, 1281]
    o.set_step(50_000)
    assert o.num_scales() == 21 and len(o.sigmas()) == 21


def test_lognormal_index_distribution():
    o = ConsistencyTrainingObjective(total_steps=100)
    p = o.index_probabilities(41)
    s = karras_sigmas(41).double()
    phi = lambda v: 0.5 * (1 + math.erf((math.log(v) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    ref = torch.tensor([phi(s[i + 1].item()) - phi(s[i].item()) for i in range(40)], dtype=torch.float64)
    torch.testing.assert_close(p, ref / ref.sum(), rtol=1e-9, atol=1e-12)
    idx = o.sample_indices(40_000, 41, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=40).double() / 40_000
    assert (freq - p).abs().max() < 0.01 and idx.max() <= 39


def test_pseudo_huber():
    a = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    b = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    c = 0.00054 * math.sqrt(48)
    ref = torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c * c) - c
    torch.testing.assert_close(pseudo_huber(a, b).double(), ref, rtol=1e-5, atol=1e-7)
    assert pseudo_huber(a, a).abs().max() < 1e-7


def test_boundary_condition_and_loss():
    o = ConsistencyTrainingObjective(total_steps=10)
    x = torch.randn(4, 3, 4, 4)
    junk = lambda x, t, class_labels=None: torch.full_like(x, 7.0)  # noqa: E731
    # f(x, sigma_min) = x whatever the network says
    torch.testing.assert_close(o.denoise(junk, x, torch.full((4,), 0.002)), x)
    # at large sigma the network's output dominates: f -> c_out * F ~ sigma_data * F
    f = o.denoise(junk, x, torch.full((4,), 80.0))
    torch.testing.assert_close(f, 0.5 * 7.0 * torch.ones_like(x) + 0.5 ** 2 / (80 ** 2) * x, rtol=1e-3, atol=1e-3)

    net = torch.nn.Conv2d(3, 3, 1)
    model = lambda x, t, class_labels=None: net(x)  # noqa: E731
    loss = o.loss(model, x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_consistency_in_the_trainer(tmp_path, requires_safetensors):
    from fastgen.train import Config, Trainer
    from fastgen.train.data import TensorImageDataset
    from test_train_resume import TinyNet

    cfg = Config.from_dict({"output_dir": str(tmp_path), "model": {"factory": "test_train_resume:TinyNet"},
                            "objective": {"kind": "consistency"},
                            "train": {"steps": 3, "batch_size": 4, "progress": False, "device": "cpu"},
                            "validation": {"every": 3, "per_class": 1, "num_steps": 2}})
    data = TensorImageDataset(torch.rand(8, 3, 8, 8) * 2 - 1, torch.arange(8) % 2)
    tr = Trainer(cfg, model=TinyNet(num_classes=2), dataset=data, log=lambda s: None)
    assert tr.objective.total_steps == 3
    out = tr.fit()
    assert tr.objective.step == 2  # set before each step's loss (the step about to be taken, 0-based)
    assert all(math.isfinite(v) for _, v in out["losses"])
    assert (tmp_path / "samples" / "step-00000003.png").exists()
