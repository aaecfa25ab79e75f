"""Fuzzing the public ops with random (often wrong) shapes, dtypes, layouts and index tensors.

The contract: every call gives a clear error (``ValueError`` / ``TypeError`` /
``BackendUnavailableError``) or the right answer; never a crash, a raw error from inside a
kernel, or a backend that answers where another refuses. The Triton path runs under the
interpreter on CPU (on a GPU, on CUDA tensors), so an out-of-bounds index would show up as a
crash or a wrong answer here. Examples are derandomized: the same cases on every machine.
"""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET, TRITON_DEVICE, max_err

from fastgen import ops
from fastgen.backend import BackendUnavailableError

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install hypothesis)")
st = hypothesis.strategies

if TRITON_DEVICE == "cpu" and not INTERPRET:  # pragma: no cover - a GPU-less machine without the interpreter
    pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

CLEAR = (ValueError, TypeError, BackendUnavailableError)
DTYPES = [torch.float32, torch.float16, torch.bfloat16] * 3 + [torch.float64, torch.int32]
SETTINGS = dict(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(hypothesis.HealthCheck))


@st.composite
def tensors(draw, shape, dtype=None):
    """A tensor of ``shape`` (some dims possibly perturbed), a drawn dtype, maybe non-contiguous."""
    shape = list(shape)
    if draw(st.integers(0, 7)) == 0 and shape:  # a wrong size in one dim
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = draw(st.integers(0, 7))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    base = torch.randn(*shape, 2) if draw(st.booleans()) else None
    t = base[..., 0] if base is not None else torch.randn(*shape)  # [..., 0]: stride-2 view
    if dtype == torch.int32:
        t = (t * 3).to(torch.int32)
    return t.to(TRITON_DEVICE, dtype)


def _run(fn):
    """(result, None) or (None, exception) for the clear errors; anything else fails the test."""
    try:
        return fn(), None
    except CLEAR as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return None, exc


def _agree(name, call):
    """Both backends: the same error kind, or the same answer (Triton may also refuse a call the
    reference serves: a dtype or size the kernels do not cover, with BackendUnavailableError)."""
    ref, ref_err = _run(lambda: call("torch"))
    out, err = _run(lambda: call("triton"))
    if ref_err is not None:
        assert err is not None, f"{name}: torch refused ({ref_err}) but triton answered"
        assert isinstance(err, (type(ref_err), BackendUnavailableError)), (name, ref_err, err)
        return
    if err is not None:
        assert isinstance(err, BackendUnavailableError), f"{name}: torch answered, triton raised {err!r}"
        return
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = out if isinstance(out, tuple) else (out,)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype, (name, o.shape, r.shape, o.dtype, r.dtype)
        tol = 1e-4 if r.dtype in (torch.float32, torch.float64) else 5e-2
        assert max_err(o, r) <= tol * (1 + r.detach().abs().max().item() if r.numel() else 1), name


@hypothesis.settings(**SETTINGS)
@hypothesis.given(data=st.data(), M=st.integers(0, 5), N=st.integers(1, 40))
def test_fuzz_rms_norm_and_layer_norm(data, M, N):
    x = data.draw(tensors((M, N)))
    w = data.draw(st.one_of(st.none(), tensors((N,), x.dtype if data.draw(st.booleans()) else None)))
    eps = data.draw(st.sampled_from([1e-6] * 6 + [0.0, -1.0, float("nan")]))
    _agree("rms_norm", lambda b: ops.rms_norm(x, w, eps, backend=b))
    _agree("layer_norm", lambda b: ops.layer_norm(x, w, None, eps, backend=b))


@hypothesis.settings(**SETTINGS)
@hypothesis.given(data=st.data(), B=st.integers(0, 2), C=st.integers(1, 12), G=st.integers(-1, 7))
def test_fuzz_group_norm(data, B, C, G):
    x = data.draw(tensors((B, C, 3, 2)))
    w = data.draw(st.one_of(st.none(), tensors((C,))))
    act = data.draw(st.sampled_from([None, "silu", "relu"]))
    _agree("group_norm", lambda b: ops.group_norm(x, G, w, None, 1e-5, act, backend=b))


@hypothesis.settings(**SETTINGS)
@hypothesis.given(data=st.data(), S=st.integers(0, 5), H=st.integers(1, 3), D=st.sampled_from([2, 8, 16, 7]))
def test_fuzz_apply_rope_and_qk_norm_rope(data, S, H, D):
    dtype = data.draw(st.sampled_from(DTYPES))
    q = data.draw(tensors((1, S, H, D), dtype))
    k = data.draw(tensors((1, S, 1, D), dtype))
    cos = data.draw(tensors((S, D), torch.float32))
    sin = data.draw(tensors((S, D), torch.float32))
    layout = data.draw(st.sampled_from(["bshd"] * 3 + ["bhsd", "sbhd"]))
    _agree("apply_rope", lambda b: ops.apply_rope(q, k, cos, sin, layout, backend=b))
    w = data.draw(tensors((D,), torch.float32))
    _agree("qk_norm_rope", lambda b: ops.qk_norm_rope(q, k, w, w, cos, sin, layout=layout, backend=b))


@hypothesis.settings(**SETTINGS)
@hypothesis.given(data=st.data(), M=st.integers(0, 4), N=st.integers(0, 13))
def test_fuzz_glu_and_modulate(data, M, N):
    x = data.draw(tensors((2, M, N)))
    act = data.draw(st.sampled_from(["gelu", "silu", "gelu_tanh", "swish"]))
    _agree("glu", lambda b: ops.glu(x, act, backend=b))
    shift, scale = data.draw(tensors((2, N))), data.draw(tensors((2, N)))
    _agree("layer_norm_modulate", lambda b: ops.layer_norm_modulate(x, shift, scale, backend=b))


@hypothesis.settings(**SETTINGS)
@hypothesis.given(data=st.data(), lens=st.lists(st.integers(0, 6), min_size=1, max_size=3))
def test_fuzz_attention_varlen_index_tensors(data, lens):
    """cu_seqlens drawn at random (often inconsistent with the packed length)."""
    total = data.draw(st.integers(0, 12))
    dtype = data.draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    q = torch.randn(total, 2, 16).to(TRITON_DEVICE, dtype)
    cuts = [0] + [data.draw(st.integers(-2, 14)) for _ in lens]
    cu = torch.tensor(cuts, dtype=data.draw(st.sampled_from([torch.int32, torch.int32, torch.int64])),
                      device=TRITON_DEVICE)
    max_q = data.draw(st.one_of(st.none(), st.integers(0, 8)))
    _agree("attention", lambda b: ops.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_q,
                                                max_seqlen_k=max_q, backend=b))
