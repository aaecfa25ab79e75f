"""The whole-model benchmark suite (benchmarks/bench_models.py): its plumbing on CPU.

The timings themselves mean something only on a GPU (``fastgen bench --ops models``);
here each tiny model runs one inference call and one training step per provider that
CPU can serve, and the suite stays out of a plain ``fastgen bench``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fastgen.cli import _benchmarks_package

PKG = _benchmarks_package().__name__
bench = importlib.import_module(PKG + ".bench_models")
harness = importlib.import_module(PKG + ".harness")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_on_request_only():
    assert "models" in harness.available_ops() and "models" not in harness.default_ops()
    assert "rms_norm" in harness.default_ops()


def test_gpu_sizes_are_the_released_models():
    """Parameter counts of the GPU configs (meta device, no memory): SD3-medium 2.03 B,
    SDXL UNet 2.57 B, SDXL VAE 83.7 M, CogVideoX-2b 1.69 B, and a Flux-dev-width stack of 2 + 4 blocks."""
    pytest.importorskip("diffusers")
    counts = {v: bench.parameter_count(v, "cuda")
              for v in ("flux-stack", "sd3-medium", "sdxl-unet", "sdxl-vae", "cogvideox-2b")}
    assert round(counts["cogvideox-2b"] / 1e7) == 169
    assert round(counts["sd3-medium"] / 1e6) == 2028
    assert round(counts["sdxl-unet"] / 1e6) == 2567
    assert round(counts["sdxl-vae"] / 1e5) == 837
    assert 1.2e9 < counts["flux-stack"] < 1.4e9
    case = bench.Case({"B": 1, "px": 1024}, torch.bfloat16, "sdxl-unet")
    assert bench.bytes_moved(case, "fwd") == 2 * counts["sdxl-unet"]
    assert bench.bytes_moved(case, "fwd+bwd") == 6 * counts["sdxl-unet"]


@pytest.mark.parametrize("case", bench.cases("cpu", quick=False), ids=lambda c: f"{c.variant}-{c.shape['px']}")
def test_cpu_cases_run(case):
    pytest.importorskip("diffusers")
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


def test_cogvideox_case_is_the_released_video_size():
    """49 frames x 480 x 720 px -> latents (B, 13, 16, 60, 90) on the GPU; the tiny CPU case likewise."""
    pytest.importorskip("diffusers")
    (gpu,) = [c for c in bench.cases("cuda", quick=False) if c.variant == "cogvideox-2b"]
    assert gpu.shape == {"B": 1, "px": 480, "W": 720, "frames": 49} and gpu.dtype == torch.bfloat16
    cfg = bench._build("cogvideox-2b", "cuda", torch.bfloat16, meta=True).config
    assert bench.video_latent_shape(gpu.shape, cfg) == (13, 16, 60, 90)
    assert (cfg.max_text_seq_length, cfg.text_embed_dim) == (226, 4096)
    (cpu,) = [c for c in bench.cases("cpu", quick=False) if c.variant == "cogvideox-2b"]
    model = bench._model("cogvideox-2b", "cpu", torch.float32)
    x = bench._inputs("cogvideox-2b", 1, cpu.shape["px"], "cpu", torch.float32, model, cpu.shape)
    assert x["hidden_states"].shape == (1, 3, 4, 4, 6)


@pytest.mark.parametrize("variant", sorted(bench.FASTGEN_MODELS))
def test_fastgen_rows_wired_at_tiny_size(variant):
    """The fastgen-models rows (the variant's fastgen.models class from the benchmark's diffusers
    model) and the fastgen.patch rows, wired as timed but on the torch backend: the same output as
    the diffusers model on the benchmark's inputs (fp32), and a training step reaches every
    parameter of the fastgen model."""
    pytest.importorskip("diffusers")
    (case,) = [c for c in bench.cases("cpu", quick=False) if c.variant == variant]
    want = bench.build("torch", case, "fwd", "cpu")()
    for provider in ("fastgen-models", "fastgen-triton"):
        got = bench.build(provider, case, "fwd", "cpu", backend="torch")()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    diffusers_model = bench._model(variant, "cpu", torch.float32)
    bench.fp.unpatch(diffusers_model)
    native = bench.native_model(variant, diffusers_model, "torch")
    assert type(native).__name__ == bench.FASTGEN_MODELS[variant]
    step = bench.build("fastgen-models", case, "fwd+bwd", "cpu", backend="torch")
    step()
    assert len(step.grad_to_none) == len(list(native.parameters()))
    assert all(p.grad is not None for p in step.grad_to_none)


def test_bad_arguments():
    case = bench.cases("cpu", quick=True)[0]
    with pytest.raises(ValueError, match="unknown mode"):
        bench.setup("torch", case, "bwd", "cpu")
    with pytest.raises(ValueError, match="unknown provider"):
        bench.setup("eager", case, "fwd", "cpu")
