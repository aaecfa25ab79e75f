"""Shared test configuration: devices, the tolerance rule, markers.

Tiers (DESIGN.md): the CPU tier runs everywhere — Triton kernels under
TRITON_INTERPRET=1 on CPU tensors when no GPU is present; ``-m gpu`` selects the
tests that need a GPU (run by scripts/gpu_suite.sh). A test that needs what the
machine lacks skips with a reason.
"""

from __future__ import annotations

import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated,
# so the interpreter must be switched on before fastgen's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by scripts/gpu_suite.sh)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_suite.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
