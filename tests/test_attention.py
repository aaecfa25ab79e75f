"""fastgen.ops.attention / scaled_dot_product_attention against independent references.

The kernel tests use the FlashAttention rule (DESIGN.md): for out, lse, dq, dk and dv,
``max|kernel - ref_fp32| <= 2 * max|torch_lowp - ref_fp32| + atol``, where ``ref_fp32`` is
``attention_ref`` (fp32 math) and ``torch_lowp`` is the same attention computed by plain
torch in the input dtype (bf16 / fp16 matmuls, fp32 softmax, p rounded to the dtype).

Triton runs on the GPU when there is one, else on CPU tensors in Triton's interpreter with
small blocks (16 / 32) and small shapes. ``gpu``-marked tests run real sizes on a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import TRITON_DEVICE, assert_fa_rule, max_err, requires_gpu

import fastgen
from fastgen.backend import BackendUnavailableError
from fastgen.kernels.attention_configs import LaunchOverride
from fastgen.ops import attention, attention_ref, scaled_dot_product_attention

BF16, FP16 = torch.bfloat16, torch.float16
ON_GPU = TRITON_DEVICE == "cuda"


# ----------------------------------------------------------------------------- helpers


def _qkv(B, Sq, Sk, H, HK, D, dtype, layout="bshd", device=TRITON_DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(S, h):
        shape = (B, S, h, D) if layout == "bshd" else (B, h, S, D)
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    return make(Sq, H), make(Sk, HK), make(Sk, HK)


def _bhsd(t, layout):
    return t.transpose(1, 2) if layout == "bshd" else t


def _lowp(q, k, v, causal, scale, layout="bshd"):
    """Attention in the input dtype the way plain torch computes it: (o, lse); o in q.dtype."""
    q, k, v = (_bhsd(t, layout) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    Sq, Sk = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + Sk - Sq, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = (e / torch.where(den == 0, torch.ones_like(den), den)).to(q.dtype)
    o = torch.matmul(p, v)
    return _bhsd(o, layout), (torch.log(den) + m).squeeze(-1)


def _attention64(q, k, v, causal, scale):
    """Float64 attention written out by hand on (B, H, S, D) inputs (equal head counts)."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        Sq, Sk = s.shape[-2:]
        keep = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
        s = s.masked_fill(~keep, float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("bhij,bhjd->bhid", w / w.sum(-1, keepdim=True), v), torch.logsumexp(s, -1)


_err = max_err  # NaN / inf where the reference is finite is an infinite error
_fa_rule = assert_fa_rule


def _blocks(block_m, block_n, **kw):
    """The interpreter's launch override: BLOCK_M x BLOCK_N for every kernel, or ``None, None`` for
    the GPU's shipped configs (the interpreter otherwise runs 32 x 32)."""
    if block_m is None:
        return LaunchOverride(shipped=True, **kw)
    return LaunchOverride(blocks=(block_m, block_n), **kw)


def _interp_blocks(block_m, block_n):
    """``_blocks`` under the interpreter; on a GPU no override (the shipped configs)."""
    return None if ON_GPU else _blocks(block_m, block_n)


def _check_against_references(q, k, v, causal, layout, backend="triton", scale=None, blocks=(32, 32), launch=None):
    """Forward (o, lse) and backward (dq, dk, dv) of ``backend`` against attention_ref and _lowp.

    ``blocks``: (BLOCK_M, BLOCK_N) forced in the interpreter; a GPU runs the shipped configs.
    ``launch``: a LaunchOverride to pass instead."""
    D = q.shape[-1]
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    g = torch.Generator().manual_seed(1)
    launch = launch or (_interp_blocks(*blocks) if blocks else None)
    o, lse = attention(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=True, backend=backend,
                       _launch=launch)
    do = torch.randn(o.shape, generator=g).to(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ro, rlse = attention_ref(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=True)
    rgrads = torch.autograd.grad(ro.float(), (q, k, v), do.float())
    lo, llse = _lowp(q, k, v, causal, sc, layout)
    lgrads = torch.autograd.grad(lo, (q, k, v), do)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.dtype == torch.float32
    assert lse.shape == rlse.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), "rows that see no key: lse must be -inf"
    atol = 1e-3
    _fa_rule("out", o, lo, ro.float(), atol)
    _fa_rule("lse", lse, llse, rlse, atol)
    for name, gr, lg, rg in zip(("dq", "dk", "dv"), grads, lgrads, rgrads):
        assert gr.shape == rg.shape and gr.dtype == q.dtype
        _fa_rule(name, gr, lg, rg, atol)
    return o, lse, grads


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq, Sk", [(33, 33), (17, 40), (40, 17)])
def test_reference_matches_hand_written_float64(causal, Sq, Sk):
    q, k, v = (t.detach() for t in _qkv(2, Sq, Sk, 3, 3, 24, torch.float32, "bhsd", "cpu"))
    o, lse = attention_ref(q, k, v, causal=causal, layout="bhsd", return_lse=True)
    o64, lse64 = _attention64(q, k, v, causal, 1 / math.sqrt(24))
    seen = torch.isfinite(lse64)  # with Sq > Sk and causal, the first rows see no key
    torch.testing.assert_close(o[seen], o64[seen].float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(o[~seen], torch.zeros_like(o[~seen]))
    torch.testing.assert_close(lse, lse64.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa_with_gqa_and_both_layouts(causal):
    q, k, v = (t.detach() for t in _qkv(2, 19, 19, 4, 2, 16, torch.float32, "bhsd", "cpu"))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attention_ref(q, k, v, causal, 0.3, "bhsd"), expected, atol=1e-5, rtol=1e-5)
    out = attention_ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, 0.3, "bshd")
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, causal, 0.3, "bhsd", backend="torch"), expected,
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- kernels

