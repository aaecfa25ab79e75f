"""fastgen.ops.apply_rope / rope_frequencies / rope_grid_ids against diffusers and float64 math.

Triton runs on the GPU when there is one, else on CPU tensors in Triton's
interpreter (small shapes). CUDA C++ runs in the ``gpu`` tier only.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPES, TRITON_DEVICE, assert_close, c_entry, requires_gpu, run_auto_as

import fastgen
from fastgen.backend import BackendUnavailableError
from fastgen.ops import apply_rope, apply_rope_ref, rope_frequencies, rope_grid_ids


def _tables(S, R, interleaved, device="cpu", batch=None, seed=0):
    """cos / sin whose pair members share an angle (the layout rope_frequencies produces)."""
    g = torch.Generator().manual_seed(seed)
    shape = (S, R // 2) if batch is None else (batch, S, R // 2)
    ang = torch.rand(shape, generator=g, dtype=torch.float64) * 2 * math.pi
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _qk(B, S, hq, hk, D, dtype, layout, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, S, hk, D, generator=g).to(device=device, dtype=dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    return q, k


def _rope64(x, cos, sin, layout, interleaved):
    """float64 RoPE written with complex numbers: independent of the reference's formula."""
    R = cos.shape[-1]
    xd = x.double()
    if interleaved:
        z = torch.complex(xd[..., 0:R:2], xd[..., 1:R:2])
        ang = torch.atan2(sin[..., 0::2].double(), cos[..., 0::2].double())
    else:
        z = torch.complex(xd[..., : R // 2], xd[..., R // 2 : R])
        ang = torch.atan2(sin[..., : R // 2].double(), cos[..., : R // 2].double())
    ang = ang[None] if ang.dim() == 2 else ang
    ang = ang[:, :, None] if layout == "bshd" else ang[:, None]
    w = z * torch.polar(torch.ones_like(ang), ang)
    if interleaved:
        rot = torch.stack([w.real, w.imag], -1).flatten(-2)
    else:
        rot = torch.cat([w.real, w.imag], -1)
    return torch.cat([rot, xd[..., R:]], -1)


# ----------------------------------------------------------------------------- reference vs diffusers


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_equals_diffusers_apply_rotary_emb(interleaved, layout, dtype):
    emb = pytest.importorskip("diffusers.models.embeddings", reason="diffusers is the anchor of the convention")
    q, k = _qk(2, 9, 3, 2, 64, dtype, layout, "cpu")
    cos, sin = _tables(9, 64, interleaved)
    out_q, out_k = apply_rope_ref(q, k, cos, sin, layout, interleaved)
    kw = dict(use_real=True, use_real_unbind_dim=-1 if interleaved else -2, sequence_dim=1 if layout == "bshd" else 2)
    assert torch.equal(out_q, emb.apply_rotary_emb(q, (cos, sin), **kw))
    assert torch.equal(out_k, emb.apply_rotary_emb(k, (cos, sin), **kw))
    assert torch.equal(apply_rope(q, k, cos, sin, layout, interleaved, backend="torch")[0], out_q)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_reference_matches_complex_float64_with_partial_rotary(interleaved):
    q, k = _qk(2, 5, 2, 1, 72, torch.float64, "bhsd", "cpu")
    cos, sin = _tables(5, 40, interleaved)
    out_q, out_k = apply_rope_ref(q, k, cos, sin, "bhsd", interleaved)
    torch.testing.assert_close(out_q, _rope64(q, cos, sin, "bhsd", interleaved))
    torch.testing.assert_close(out_k, _rope64(k, cos, sin, "bhsd", interleaved))
    assert torch.equal(out_q[..., 40:], q[..., 40:])


# ----------------------------------------------------------------------------- tables and ids


def test_rope_frequencies_equal_flux_pos_embed():
    flux = pytest.importorskip("diffusers.models.transformers.transformer_flux", reason="diffusers' FluxPosEmbed")
    txt_ids = torch.zeros(7, 3)
    img_ids = rope_grid_ids(4, 6, prefix_axes=1)
    expected_img = torch.zeros(4, 6, 3)
    expected_img[..., 1] += torch.arange(4)[:, None]
    expected_img[..., 2] += torch.arange(6)[None, :]
    assert torch.equal(img_ids, expected_img.reshape(24, 3))  # Flux's _prepare_latent_image_ids
    ids = torch.cat([txt_ids, img_ids])
    cos, sin = rope_frequencies(ids, (16, 56, 56), theta=10000.0, interleaved=True)
    ref_cos, ref_sin = flux.FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    assert cos.dtype == torch.float32 and cos.shape == (31, 128)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("grid_type", ["slice", "linspace"])
def test_rope_frequencies_match_cogvideox_3d(grid_type):
    emb = pytest.importorskip("diffusers.models.embeddings", reason="diffusers' get_3d_rotary_pos_embed")
    D, F_, H, W = 64, 3, 4, 5
    if grid_type == "slice":
        ref = emb.get_3d_rotary_pos_embed(D, None, (H, W), F_, grid_type="slice", max_size=(H, W))
        ids = rope_grid_ids(F_, H, W)
    else:
        crops = ((0, 0), (H, W))
        ref = emb.get_3d_rotary_pos_embed(D, crops, (H, W), F_)
        t = torch.linspace(0, F_ * (F_ - 1) / F_, F_)  # fractional positions, as CogVideoX
        h = torch.linspace(0, H * (H - 1) / H, H)
        w = torch.linspace(0, W * (W - 1) / W, W)
        ids = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), -1).reshape(-1, 3)
    cos, sin = rope_frequencies(ids, (D // 4, D // 8 * 3, D // 8 * 3), interleaved=True)
    # diffusers computes these angles in float32, we in float64: equal to float32 rounding.
    torch.testing.assert_close(cos, ref[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(sin, ref[1], atol=2e-6, rtol=0)


def test_rope_frequencies_halves_layout_and_1d():
    emb = pytest.importorskip("diffusers.models.embeddings", reason="diffusers' get_1d_rotary_pos_embed")
    pos = torch.arange(11)
    cos, sin = rope_frequencies(pos, 32)
    ref = emb.get_1d_rotary_pos_embed(32, pos, use_real=True, repeat_interleave_real=False, freqs_dtype=torch.float64)
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
    # Two axes in the halves layout: pair (j, j + R/2) shares one angle.
    cos2, sin2 = rope_frequencies(torch.stack([pos, 2 * pos], -1).float(), (8, 16))
    assert cos2.shape == (11, 24)
    assert torch.equal(cos2[:, :12], cos2[:, 12:]) and torch.equal(sin2[:, :12], sin2[:, 12:])
    c_axis1, _ = rope_frequencies(2 * pos, 16)
    assert torch.equal(cos2[:, 4:12], c_axis1[:, :8])


def test_rope_grid_ids():
    ids = rope_grid_ids(2, 3, 4)
    assert ids.shape == (24, 3) and ids.dtype == torch.float32
    assert ids[0].tolist() == [0, 0, 0] and ids[-1].tolist() == [1, 2, 3] and ids[5].tolist() == [0, 1, 1]
    assert rope_grid_ids(3, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    with pytest.raises(ValueError, match="sizes must be one or more ints"):
        rope_grid_ids()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rope_frequencies(torch.zeros(4, 2), (8,)), r"1 axes_dim entries \(8,\) for positions with 2 axes"),
        (lambda: rope_frequencies(torch.zeros(4), 7), "positive even int"),
        (lambda: rope_frequencies(torch.zeros(2, 2, 2), (4, 4)), r"shape \(S,\) or \(S, n_axes\)"),
    ],
)
def test_rope_frequencies_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- Triton


def _check_triton(B, S, hq, hk, D, R, dtype, layout, interleaved, table_batch=None):
    q, k = _qk(B, S, hq, hk, D, dtype, layout, TRITON_DEVICE)
    cos, sin = _tables(S, R, interleaved, TRITON_DEVICE, table_batch)
    q.requires_grad_()
    k.requires_grad_()
    rq, rk = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    out_q, out_k = apply_rope(q, k, cos, sin, layout, interleaved, backend="triton")
    ref_q, ref_k = apply_rope_ref(rq, rk, cos, sin, layout, interleaved)
    assert out_q.shape == q.shape and out_q.dtype == dtype and out_k.shape == k.shape
    # Same fp32 formula, one rounding: equal to the reference up to fp32 contraction.
    assert_close(out_q, ref_q, scale=0.5)
    assert_close(out_k, ref_k, scale=0.5)
    err = (out_q.double() - _rope64(q.detach(), cos, sin, layout, interleaved)).abs().max()
    ref_err = (ref_q.double() - _rope64(q.detach(), cos, sin, layout, interleaved)).abs().max()
    assert err <= 2 * ref_err + 1e-6
    assert torch.equal(out_q[..., R:], q.detach()[..., R:])
    g = torch.Generator().manual_seed(1)
    dq = torch.randn(out_q.shape, generator=g).to(out_q.device, dtype)
    dk = torch.randn(out_k.shape, generator=g).to(out_k.device, dtype)
    ((out_q * dq).sum() + (out_k * dk).sum()).backward()
    ((ref_q * dq).sum() + (ref_k * dk).sum()).backward()
    assert_close(q.grad, rq.grad)
    assert_close(k.grad, rk.grad)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_partial_rotary_gqa_odd_seq(interleaved, layout, dtype):
    _check_triton(2, 7, 3, 1, 72, 40, dtype, layout, interleaved)


@pytest.mark.parametrize("D, R", [(64, 64), (72, 72), (128, 128), (40, 40), (128, 64), (80, 2)])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_triton_head_dims(D, R, interleaved):
    _check_triton(1, 5, 2, 2, D, R, torch.bfloat16, "bshd", interleaved)


@pytest.mark.parametrize("table_batch", [1, 2])
def test_triton_batched_tables(table_batch):
    _check_triton(2, 3, 2, 3, 32, 32, torch.float16, "bhsd", True, table_batch=table_batch)


def test_triton_qkv_views_no_copy_and_inplace():
    # q, k, v as views of one fused projection (B, S, 3, H, D): strided heads and tokens.
    B, S, H, D = 2, 5, 3, 64
    qkv = torch.randn(B, S, 3, H, D, device=TRITON_DEVICE)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    assert not q.is_contiguous() and q.stride(-1) == 1
    cos, sin = _tables(S, D, True, TRITON_DEVICE)
    ref_q, ref_k = apply_rope_ref(q, k, cos, sin, "bshd", True)
    out_q, out_k = apply_rope(q, k, cos, sin, "bshd", True, backend="triton")
    assert_close(out_q, ref_q)
    assert_close(out_k, ref_k)
    v_before = qkv[:, :, 2].clone()
    r_q, r_k = apply_rope(q, k, cos, sin, "bshd", True, inplace=True, backend="triton")
    assert r_q is q and r_k is k
    assert_close(qkv[:, :, 0], ref_q)  # written through the views, into the fused buffer
    assert_close(qkv[:, :, 1], ref_k)
    assert torch.equal(qkv[:, :, 2], v_before)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_triton_inplace_autograd(layout):
    B, S, H, D, R = 1, 6, 2, 48, 32
    x = torch.randn(B, S, H, D, device=TRITON_DEVICE, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    cos, sin = _tables(S, R, False, TRITON_DEVICE)

    def run(x, backend):
        q = x * 2  # non-leaf: in-place on it is allowed
        k = (x + 1)[:, :, :1]
        if layout == "bhsd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        out_q, out_k = apply_rope(q, k, cos, sin, layout, inplace=True, backend=backend)
        assert out_q is q and out_k is k
        return out_q, out_k

    oq, ok = run(x, "triton")
    rq, rk = run(xr, "torch")
    assert_close(oq, rq)
    assert_close(ok, rk)
    (oq.square().sum() + ok.sum()).backward()
    (rq.square().sum() + rk.sum()).backward()
    assert_close(x.grad, xr.grad)


def test_triton_non_unit_last_stride_is_copied():
    S, H, D = 4, 2, 32
    base = torch.randn(1, S, H, D, device=TRITON_DEVICE)
    q = base.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last stride != 1
    assert q.stride(-1) != 1
    cos, sin = _tables(S, D, False, TRITON_DEVICE)
    out = apply_rope(q, base, cos, sin, backend="triton")
    ref = apply_rope_ref(base, base, cos, sin)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    # strided cos / sin (every other column of a wider table) work too
    wide = torch.randn(S, 2 * D, device=TRITON_DEVICE)
    out = apply_rope(base, base, wide[:, ::2], wide[:, 1::2], backend="triton")
    ref = apply_rope_ref(base, base, wide[:, ::2], wide[:, 1::2])
    assert_close(out[0], ref[0])


def test_triton_bf16_tables():
    q, k = _qk(1, 4, 2, 2, 32, torch.bfloat16, "bshd", TRITON_DEVICE)
    cos, sin = (t.to(torch.bfloat16) for t in _tables(4, 32, True, TRITON_DEVICE))
    out = apply_rope(q, k, cos, sin, interleaved=True, backend="triton")
    ref = apply_rope_ref(q, k, cos, sin, interleaved=True)
    assert_close(out[0], ref[0])


@pytest.mark.parametrize("shape", [(0, 4, 2, 16), (2, 0, 2, 16), (2, 4, 0, 16)])
def test_zero_size(shape):
    q = torch.randn(shape, device=TRITON_DEVICE, requires_grad=True)
    k = torch.randn(shape[0], shape[1], 1, 16, device=TRITON_DEVICE, requires_grad=True)
    cos, sin = _tables(shape[1], 16, False, TRITON_DEVICE)
    out_q, out_k = apply_rope(q, k, cos, sin, backend="triton")
    assert out_q.shape == q.shape and out_k.shape == k.shape
    (out_q.sum() + out_k.sum()).backward()
    assert q.grad.shape == q.shape


def test_custom_ops_pass_opcheck():
    q, k = _qk(1, 3, 2, 1, 16, torch.float32, "bshd", TRITON_DEVICE)
    cos, sin = _tables(3, 8, True, TRITON_DEVICE)
    utils = ("test_schema", "test_faketensor")
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.fastgen.apply_rope, (q, k, cos, sin, "bshd", True, inverse, "triton"),
                              test_utils=utils)
    torch.library.opcheck(torch.ops.fastgen.apply_rope_, (q.clone(), k.clone(), cos, sin, "bshd", True, "triton"),
                          test_utils=utils)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    lin = torch.nn.Linear(32, 3 * 2 * 16).to(TRITON_DEVICE)
    cos, sin = _tables(5, 16, True, TRITON_DEVICE)

    def block(x):
        qkv = lin(x).view(2, 5, 3, 2, 16)
        q, k = apply_rope(qkv[:, :, 0], qkv[:, :, 1], cos, sin, interleaved=True, backend=backend)
        return (q * k).sum(-1)

    x = torch.randn(2, 5, 32, device=TRITON_DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    y = compiled(x)
    ye = block(x)
    assert_close(y, ye)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    ye.sum().backward()
    assert_close(g, x.grad)


# ----------------------------------------------------------------------------- backends and errors


def test_backend_errors():
    q, k = _qk(1, 3, 2, 2, 16, torch.float32, "bshd", "cpu")
    cos, sin = _tables(3, 16, False)
    with pytest.raises(BackendUnavailableError, match="CUDA C\\+\\+ backend needs CUDA tensors"):
        apply_rope(q, k, cos, sin, backend="cuda")
    q64, k64 = q.double(), k.double()
    out = apply_rope(q64, k64, cos, sin)  # auto: the reference serves float64
    torch.testing.assert_close(out[0], _rope64(q, cos, sin, "bshd", False))
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 is not supported by the kernels"):
        apply_rope(q64, k64, cos, sin, backend="triton")
    big = torch.randn(1, 1, 1, 2048)
    cb, sb = _tables(1, 2048, False)
    with pytest.raises(BackendUnavailableError, match="head dim D=2048 exceeds the kernels' limit 1024"):
        apply_rope(big, big, cb, sb, backend="triton")
    assert apply_rope(big, big, cb, sb)[0].shape == big.shape  # auto falls back to the reference


def _bad(q_shape=(2, 5, 3, 16), k_shape=(2, 5, 1, 16), cs_shape=(5, 16), sn_shape=None, layout="bshd",
         q=None, k=None, cos=None):
    q = torch.randn(q_shape) if q is None else q
    k = torch.randn(k_shape) if k is None else k
    cos = torch.randn(cs_shape) if cos is None else cos
    sin = torch.randn(sn_shape or cs_shape)
    return lambda: apply_rope(q, k, cos, sin, layout=layout)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (_bad(cs_shape=(5, 16), sn_shape=(5, 8)), ValueError, r"cos and sin must have the same shape, got \(5, 16\)"),
        (_bad(cs_shape=(5, 15)), ValueError, "R = cos.shape\\[-1\\] = 15 must be even"),
        (_bad(cs_shape=(5, 32)), ValueError, "R = cos.shape\\[-1\\] = 32 exceeds the head dim D = 16"),
        (_bad(cs_shape=(6, 16)), ValueError, r"cos/sin have 6 positions \(shape \(6, 16\)\) but q has S=5"),
        (_bad(cs_shape=(3, 5, 16)), ValueError, "cos/sin batch 3 .* must be 1 or q's B=2"),
        (_bad(cs_shape=(16,)), ValueError, r"shape \(S, R\) or \(B, S, R\)"),
        (_bad(k_shape=(2, 4, 1, 16)), ValueError, "must agree in batch, sequence and head dim"),
        (_bad(q_shape=(5, 3, 16)), ValueError, r"q must be 4-D \(B, S, H, D\)"),
        (_bad(layout="sbhd"), ValueError, "layout must be 'bshd'"),
        (_bad(k=torch.randn(2, 5, 1, 16, dtype=torch.float16)), TypeError, "q and k must have the same dtype"),
        (_bad(cos=torch.ones(5, 16, dtype=torch.int32)), TypeError, "cos must be a floating-point tensor"),
        (_bad(cos=torch.ones(5, 16, device="meta")), ValueError, "cos is on meta but q is on cpu"),
        (_bad(k_shape=(2, 1, 3, 16), layout="bhsd"), ValueError, r"cos/sin have 5 positions .* but q has S=3"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_cuda_extension_argument_errors():
    try:
        from fastgen import _C
    except ImportError:
        pytest.skip("fastgen._C is not built (nvcc absent or FASTGEN_SKIP_CUDA_BUILD=1)")
    zeros = [0] * 12
    with pytest.raises(ValueError, match="rotary dim R must be even with 2 <= R <= D, got R=15"):
        c_entry(_C, "apply_rope", 0, 0, 0, 0, 0, 0, 1, 4, 2, 2, 16, 15, *zeros, 0, 0, 0, 0, 2, 0, True, False, True, 0)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(_C, "apply_rope", 8, 8, 8, 8, 8, 8, 1, 4, 2, 2, 16, 16, *zeros, 0, 0, 0, 0, 2, 1, True, False, True, 0)
    c_entry(_C, "apply_rope", 0, 0, 0, 0, 0, 0, 0, 4, 2, 2, 16, 16, *zeros, 0, 0, 0, 0, 2, 0, True, False, True, 0)  # empty


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D, R", [(128, 128), (64, 64), (72, 72), (40, 40), (128, 64), (80, 32)])
def test_gpu_forward_backward(backend, interleaved, layout, dtype, D, R):
    B, S, hq, hk = 2, 333, 6, 2
    q, k = _qk(B, S, hq, hk, D, dtype, layout, "cuda")
    cos, sin = _tables(S, R, interleaved, "cuda")
    q.requires_grad_()
    k.requires_grad_()
    out = apply_rope(q, k, cos, sin, layout, interleaved, backend=backend)
    ref = apply_rope_ref(q.detach(), k.detach(), cos, sin, layout, interleaved)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    dq, dk = torch.randn_like(out[0]), torch.randn_like(out[1])
    torch.autograd.backward(out, (dq, dk))
    rq, rk = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    torch.autograd.backward(apply_rope_ref(rq, rk, cos, sin, layout, interleaved), (dq, dk))
    assert_close(q.grad, rq.grad)
    assert_close(k.grad, rk.grad)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_flux_qkv_views_inplace_and_compiled(backend):
    B, S, H, D = 1, 4608, 24, 128
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.cat([torch.zeros(512, 3), rope_grid_ids(64, 64, prefix_axes=1)]).cuda()
    cos, sin = rope_frequencies(ids, (16, 56, 56), interleaved=True)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    ref = apply_rope_ref(q, k, cos, sin, interleaved=True)
    out = apply_rope(q, k, cos, sin, interleaved=True, backend=backend)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    apply_rope(q, k, cos, sin, interleaved=True, inplace=True, backend=backend)
    assert_close(qkv[:, :, 0], ref[0])
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: apply_rope(a, b, cos, sin, interleaved=True, backend=backend), fullgraph=True)
    y = f(ref[0], ref[1])
    assert_close(y[0], apply_rope_ref(ref[0], ref[1], cos, sin, interleaved=True)[0])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_auto_matches_reference(impl, monkeypatch):
    q, k = _qk(2, 100, 4, 4, 64, torch.bfloat16, "bshd", "cuda")
    cos, sin = _tables(100, 64, False, "cuda")
    out = run_auto_as(monkeypatch, "apply_rope", impl, lambda: apply_rope(q, k, cos, sin))
    assert_close(out[0], apply_rope_ref(q, k, cos, sin)[0])


# ----------------------------------------------------------------------------- benchmark suite


def _bench():
    import importlib

    from fastgen.cli import _benchmarks_package

    return importlib.import_module(_benchmarks_package().__name__ + ".bench_rope")


@pytest.mark.parametrize("variant", ["halves", "interleaved", "qk_norm"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_bench_setup_runs_on_cpu(variant, mode):
    bench = _bench()
    case = bench.Case({"B": 1, "S": 6, "H": 2, "D": 16}, torch.float32, variant)
    bench.setup("torch", case, mode, "cpu")()
    for provider in ("fastgen-triton", "fastgen-cuda", "liger-kernel"):
        with pytest.raises(bench.Unavailable):
            bench.setup(provider, case, mode, "cpu")


def test_bench_liger_adapter_is_the_same_rotation():
    """The liger-kernel row times the function the other rows compute: its RoPE (Triton, run in
    the interpreter on CPU) through the suite's layout adapter equals apply_rope_ref (halves)."""
    if TRITON_DEVICE != "cpu":
        pytest.skip("the interpreter check; on a GPU the bench compares real timings")
    liger_rope = pytest.importorskip("liger_kernel.ops.rope", reason="liger-kernel is not installed")
    f = _bench().liger_adapter(liger_rope.LigerRopeFunction)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, 3, 16, generator=g), torch.randn(2, 7, 1, 16, generator=g)
    ang = torch.rand(7, 8, generator=g) * 6.28
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    qr, kr = apply_rope_ref(q, k, cos, sin, "bshd", False)
    qo, ko = f(q.clone(), k.clone(), None, None, cos, sin)  # liger rotates its inputs in place
    torch.testing.assert_close(qo, qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, kr, atol=1e-5, rtol=1e-5)
