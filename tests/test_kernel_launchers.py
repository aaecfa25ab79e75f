"""Properties every Triton launcher in fastgen/kernels must have, checked on the source (no GPU).

- **Device guard.** Triton launches on the *current* CUDA device, not the tensors'. Every
  module-level function that launches a kernel (``_x_kernel[grid](...)``, directly or through a nested
  ``launch`` closure that the autotuner times) carries ``@device_guard``.
- On a machine with two GPUs, a launch with tensors on ``cuda:1`` runs there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _launches(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript):
            v = n.func.value
            if isinstance(v, ast.Name) and v.id.endswith("_kernel"):
                return True
    return False


def _launchers():
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and _launches(fn):
                decorators = {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}
                yield path.stem, fn.name, decorators


def test_every_launcher_is_device_guarded():
    launchers = list(_launchers())
    assert len(launchers) >= 15, launchers  # the scan finds the launchers at all
    missing = [f"kernels/{m}.py:{f}" for m, f, decorators in launchers if "device_guard" not in decorators]
    assert not missing, f"launchers without @device_guard (they would launch on the current device): {missing}"


def test_device_guard_switches_to_the_tensors_device(monkeypatch):
    from fastgen.kernels._common import device_guard

    entered = []

    class FakeDevice:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeTensor(torch.Tensor):
        pass

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    t = torch.empty(2)
    monkeypatch.setattr(type(t), "is_cuda", property(lambda self: getattr(self, "_fake_cuda", False)))
    monkeypatch.setattr(type(t), "device", property(lambda self: torch.device("cuda", 1) if getattr(
        self, "_fake_cuda", False) else torch.device("cpu")))
    t._fake_cuda = True
    ran = device_guard(lambda xs, scale: ("ran", scale))([t], scale=2.0)
    assert ran == ("ran", 2.0) and entered == [torch.device("cuda", 1)]
    entered.clear()
    assert device_guard(lambda x: x)(torch.empty(1)).shape == (1,) and entered == []  # CPU: no switch


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_launch_on_the_second_gpu_while_the_first_is_current():
    from fastgen.ops import rms_norm, rms_norm_ref

    torch.cuda.set_device(0)
    x = torch.randn(64, 256, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        y = rms_norm(x, backend="triton")
    assert y.device == x.device
    torch.testing.assert_close(y, rms_norm_ref(x), atol=1e-2, rtol=1e-2)