# (B, Sq, Sk, H, HK, D, causal, layout, dtype, blocks): lengths 1, 7, 113, 256, Sq != Sk both
# ways, head dims 40 / 64 / 80 / 128 (and 16 / 72 / 160 / 256), GQA and MQA, both layouts.
# D = 40 / 72 / 80 run split head-dim blocks (32 + 16, 64 + 16, 64 + 16); 160 a masked 256.
CASES = [
    (1, 1, 1, 2, 2, 64, False, "bshd", BF16, (32, 32)),
    (2, 7, 7, 2, 1, 40, True, "bhsd", FP16, (16, 16)),
    (1, 113, 113, 2, 2, 80, True, "bshd", BF16, (32, 16)),
    (1, 113, 37, 4, 2, 64, False, "bshd", FP16, (16, 32)),
    (1, 37, 113, 2, 2, 128, True, "bhsd", BF16, (32, 32)),
    (1, 113, 37, 2, 1, 40, True, "bshd", BF16, (32, 32)),  # Sq > Sk causal: rows that see no key
    (1, 256, 256, 1, 1, 64, True, "bshd", BF16, (32, 32)),
    (1, 20, 77, 3, 1, 72, False, "bshd", BF16, (16, 32)),  # cross-attention to 77 text tokens, MQA
    (1, 24, 9, 1, 1, 256, False, "bhsd", FP16, (16, 16)),
    (1, 30, 30, 1, 1, 160, True, "bshd", FP16, (16, 16)),  # fp16 dots, as on the GPU
    (1, 50, 33, 2, 2, 96, True, "bhsd", BF16, (32, 16)),  # forward 64 + 32, backward masked 128
    (1, 9, 24, 2, 2, 16, True, "bshd", BF16, (16, 16)),
]


@pytest.mark.parametrize("B, Sq, Sk, H, HK, D, causal, layout, dtype, blocks", CASES,
                         ids=[f"{c[1]}x{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-{c[7]}-"
                              f"{str(c[8])[6:]}" for c in CASES])
def test_kernel_forward_backward(B, Sq, Sk, H, HK, D, causal, layout, dtype, blocks):
    q, k, v = _qkv(B, Sq, Sk, H, HK, D, dtype, layout)
    _check_against_references(q, k, v, causal, layout, blocks=blocks)


def test_head_dim_split():
    from fastgen.kernels.attention_configs import kernel_head_blocks, split_head_dim

    expected = {16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16), 96: (64, 32),
                112: (128, 0), 128: (128, 0), 160: (128, 32), 192: (128, 64), 200: (256, 0), 256: (256, 0)}
    assert {d: split_head_dim(d) for d in expected} == expected
    for d in range(16, 257, 8):
        main, rem = split_head_dim(d)
        assert main + rem >= d and (rem == 0 or (rem >= 16 and main + rem < triton.next_power_of_2(d)))
    # what the kernels run: the split where it has register headroom (16-wide remainders)
    runs = {40: (32, 16), 48: (32, 16), 72: (64, 16), 80: (64, 16), 96: (128, 0), 160: (256, 0), 64: (64, 0)}
    assert {d: kernel_head_blocks(d, "bwd") for d in runs} == runs
    assert {d: kernel_head_blocks(d, "fwd") for d in runs} == {**runs, 96: (64, 32)}


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the shipped configs in every test")
@pytest.mark.parametrize("D", [40, 80, 96, 128])
def test_shipped_block_sizes_under_the_interpreter(D):
    """The GPU's launch configs (BLOCK_M / BLOCK_N 32..128, split head dims), fp16 so that the
    interpreter runs the GPU's dot code path too."""
    q, k, v = _qkv(1, 150, 140, 2, 1, D, FP16)
    _check_against_references(q, k, v, True, "bshd", blocks=(None, None))


def test_kernel_custom_scale():
    q, k, v = _qkv(1, 40, 40, 2, 2, 64, BF16)
    _check_against_references(q, k, v, False, "bshd", scale=0.05)


