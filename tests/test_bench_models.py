"""The whole-model benchmark suite (benchmarks/bench_models.py): its plumbing on CPU.

The timings themselves mean something only on a GPU (``fastgen bench --ops models``);
here each tiny model runs one inference call and one training step per provider that
CPU can serve, and the suite stays out of a plain ``fastgen bench``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("diffusers")

from fastgen.cli import _benchmarks_package  # noqa: E402

PKG = _benchmarks_package().__name__
bench = importlib.import_module(PKG + ".bench_models")
harness = importlib.import_module(PKG + ".harness")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_on_request_only():
    assert "models" in harness.available_ops() and "models" not in harness.default_ops()
    assert "rms_norm" in harness.default_ops()


def test_gpu_sizes_are_the_released_models():
    """Parameter counts of the GPU configs (meta device, no memory): SD3-medium 2.03 B,
    SDXL UNet 2.57 B, SDXL VAE 83.7 M, and a Flux-dev-width stack of 2 + 4 blocks."""
    counts = {v: bench.parameter_count(v, "cuda") for v in ("flux-stack", "sd3-medium", "sdxl-unet", "sdxl-vae")}
    assert round(counts["sd3-medium"] / 1e6) == 2028
    assert round(counts["sdxl-unet"] / 1e6) == 2567
    assert round(counts["sdxl-vae"] / 1e5) == 837
    assert 1.2e9 < counts["flux-stack"] < 1.4e9
    case = bench.Case({"B": 1, "px": 1024}, torch.bfloat16, "sdxl-unet")
    assert bench.bytes_moved(case, "fwd") == 2 * counts["sdxl-unet"]
    assert bench.bytes_moved(case, "fwd+bwd") == 6 * counts["sdxl-unet"]


@pytest.mark.parametrize("case", bench.cases("cpu", quick=False), ids=lambda c: f"{c.variant}-{c.shape['px']}")
def test_cpu_cases_run(case):
    fn = bench.setup("torch", case, "fwd", "cpu")
    out = fn()
    assert torch.isfinite(out).all()
    if case.variant == "sdxl-vae":
        assert out.shape[-1] == case.shape["px"]
        with pytest.raises(bench.Unavailable, match="decode-only"):
            bench.setup("torch", case, "fwd+bwd", "cpu")
    else:
        step = bench.setup("torch", case, "fwd+bwd", "cpu")
        step()
        assert all(p.grad is not None for p in step.grad_to_none[:3])
    for provider in bench.GPU_ONLY:
        with pytest.raises(bench.Unavailable, match="GPU"):
            bench.setup(provider, case, "fwd", "cpu")


def test_bad_arguments():
    case = bench.cases("cpu", quick=True)[0]
    with pytest.raises(ValueError, match="unknown mode"):
        bench.setup("torch", case, "bwd", "cpu")
    with pytest.raises(ValueError, match="unknown provider"):
        bench.setup("eager", case, "fwd", "cpu")
