"""A new user's first hour: clear messages, docs that say what the code does, no raw stack traces.

The flow of a newcomer on a machine without a GPU: call an op with a wrong weight dtype
(the remedy names the dtypes once each), build ``fastgen.nn.RMSNorm`` with a backend (a
constructor argument, as docs/rms_norm.md says), and patch a model with
``backend="triton"`` on CPU tensors without Triton's interpreter (it runs, with a warning
per module, instead of raising at the first forward).
"""

from __future__ import annotations

import inspect
import pathlib
import warnings

import pytest
import torch
from torch import nn

import fastgen
import fastgen.patch as fp

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("x_dtype, remedy", [
    (torch.float32, "cast weight to torch.float32 (weight.float())"),
    (torch.float16, "cast weight to torch.float16 or torch.float32"),
])
def test_weight_dtype_message_names_each_dtype_once(x_dtype, remedy):
    x = torch.randn(2, 8, dtype=x_dtype)
    with pytest.raises(TypeError) as err:
        fastgen.ops.rms_norm(x, torch.ones(8, dtype=torch.float64))
    msg = str(err.value)
    assert f"weight dtype torch.float64 does not match x dtype {x_dtype}" in msg and remedy in msg
    assert "torch.float32 or torch.float32" not in msg


def test_rms_norm_backend_is_a_constructor_argument_as_documented():
    assert "backend" in inspect.signature(fastgen.nn.RMSNorm.__init__).parameters
    assert "backend" not in inspect.signature(fastgen.nn.RMSNorm.forward).parameters
    doc = (ROOT / "docs" / "rms_norm.md").read_text()
    assert "keyword-only `backend=`." not in doc and "**constructor** argument" in doc


def test_patch_triton_on_cpu_without_interpreter_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.GroupNorm(4, 16), nn.SiLU(), nn.LayerNorm(16))
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = m(x)
    report = fp.patch(m, backend="triton")
    assert "the model is on cpu" in str(report)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        out = m(x)
    assert len([w for w in seen if issubclass(w.category, fp.PatchFallbackWarning)]) == 1  # the LayerNorm
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    fp.unpatch(m)


def test_auto_report_says_when_it_runs_the_references(monkeypatch):
    """On a GPU the default patch runs the references until a GPU run is recorded: the report says so."""
    from fastgen.backend import AUTO_ON_CUDA

    monkeypatch.delenv("FASTGEN_BACKEND", raising=False)
    from fastgen.patch.serve import PATCH_OPS

    m = nn.Sequential(nn.LayerNorm(8))
    text = str(fp.patch(m))
    fp.unpatch(m)
    all_reference = all(AUTO_ON_CUDA.get(op, "torch") == "torch" for op in PATCH_OPS)
    assert ("backend='auto' runs the torch reference" in text) == all_reference
    assert "backend='auto'" not in str(fp.patch(m, backend="torch"))
    fp.unpatch(m)