def test_kernel_strided_views_of_one_qkv_tensor():
    """q, k, v sliced out of a packed (B, S, 3, H, D) projection, read in place (no copies)."""
    B, S, H, D = 2, 50, 2, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(TRITON_DEVICE, BF16).requires_grad_()
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    o = attention(q, k, v, causal=True, backend="triton")
    do = torch.randn(o.shape, generator=g).to(o)
    (gqkv,) = torch.autograd.grad(o, qkv, do)
    q2, k2, v2 = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    o2 = attention(q2, k2, v2, causal=True, backend="triton")
    g2 = torch.autograd.grad(o2, (q2, k2, v2), do)
    assert torch.equal(o, o2)
    assert torch.equal(gqkv, torch.stack(g2, 2))
    # A non-unit last-dim stride is copied, not refused.
    qt = q2.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    assert torch.equal(attention(qt, k2.detach(), v2.detach(), causal=True, backend="triton"), o2.detach())


def test_backward_is_deterministic():
    q, k, v = _qkv(1, 70, 70, 4, 2, 40, BF16)  # GQA: each dk/dv program loops over its query heads
    o = attention(q, k, v, causal=True, backend="triton", deterministic=True)
    do = torch.randn_like(o)
    g1 = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    g2 = torch.autograd.grad(o, (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_varlen_three_sequences(causal):
    """Packed (total, H, D) sequences of lengths (7, 30, 1) / keys (12, 30, 5): each against its own run."""
    lq, lk = [7, 30, 1], [12, 30, 5]
    H, HK, D = 4, 2, 40
    g = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lq), H, D, generator=g).to(TRITON_DEVICE, BF16).requires_grad_()
    k = torch.randn(sum(lk), HK, D, generator=g).to(TRITON_DEVICE, BF16).requires_grad_()
    v = torch.randn(sum(lk), HK, D, generator=g).to(TRITON_DEVICE, BF16).requires_grad_()
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(TRITON_DEVICE)  # noqa
    cq, ck = cu(lq), cu(lk)
    o, lse = attention(q, k, v, causal=causal, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=30,
                       max_seqlen_k=30, return_lse=True, backend="triton", _launch=_interp_blocks(16, 16))
    do = torch.randn(o.shape, generator=g).to(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ro, rlse = attention_ref(q, k, v, causal, None, "bshd", cq, ck, return_lse=True)
    rgrads = torch.autograd.grad(ro.float(), (q, k, v), do.float())
    assert o.shape == q.shape and lse.shape == (H, sum(lq)) == rlse.shape
    # Per sequence, the lowp torch baseline of the rule.
    lo, llse, lgrads = [], [], [[], [], []]
    for b in range(3):
        sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qs, ks, vs = (t.detach()[s][None].requires_grad_() for t, s in ((q, sl_q), (k, sl_k), (v, sl_k)))
        ob, lb = _lowp(qs, ks, vs, causal, 1 / math.sqrt(D))
        gb = torch.autograd.grad(ob, (qs, ks, vs), do[sl_q][None])
        lo.append(ob[0])
        llse.append(lb[0])
        for i in range(3):
            lgrads[i].append(gb[i][0])
    _fa_rule("out", o, torch.cat(lo), ro.float(), 1e-3)
    _fa_rule("lse", lse, torch.cat(llse, -1), rlse, 1e-3)
    for name, gr, lg, rg in zip(("dq", "dk", "dv"), grads, lgrads, rgrads):
        _fa_rule(name, gr, torch.cat(lg), rg, 1e-3)



_OLD_INTERPRETER = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)


@pytest.mark.skipif(ON_GPU, reason="the GPU runs the per-program loop bounds in every other test")
@pytest.mark.skipif(_OLD_INTERPRETER,
                    reason="Triton < 3.7's interpreter cannot run loops with program-dependent bounds")
@pytest.mark.parametrize("Sq, Sk, varlen", [(60, 25, False), (25, 60, False), (None, None, True)])
def test_gpu_loop_bounds_match_host_loop_bounds(Sq, Sk, varlen):
    """The causal / varlen block skipping of the GPU path (per-program loop bounds) gives bit-identical
    results to the interpreter's loop over every block."""
    g = torch.Generator().manual_seed(5)
    if varlen:
        q, k, v = (torch.randn(n, h, 32, generator=g).to(BF16).requires_grad_() for n, h in ((38, 2), (47, 1), (47, 1)))
        kw = dict(cu_seqlens_q=torch.tensor([0, 7, 37, 38], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 12, 42, 47], dtype=torch.int32))
    else:
        q, k, v = _qkv(1, Sq, Sk, 2, 1, 40, FP16)
        kw = {}
    runs = []
    for device_bounds in (False, True):
        o = attention(q, k, v, causal=True, backend="triton", _launch=_blocks(16, 32, device_bounds=device_bounds),
                      **kw)
        runs.append((o, *torch.autograd.grad(o, (q, k, v), torch.ones_like(o))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))

