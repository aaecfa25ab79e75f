"""fastgen.adapters layers: LoRA / rsLoRA / DoRA / LoHa / LoKr on Linear and Conv2d against peft
(same weights -> same outputs), against float64 torch math for several adapters at once, merge /
unmerge, enable / disable, gradients, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, TRITON_DEVICE
from torch import nn

import fastgen.adapters as A


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread (on a loaded 2-core machine, idle OpenMP threads spinning
    for work cost these tests 5-10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Block(nn.Module):
    """A tiny attention-style block with diffusers-like names and a conv."""

    def __init__(self, d=12, c=4):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.conv = nn.Conv2d(c, 6, 3, padding=1)
        self.conv_out = nn.Conv2d(6, c, 1)

    def forward(self, x, img):
        h = self.to_q(x) * torch.sigmoid(self.to_k(x)) + self.to_v(x)
        return h + self.ff(h), self.conv_out(F.silu(self.conv(img)))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 12, generator=g), torch.randn(2, 4, 7, 7, generator=g)


def _randomize(model, name, seed=1):
    """Give adapter ``name`` random, non-zero factors (new adapters start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def _close(a, b, atol=1e-5, rtol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


TARGETS = ["to_q", "to_v", "ff.0", "conv", "conv_out"]


def _peft_twin(base, model, name, kind, rank, alpha, rslora=False, tmp_path=None):
    """The same adapter in peft: fastgen saves PEFT keys, peft's own set_peft_model_state_dict loads them."""
    peft = pytest.importorskip("peft")
    from peft.utils import set_peft_model_state_dict

    sd, _ = A.formats.to_state_dict(A.get_weights(model, name), "peft", prefix="base_model.model")
    if kind in ("lora", "dora"):
        cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, use_dora=kind == "dora", use_rslora=rslora)
    elif kind == "loha":
        cfg = peft.LoHaConfig(r=rank, alpha=rank, target_modules=TARGETS)  # fastgen folds the scale: alpha = r
    else:
        cfg = peft.LoKrConfig(r=rank, alpha=rank, target_modules=TARGETS)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    res = set_peft_model_state_dict(twin, sd)
    assert not res.unexpected_keys, res.unexpected_keys
    return twin


@pytest.mark.parametrize("kind,rank,alpha,rslora", [
    ("lora", 3, 6.0, False), ("lora", 4, 2.0, True), ("dora", 2, 5.0, False), ("loha", 2, 3.0, False), ("lokr", 1, 2.0, False),
])
def test_same_output_as_peft(kind, rank, alpha, rslora):
    torch.manual_seed(0)
    base = Block().eval()
    model = copy.deepcopy(base)
    A.add_adapter(model, "x", kind=kind, rank=rank, alpha=alpha, rslora=rslora, targets=TARGETS)
    _randomize(model, "x")
    x, img = _inputs()
    twin = _peft_twin(base, model, "x", kind, rank, alpha, rslora).eval()
    out, ref = model(x, img), twin(x, img)
    base_out = base(x, img)
    assert (out[0] - base_out[0]).abs().max() > 1e-2, "the adapter must change the output for the test to mean anything"
    _close(out, ref, atol=1e-5, rtol=1e-4)


def test_several_adapters_with_scales_match_float64_math():
    torch.manual_seed(0)
    base = Block().double().eval()
    model = copy.deepcopy(base)
    A.add_adapter(model, "a", rank=2, alpha=4.0, targets=["to_q"])
    A.add_adapter(model, "b", kind="loha", rank=2, alpha=1.0, targets=["to_q"])
    model.double()
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    A.set_scale(model, "a", 0.5)
    A.set_scale(model, "b", -1.5)
    ba, bb = model.to_q.fastgen_adapters["a"], model.to_q.fastgen_adapters["b"]
    w = base.to_q.weight + 0.5 * 2.0 * (ba.up @ ba.down) - 1.5 * 0.5 * (bb.w1a @ bb.w1b) * (bb.w2a @ bb.w2b)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(model.to_q(x), F.linear(x, w, base.to_q.bias))


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_merge_unmerge_enable_disable(kind):
    torch.manual_seed(0)
    base = Block().eval()
    model = copy.deepcopy(base)
    A.add_adapter(model, "a", kind=kind, rank=2, alpha=3.0, targets="all")
    A.add_adapter(model, "b", rank=1, targets=["to_q", "conv"])
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    A.set_scale(model, "b", 0.7)
    x, img = _inputs()
    live = model(x, img)
    A.merge(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "fastgen_adapters" not in n)
    _close(model(x, img), live, atol=2e-5, rtol=1e-4)
    A.unmerge(model)
    for (n, p), q in zip(base.named_parameters(), [model.get_parameter(n) for n, _ in base.named_parameters()]):
        torch.testing.assert_close(q, p, atol=2e-6, rtol=1e-5, msg=f"unmerge did not restore {n}")
    _close(model(x, img), live)
    with A.disabled(model):
        _close(model(x, img), base(x, img), atol=1e-5, rtol=1e-5)
    A.disable(model, "a")
    only_b = model(x, img)
    A.enable(model, "a")
    _close(model(x, img), live)
    A.remove(model, "a")
    _close(model(x, img), only_b)
    A.remove(model)
    assert A.adapter_names(model) == [] and not hasattr(model.to_q, "fastgen_adapters")
    _close(model(x, img), base(x, img), atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict())


def test_only_adapter_parameters_train_and_receive_grads():
    model = Block()
    names = A.add_adapter(model, "a", rank=2, targets="attention+ff")
    assert names == ["to_q", "to_k", "to_v"]  # the block's ff.0 / ff.2 are not feed-forward names of the presets
    A.add_adapter(model, "c", kind="dora", rank=2, targets=["ff.0", "ff.2", "conv"], dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".fastgen_adapters." in n}
    _randomize(model, "a")
    _randomize(model, "c", 2)
    x, img = _inputs()
    out = model(x, img)
    (out[0].square().mean() + out[1].square().mean()).backward()
    for p in A.adapter_parameters(model):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_presets_and_patterns():
    model = Block()
    assert A.targets.select(model, "all") == ["to_q", "to_k", "to_v", "ff.0", "ff.2", "conv", "conv_out"]
    assert A.targets.select(model, "*conv*") == ["conv", "conv_out"]
    assert A.targets.select(model, "re:to_[qk]") == ["to_q", "to_k"]
    assert A.targets.select(model, "attention", exclude=["to_k"]) == ["to_q", "to_v"]


def test_bad_input_errors():
    model = Block()
    with pytest.raises(ValueError, match="rank 13 is larger than layer 'to_q' allows"):
        A.add_adapter(model, rank=13, targets=["to_q"])
    with pytest.raises(ValueError, match="alpha must be > 0"):
        A.add_adapter(model, rank=2, alpha=0.0, targets=["to_q"])
    with pytest.raises(ValueError, match="alpha must be > 0"):
        A.add_adapter(model, rank=2, alpha=-1.0, targets=["to_q"])
    with pytest.raises(ValueError, match="'to_qq' matches no Linear or Conv2d"):
        A.add_adapter(model, rank=2, targets=["to_q", "to_qq"])
    A.add_adapter(model, "a", rank=2, targets=["to_q"])
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        A.add_adapter(model, "a", rank=2, targets=["to_q"])
    with pytest.raises(ValueError, match="unknown adapter kind"):
        A.add_adapter(model, "z", kind="ia3", targets=["to_q"])
    A.merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        A.disable(model, "a")


def test_adapter_for_another_model_names_keys_and_base_mismatch():
    src = Block()
    A.add_adapter(src, "a", rank=2, targets=["to_q", "ff.0"])
    w = A.get_weights(src, "a")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(12, 12)

    with pytest.raises(KeyError, match="ff.0"):
        A.add_weights(Other(), w)
    wider = Block(d=16)
    w.modules.pop("ff.0")
    with pytest.raises(ValueError, match="different base model"):
        A.add_weights(wider, w)
    with pytest.raises(ValueError, match="do not fit"):
        A.add_weights(wider, w, check_base=False)


@pytest.mark.skipif(TRITON_DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1")
def test_fused_kernel_inside_model_matches_torch_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 9), nn.Linear(9, 7)).to(TRITON_DEVICE)
    A.add_adapter(model, "a", rank=3, alpha=5.0, targets="all")
    A.add_adapter(model, "d", kind="dora", rank=2, alpha=1.0, targets=["1"])  # its row norm on the kernel too
    _randomize(model, "a")
    _randomize(model, "d", 2)
    x = torch.randn(2, 3, 10, device=TRITON_DEVICE, requires_grad=True)
    outs, grads = [], []
    for backend in ("torch", "triton"):
        A.use_backend(model, backend)
        x.grad = None
        for p in A.adapter_parameters(model):
            p.grad = None
        y = model(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in A.adapter_parameters(model)])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert math.isfinite(outs[1].sum().item())


