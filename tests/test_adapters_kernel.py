"""The fused LoRA kernel (kernels/lora.py via fastgen.adapters.fused.lora_add) against the plain
torch composition ``y + s * (x @ down^T) @ up^T`` computed in float64, forward and every gradient.

Tolerance: the FlashAttention rule — the kernel's error against float64 at most twice torch's
own error in the same dtype, plus a small atol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

if __name__ != "__main__":  # run as a script, this file is the static tier's child: no interpreter
    from conftest import HAS_CUDA, INTERPRET, TRITON_DEVICE
else:
    HAS_CUDA, INTERPRET, TRITON_DEVICE = False, False, "cuda"

from fastgen.adapters.fused import dora_row_norm, dora_row_norm_ref, lora_add, lora_add_ref

needs_triton = pytest.mark.skipif(TRITON_DEVICE == "cpu" and not INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread (on a loaded 2-core machine, idle OpenMP threads spinning
    for work cost these tests 5-10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fa_close(out, torch_out, ref, dtype, what):
    err = (out.double() - ref).abs().max().item()
    bar = 2 * (torch_out.double() - ref).abs().max().item() + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    assert err <= bar, f"{what}: error {err:.3g} above the bar {bar:.3g} ({dtype})"


def _case(M, K, N, R, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(TRITON_DEVICE)  # noqa: E731
    x, y, down, up, dy = mk(M, K), mk(M, N), mk(R, K) / K**0.5, mk(N, R) / R**0.5, mk(M, N)
    return [t.to(dtype) for t in (x, y, down, up)], dy.to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,R", [(19, 37, 23, 1), (33, 70, 67, 3), (5, 9, 130, 17)])
def test_lora_kernel_matches_torch(M, K, N, R, dtype):
    (x, y, down, up), dy = _case(M, K, N, R, dtype)
    s = 0.7
    leaves = [t.clone().requires_grad_() for t in (x, down, up)]
    ref_leaves = [t.double().requires_grad_() for t in (x, down, up)]
    tch_leaves = [t.clone().requires_grad_() for t in (x, down, up)]

    y_k = y.clone()
    out = lora_add(y_k, leaves[0], leaves[1], leaves[2], s, backend="triton")
    assert out.data_ptr() == y_k.data_ptr(), "the kernel must add into the base output in place"
    ref = lora_add_ref(y.double(), *ref_leaves, s)
    tch = lora_add(y.clone(), *tch_leaves, s, backend="torch")
    _fa_close(out, tch, ref, dtype, "y")

    out.backward(dy)
    ref.backward(dy.double())
    tch.backward(dy)
    for name, a, b, c in zip(("dx", "d_down", "d_up"), leaves, ref_leaves, tch_leaves):
        assert a.grad.dtype == dtype
        _fa_close(a.grad, c.grad, b.grad, dtype, name)


@needs_triton
def test_lora_kernel_in_place_and_batched_shapes():
    """3-D inputs (batch, tokens, features), the base output grad passes through unchanged."""
    (x, y, down, up), dy = _case(2 * 7, 12, 10, 4, torch.float32, seed=1)
    x, y, dy = x.view(2, 7, 12), y.view(2, 7, 10), dy.view(2, 7, 10)
    yb = y.clone().requires_grad_()
    base = yb * 1.0  # a non-leaf stand-in for the base layer's output
    out = lora_add(base, x, down, up, 2.0, backend="triton")
    torch.testing.assert_close(out, lora_add_ref(y, x, down, up, 2.0), atol=1e-5, rtol=1e-5)
    out.backward(dy)
    torch.testing.assert_close(yb.grad, dy)


def test_lora_add_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        lora_add(torch.zeros(3, 5), torch.zeros(3, 4), torch.zeros(2, 4), torch.zeros(6, 2), 1.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,R", [((23, 37), 1), ((9, 70), 17), ((6, 5, 3, 3), 3)])
def test_dora_row_norm_kernel(shape, R, dtype):
    """||W + s up @ down|| per output row (Linear and Conv2d weights) against float64."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g).to(TRITON_DEVICE, dtype)
    down = torch.randn(R, *shape[1:], generator=g).to(TRITON_DEVICE, dtype)
    up = (torch.randn(shape[0], R, *([1] * (len(shape) - 2)), generator=g) * 0.5).to(TRITON_DEVICE, dtype)
    out = dora_row_norm(w, up, down, 0.7, backend="triton")
    ref = dora_row_norm_ref(w.double(), up.double(), down.double(), 0.7)
    tch = dora_row_norm(w, up, down, 0.7, backend="torch")
    assert out.shape == (shape[0],) and out.dtype == dtype
    _fa_close(out, tch, ref, dtype, "row norm")


@needs_triton
def test_compile_fullgraph_with_adapters_on_the_kernels():
    """torch.compile(fullgraph=True) traces LoRA (in-place custom op), DoRA's norm and the quantized
    base's dequantize-GEMM on the Triton path; output and adapter grads equal eager."""
    import fastgen.adapters as A

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.GELU(), torch.nn.Linear(12, 8)).to(TRITON_DEVICE)
    A.add_adapter(model, "a", rank=2, targets="all")
    A.add_adapter(model, "d", kind="dora", rank=2, targets=["2"])
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(0.1)
    A.quantize(model, "int8")
    A.use_backend(model, "triton")
    x = torch.randn(2, 3, 16, device=TRITON_DEVICE)
    eager = model(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in A.adapter_parameters(model)]
    for p in A.adapter_parameters(model):
        p.grad = None
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    for p, w in zip(A.adapter_parameters(model), want):
        torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-5)