@pytest.mark.parametrize("dtype, causal", [(BF16, True), (FP16, False)])
def test_gradient_through_lse(dtype, causal):
    """d lse_i / d s_ij = p_ij: the backward takes the lse gradient too (ring attention merges on it)."""
    q, k, v = _qkv(1, 45, 60, 4, 2, 64, dtype)
    g = torch.Generator().manual_seed(6)
    o, lse = attention(q, k, v, causal=causal, return_lse=True, backend="triton", _launch=_interp_blocks(16, 32))
    do = torch.randn(o.shape, generator=g).to(o)
    dlse = torch.randn(lse.shape, generator=g).to(lse)
    grads = torch.autograd.grad((o, lse), (q, k, v), (do, dlse), retain_graph=True)
    only_lse = torch.autograd.grad(lse, (q, k, v), dlse, allow_unused=True)
    ro, rlse = attention_ref(q, k, v, causal=causal, return_lse=True)
    rgrads = torch.autograd.grad((ro.float(), rlse), (q, k, v), (do.float(), dlse), retain_graph=True)
    r_only = torch.autograd.grad(rlse, (q, k, v), dlse, allow_unused=True)
    lo, llse = _lowp(q, k, v, causal, 1 / 8)
    lgrads = torch.autograd.grad((lo, llse), (q, k, v), (do, dlse), retain_graph=True)
    l_only = torch.autograd.grad(llse, (q, k, v), dlse, allow_unused=True)
    for name, gr, lg, rg in zip(("dq", "dk", "dv"), grads, lgrads, rgrads):
        _fa_rule(name, gr, lg, rg, 1e-3)
    for name, gr, lg, rg in zip(("dq", "dk"), only_lse[:2], l_only[:2], r_only[:2]):
        _fa_rule(name + " (lse only)", gr, lg, rg, 1e-3)
    assert torch.equal(only_lse[2], torch.zeros_like(v))  # lse does not depend on v


@pytest.mark.parametrize("shape", [(0, 5, 2, 64), (2, 0, 2, 64)], ids=["batch0", "seq0"])
def test_zero_size(shape):
    q = torch.zeros(shape, dtype=BF16, device=TRITON_DEVICE, requires_grad=True)
    o = attention(q, q, q, backend="triton")
    assert o.shape == shape
    o.sum().backward()
    assert q.grad.shape == shape


def test_no_keys_gives_zeros_and_minus_inf_lse():
    q = torch.randn(1, 4, 2, 32, dtype=BF16, device=TRITON_DEVICE)
    kv = torch.zeros(1, 0, 2, 32, dtype=BF16, device=TRITON_DEVICE)
    o, lse = attention(q, kv, kv, return_lse=True, backend="triton")
    assert torch.equal(o, torch.zeros_like(q)) and bool(torch.isneginf(lse).all())


def test_custom_ops_pass_opcheck():
    q, k, v = (t.detach() for t in _qkv(1, 9, 12, 2, 1, 32, BF16))
    fwd = torch.ops.fastgen.attention_fwd
    utils = ("test_schema", "test_faketensor")
    for args in [(q, k, v, True, 0.2, "bshd", None, None, 0, 0, False),
                 (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), False, 0.2, "bhsd", None, None, 0, 0,
                  True)]:
        torch.library.opcheck(fwd, args, test_utils=utils)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=q.device)
    cuk = torch.tensor([0, 5, 12], dtype=torch.int32, device=q.device)
    torch.library.opcheck(fwd, (q[0], k[0], v[0], True, 0.2, "bshd", cu, cuk, 5, 7, False), test_utils=utils)
    o, lse = fwd(q, k, v, True, 0.2, "bshd", None, None, 0, 0, False)
    torch.library.opcheck(torch.ops.fastgen.attention_bwd,
                          (torch.randn_like(o), q, k, v, o, lse, True, 0.2, "bshd", None, None, 0, 0, None, False),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fastgen.attention_bwd,
                          (torch.randn_like(o), q, k, v, o, lse, True, 0.2, "bshd", None, None, 0, 0,
                           torch.randn_like(lse), True), test_utils=utils)


# ----------------------------------------------------------------------------- torch.compile


class _SelfAttention(torch.nn.Module):
    def __init__(self, dim, heads, backend):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        return attention(q, k, v, causal=True, backend=self.backend).reshape(B, S, C)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    dtype = torch.float32 if backend == "torch" else BF16
    block = _SelfAttention(64, 2, backend).to(TRITON_DEVICE, dtype)
    x = torch.randn(1, 20, 64, device=TRITON_DEVICE, dtype=dtype, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if backend == "torch" else "aot_eager")
    y = compiled(x)
    ye = block(x)
    torch.testing.assert_close(y, ye, atol=1e-3, rtol=1e-3)
    y.float().sum().backward()
    gc = x.grad.clone()
    x.grad = None
    ye.float().sum().backward()
    torch.testing.assert_close(gc, x.grad, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- SDPA drop-in


def test_sdpa_wrapper_kernel_path_matches_sdpa():
    q, k, v = (t.detach() for t in _qkv(1, 40, 40, 4, 2, 64, BF16, "bhsd"))
    out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend="triton")
    ref = attention(q, k, v, causal=True, layout="bhsd", backend="triton")
    assert torch.equal(out, ref)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", ["bool_mask", "float_mask", "dropout", "causal_top_left", "fp32", "no_gqa_flag"])
