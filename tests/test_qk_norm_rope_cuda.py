"""The CUDA C++ qk_norm_rope (csrc/qk_norm_rope/, fastgen.cuda.qk_norm_rope).

CPU tier: the launchers mirror the Triton ones, fastgen._C checks its arguments and fails
cleanly without a GPU (the sources' compilation, sm_80 / sm_90 with no spills, is
tests/test_cuda_build.py). GPU tier (``-m gpu``): ``backend="cuda"`` against
``backend="torch"`` with the tolerance table of conftest.py and against float64 with the
FlashAttention rule, forward and every gradient, both pair conventions and layouts, partial
rotary, GQA, odd head dims and sequence lengths, strided and misaligned views (vector and
scalar paths), table and weight dtypes, empty problems, deterministic weight gradients.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import DTYPES, HAS_CUDA, TOL, assert_close, c_entry, requires_gpu

from fastgen.ops import qk_norm_rope

EPS = 1e-6


def _C_or_skip():
    try:
        from fastgen import _C
    except ImportError:
        pytest.skip("fastgen._C is not built (nvcc absent or FASTGEN_SKIP_CUDA_BUILD=1)")
    return _C


# ----------------------------------------------------------------------------- CPU tier


def test_launchers_have_the_triton_signatures():
    from fastgen.cuda import qk_norm_rope as cuda_launchers
    from fastgen.kernels import qk_norm_rope as triton_launchers

    for name in ("qk_norm_rope_fwd", "qk_norm_rope_bwd"):
        got = inspect.signature(getattr(cuda_launchers, name))
        want = inspect.signature(getattr(triton_launchers, name))
        assert list(got.parameters) == list(want.parameters), name


def test_backward_partials_split():
    from fastgen.cuda.qk_norm_rope import _num_partials

    for rows_q, rows_k, total in [(1, 1, 528), (10_000, 0, 528), (0, 7, 528), (24 * 4608, 4608, 528),
                                  (3, 100_000, 528), (5, 5, 2), (1000, 1000, 1)]:
        pq, pk = _num_partials(rows_q, rows_k, total)
        assert (pq >= 1) == (rows_q > 0) and (pk >= 1) == (rows_k > 0)
        assert pq <= rows_q and pk <= rows_k and pq + pk <= max(total, 2)


def _fwd_args(**kw):
    a = dict(q_ptr=256, k_ptr=256, wq_ptr=256, wk_ptr=256, qo_ptr=256, ko_ptr=256, cos_ptr=256, sin_ptr=256,
             B=1, S=4, Hq=2, Hk=1, D=64, R=64, sqb=512, sqs=128, sqh=64, skb=256, sks=64, skh=64,
             soqb=512, soqs=128, soqh=64, sokb=256, soks=64, sokh=64, scb=0, scs=64, ssb=0, sss=64,
             x_dtype=2, wq_dtype=2, wk_dtype=0, table_dtype=0, eps=1e-6, interleaved=True, stream=0)
    a.update(kw)
    return a


def _bwd_args(**kw):
    f = _fwd_args()
    a = dict(dqo_ptr=256, dko_ptr=256, q_ptr=256, k_ptr=256, wq_ptr=256, wk_ptr=256, dq_ptr=256, dk_ptr=256,
             dw_partial_ptr=256, cos_ptr=256, sin_ptr=256, B=1, S=4, Hq=2, Hk=1, D=64, R=64)
    for pre, src in (("sdq", "sq"), ("sdk", "sk"), ("sq", "sq"), ("sk", "sk"), ("soq", "soq"), ("sok", "sok")):
        for d in "bsh":
            a[pre + d] = f[src + d]
    a.update(scb=0, scs=64, ssb=0, sss=64, x_dtype=2, wq_dtype=2, wk_dtype=0, table_dtype=0, eps=1e-6,
             interleaved=False, num_partials_q=4, num_partials_k=2, stream=0)
    a.update(kw)
    return a


def test_extension_argument_errors():
    C = _C_or_skip()
    cases = [
        (dict(R=15), "rotary dim R must be even with 2 <= R <= D, got R=15"),
        (dict(R=66), "rotary dim R must be even with 2 <= R <= D, got R=66"),
        (dict(D=2048, R=64), "head dim D must be <= 1024"),
        (dict(x_dtype=3), "unsupported dtypes"),
        (dict(table_dtype=1), "unsupported dtypes"),  # fp16 tables with bf16 x
        (dict(wk_dtype=7), "unsupported weight dtypes"),
        (dict(S=-1), "sizes must be >= 0"),
        (dict(eps=float("nan")), "eps must be finite"),
        (dict(cos_ptr=0), "cos / sin pointers must be non-null"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            c_entry(C, "qk_norm_rope_fwd", **_fwd_args(**kw))
    with pytest.raises(ValueError, match="num_partials_q .* must be >= 1 when q"):
        c_entry(C, "qk_norm_rope_bwd", **_bwd_args(num_partials_q=0))
    with pytest.raises(ValueError, match="dw_partial pointers must be non-null"):
        c_entry(C, "qk_norm_rope_bwd", **_bwd_args(dw_partial_ptr=0))
    # empty problems return before touching the GPU
    c_entry(C, "qk_norm_rope_fwd", **_fwd_args(S=0, q_ptr=0, k_ptr=0))
    c_entry(C, "qk_norm_rope_fwd", **_fwd_args(Hq=0, Hk=0))
    c_entry(C, "qk_norm_rope_bwd", **_bwd_args(B=0, num_partials_q=0, num_partials_k=0))


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_launch_without_gpu_raises_runtime_error():
    C = _C_or_skip()
    if C.device_count() != 0:
        pytest.skip("a CUDA device is visible to fastgen._C")
    with pytest.raises(RuntimeError, match="CUDA error"):
        c_entry(C, "qk_norm_rope_fwd", **_fwd_args())
    with pytest.raises(RuntimeError, match="CUDA error"):
        c_entry(C, "qk_norm_rope_bwd", **_bwd_args())


# ----------------------------------------------------------------------------- GPU tier: helpers


def _tables(S, R, interleaved, batch=None, dtype=torch.float32, seed=0):
    """cos / sin whose pair members share an angle."""
    g = torch.Generator().manual_seed(seed)
    shape = (S, R // 2) if batch is None else (batch, S, R // 2)
    ang = torch.rand(shape, generator=g, dtype=torch.float64) * 2 * math.pi
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat([ang, ang], -1)
    return ang.cos().to("cuda", dtype), ang.sin().to("cuda", dtype)


def _qk(B, S, hq, hk, D, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, hq, D, generator=g).to("cuda", dtype)
    k = torch.randn(B, S, hk, D, generator=g).to("cuda", dtype)
    if layout == "bhsd":
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    return q, k


def _weights(D, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return tuple((1 + 0.3 * torch.randn(D, generator=g)).to("cuda", dtype) for _ in range(2))


def _table64(t, layout):
    t = t.double()
    t = t[None] if t.dim() == 2 else t
    return t[:, :, None, :] if layout == "bshd" else t[:, None, :, :]


def _ref64(x, w, cos, sin, layout, interleaved, eps=EPS):
    """float64 RMSNorm then the rotation, written out pair by pair (differentiable)."""
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    R = cos.shape[-1]
    c, s = _table64(cos, layout), _table64(sin, layout)
    if interleaved:
        a, b, ca, cb, sa, sb = n[..., 0:R:2], n[..., 1:R:2], c[..., 0::2], c[..., 1::2], s[..., 0::2], s[..., 1::2]
        rot = torch.stack([a * ca - b * sa, b * cb + a * sb], -1).flatten(-2)
    else:
        h = R // 2
        a, b, ca, cb, sa, sb = n[..., :h], n[..., h:R], c[..., :h], c[..., h:], s[..., :h], s[..., h:]
        rot = torch.cat([a * ca - b * sa, b * cb + a * sb], -1)
    return torch.cat([rot, n[..., R:]], -1)


def _run(backend, q, k, wq, wk, cos, sin, layout, interleaved, dys):
    # detach() keeps the strides of views (clone() would make them contiguous)
    leaves = [t.detach().requires_grad_() for t in (q, k, wq, wk)]
    out = qk_norm_rope(*leaves, cos, sin, EPS, layout, interleaved, backend=backend)
    torch.autograd.backward(out, dys)
    return [o.detach() for o in out], [t.grad for t in leaves]


def _check(q, k, wq, wk, cos, sin, layout, interleaved, w_scale=8.0, fa_rule=True):
    """cuda vs torch (tolerance table) and, for the forward and dq / dk, vs float64 (FA rule)."""
    dtype = q.dtype
    g = torch.Generator().manual_seed(7)
    dys = [torch.randn(t.shape, generator=g).to("cuda", dtype) for t in (q, k)]
    out, grads = _run("cuda", q, k, wq, wk, cos, sin, layout, interleaved, dys)
    ref, ref_grads = _run("torch", q, k, wq, wk, cos, sin, layout, interleaved, dys)
    for o, r, x in zip(out, ref, (q, k)):
        assert o.shape == x.shape and o.dtype == dtype
        assert_close(o, r, msg=f"forward ({dtype})")
    for name, got, want, x, scale in zip(("dq", "dk", "dwq", "dwk"), grads, ref_grads, (q, k, wq, wk),
                                         (2, 2, w_scale, w_scale)):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert_close(got, want, dtype=dtype, scale=scale, msg=f"{name} ({dtype})")
    if not fa_rule:
        return
    leaves = [t.detach().double().requires_grad_() for t in (q, k, wq, wk)]
    ref64 = (_ref64(leaves[0], leaves[2], cos, sin, layout, interleaved),
             _ref64(leaves[1], leaves[3], cos, sin, layout, interleaved))
    torch.autograd.backward(ref64, [d.double() for d in dys])
    atol = TOL[dtype][0]
    pairs = list(zip(out, ref, ref64)) + list(zip(grads[:2], ref_grads[:2], [t.grad for t in leaves[:2]]))
    for got, same, exact in pairs:
        err = (got.double() - exact.detach()).abs().max().item()
        base = (same.double() - exact.detach()).abs().max().item()
        assert err <= 2 * base + atol, f"FlashAttention rule: {err} > 2 * {base} + {atol}"


# ----------------------------------------------------------------------------- GPU tier: tests


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D, R", [(64, 64), (72, 72), (128, 128), (256, 256), (128, 64), (80, 32)])
def test_cuda_matches_torch(interleaved, layout, dtype, D, R):
    B, S, hq, hk = 2, 333, 6, 2  # odd sequence length, GQA
    q, k = _qk(B, S, hq, hk, D, dtype, layout)
    wq, wk = _weights(D, dtype)
    cos, sin = _tables(S, R, interleaved)
    _check(q, k, wq, wk, cos, sin, layout, interleaved)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D, R", [(2, 2), (16, 16), (40, 24), (73, 40), (130, 128), (1024, 1024), (1024, 512)])
def test_cuda_head_dims(interleaved, dtype, D, R):
    """Tiny heads (one thread per row), odd D (a pass-through tail of one dim), the widest heads
    (256 threads per row, block reductions)."""
    q, k = _qk(3, 17, 3, 1, D, dtype, "bshd", seed=D)
    wq, wk = _weights(D, dtype)
    cos, sin = _tables(17, R, interleaved)
    _check(q, k, wq, wk, cos, sin, "bshd", interleaved)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", ["qkv", "qkv_bhsd", "misaligned", "transposed"])
def test_cuda_strided_inputs(view, dtype, interleaved):
    """Views of a fused projection (vector path), views one element off alignment (scalar
    path), and a bshd tensor passed transposed as bhsd."""
    B, S, H, D = 2, 37, 4, 64
    g = torch.Generator().manual_seed(3)
    layout = "bshd"
    if view == "qkv":
        qkv = torch.randn(B, S, 3, H, D, generator=g).to("cuda", dtype)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    elif view == "qkv_bhsd":
        qkv = torch.randn(B, 3, H, S, D, generator=g).to("cuda", dtype)
        q, k, layout = qkv[:, 0], qkv[:, 1], "bhsd"
    elif view == "misaligned":
        buf = torch.randn(B, S, 2 * H, D + 1, generator=g).to("cuda", dtype)
        q, k = buf[:, :, :H, 1:], buf[:, :, H:, :D]
    else:
        q = torch.randn(B, S, H, D, generator=g).to("cuda", dtype).transpose(1, 2)
        k = torch.randn(B, S, 2, D, generator=g).to("cuda", dtype).transpose(1, 2)
        layout = "bhsd"
    wq, wk = _weights(D, dtype)
    cos, sin = _tables(S, 48, interleaved)
    _check(q, k, wq, wk, cos, sin, layout, interleaved)
    # the cos / sin rows may be views too (misaligned: scalar path)
    wide_c, wide_s = _tables(S, 50, interleaved)
    _check(q, k, wq, wk, wide_c[:, 2:], wide_s[:, 2:], layout, interleaved)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize(
    "dtype, w_dtypes, table_dtype, batch",
    [
        (torch.bfloat16, (torch.float32, torch.float32), torch.float32, None),
        (torch.float16, (torch.float32, torch.float16), torch.float32, 2),
        (torch.bfloat16, (torch.bfloat16, torch.float32), torch.bfloat16, 1),
        (torch.bfloat16, (torch.bfloat16, torch.bfloat16), torch.float16, None),  # tables upcast to fp32
        (torch.float16, (torch.float16, torch.float16), torch.float16, 2),
        (torch.float32, (torch.float32, torch.float32), torch.bfloat16, 2),
    ],
    ids=str,
)
def test_cuda_weight_and_table_dtypes(dtype, w_dtypes, table_dtype, batch, interleaved):
    B, S, D = 2, 45, 128
    q, k = _qk(B, S, 4, 2, D, dtype, "bhsd")
    g = torch.Generator().manual_seed(5)
    wq, wk = ((1 + 0.3 * torch.randn(D, generator=g)).to("cuda", wd) for wd in w_dtypes)
    cos, sin = _tables(S, 96, interleaved, batch=batch, dtype=table_dtype)
    _check(q, k, wq, wk, cos, sin, "bhsd", interleaved)


@pytest.mark.gpu
@requires_gpu
def test_cuda_zero_size():
    # the CUDA launchers with the outputs the op allocates (fastgen.ops.qk_norm_rope answers empty calls)
    def qk_norm_rope_fwd(*args):
        return torch.ops.fastgen.qk_norm_rope_fwd(*args, "cuda")

    def qk_norm_rope_bwd(*args):
        return torch.ops.fastgen.qk_norm_rope_bwd(*args, "cuda")

    D = 64
    wq, wk = _weights(D, torch.bfloat16)
    cos, sin = _tables(0, D, True)
    q = torch.randn(2, 0, 3, D, device="cuda", dtype=torch.bfloat16)
    qo, ko = qk_norm_rope_fwd(q, q, wq, wk, cos, sin, EPS, "bshd", True)
    assert qo.shape == q.shape and ko.shape == q.shape
    dq, dk, dwq, dwk = qk_norm_rope_bwd(q, q, q, q, wq, wk, cos, sin, EPS, "bshd", True)
    assert dq.shape == q.shape and torch.equal(dwq, torch.zeros_like(wq)) and dwk.dtype == wk.dtype
    # through the op: empty tensors take the reference, gradients flow
    leaf = q.clone().requires_grad_()
    out = qk_norm_rope(leaf, leaf, wq, wk, cos, sin, backend="cuda")
    (out[0].sum() + out[1].sum()).backward()
    assert leaf.grad.shape == q.shape
    # no k heads (or no q heads): the other tensor is still served, its weight gradient is zero
    S = 9
    cos, sin = _tables(S, D, False)
    x, _ = _qk(2, S, 3, 1, D, torch.bfloat16, "bshd")
    none = x[:, :, :0]
    for q_, k_ in ((x, none), (none, x)):
        qo, ko = qk_norm_rope_fwd(q_, k_, wq, wk, cos, sin, EPS, "bshd", False)
        leaves = [t.detach().clone().requires_grad_() for t in (q_, k_, wq, wk)]
        ref = qk_norm_rope(*leaves, cos, sin, EPS, "bshd", False, backend="torch")
        if q_.numel():
            assert_close(qo, ref[0])
        else:
            assert_close(ko, ref[1])
        dy = torch.randn_like(x)
        dq, dk, dwq, dwk = qk_norm_rope_bwd(dy if q_.numel() else none, dy if k_.numel() else none, q_, k_, wq, wk,
                                            cos, sin, EPS, "bshd", False)
        live = ref[0] if q_.numel() else ref[1]
        live.backward(dy)
        if q_.numel():
            assert_close(dq, leaves[0].grad, scale=2)
            assert_close(dwq, leaves[2].grad, scale=8)
            assert torch.equal(dwk, torch.zeros_like(wk)) and dk.shape == k_.shape
        else:
            assert_close(dk, leaves[1].grad, scale=2)
            assert_close(dwk, leaves[3].grad, scale=8)
            assert torch.equal(dwq, torch.zeros_like(wq)) and dq.shape == q_.shape


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "halves"])
def test_cuda_deterministic(interleaved):
    """Two runs give the same bits: forward, dq / dk and the weight gradients (fp32 per-block
    partials summed in a fixed order), with many rows per backward block."""
    B, S, hq, hk, D = 2, 1531, 24, 8, 128
    q, k = _qk(B, S, hq, hk, D, torch.bfloat16, "bshd", seed=11)
    wq, wk = _weights(D, torch.float32)
    cos, sin = _tables(S, D, interleaved)
    dys = [torch.randn_like(q), torch.randn_like(k)]
    runs = [_run("cuda", q, k, wq, wk, cos, sin, "bshd", interleaved, dys) for _ in range(2)]
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b), "qk_norm_rope(backend='cuda') must be deterministic"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_flux_size(dtype):
    """Flux's attention (1, 4608, 24, 128), interleaved multi-axis tables, q / k views of one
    qkv projection; the weight gradients sum 110592 rows (FlashAttention rule vs float64)."""
    from fastgen.ops import rope_frequencies, rope_grid_ids

    B, S, H, D = 1, 4608, 24, 128
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=dtype)
    ids = torch.cat([torch.zeros(512, 3), rope_grid_ids(64, 64, prefix_axes=1)]).cuda()
    cos, sin = rope_frequencies(ids, (16, 56, 56), interleaved=True)
    wq, wk = _weights(D, dtype)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    _check(q, k, wq, wk, cos, sin, "bshd", True, w_scale=32)


@pytest.mark.gpu
@requires_gpu
def test_cuda_op_routes_to_the_cuda_launchers(monkeypatch):
    import fastgen.cuda.qk_norm_rope as L

    calls = []
    for name in ("qk_norm_rope_fwd", "qk_norm_rope_bwd"):
        fn = getattr(L, name)
        monkeypatch.setattr(L, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    q, k = _qk(1, 8, 2, 2, 64, torch.float16, "bshd")
    wq, wk = _weights(64, torch.float16)
    cos, sin = _tables(8, 64, True)
    q.requires_grad_()
    out = qk_norm_rope(q, k, wq, wk, cos, sin, interleaved=True, backend="cuda")
    out[0].sum().backward()
    assert calls == ["qk_norm_rope_fwd", "qk_norm_rope_bwd"]


@pytest.mark.gpu
@requires_gpu
def test_cuda_custom_ops_and_compile():
    D = 64
    q, k = _qk(1, 5, 2, 1, D, torch.float32, "bshd")
    wq, wk = _weights(D, torch.float32)
    cos, sin = _tables(5, 32, True)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastgen.qk_norm_rope_fwd, (q, k, wq, wk, cos, sin, EPS, "bshd", True, "cuda"),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fastgen.qk_norm_rope_bwd,
                          (q, k, q, k, wq, wk, cos, sin, EPS, "bshd", True, "cuda"), test_utils=utils)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: qk_norm_rope(a, b, wq, wk, cos, sin, interleaved=True, backend="cuda"),
                      fullgraph=True, backend="aot_eager")
    out = f(q, k)
    ref = qk_norm_rope(q, k, wq, wk, cos, sin, interleaved=True, backend="torch")
    assert_close(out[0], ref[0])
    assert_close(out[1], ref[1])
