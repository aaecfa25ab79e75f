"""The AdaLN modulation ops and the gated residual against fp32 references and float64 formulas.

fastgen.ops.layer_norm_modulate, rms_norm_modulate, gated_residual and
gated_residual_layer_norm_modulate; per-sample and per-token modulation; the
(B, 6N) projection chunks read in place; every gradient.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, TRITON_DEVICE, assert_close, requires_gpu

from fastgen.backend import BackendUnavailableError
from fastgen.ops import (
    gated_residual,
    gated_residual_layer_norm_modulate,
    gated_residual_layer_norm_modulate_ref,
    gated_residual_ref,
    layer_norm_modulate,
    layer_norm_modulate_ref,
    rms_norm_modulate,
    rms_norm_modulate_ref,
)

EPS = 1e-6
OPS = {
    # name: (op, ref, tensor args after x, keyword extras)
    "ln_mod": (layer_norm_modulate, layer_norm_modulate_ref, ("shift", "scale"), ("weight", "bias")),
    "rms_mod": (rms_norm_modulate, rms_norm_modulate_ref, ("shift", "scale"), ("weight",)),
    "gated": (gated_residual, gated_residual_ref, ("y", "gate"), ()),
    "gated_ln_mod": (gated_residual_layer_norm_modulate, gated_residual_layer_norm_modulate_ref,
                     ("y", "gate", "shift", "scale"), ("weight", "bias")),
}


def _make(op, B, S, N, dtype, device, per_token, affine=True, seed=0):
    """Inputs of ``op`` as (args, kwargs); modulation tensors are chunks of one (B, 6N) projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, N, generator=g).to(device, dtype)
    shape = (B, S, 6 * N) if per_token else (B, 6 * N)
    emb = (0.5 * torch.randn(shape, generator=g)).to(device, dtype)
    chunks = dict(zip(("shift", "scale", "gate"), emb.chunk(6, dim=-1)))
    pool = dict(chunks, y=torch.randn(B, S, N, generator=g).to(device, dtype),
                weight=(1 + 0.3 * torch.randn(N, generator=g)).to(device, dtype),
                bias=(0.3 * torch.randn(N, generator=g)).to(device, dtype))
    _, _, names, extras = OPS[op]
    args = [x] + [pool[n] for n in names]
    kwargs = {"eps": EPS} if op != "gated" else {}
    if affine:
        kwargs.update({n: pool[n] for n in extras})
    return args, kwargs