def test_sdpa_wrapper_sends_what_it_cannot_serve_to_pytorch(kind, monkeypatch):
    Sq = 12 if kind == "causal_top_left" else 20
    dtype = torch.float32 if kind == "fp32" else BF16
    dev = TRITON_DEVICE
    q = torch.randn(1, 2, Sq, 32, dtype=dtype, device=dev)
    k = torch.randn(1, 1 if kind == "no_gqa_flag" else 2, 20, 32, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    kwargs = {
        "bool_mask": dict(attn_mask=torch.rand(Sq, 20, device=dev) > 0.3),
        "float_mask": dict(attn_mask=torch.randn(Sq, 20, device=dev, dtype=dtype)),
        "dropout": dict(dropout_p=0.5),
        "causal_top_left": dict(is_causal=True),
        "fp32": dict(),
        "no_gqa_flag": dict(),  # SDPA broadcasts 1 kv head over 2 query heads: its answer, not GQA's
    }[kind]
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    # backend="triton" would run the kernel on a servable call; float32 is served by "auto" only
    out = scaled_dot_product_attention(q, k, v, **kwargs, backend="auto" if kind == "fp32" else "triton")
    assert calls, "expected the call to go to torch's SDPA"
    torch.manual_seed(0)
    assert torch.equal(out, real(q, k, v, **kwargs))


def test_causal_alignment_differs_from_sdpa_when_lengths_differ():
    """attention(causal=True) is bottom-right aligned; SDPA's is_causal top-left (documented)."""
    q, k, v = (t.detach() for t in _qkv(1, 5, 9, 1, 1, 16, torch.float32, "bhsd", "cpu"))
    ours = attention(q, k, v, causal=True, layout="bhsd", backend="torch")
    mask = torch.ones(5, 9, dtype=torch.bool).tril(9 - 5)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))


# ----------------------------------------------------------------------------- backends and errors


def test_backend_selection_and_fp32():
    q, k, v = (t.detach() for t in _qkv(1, 8, 8, 2, 2, 32, torch.float32, "bshd"))
    assert fastgen.backend.resolve("attention", "auto", q.device) == "torch"
    assert torch.equal(attention(q, k, v), attention_ref(q, k, v))  # auto on CPU: the reference
    with pytest.raises(BackendUnavailableError, match="cast q, k, v to torch.bfloat16.*backend='torch'"):
        attention(q, k, v, backend="triton")
    with pytest.raises(BackendUnavailableError, match="no CUDA C\\+\\+ attention|CUDA C\\+\\+ backend needs CUDA"):
        attention(q, k, v, backend="cuda")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 8, 2, 32, dtype=BF16)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        attention(q, q, q, backend="triton")


def test_unsupported_head_dim_is_refused_by_triton_and_served_by_auto():
    q = torch.randn(1, 8, 2, 36, dtype=BF16, device=TRITON_DEVICE)
    with pytest.raises(BackendUnavailableError, match="head dim 36 is not supported"):
        attention(q, q, q, backend="triton")
    assert attention(q, q, q).shape == q.shape


_t = lambda *s, dtype=BF16: torch.randn(*s, dtype=dtype)  # noqa: E731
_cu = torch.tensor([0, 3, 8], dtype=torch.int32)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: attention(_t(1, 8, 2, 32), _t(1, 8, 2, 64), _t(1, 8, 2, 64)), ValueError,
         "same head dim, got 32 and 64"),
        (lambda: attention(_t(1, 8, 2, 32), _t(1, 8, 2, 32), _t(1, 9, 2, 32)), ValueError,
         "k and v must have the same shape"),
        (lambda: attention(_t(1, 8, 3, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), ValueError,
         r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
        (lambda: attention(_t(1, 8, 2, 32), _t(1, 8, 2, 32, dtype=FP16), _t(1, 8, 2, 32)), TypeError,
         "share one dtype"),
        (lambda: attention(*[torch.ones(1, 8, 2, 32, dtype=torch.int32)] * 3), TypeError, "floating-point"),
        (lambda: attention(*[_t(1, 8, 2, 32)] * 3, layout="sbhd"), ValueError, "layout must be one of"),
        (lambda: attention(*[_t(8, 2, 32)] * 3), ValueError, r"q must be 4-D \(B, S, H, D\)"),
        (lambda: attention(*[_t(8, 2, 32)] * 3, cu_seqlens_q=_cu), ValueError, "pass both cu_seqlens_q and"),
        (lambda: attention(*[_t(8, 2, 32)] * 3, cu_seqlens_q=_cu.long(), cu_seqlens_k=_cu), ValueError,
         "cu_seqlens_q must be a 1-D torch.int32"),
        (lambda: attention(*[_t(8, 2, 32)] * 3, cu_seqlens_q=_cu, cu_seqlens_k=_cu[:2]), ValueError,
         "same length B \\+ 1"),
        (lambda: attention(*[_t(8, 2, 32)] * 3, cu_seqlens_q=_cu, cu_seqlens_k=_cu, layout="bhsd"), ValueError,
         "leave layout='bshd'"),
        (lambda: attention(*[_t(1, 8, 2, 32)] * 3, scale=float("nan")), ValueError, "scale must be a finite"),
        (lambda: attention(_t(2, 8, 2, 32), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), ValueError, "same batch size"),
    ],
)
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cu_q, cu_k, max_q, message", [
    ([0, 3, 10], [0, 3, 10], None, r"end at the packed length 8"),  # past the end: out-of-bounds writes
    ([0, 6, 3, 8], [0, 6, 3, 8], None, r"never decrease"),
    ([0, 3, 6], [0, 3, 6], None, r"end at the packed length 8"),  # short: rows left unwritten
    ([1, 3, 8], [0, 3, 8], None, r"cu_seqlens_q must start at 0"),
    ([0, 3, 8], [0, 3, 8], 4, r"max_seqlen_q=4 is smaller than the longest sequence \(5\)"),
])
def test_bad_cu_seqlens_are_refused_by_every_backend(backend, cu_q, cu_k, max_q, message):
    """Index tensors the kernels trust: each backend gives the same clear error (before the check the
    Triton path wrote out of bounds and the torch path returned another shape)."""
    q = torch.randn(8, 2, 16, dtype=BF16, device=TRITON_DEVICE)
    cq, ck = (torch.tensor(c, dtype=torch.int32, device=TRITON_DEVICE) for c in (cu_q, cu_k))
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=max_q, backend=backend)