def test_half_precision_base_with_fp32_adapters():
    """A bf16 model: adapter parameters stay fp32, the branches run in bf16, the output matches the
    fp32 model within bf16 rounding, and merging into bf16 weights works."""
    torch.manual_seed(0)
    model = Block()
    for kind, name in (("lora", "a"), ("dora", "d"), ("loha", "h")):
        A.add_adapter(model, name, kind=kind, rank=2, targets=["to_q", "ff.0", "conv"])
        _randomize(model, name, ord(name))
    half = copy.deepcopy(model).to(torch.bfloat16)
    for _, layer in A.inject.adapted_layers(half):
        layer.fastgen_adapters.float()  # adapters train in fp32 on a bf16 base
    x, img = _inputs()
    want = model(x, img)
    got = half(x.bfloat16(), img.bfloat16())
    assert all(p.dtype == torch.float32 for p in A.adapter_parameters(half))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, atol=0.1, rtol=0.05)
    A.merge(half)
    for g, w in zip(half(x.bfloat16(), img.bfloat16()), want):
        torch.testing.assert_close(g.float(), w, atol=0.15, rtol=0.05)


def test_merge_order_with_several_doras():
    """LoRA and two DoRAs on one layer: merged in any order, and partly unmerged, the model computes
    what the unmerged one did (each DoRA's norm is of the base weight plus its own update)."""
    torch.manual_seed(0)
    base = Block().eval()
    model = copy.deepcopy(base)
    A.add_adapter(model, "a", rank=2, targets=["to_q", "conv"])
    A.add_adapter(model, "d", kind="dora", rank=2, targets=["to_q", "conv"])
    A.add_adapter(model, "e", kind="dora", rank=1, alpha=3.0, targets=["to_q", "conv"])
    for i, n in enumerate("ade"):
        _randomize(model, n, i + 1)
    A.set_scale(model, "e", 0.5)
    x, img = _inputs()
    live = model(x, img)
    A.merge(model, ["a"])
    A.merge(model, ["e", "d"])
    _close(model(x, img), live, atol=2e-5, rtol=1e-4)
    A.unmerge(model, ["d"])  # d runs through its hook again, a and e stay merged
    _close(model(x, img), live, atol=2e-5, rtol=1e-4)
    A.unmerge(model)
    for n, p in base.named_parameters():
        torch.testing.assert_close(model.get_parameter(n), p, atol=2e-6, rtol=1e-5)