# --- GPU tier: real sizes, the kernel must be what ran ----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R", [16, 128])
def test_lora_kernel_gpu_sizes(dtype, R):
    """Flux-width projection (3072 -> 3072), 4096 tokens."""
    M, K, N = 4096, 3072, 3072
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    y = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    down = (torch.randn(R, K, device="cuda", generator=g) / K**0.5).to(dtype).requires_grad_()
    up = (torch.randn(N, R, device="cuda", generator=g) / R**0.5).to(dtype).requires_grad_()
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    y_k = y.clone()
    out = lora_add(y_k, x, down, up, 0.5, backend="triton")
    assert out.data_ptr() == y_k.data_ptr(), "the Triton kernel (in place) must have run"
    ref = lora_add_ref(y.double(), x.double(), down.double(), up.double(), 0.5)
    tch = lora_add(y.clone(), x, down.detach(), up.detach(), 0.5, backend="torch")
    _fa_close(out, tch, ref, dtype, "y")
    out.backward(dy)
    assert down.grad is not None and torch.isfinite(down.grad).all() and torch.isfinite(up.grad).all()


# --- static tier: the launch configs compile for sm_90 without spilling ----------------------

# the configs nearest the register limit (all configs were checked by hand: none spills)
STATIC_CASES = ["lora:fwd:bf16:32", "qmm:fp8e4nv:T:bf16", "dora:bf16:128"]
SPILL_BYTES_ALLOWED = 0 if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9) else 16


def _static_usage(cases):  # runs in a child process without the interpreter
    import triton.language as tl
    from sm90 import resource_usage

    from fastgen.kernels import lora as k
    from fastgen.kernels import quant_matmul as qm

    cuda = torch.device("cuda")
    tl_dt = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    th_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = []
    for case in cases:
        c = case.split(":")
        if c[0] == "lora":
            kind, dt, R = c[1], c[2], int(c[3])
            bm, bn, bk, br = k.blocks(R, th_dt[dt], cuda)
            p = f"*{dt}"
            if kind == "fwd":
                fn, names = k._lora_fwd_kernel, ("stride_ym", "stride_xm", "stride_xk", "stride_ak", "stride_ar", "stride_br", "stride_bn")
                sig = {"Y": p, "X": p, "A": p, "B": p}
                ce = dict(INTERPRET=False)
            else:
                fn, names = k._lora_bwd_kernel, ("stride_xm", "stride_xk", "stride_dym", "stride_dyn", "stride_ak", "stride_ar", "stride_br", "stride_bn")
                sig = {"X": p, "DY": p, "A": p, "B": p, "T": "*fp32", "DT": "*fp32"}
                ce = dict(N_TILES=48)
            sig.update({"M": "i32", "N": "i32", "K": "i32", "R": "i32", **{n: "i64" for n in names}, "scale": "fp32"})
            if kind == "fwd":
                sig["N_TILES"] = "i32"
            ce.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, K_TILES=48, DTYPE=tl_dt[dt], DOT_FP32=dt == "fp32")
            rows.append(dict(name=case, num_warps=k.num_warps(th_dt[dt], cuda), **resource_usage(fn, sig, ce, k.num_warps(th_dt[dt], cuda))))
        elif c[0] == "dora":
            dt = c[1]
            bn, bk, br = k.dora_blocks(int(c[2]), th_dt[dt], cuda)
            names = ("stride_wn", "stride_wk", "stride_un", "stride_ur", "stride_dr", "stride_dk")
            sig = {"W": f"*{dt}", "UP": f"*{dt}", "DOWN": f"*{dt}", "OUT": "*fp32", "N": "i32", "K": "i32", "R": "i32",
                   **{n: "i64" for n in names}, "scale": "fp32"}
            ce = dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, K_TILES=48, DTYPE=tl_dt[dt], DOT_FP32=dt == "fp32")
            rows.append(dict(name=case, num_warps=4, **resource_usage(k._dora_norm_kernel, sig, ce, 4)))
        else:
            q, trans, dt = c[1], c[2] == "T", c[3]
            bm, bp, br = qm.blocks(cuda, th_dt[dt])
            names = ("stride_cm", "stride_am", "stride_ar", "stride_qn", "stride_qk", "stride_sn", "stride_sb")
            sig = {"C": f"*{dt}", "A": f"*{dt}", "Q": f"*{q}", "S": "*fp32", "BIAS": f"*{dt}", "M": "i32", "P": "i32",
                   "R": "i32", **{n: "i64" for n in names}, "QB": "i32"}
            ce = dict(TRANS_W=trans, HAS_BIAS=trans, BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, R_TILES=48, DTYPE=tl_dt[dt],
                      DOT_FP32=dt == "fp32", INTERPRET=False)
            rows.append(dict(name=case, num_warps=4, **resource_usage(qm._qmm_kernel, sig, ce, 4)))
    return rows


@pytest.mark.skipif(HAS_CUDA, reason="the static tier runs where there is no GPU to test on")
def test_adapter_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__, *STATIC_CASES], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in rows] == STATIC_CASES
    for r in rows:
        assert max(r["spill_stores"], r["spill_loads"]) <= SPILL_BYTES_ALLOWED, r
        assert r["registers"] <= 65536 // (32 * r["num_warps"]), r


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_static_usage(sys.argv[1:])))
