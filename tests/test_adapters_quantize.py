"""Weight-only quantized bases (fastgen.adapters.quantize): the stated per-weight error bound and
the output bound it implies, adapter gradients equal to those through a dequantized copy, the
base's bytes measured, safetensors save/load, and the refusal to quantize a training base."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adapters import Block, _inputs, _one_thread, _randomize  # noqa: F401 (_one_thread: autouse)
from torch import nn

import fastgen.adapters as A
from fastgen.adapters.quantize import QuantLinear, base_nbytes, dequantize_weight, quantize_weight


def _bound(w, scale, scheme):
    """Per-weight error bound of the module docstring, broadcast to w's shape."""
    out_f, in_f = w.shape
    s = scale.repeat_interleave(in_f // scale.shape[1], dim=1)
    if scheme == "int8":
        return s / 2 * (1 + 1e-6)
    return torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("scheme", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("block_size", [None, 8])
def test_weight_and_output_error_within_bound(scheme, block_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64).float() * torch.logspace(-3, 1, 24)[:, None]
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_weight(w, scheme, block_size)
    assert q.dtype == {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[scheme]
    assert scale.shape == (24, 1 if block_size is None else 4)
    w_hat = dequantize_weight(q, scale)
    bound = _bound(w, scale, scheme)
    err = (w_hat - w).abs()
    assert torch.isfinite(w_hat).all() and (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    assert (w_hat - w).abs().max() > 0, "quantization must actually round something"

    lin = nn.Linear(32, 24).requires_grad_(False)
    lin.weight.data.copy_(w)
    ql = QuantLinear.from_linear(lin, scheme, block_size)
    x = torch.randn(5, 32, generator=g)
    y_bound = x.abs().double() @ bound.double().t()
    assert ((ql(x) - lin(x)).abs().double() <= y_bound + 1e-6).all()


def test_adapter_grads_match_dequantized_copy_and_bytes_shrink():
    torch.manual_seed(0)
    model = Block()
    A.add_adapter(model, "a", rank=2, targets="all")
    _randomize(model, "a")
    before = base_nbytes(model)
    A.quantize(model, "int8")
    after = base_nbytes(model)
    assert isinstance(model.to_q, QuantLinear) and model.to_q.fastgen_adapters is not None
    assert after <= 0.5 * before, f"base bytes {before} -> {after}"
    twin = A.dequantize(copy.deepcopy(model))
    assert isinstance(twin.to_q, nn.Linear)
    x, img = _inputs()
    x.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    for m, inp in ((model, x), (twin, x2)):
        out = m(inp, img)
        (out[0].square().mean() + out[1].square().mean()).backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
    for p, q in zip(A.adapter_parameters(model), A.adapter_parameters(twin)):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".fastgen_adapters." not in n)


def test_bf16_base_bytes():
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 512)).to(torch.bfloat16).requires_grad_(False)
    before = base_nbytes(model)
    A.quantize(model, "fp8_e4m3")
    after = base_nbytes(model)
    # 1 byte per weight + 4 bytes per output-channel scale, against 2 bytes per weight
    assert before == 2 * (256 * 256 + 256 * 512)
    assert after == (256 * 256 + 256 * 512) + 4 * (256 + 512)
    assert after < 0.51 * before


def test_save_load_quantized(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = Block().requires_grad_(False)
    A.quantize(model, "fp8_e4m3", block_size=4)
    A.save_quantized(model, tmp_path / "q.safetensors")
    fresh = Block().requires_grad_(False)
    A.load_quantized(fresh, tmp_path / "q.safetensors")
    assert isinstance(fresh.ff[0], QuantLinear) and fresh.ff[0].qweight.dtype == torch.float8_e4m3fn
    x, img = _inputs()
    for a, b in zip(fresh(x, img), model(x, img)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(KeyError, match="missing"):
        A.load_quantized(nn.Sequential(nn.Linear(3, 3)), tmp_path / "q.safetensors")


def test_quantizing_a_training_base_is_an_error():
    with pytest.raises(RuntimeError, match="training its base weights"):
        A.quantize(Block(), "int8")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        A.quantize(Block().requires_grad_(False), "int4")
    model = Block()
    A.add_adapter(model, "a", rank=2, targets=["to_q"])
    A.quantize(model, "int8")
    with pytest.raises(RuntimeError, match="quantized"):
        A.merge(model)
    from fastgen.models import Flux

    flux = Flux(None, patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    with pytest.raises(TypeError, match="fastgen model"):
        A.quantize(flux.requires_grad_(False), "int8")


# --- the Triton dequantize-GEMM -----------------------------------------------------------------

from conftest import INTERPRET, TRITON_DEVICE  # noqa: E402

from fastgen.adapters.quant_linear import quant_linear  # noqa: E402

needs_triton = pytest.mark.skipif(TRITON_DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@needs_triton
@pytest.mark.parametrize("scheme,block_size", [("int8", None), ("fp8_e4m3", 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_gemm_kernel_matches_torch(scheme, block_size, dtype):
    """Forward and input gradient of the kernel against float64 math on W_hat, with the FA rule
    (at most twice torch's own error in the same dtype), odd sizes, a bias."""
    g = torch.Generator().manual_seed(0)
    q, s = quantize_weight(torch.randn(37, 40, generator=g), scheme, block_size)
    q, s = q.to(TRITON_DEVICE), s.to(TRITON_DEVICE)
    bias = torch.randn(37, generator=g).to(TRITON_DEVICE, dtype)
    x = torch.randn(3, 7, 40, generator=g).to(TRITON_DEVICE, dtype)
    dy = torch.randn(3, 7, 37, generator=g).to(TRITON_DEVICE, dtype)
    w64 = dequantize_weight(q, s, torch.float64)
    outs = {}
    for impl in ("triton", "torch", "ref"):
        xi = (x.double() if impl == "ref" else x.clone()).requires_grad_(True)
        y = (xi @ w64.t() + bias.double()) if impl == "ref" else quant_linear(xi, q, s, bias, backend=impl)
        y.backward(dy.double() if impl == "ref" else dy)
        outs[impl] = (y.detach(), xi.grad)
    for i, name in enumerate(("y", "dx")):
        out, tch, ref = outs["triton"][i], outs["torch"][i], outs["ref"][i]
        assert out.dtype == dtype and torch.isfinite(out).all()
        err = (out.double() - ref).abs().max().item()
        bar = 2 * (tch.double() - ref).abs().max().item() + ATOL[dtype] * ref.abs().max().item()
        assert err <= bar, f"{name}: {err:.3g} > {bar:.3g}"


@needs_triton
def test_quantized_model_on_the_kernel_trains_its_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20), nn.GELU(), nn.Linear(20, 9)).to(TRITON_DEVICE)
    A.add_adapter(model, "a", rank=3, targets="all")
    _randomize(model, "a")
    A.quantize(model, "int8")
    x = torch.randn(2, 3, 24, device=TRITON_DEVICE)  # 3-D: the outputs the fused LoRA adds into are no views
    grads = []
    for backend in ("torch", "triton"):
        A.use_backend(model, backend)
        for p in A.adapter_parameters(model):
            p.grad = None
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in A.adapter_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,block_size", [("int8", None), ("fp8_e4m3", 128)])
def test_dequant_gemm_gpu_sizes(scheme, block_size):
    """Flux-width projection (3072 -> 12288), 4096 tokens, bf16; the Triton path must have run
    (its backward node is the custom function's)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, s = quantize_weight(torch.randn(12288, 3072, device="cuda", generator=g), scheme, block_size)
    x = torch.randn(4096, 3072, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    y = quant_linear(x, q, s, None, backend="triton")
    assert type(y.grad_fn).__name__ == "_QuantLinearBackward"
    w64 = dequantize_weight(q, s, torch.float64)
    ref = x.detach().double() @ w64.t()
    tch = quant_linear(x.detach(), q, s, None, backend="torch")
    err = (y.double() - ref).abs().max().item()
    assert err <= 2 * (tch.double() - ref).abs().max().item() + 2e-2 * ref.abs().max().item()
    y.backward(torch.ones_like(y))
    assert torch.isfinite(x.grad).all()