def test_varlen_max_seqlen_is_computed_and_a_larger_one_is_fine():
    q = torch.randn(8, 2, 16, dtype=BF16, device=TRITON_DEVICE)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=TRITON_DEVICE)
    ref = attention_ref(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for max_len in (None, 5, 9):
        out = attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                        backend="triton", _launch=_interp_blocks(16, 16))
        assert max_err(out, ref) < 2e-2


# ----------------------------------------------------------------------------- benchmark suite


def _bench():
    import importlib

    from fastgen.cli import _benchmarks_package

    return importlib.import_module(_benchmarks_package().__name__ + ".bench_attention")


def test_bench_flops_and_bytes_by_hand():
    bench = _bench()
    # B=2, H=3, Sq=5, Sk=7, D=8: forward 4 * 2*3*5*7*8 = 6720 FLOPs; causal half; bwd 2.5x
    assert bench.attention_flops(2, 3, 5, 7, 8, False, "fwd") == 6720
    assert bench.attention_flops(2, 3, 5, 7, 8, True, "fwd") == 3360
    assert bench.attention_flops(2, 3, 5, 7, 8, False, "bwd") == 16800
    assert bench.attention_flops(2, 3, 5, 7, 8, False, "fwd+bwd") == 23520
    case = bench._case(2, 3, 5, 7, 8, HK=1, causal=True)
    assert bench.flops(case, "fwd") == 3360
    # bf16: q 2*3*5*8*2 = 480 bytes, k + v 2 * 2*1*7*8*2 = 448, lse 2*3*5*4 = 120
    assert bench.bytes_moved(case, "fwd") == 2 * 480 + 448 + 120
    assert bench.bytes_moved(case, "bwd") == 4 * 480 + 2 * 448 + 120


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bench_setup_runs_on_cpu(mode):
    bench = _bench()
    assert "attention" in __import__(bench.__package__ + ".harness", fromlist=["x"]).available_ops()
    case = bench._case(1, 4, 16, 16, 32, HK=2, causal=True)
    for provider in ("torch", "sdpa-math"):
        bench.setup(provider, case, mode, "cpu")()
    for provider in ("fastgen-triton", "sdpa-cudnn", "sdpa-efficient"):
        with pytest.raises(bench.Unavailable, match="GPU"):
            bench.setup(provider, case, mode, "cpu")


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "B, Sq, Sk, H, HK, D, causal",
    [
        (1, 4608, 4608, 24, 24, 128, False),  # Flux
        (8, 1024, 1024, 16, 16, 72, False),  # DiT-XL / PixArt
        (2, 4096, 4096, 8, 8, 40, False),  # SD 1.5
        (2, 1024, 1024, 8, 8, 80, False),
        (2, 4096, 77, 8, 8, 80, False),  # cross-attention
        (2, 1024, 1024, 8, 2, 64, True),  # GQA, causal
        (1, 2048, 2048, 16, 16, 128, True),
        (1, 1000, 1500, 4, 4, 256, True),
    ],
)
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_gpu_real_sizes(B, Sq, Sk, H, HK, D, causal, dtype):
    q, k, v = _qkv(B, Sq, Sk, H, HK, D, dtype, device="cuda")
    _check_against_references(q, k, v, causal, "bshd")  # the shipped configs


