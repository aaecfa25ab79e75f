"""fastgen.zoo.ConsistencyModel: the consistency function against its float64 formula, the
boundary condition, the attention block against SDPA, compile, errors, and CPU training (iCT on
the 16x16 shapes data) whose one-step samples beat the untrained model's on colour statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastgen.backend
from conftest import INTERPRET, TRITON_DEVICE
from fastgen.nn import GroupNorm
from fastgen.zoo.consistency import ConsistencyModel, ConsistencyModelConfig, colour_stats, train_consistency
from fastgen.zoo.data import shapes
from test_zoo_cyclegan import one_thread  # noqa: F401 (autouse)

TINY = dict(channels=(8, 16), groups=4, heads=2)


def _randomise_zero_inits(m):
    # conv_out and the attention projection start at zero; give them weights so every path is live
    with torch.no_grad():
        for p in (m.net.conv_out.weight, m.net.mid_attn.proj.weight):
            p.normal_(std=0.1)


def test_consistency_function_equals_float64_formula_and_boundary():
    torch.manual_seed(0)
    m = ConsistencyModel(**TINY).double()
    _randomise_zero_inits(m)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    sd, smin = 0.5, 0.002
    c_skip = sd ** 2 / ((sigma - smin) ** 2 + sd ** 2)
    c_out = (sigma - smin) * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
    out = m.net(c_in[:, None, None, None] * x, 250 * sigma.log())
    ref = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * out
    torch.testing.assert_close(m(x, sigma).double(), ref, rtol=1e-5, atol=1e-5)  # objective computes in fp32
    # f(x, sigma_min) = x whatever the network says
    torch.testing.assert_close(m(x, torch.full((3,), smin, dtype=torch.float64)).double(), x, rtol=1e-6, atol=1e-6)


def test_attention_block_equals_sdpa():
    torch.manual_seed(0)
    m = ConsistencyModel(**TINY).double()
    blk = m.net.mid_attn
    _randomise_zero_inits(m)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    qkv = blk.qkv(F.group_norm(x, 4, blk.norm.weight, blk.norm.bias))
    q, k, v = (t.reshape(2, 2, 8, 64).transpose(2, 3) for t in qkv.chunk(3, 1))     # (B, heads, HW, d)
    o = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(2, 16, 8, 8)
    torch.testing.assert_close(blk(x), x + blk.proj(o))


def test_forward_backward_sampling_shapes():
    torch.manual_seed(0)
    m = ConsistencyModel(**TINY)
    _randomise_zero_inits(m)
    x, _ = shapes(4, torch.Generator().manual_seed(0))
    loss = m.loss(x, step=0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.sample(2).shape == (2, 3, 16, 16)
    assert m.sample(2, sigmas=(2.0, 0.5)).shape == (2, 3, 16, 16)
    # class-conditional variant: the label changes the output
    c = ConsistencyModel(**TINY, num_classes=4)
    _randomise_zero_inits(c)
    with torch.no_grad():
        c.net.class_embed.weight.normal_()
    s = torch.full((2,), 1.0)
    assert not torch.allclose(c(x[:2], s, torch.tensor([0, 0])), c(x[:2], s, torch.tensor([3, 3])))
    c.loss(x, torch.tensor([0, 1, 2, 3])).backward()


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = ConsistencyModel(**TINY)
    _randomise_zero_inits(m)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([-100.0, 300.0])
    torch._dynamo.reset()
    f = torch.compile(m.net, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x, t), m.net(x, t))


def test_errors():
    m = ConsistencyModel(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m(torch.zeros(2, 1, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m.loss(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"sigma must be a tensor of shape \(2,\)"):
        m(torch.zeros(2, 3, 16, 16), torch.ones(3))
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.zeros(2, 3, 16, 16), torch.ones(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sigmas must descend"):
        m.sample(2, sigmas=(100.0,))
    c = ConsistencyModel(**TINY, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        c(torch.zeros(2, 3, 16, 16), torch.ones(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="divisible by groups"):
        ConsistencyModelConfig(channels=(8, 12), groups=8)


def test_trains_with_fastgen_train(tmp_path, requires_safetensors):
    """``fastgen train`` builds the UNet from model.kwargs (config_class) and runs iCT on it."""
    from fastgen.train import Config, Trainer
    from fastgen.train.data import TensorImageDataset

    cfg = Config.from_dict({"output_dir": str(tmp_path), "objective": {"kind": "consistency", "ct_s1": 20},
                            "model": {"factory": "fastgen.zoo.consistency:ConsistencyUNet",
                                      "kwargs": {"channels": [8, 16], "groups": 4, "num_classes": 2}},
                            "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu"},
                            "validation": {"every": 0}})
    x, labels = shapes(8, torch.Generator().manual_seed(0))
    tr = Trainer(cfg, dataset=TensorImageDataset(x, labels % 2), log=lambda s: None)
    assert type(tr.model).__name__ == "ConsistencyUNet" and tr.model.config.num_classes == 2
    out = tr.fit()
    assert len(out["losses"]) == 2 and all(math.isfinite(v) for _, v in out["losses"])


def test_one_step_samples_improve_on_the_untrained_model(one_thread):
    """iCT, 120 steps (batch 32, lr 1e-3, s1 = 40, EMA 0.99, seed 0) on 2048 shapes images.
    Measure (the trainer's end-to-end colour statistics, without classes): the distance between
    the per-channel mean and std of 256 samples and of the data (6 numbers), same noise before
    and after. Asserted: the EMA model's one-step distance < 0.35 x the untrained model's, and
    the two-step sampler also < 0.35 x; the loss falls."""
    data, _ = shapes(2048, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    m = ConsistencyModel(channels=(16, 32), s1=40)
    ref = colour_stats(data)

    def dist(**kw):
        return (colour_stats(m.sample(256, generator=torch.Generator().manual_seed(5), **kw)) - ref).norm().item()

    before = dist()
    losses, ema = train_consistency(m, data, steps=120, batch_size=32, lr=1e-3, ema_decay=0.99, seed=0)
    with ema.average_parameters(m):
        one, two = dist(), dist(sigmas=(0.8,))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"colour-stat distance untrained {before:.3f}; trained one-step {one:.3f}, two-step {two:.3f}; "
          f"loss {first:.2f} -> {last:.2f}")
    assert math.isfinite(one) and one < 0.35 * before
    assert math.isfinite(two) and two < 0.35 * before
    assert last < first


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE != "cuda", reason="needs the Triton interpreter or a GPU")
def test_triton_backend_matches_torch():
    """The UNet's fused GroupNorm+SiLU on the Triton kernels (the interpreter on CPU) equals the
    torch backend in fp32; the attention block in bf16 (the Triton attention takes bf16 / fp16)
    runs both its ops on Triton and stays within bf16 error of the fp32 torch result."""
    torch.manual_seed(0)
    m = ConsistencyModel(channels=(8, 16), groups=4, heads=1, image_size=8, backend="torch").to(TRITON_DEVICE)
    _randomise_zero_inits(m)
    x, t = torch.randn(1, 3, 8, 8, device=TRITON_DEVICE), torch.tensor([100.0], device=TRITON_DEVICE)
    ref = m.net(x, t)
    norms = [mod for mod in m.net.modules() if isinstance(mod, GroupNorm) and mod.activation == "silu"]
    for mod in norms:
        mod.backend = "triton"
    with fastgen.backend.trace() as ran:
        out = m.net(x, t)
    assert ran.count(("group_norm", "triton")) == len(norms) == 9 and ("attention", "torch") in ran
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)

    blk = m.net.mid_attn
    h = torch.randn(1, 16, 4, 4, device=TRITON_DEVICE)
    ref = blk(h)
    blk = blk.to(torch.bfloat16)
    blk.backend = blk.norm.backend = "triton"
    with fastgen.backend.trace() as ran:
        out = blk(h.to(torch.bfloat16))
    assert ran == [("group_norm", "triton"), ("attention", "triton")]
    err = (out.float() - ref).abs().max().item()
    print(f"bf16 Triton attention block max error {err:.4f}")
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
