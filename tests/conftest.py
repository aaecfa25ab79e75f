"""Shared test configuration: devices, the tolerance rule, markers.

Tiers (DESIGN.md): the CPU tier runs everywhere — Triton kernels under
TRITON_INTERPRET=1 on CPU tensors when no GPU is present; ``-m gpu`` selects the
tests that need a GPU (run by scripts/gpu_suite.sh). A test that needs what the
machine lacks skips with a reason.
"""

from __future__ import annotations

import math
import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated,
# so the interpreter must be switched on before fastgen's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU tier's tensors are tiny: one torch thread per process avoids OpenMP's wake-up and
# spin cost, which dominates them (3-50x on a loaded 2-core machine). FASTGEN_TEST_THREADS
# overrides it.
torch.set_num_threads(int(os.environ.get("FASTGEN_TEST_THREADS", "1")))

# One fixed launch config per shape in the tests (the GPU autotuner, kernels/autotune.py, is
# tested on its own in tests/test_autotune.py).
os.environ.setdefault("FASTGEN_AUTOTUNE", "0")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Where the Triton kernels run in this session: real GPU, else CPU tensors in the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Elementwise and normalization ops: (atol, rtol) per dtype, for a kernel output
# compared with the torch reference computed in the same dtype (both rounded once
# from fp32, so they differ by about one unit in the last place).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """torch.testing.assert_close with the per-dtype tolerance table (``scale`` widens it)."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale, msg=msg or None)


def perturb_biases(model, seed=0):
    """``model`` in eval mode with 0.1 N(0, 1) (seeded) added to every 1-D parameter: biases and norm
    affines far from their init, so per-tile statistics differ and tiling errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def capture_cuda_graph(fn):
    """``(graph, fn())`` with ``fn`` captured into a CUDA graph on a side stream (the way torch
    documents it); nothing ran yet: ``graph.replay()`` runs it. The caller did one eager call
    first (states and launch tables allocated outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def replay_cuda_graph(fn, replays: int) -> None:
    """Capture ``fn`` (:func:`capture_cuda_graph`), replay it ``replays`` times, synchronize."""
    graph, _ = capture_cuda_graph(fn)
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()


def max_err(actual, expected) -> float:
    """Largest |actual - expected| in float64; ``inf`` wherever ``actual`` is NaN or infinite and
    ``expected`` is not the same value (so a kernel that returns NaN can never look close).
    Infinities equal in both (an lse of -inf for a row that sees no key) count as agreement."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    agree = a == e  # NaN never agrees
    if bool((~torch.isfinite(a) & ~agree).any()) or bool((~torch.isfinite(e) & ~agree).any()):
        return math.inf
    if a.numel() == 0:
        return 0.0
    return torch.where(agree, torch.zeros_like(a), a - e).abs().max().item()


def assert_fa_rule(name, out, lowp, ref, atol):
    """The FlashAttention rule (DESIGN.md): ``|out - ref| <= 2 * |lowp - ref| + atol`` where ``ref``
    is the fp32/fp64 truth and ``lowp`` plain torch in the kernel's dtype: no worse than PyTorch
    itself. Fails on NaN / inf in ``out`` where ``ref`` is finite (``max_err``)."""
    err, base = max_err(out, ref), max_err(lowp, ref)
    assert math.isfinite(base), f"{name}: the torch baseline itself is not finite"
    assert err <= 2 * base + atol, f"{name}: max error {err:.3g} > 2 * {base:.3g} (torch in the same dtype) + {atol}"


def c_entry(C, fn: str, *values, **fields):
    """Call fastgen._C's entry point ``fn`` with its parameter struct (``RmsNormFwdParams`` for
    ``rms_norm_fwd``) filled by name: ``values`` in the struct's field order, then ``fields``."""
    params = getattr(C, "".join(w.capitalize() for w in fn.split("_")) + "Params")
    assert len(values) <= len(params.fields), (fn, len(values))
    named = dict(zip(params.fields, values))
    named.update(fields)
    return getattr(C, fn)(params(**named))


def run_auto_as(monkeypatch, op, impl, fn):
    """Run ``fn()`` with ``backend="auto"`` standing for ``impl`` on CUDA tensors (as a recorded
    run would set ``AUTO_ON_CUDA``), and fail unless ``op`` really resolved to ``impl``."""
    from fastgen import backend

    monkeypatch.setitem(backend.AUTO_ON_CUDA, op, impl)
    with backend.trace() as ran:
        out = fn()
    assert (op, impl) in ran, f"backend='auto' was to run {op} with {impl!r}; it ran {ran}"
    return out


requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """pytest-xdist workers share one GPU: none may keep the tens of GB its float64 references
    cached once its test is done."""
    yield
    if HAS_CUDA and torch.cuda.memory_reserved() > (2 << 30):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture
def requires_safetensors():
    """For tests that write or read fastgen's files (checkpoints, adapters, caches): safetensors,
    a dependency that an offline machine (the GPU image) may lack; the single test skips."""
    return pytest.importorskip("safetensors", reason="needs safetensors (pip install safetensors)")


@pytest.fixture
def requires_image_writer():
    """For tests that write PNG grids: Pillow or matplotlib."""
    for name in ("PIL", "matplotlib"):
        try:
            return __import__(name)
        except ImportError:
            pass
    pytest.skip("needs Pillow or matplotlib to write PNG grids")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by scripts/gpu_suite.sh)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")
    config.addinivalue_line("markers", "candidates: GPU tier, every autotune / TMA launch config once "
                                       "(scripts/gpu_suite.sh runs them after the rest of the GPU tier)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_suite.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