@pytest.mark.gpu
@requires_gpu
def test_gpu_deterministic_varlen_and_compiled():
    torch.manual_seed(0)
    lens = [1024, 300, 2000]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens), 16, 128, device="cuda", dtype=BF16, requires_grad=True)
    k = torch.randn(sum(lens), 4, 128, device="cuda", dtype=BF16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    o = attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="triton")
    do = torch.randn_like(o)
    g1 = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    g2 = torch.autograd.grad(o, (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    ro = attention_ref(q, k, v, True, None, "bshd", cu, cu)
    assert _err(o, ro) < 2e-2
    block = _SelfAttention(1024, 8, "triton").cuda().to(BF16)
    x = torch.randn(2, 1024, 1024, device="cuda", dtype=BF16)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- TMA forward


@pytest.mark.parametrize("B, Sq, Sk, H, HK, D, causal, layout, dtype", [
    (2, 37, 50, 4, 2, 64, False, "bshd", FP16),
    (1, 70, 33, 2, 1, 40, True, "bhsd", BF16),     # split head dim (32 + 16), causal, Sq > Sk
    (1, 20, 20, 2, 2, 96, True, "bshd", FP16),     # 64 + 32 in the forward
    (2, 9, 65, 3, 3, 128, False, "bshd", BF16),
    (1, 33, 17, 2, 1, 256, True, "bhsd", FP16),
    (1, 21, 19, 2, 1, 160, False, "bshd", BF16),   # TMA only: 128 + 32 instead of padding to 256
    (1, 12, 30, 2, 2, 192, True, "bshd", FP16),    # TMA only: 128 + 64 in the forward and dQ
])
def test_tma_matches_pointer_loads(B, Sq, Sk, H, HK, D, causal, layout, dtype, monkeypatch):
    """Forward and backward through TMA descriptors (4-D [B, H, S, D], rows past S and columns
    past D zero-filled by the descriptor's bounds) against the pointer-load path and the references."""
    import fastgen.kernels.attention as ka
    import fastgen.kernels.attention_bwd as kb
    from fastgen.kernels.attention_configs import CANDIDATES, launch_config

    made = []
    real = ka.tma_descriptor
    spy = lambda *a: made.append(a[2:]) or real(*a)  # noqa: E731
    monkeypatch.setattr(ka, "tma_descriptor", spy)
    monkeypatch.setattr(kb, "tma_descriptor", spy)
    # the head-dim remainder of the config each kernel runs with TMA forced on
    forced_dr = [launch_config(kernel, D, True, LaunchOverride(tma=True), not ON_GPU)["BLOCK_DR"]
                 for kernel in ("fwd", "bwd_dkdv", "bwd_dq")]
    q, k, v = _qkv(B, Sq, Sk, H, HK, D, dtype, layout)
    assert ka.tma_ok(q, k, v, layout, False) == (not ON_GPU or torch.cuda.get_device_capability()[0] >= 9)
    if not ka.tma_ok(q, k, v, layout, False):
        pytest.skip("TMA needs a Hopper-class GPU")
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)
    runs = []
    for on in (True, False):
        o, lse = attention(q, k, v, causal=causal, layout=layout, return_lse=True, backend="triton",
                           _launch=LaunchOverride(tma=on))
        runs.append((o, lse, *torch.autograd.grad(o, (q, k, v), do)))
        if on:  # the TMA path ran: 3 (or 6) descriptors forward, 4 (or 8) per backward kernel
            split = [dr > 0 for dr in forced_dr]
            expected = 3 * (1 + split[0]) + 4 * (1 + split[1]) + 4 * (1 + split[2])
            assert len(made) == expected
            if D in (160, 192):  # the split tiles that only TMA runs (pointer loads pad to 256)
                assert split[0] and split[2] and {128, D - 128} <= {c for _, c in made}
            same_blocks = all(  # same head-dim blocks as the pointer-load default: same sums
                dr == CANDIDATES[kernel](D)[0]["BLOCK_DR"] for dr, kernel in zip(forced_dr, CANDIDATES))
    assert len(made) == expected  # pointer loads: no descriptors
    if same_blocks:
        # Same blocks, same math, but not bit-identical on every machine: the interpreter's dots go
        # through NumPy/BLAS, whose fp32 summation order depends on the BLAS build and on the layout
        # of the loaded blocks (TMA and pointer loads lay them out differently); a GPU's two paths
        # may schedule their MMAs differently too. Both round the same fp32 sums once, so they agree
        # to an ulp or two of the dtype on values, plus fp32 summation noise near zero.
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *runs):
            eps = torch.finfo(a.dtype).eps
            amax = b.detach().abs().max().item()
            torch.testing.assert_close(a, b, rtol=2 * eps, atol=1e-4 * amax + 1e-6,
                                       msg=lambda m, name=name: f"TMA vs pointer loads, {name}: {m}")
    o1, l1, *g1 = runs[0]
    ro, rlse = attention_ref(q, k, v, causal=causal, layout=layout, return_lse=True)
    rgrads = torch.autograd.grad(ro.float(), (q, k, v), do.float())
    lo, llse = _lowp(q, k, v, causal, 1.0 / math.sqrt(D), layout)
    lgrads = torch.autograd.grad(lo, (q, k, v), do)
    _fa_rule("out", o1, lo, ro.float(), 1e-3)
    _fa_rule("lse", l1, llse, rlse, 1e-3)
    for name, gr, lg, rg in zip(("dq", "dk", "dv"), g1, lgrads, rgrads):
        _fa_rule(name, gr, lg, rg, 1e-3)