def _leaves(args, kwargs):
    """Detached, grad-requiring copies (chunks become their own leaves)."""
    a = [t.detach().clone().requires_grad_() for t in args]
    k = {n: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    return a, k


def _tensors(a, k):
    return a + [v for v in k.values() if isinstance(v, torch.Tensor)]


def _as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


# ----------------------------------------------------------------------------- references vs float64


def _ln64(h, w, b, eps, rms=False):
    h = h.double()
    if rms:
        n = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    else:
        m = h.mean(-1, keepdim=True)
        n = (h - m) / torch.sqrt(((h - m) ** 2).mean(-1, keepdim=True) + eps)
    if w is not None:
        n = n * w.double()
    if b is not None:
        n = n + b.double()
    return n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_references_match_hand_written_float64(dtype, per_token):
    B, S, N = 2, 5, 96
    up = lambda t: (t.unsqueeze(1) if t.dim() == 2 else t).double()  # noqa: E731
    (x, sh, sc), kw = _make("ln_mod", B, S, N, dtype, "cpu", per_token)
    want = _ln64(x, kw["weight"], kw["bias"], EPS) * (1 + up(sc)) + up(sh)
    assert_close(layer_norm_modulate_ref(x, sh, sc, **kw), want.to(dtype))
    (x, sh, sc), kw = _make("rms_mod", B, S, N, dtype, "cpu", per_token)
    want = _ln64(x, kw["weight"], None, EPS, rms=True) * (1 + up(sc)) + up(sh)
    assert_close(rms_norm_modulate_ref(x, sh, sc, **kw), want.to(dtype))
    (x, y, gate, sh, sc), kw = _make("gated_ln_mod", B, S, N, dtype, "cpu", per_token)
    h, x_new = gated_residual_layer_norm_modulate_ref(x, y, gate, sh, sc, **kw)
    assert_close(x_new, (x.double() + up(gate) * y.double()).to(dtype))
    assert_close(h, (_ln64(x_new, kw["weight"], kw["bias"], EPS) * (1 + up(sc)) + up(sh)).to(dtype))


# ----------------------------------------------------------------------------- Triton


SHAPES = [(1, 1, 1), (3, 17, 7), (2, 5, 123), (1, 2, 3072)]


def _check(op, B, S, N, dtype, per_token, affine=True, grad_scale=2):
    f, ref, _, _ = OPS[op]
    args, kwargs = _make(op, B, S, N, dtype, TRITON_DEVICE, per_token, affine)
    a, k = _leaves(args, kwargs)
    ra, rk = _leaves(args, kwargs)
    out, want = _as_tuple(f(*a, **k, backend="triton")), _as_tuple(ref(*ra, **rk))
    assert len(out) == len(want)
    for o, w in zip(out, want):
        assert o.shape == (B, S, N) and o.dtype == dtype
        assert_close(o, w)
    gen = torch.Generator().manual_seed(7)
    douts = [torch.randn(o.shape, generator=gen).to(o.device, dtype) for o in out]
    leaves, rleaves = _tensors(a, k), _tensors(ra, rk)
    got = torch.autograd.grad(sum((o * d).sum() for o, d in zip(out, douts)), leaves)
    exp = torch.autograd.grad(sum((o * d).sum() for o, d in zip(want, douts)), rleaves)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert g.shape == e.shape and g.dtype == e.dtype, i
        # per-sample gradients sum S rows; both sides accumulate in fp32
        assert_close(g, e, scale=grad_scale, msg=f"gradient {i} of {op}")


# The wide row (N = 3072) runs in bf16 only, to keep the interpreter time down.
SHAPE_DTYPES = [(s, dt) for s in SHAPES for dt in DTYPES if s[-1] != 3072 or dt == torch.bfloat16]


@pytest.mark.parametrize("shape, dtype", SHAPE_DTYPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("op", list(OPS))
def test_triton_forward_backward(op, per_token, dtype, shape):
    _check(op, *shape, dtype, per_token, grad_scale=4 if dtype == torch.bfloat16 else 2)


@pytest.mark.parametrize("op", ["ln_mod", "rms_mod", "gated_ln_mod"])
def test_triton_without_affine(op):
    _check(op, 2, 3, 40, torch.float32, per_token=False, affine=False)


@pytest.mark.parametrize("op", ["ln_mod", "rms_mod", "gated_ln_mod"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_triton_column_block_backward(monkeypatch, op, per_token):
    """Rows wider than MAX_FULL_ROW_BWD: row statistics kernel, then column blocks."""
    from fastgen.kernels import layer_norm as k

    monkeypatch.setattr(k, "MAX_FULL_ROW_BWD", 64)
    monkeypatch.setattr(k, "CHUNK_N", 64)
    assert not k.layer_norm_bwd_config(2, 3, 150, True, 0, torch.device("cpu"))["FULL_ROW"]
    _check(op, 2, 3, 150, torch.float32, per_token)


# Rows wider than MAX_FULL_ROW_FWD (8192) take the chunked forward: two passes over column chunks
# of FWD_CHUNK_N (2048); 8193 ends on a 1-element chunk. Every dtype at 8193, bf16 also at 20000.
WIDE_SHAPE_DTYPES = [((2, 2, 8193), dt) for dt in DTYPES] + [((1, 3, 20000), torch.bfloat16)]


@pytest.mark.parametrize("shape, dtype", WIDE_SHAPE_DTYPES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("op", list(OPS))
def test_triton_wide_rows(op, per_token, dtype, shape):
    from fastgen.kernels import layer_norm as k

    assert shape[-1] > k.MAX_FULL_ROW_FWD
    _check(op, *shape, dtype, per_token, grad_scale=4 if dtype == torch.bfloat16 else 2)


@pytest.mark.parametrize("op", ["ln_mod", "rms_mod", "gated_ln_mod"])
def test_triton_wide_rows_without_affine(op):
    _check(op, 1, 2, 12000, torch.float32, per_token=True, affine=False)


@pytest.mark.parametrize("N", [40, 150, 256])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("op", list(OPS))
def test_triton_chunked_forward_small_chunks(monkeypatch, op, per_token, N):
    """The chunked forward with 64-column chunks on narrow rows: one partial chunk (40), a partial
    last chunk (150), whole chunks only (256); outputs as the single-pass forward gives them."""
    from fastgen.kernels import layer_norm as k

    args, kwargs = _make(op, 2, 3, N, torch.float32, TRITON_DEVICE, per_token)
    f = OPS[op][0]
    single = _as_tuple(f(*args, **kwargs, backend="triton"))
    monkeypatch.setattr(k, "MAX_FULL_ROW_FWD", 32)
    monkeypatch.setattr(k, "FWD_CHUNK_N", 64)
    assert k.layer_norm_fwd_chunked_config(6, N)["n_chunks"] == -(-N // 64)
    chunked = _as_tuple(f(*args, **kwargs, backend="triton"))
    for c, o in zip(chunked, single):
        assert_close(c, o)
    _check(op, 2, 3, N, torch.float32, per_token)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_wide_gated_residual_large_mean(dtype):
    """gated_residual_layer_norm_modulate on a residual stream of mean 1000: the chunked statistics
    of the rounded x_new stay as accurate as PyTorch's own fp32 (FlashAttention rule, float64 truth
    of the norm of the rounded x_new). In bf16 (ulp 4 at 1000) most of gate * y is lost in the
    rounding of x_new, so a norm of the unrounded sum would be far off."""
    B, S, N = 1, 2, 12000
    g = torch.Generator().manual_seed(9)
    x = (1000 + torch.randn(B, S, N, generator=g)).to(TRITON_DEVICE, dtype)
    y, gate, sh, sc = (0.5 * torch.randn(4, B, S, N, generator=g)).to(TRITON_DEVICE, dtype).unbind(0)
    h, x_new = gated_residual_layer_norm_modulate(x, y, gate, sh, sc, eps=EPS, backend="triton")
    hr, x_newr = gated_residual_layer_norm_modulate_ref(x, y, gate, sh, sc, eps=EPS)
    # x + gate * y: one rounding of the fp32 sum in torch; a compiled kernel contracts it into an FMA,
    # so the two may differ by one ulp of the stored dtype (never more).
    torch.testing.assert_close(x_new, x_newr, rtol=torch.finfo(dtype).eps, atol=0)
    h64 = _ln64(x_newr, None, None, EPS) * (1 + sc.double()) + sh.double()
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (h.double() - h64).abs().max() <= 2 * (hr.double() - h64).abs().max() + atol


def test_projection_chunks_are_read_in_place_and_get_gradients():
    B, S, N = 2, 3, 24
    x = torch.randn(B, S, N, device=TRITON_DEVICE)
    y = torch.randn(B, S, N, device=TRITON_DEVICE)
    emb = torch.randn(B, 6 * N, device=TRITON_DEVICE, requires_grad=True)
    sh, sc, gate = emb.chunk(6, dim=1)[:3]
    assert sh.stride() == (6 * N, 1)
    h, x_new = gated_residual_layer_norm_modulate(x, y, gate, sh, sc, backend="triton")
    embr = emb.detach().clone().requires_grad_()
    shr, scr, gater = embr.chunk(6, dim=1)[:3]
    hr, xr = gated_residual_layer_norm_modulate_ref(x, y, gater, shr, scr)
    assert_close(h, hr)
    assert_close(x_new, xr)
    (h.sum() + (x_new * 2).sum()).backward()
    (hr.sum() + (xr * 2).sum()).backward()
    assert_close(emb.grad, embr.grad)
    assert torch.all(emb.grad[:, 3 * N:] == 0)


def test_non_contiguous_x_y_and_per_token_modulation():
    B, S, N = 2, 4, 30
    x = torch.randn(B, N, S, device=TRITON_DEVICE).transpose(1, 2).requires_grad_()  # last dim strided
    y = torch.randn(S, B, N, device=TRITON_DEVICE).transpose(0, 1)  # sample stride < token stride
    gate = torch.randn(B, S, 2 * N, device=TRITON_DEVICE)[..., ::2]  # strided last dim: copied
    sh = torch.randn(B, 1, N, device=TRITON_DEVICE).expand(B, S, N)  # broadcast view
    sc = torch.randn(B, 1, N, device=TRITON_DEVICE)
    h, x_new = gated_residual_layer_norm_modulate(x, y, gate, sh, sc, backend="triton")
    xr = x.detach().clone().requires_grad_()
    hr, x_newr = gated_residual_layer_norm_modulate_ref(xr, y, gate, sh, sc)
    assert_close(h, hr)
    assert_close(x_new, x_newr)
    dh = torch.randn_like(h)
    (h * dh).sum().backward()
    (hr * dh).sum().backward()
    assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("which", ["h", "x_new"])
def test_gradient_of_one_output_only(which):
    args, kwargs = _make("gated_ln_mod", 2, 3, 20, torch.float32, TRITON_DEVICE, per_token=False)
    a, k = _leaves(args, kwargs)
    ra, rk = _leaves(args, kwargs)
    out = gated_residual_layer_norm_modulate(*a, **k, backend="triton")
    want = gated_residual_layer_norm_modulate_ref(*ra, **rk)
    i = 0 if which == "h" else 1
    got = torch.autograd.grad(out[i].square().sum(), _tensors(a, k), allow_unused=True)
    exp = torch.autograd.grad(want[i].square().sum(), _tensors(ra, rk), allow_unused=True)
    for g, e in zip(got, exp):
        if e is None:
            assert g is None or torch.all(g == 0)
        else:
            assert_close(g, e)


def test_per_sample_gradients_are_deterministic():
    args, kwargs = _make("gated_ln_mod", 2, 37, 64, torch.float32, TRITON_DEVICE, per_token=False, seed=4)
    grads = []
    for _ in range(2):
        a, k = _leaves(args, kwargs)
        h, x_new = gated_residual_layer_norm_modulate(*a, **k, backend="triton")
        grads.append(torch.autograd.grad(h.sum() + x_new.square().sum(), _tensors(a, k)))
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


def test_custom_ops_pass_opcheck():
    args, kwargs = _make("gated_ln_mod", 2, 3, 17, torch.float32, TRITON_DEVICE, per_token=False)
    x, y, gate, sh, sc = args
    gate, sh, sc = gate[:, None], sh[:, None], sc[:, None]
    w, b = kwargs["weight"], kwargs["bias"]
    fwd_args = (x, y, gate, sh, sc, w, b, EPS, 1, "triton")
    torch.library.opcheck(torch.ops.fastgen.layer_norm_fwd, fwd_args, test_utils=("test_schema", "test_faketensor"))
    out, x_new, mean, rstd = torch.ops.fastgen.layer_norm_fwd(*fwd_args)
    d = torch.randn_like(out)
    for dout in (d, None):
        torch.library.opcheck(torch.ops.fastgen.layer_norm_bwd,
                              (dout, d, x_new, y, gate, sc, w, b, mean, rstd, True, 1, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def block(x, y, emb):
        sh, sc, gate = emb.chunk(3, dim=1)
        h, x = gated_residual_layer_norm_modulate(x, y, gate, sh, sc, backend=backend)
        return layer_norm_modulate(h, sh, sc, backend=backend) * 2, gated_residual(x, h, gate, backend=backend)

    x = torch.randn(2, 3, 16, device=TRITON_DEVICE, requires_grad=True)
    y = torch.randn(2, 3, 16, device=TRITON_DEVICE)
    emb = torch.randn(2, 48, device=TRITON_DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    out, eager = compiled(x, y, emb), block(x, y, emb)
    for o, e in zip(out, eager):
        assert_close(o, e)
    g = torch.autograd.grad(sum(o.sum() for o in out), (x, emb))
    ge = torch.autograd.grad(sum(o.sum() for o in eager), (x, emb))
    for a, b in zip(g, ge):
        assert_close(a, b)


# ----------------------------------------------------------------------------- errors


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: layer_norm_modulate(_t(2, 3, 8), _t(2, 8), _t(2, 7)), ValueError,
         r"scale must have shape \(B, N\) = \(2, 8\) \(per sample\) or \(B, S, N\) = \(2, 3, 8\) \(per token\)"),
        (lambda: layer_norm_modulate(_t(2, 3, 8), _t(3, 8), _t(2, 8)), ValueError, "shift must have shape"),
        (lambda: rms_norm_modulate(_t(2, 3, 8), _t(2, 8, dtype=torch.float16), _t(2, 8)), TypeError,
         "shift dtype torch.float16 does not match x dtype torch.float32"),
        (lambda: layer_norm_modulate(_t(2, 3, 8), _t(2, 8), _t(2, 8, device="meta")), ValueError,
         "scale is on meta but x is on cpu"),
        (lambda: layer_norm_modulate(_t(3, 8), _t(3, 8), _t(3, 8)), ValueError,
         r"x must have shape \(B, S, N\)"),
        (lambda: gated_residual(_t(2, 3, 8), _t(2, 3, 7), _t(2, 8)), ValueError, "y must have the shape of x"),
        (lambda: gated_residual(_t(2, 3, 8), _t(2, 3, 8), _t(2, 3, 4)), ValueError, "gate must have shape"),
        (lambda: gated_residual(_t(2, 3, 8), _t(2, 3, 8, dtype=torch.bfloat16), _t(2, 8)), TypeError,
         "y dtype torch.bfloat16 does not match x dtype torch.float32"),
        (lambda: gated_residual_layer_norm_modulate(_t(2, 3, 8), _t(2, 3, 8), _t(2, 8), _t(2, 8), _t(2, 8),
                                                    weight=_t(9)), ValueError, r"weight must have shape \(8,\)"),
        (lambda: layer_norm_modulate(_t(2, 3, 8), _t(2, 8), _t(2, 8), eps=-1.0), ValueError,
         "eps must be a finite number >= 0"),
        (lambda: layer_norm_modulate(_t(2, 3, 8), _t(2, 8), _t(2, 8), backend="cuda"), BackendUnavailableError,
         "layer_norm_modulate: backend='cuda' cannot run: this op has no CUDA C\\+\\+ implementation"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_zero_size_and_float64_take_the_reference():
    x = torch.randn(2, 0, 8, device=TRITON_DEVICE)
    shift = torch.randn(2, 8, device=TRITON_DEVICE)
    assert layer_norm_modulate(x, shift, shift, backend="triton").shape == x.shape
    x64 = torch.randn(2, 3, 8, dtype=torch.float64)
    s = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(layer_norm_modulate(x64, s, s), layer_norm_modulate_ref(x64, s, s))
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        layer_norm_modulate(x64, s, s, backend="triton")


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 123), (2, 1024, 1152), (2, 333, 3072), (1, 64, 5120),
                                   (2, 16, 8192), (2, 9, 20000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_forward_backward(op, per_token, shape, dtype):
    assert TRITON_DEVICE == "cuda"  # with a GPU present, the kernels run on it
    _check(op, *shape, dtype, per_token, grad_scale=8)
