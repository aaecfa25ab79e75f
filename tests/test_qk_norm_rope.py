"""fastgen.ops.qk_norm_rope against the unfused torch path, float64 math and diffusers.

Triton runs on the GPU when there is one, else in Triton's interpreter on CPU
tensors (small shapes). CUDA C++ runs in the ``gpu`` tier only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, TRITON_DEVICE, assert_close, requires_gpu
from test_rope import _qk, _rope64, _tables

from fastgen.backend import BackendUnavailableError
from fastgen.ops import apply_rope_ref, qk_norm_rope, qk_norm_rope_ref, rms_norm_ref

EPS = 1e-6


def _ref64(x, w, cos, sin, layout, interleaved, eps=EPS):
    """float64: hand-written RMSNorm, then the complex-number rotation."""
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return _rope64(n, cos, sin, layout, interleaved)


def _weights(D, dtype, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    return tuple((1 + 0.3 * torch.randn(D, generator=g)).to(device=device, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_float64_and_unfused(interleaved, dtype):
    q, k = _qk(2, 5, 3, 1, 72, dtype, "bshd", "cpu")
    wq, wk = _weights(72, dtype, "cpu")
    cos, sin = _tables(5, 40, interleaved)
    out_q, out_k = qk_norm_rope_ref(q, k, wq, wk, cos, sin, EPS, "bshd", interleaved)
    assert_close(out_q, _ref64(q, wq, cos, sin, "bshd", interleaved).to(dtype))
    assert_close(out_k, _ref64(k, wk, cos, sin, "bshd", interleaved).to(dtype))
    # The unfused pair rounds the normalized q once more: equal within the dtype's tolerance.
    unfused = apply_rope_ref(rms_norm_ref(q, wq, EPS), rms_norm_ref(k, wk, EPS), cos, sin, "bshd", interleaved)
    assert_close(out_q, unfused[0], scale=2)
    assert_close(out_k, unfused[1], scale=2)


def test_reference_matches_diffusers_flux_attention_math():
    emb = pytest.importorskip("diffusers.models.embeddings", reason="diffusers' apply_rotary_emb")
    norm = pytest.importorskip("diffusers.models.normalization", reason="diffusers' RMSNorm")
    B, S, H, D = 1, 6, 2, 64
    q, k = _qk(B, S, H, H, D, torch.float32, "bhsd", "cpu")
    n = norm.RMSNorm(D, eps=1e-6)
    torch.nn.init.normal_(n.weight)
    cos, sin = _tables(S, D, True)
    expected = emb.apply_rotary_emb(n(q), (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=2)
    out, _ = qk_norm_rope_ref(q, k, n.weight.detach(), n.weight.detach(), cos, sin, 1e-6, "bhsd", True)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def _check_triton(B, S, hq, hk, D, R, dtype, layout, interleaved, w_dtype=None, seed=0):
    q, k = _qk(B, S, hq, hk, D, dtype, layout, TRITON_DEVICE, seed)
    wq, wk = _weights(D, w_dtype or dtype, TRITON_DEVICE)
    cos, sin = _tables(S, R, interleaved, TRITON_DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, wq, wk)]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    out = qk_norm_rope(q, k, wq, wk, cos, sin, EPS, layout, interleaved, backend="triton")
    ref = qk_norm_rope_ref(*refs, cos, sin, EPS, layout, interleaved)
    assert out[0].dtype == dtype and out[0].shape == q.shape and out[1].shape == k.shape
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    q64 = _ref64(q.detach(), wq.detach(), cos, sin, layout, interleaved)
    assert (out[0].double() - q64).abs().max() <= 2 * (ref[0].double() - q64).abs().max() + 1e-5
    g = torch.Generator().manual_seed(1)
    dys = [torch.randn(o.shape, generator=g).to(o.device, dtype) for o in out]
    torch.autograd.backward(out, dys)
    torch.autograd.backward(ref, dys)
    for got, want in zip(leaves, refs):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, dtype=dtype, scale=2)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_partial_rotary_gqa_odd_seq(interleaved, layout, dtype):
    _check_triton(2, 7, 3, 1, 72, 40, dtype, layout, interleaved)


@pytest.mark.parametrize("D, R", [(64, 64), (128, 128), (40, 40), (128, 32)])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_triton_head_dims(D, R, interleaved):
    _check_triton(1, 5, 2, 2, D, R, torch.bfloat16, "bshd", interleaved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_fp32_weights_with_half_inputs(dtype):
    _check_triton(1, 3, 2, 1, 32, 32, dtype, "bhsd", True, w_dtype=torch.float32)


def test_triton_many_token_tiles_and_determinism():
    # Enough tokens for several tiles per backward program: the partials must be summed in order.
    B, S, H, D = 1, 150, 1, 16
    q, k = _qk(B, S, H, H, D, torch.float32, "bshd", TRITON_DEVICE, seed=4)
    wq, wk = _weights(D, torch.float32, TRITON_DEVICE)
    cos, sin = _tables(S, D, False, TRITON_DEVICE)
    dy = torch.randn(B, S, H, D, device=TRITON_DEVICE)
    grads = []
    for _ in range(2):
        w1, w2 = wq.clone().requires_grad_(), wk.clone().requires_grad_()
        out = qk_norm_rope(q, k, w1, w2, cos, sin, backend="triton")
        torch.autograd.backward(out, (dy, dy))
        grads.append((w1.grad, w2.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    r1, r2 = wq.clone().requires_grad_(), wk.clone().requires_grad_()
    torch.autograd.backward(qk_norm_rope_ref(q, k, r1, r2, cos, sin), (dy, dy))
    assert_close(grads[0][0], r1.grad, scale=10)
    assert_close(grads[0][1], r2.grad, scale=10)


def test_triton_qkv_views():
    B, S, H, D = 1, 4, 2, 32
    qkv = torch.randn(B, S, 3, H, D, device=TRITON_DEVICE, requires_grad=True)
    qkv_r = qkv.detach().clone().requires_grad_()
    wq, wk = _weights(D, torch.float32, TRITON_DEVICE)
    cos, sin = _tables(S, 16, True, TRITON_DEVICE)
    out = qk_norm_rope(qkv[:, :, 0], qkv[:, :, 1], wq, wk, cos, sin, interleaved=True, backend="triton")
    ref = qk_norm_rope_ref(qkv_r[:, :, 0], qkv_r[:, :, 1], wq, wk, cos, sin, interleaved=True)
    assert_close(out[0], ref[0])
    (out[0].sum() + 2 * out[1].sum()).backward()
    (ref[0].sum() + 2 * ref[1].sum()).backward()
    assert_close(qkv.grad, qkv_r.grad)


def test_zero_size():
    q = torch.randn(2, 0, 3, 16, device=TRITON_DEVICE, requires_grad=True)
    wq = torch.ones(16, device=TRITON_DEVICE, requires_grad=True)
    cos, sin = _tables(0, 16, False, TRITON_DEVICE)
    out = qk_norm_rope(q, q, wq, wq, cos, sin, backend="triton")
    assert out[0].shape == q.shape


def test_custom_ops_pass_opcheck():
    q, k = _qk(1, 3, 2, 1, 16, torch.float32, "bshd", TRITON_DEVICE)
    wq, wk = _weights(16, torch.float32, TRITON_DEVICE)
    cos, sin = _tables(3, 8, True, TRITON_DEVICE)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastgen.qk_norm_rope_fwd, (q, k, wq, wk, cos, sin, EPS, "bshd", True, "triton"),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fastgen.qk_norm_rope_bwd,
                          (q, k, q, k, wq, wk, cos, sin, EPS, "bshd", True, "triton"), test_utils=utils)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    D = 16
    wq, wk = (torch.nn.Parameter(w) for w in _weights(D, torch.float32, TRITON_DEVICE))
    cos, sin = _tables(4, D, False, TRITON_DEVICE)

    def f(q, k):
        a, b = qk_norm_rope(q, k, wq, wk, cos, sin, backend=backend)
        return (a * b).sum(-1)

    q, k = _qk(1, 4, 2, 2, D, torch.float32, "bshd", TRITON_DEVICE)
    q.requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    y, ye = compiled(q, k), f(q, k)
    assert_close(y, ye)
    y.sum().backward()
    g, gw = q.grad.clone(), wq.grad.clone()
    q.grad = wq.grad = None
    ye.sum().backward()
    assert_close(g, q.grad)
    assert_close(gw, wq.grad)


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(q_weight=torch.ones(15)), ValueError, r"q_weight must have shape \(16,\)"),
        (dict(k_weight=torch.ones(16, dtype=torch.float16)), TypeError, "k_weight dtype torch.float16 does not match"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        (dict(cos=torch.ones(4, 17)), ValueError, "cos and sin must have the same shape"),
        (dict(layout="bsdh"), ValueError, "layout must be"),
    ],
)
def test_bad_inputs(kw, error, message):
    args = dict(q=torch.randn(1, 4, 2, 16), k=torch.randn(1, 4, 2, 16), q_weight=torch.ones(16),
                k_weight=torch.ones(16), cos=torch.ones(4, 16), sin=torch.zeros(4, 16))
    args.update(kw)
    with pytest.raises(error, match=message):
        qk_norm_rope(**args)


def test_backend_errors():
    q = torch.randn(1, 2, 2, 8)
    w = torch.ones(8)
    cos, sin = _tables(2, 8, False)
    with pytest.raises(BackendUnavailableError, match="CUDA C\\+\\+ backend needs CUDA tensors"):
        qk_norm_rope(q, q, w, w, cos, sin, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        qk_norm_rope(q.double(), q.double(), w, w, cos, sin, backend="triton")


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@requires_gpu
def test_gpu_cuda_backend_runs_the_cuda_kernel():
    q = torch.randn(1, 2, 2, 8, device="cuda")
    w = torch.ones(8, device="cuda")
    cos, sin = _tables(2, 8, False, "cuda")
    out = qk_norm_rope(q, q, w, w, cos, sin, backend="cuda")
    ref = qk_norm_rope_ref(q, q, w, w, cos, sin)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D, R", [(128, 128), (64, 64), (72, 72), (128, 64)])
def test_gpu_forward_backward(backend, interleaved, layout, dtype, D, R):
    B, S, hq, hk = 2, 333, 6, 2
    q, k = _qk(B, S, hq, hk, D, dtype, layout, "cuda")
    wq, wk = _weights(D, dtype, "cuda")
    cos, sin = _tables(S, R, interleaved, "cuda")
    leaves = [t.requires_grad_() for t in (q, k, wq, wk)]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    out = qk_norm_rope(q, k, wq, wk, cos, sin, EPS, layout, interleaved, backend=backend)
    ref = qk_norm_rope_ref(*refs, cos, sin, EPS, layout, interleaved)
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
    dys = [torch.randn_like(o) for o in out]
    torch.autograd.backward(out, dys)
    torch.autograd.backward(ref, dys)
    for got, want, scale in zip(leaves, refs, (2, 2, 8, 8)):
        assert_close(got.grad, want.grad, dtype=dtype, scale=scale)