def test_tma_eligibility():
    from fastgen.kernels.attention import tma_ok

    if ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper-class GPU")
    q, k, v = (t.detach() for t in _qkv(1, 8, 8, 2, 2, 64, BF16))
    assert tma_ok(q, k, v, "bshd", False)
    assert not tma_ok(q, k, v, "bshd", True)  # varlen: packed sequences take pointer loads
    wide = torch.zeros(1, 8, 2, 72, dtype=BF16, device=q.device)
    assert not tma_ok(wide[..., 1:65], k, v, "bshd", False)  # base pointer not 16-byte aligned
    odd = torch.zeros(1, 8, 2, 68, dtype=BF16, device=q.device)[..., :64]  # row stride 136 bytes
    assert not tma_ok(odd, k, v, "bshd", False)
    qkv = torch.zeros(1, 8, 3, 2, 64, dtype=BF16, device=q.device)  # q, k, v views of one projection
    assert tma_ok(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], "bshd", False)
    os.environ["FASTGEN_TMA"] = "0"
    try:
        assert not tma_ok(q, k, v, "bshd", False)
    finally:
        del os.environ["FASTGEN_TMA"]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("B, S, H, D, causal", [(1, 4608, 24, 128, False), (2, 1024, 16, 72, False),
                                                (1, 4096, 8, 64, True), (1, 2048, 4, 256, False),
                                                (2, 1024, 8, 160, False), (2, 1024, 8, 96, True)])
def test_gpu_tma_real_sizes(B, S, H, D, causal):
    """Forward and backward with every kernel reading through TMA descriptors, at real sizes."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper-class GPU")
    q, k, v = _qkv(B, S, S, H, H, D, BF16, device="cuda")
    _check_against_references(q, k, v, causal, "bshd", launch=LaunchOverride(tma=True))


def test_tma_refuses_broadcast_and_every_tma_tile_is_a_legal_box():
    from fastgen.kernels.attention import tma_box_ok, tma_ok
    from fastgen.kernels.attention_configs import CANDIDATES

    if ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper-class GPU")
    q = torch.zeros(2, 8, 2, 64, dtype=BF16, device=TRITON_DEVICE)
    k = torch.zeros(1, 8, 2, 64, dtype=BF16, device=TRITON_DEVICE).expand(2, -1, -1, -1)  # stride 0 over B
    assert k.stride(0) == 0 and not tma_ok(q, k, k, "bshd", False)
    assert tma_ok(q, q, q, "bshd", False)
    assert not tma_box_ok(128, 512, 2) and not tma_box_ok(300, 64, 2) and not tma_box_ok(64, 4, 2)
    for D in range(16, 257, 8):
        for kernel, cands in CANDIDATES.items():
            for c in cands(D, True):
                if not c.get("TMA"):
                    continue
                for rows in (c["BLOCK_M"], c["BLOCK_N"]):
                    for cols in (c["BLOCK_D"], c["BLOCK_DR"]):
                        assert cols == 0 or tma_box_ok(rows, cols, 2), (kernel, D, c)


def test_batch_times_heads_is_on_grid_axis_0(monkeypatch):
    """CUDA grid axes 1 and 2 stop at 65,535 blocks; batch x heads passes that (varlen: 4,096
    sequences x 24 heads), so every attention kernel launches a 1-D grid."""
    import fastgen.kernels.attention as ka
    import fastgen.kernels.attention_bwd as kb

    grids = {}

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            grids[self.name] = grid
            return self.kernel[grid]

    for mod, name in ((ka, "_attn_fwd_kernel"), (kb, "_attn_bwd_preprocess_kernel"), (kb, "_attn_bwd_dkdv_kernel"),
                      (kb, "_attn_bwd_dq_kernel")):
        monkeypatch.setattr(mod, name, Spy(name, getattr(mod, name)))
    q, k, v = _qkv(3, 20, 20, 4, 2, 32, BF16)
    o = attention(q, k, v, causal=True, backend="triton", _launch=_interp_blocks(16, 16))
    torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert set(grids) == {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                          "_attn_bwd_dq_kernel"}
    assert all(len(g) == 1 for g in grids.values()), grids


def test_rows_past_32_bit_offsets_go_to_the_reference():
    """Row offsets are 32-bit inside a (batch, head) slice; a slice past 2^31 elements is refused by
    backend='triton' and served by the reference under 'auto' (checked on stride-only views)."""
    from fastgen.ops.attention import _offset_reason

    base = torch.empty(1, dtype=BF16, device="meta")  # shapes and strides only
    huge = base.as_strided((1, 300_000, 24, 128), (0, 3 * 24 * 128, 128, 1))  # packed qkv rows at S = 300k
    assert "32-bit row offsets" in _offset_reason(huge, huge, huge, "bshd", False)
    ok = base.as_strided((1, 200_000, 24, 128), (0, 3 * 24 * 128, 128, 1))
    assert _offset_reason(ok, ok, ok, "bshd", False) is None
    q = torch.randn(1, 8, 2, 16, dtype=BF16, device=TRITON_DEVICE)
    assert _offset_reason(q, q, q, "bshd", False) is None
