"""The training-step benchmark suite (benchmarks/bench_train.py): its wiring on CPU at tiny size.

Timings mean something only on a GPU (``fastgen bench --ops train``); here both providers run
real optimizer steps of the tiny models, and with equal weights they take the same step.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from fastgen.cli import _benchmarks_package

PKG = _benchmarks_package().__name__
bench = importlib.import_module(PKG + ".bench_train")
harness = importlib.import_module(PKG + ".harness")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_on_request_only_and_gpu_sizes():
    assert "train" in harness.available_ops() and "train" not in harness.default_ops()
    gpu = {c.variant: c for c in bench.cases("cuda", quick=False)}
    assert set(gpu) == {"flux-dev-width", "sdxl-unet", "tiny-dit"} and gpu["sdxl-unet"].dtype == torch.bfloat16
    n_flux = bench._meta_count("fastgen-models", "flux-dev-width", "cuda")
    n_unet = bench._meta_count("fastgen-models", "sdxl-unet", "cuda")
    assert 1.2e9 < n_flux < 1.4e9 and round(n_unet / 1e6) == 2567  # SDXL's UNet: 2.57 B parameters
    assert bench.tokens(gpu["flux-dev-width"]) == 4096 + 512
    assert bench.flops(gpu["flux-dev-width"], "step") == 6 * n_flux * 4608
    assert bench.flops(gpu["sdxl-unet"], "step") == 0
    assert bench.resident_bytes(gpu["sdxl-unet"]) == 3 * 2 * n_unet
    if importlib.util.find_spec("diffusers"):  # the diffusers models have the same sizes
        assert bench._meta_count("torch", "flux-dev-width", "cuda") == n_flux
        assert bench._meta_count("torch", "sdxl-unet", "cuda") == n_unet


@pytest.mark.parametrize("case", bench.cases("cpu", quick=False), ids=lambda c: c.variant)
def test_cpu_steps_train(case):
    providers = ["fastgen-models"] + (["torch"] if importlib.util.find_spec("diffusers") else [])
    for provider in providers:
        step = bench.setup(provider, case, "step", "cpu")
        before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
        losses = [step() for _ in range(3)]
        assert all(torch.isfinite(v) for v in losses), (provider, losses)
        assert all(p.grad is None for p in step.model.parameters())  # zero_grad(set_to_none) in the step
        moved = [n for n, p in step.model.named_parameters() if not torch.equal(p, before[n])]
        assert len(moved) > 0.9 * len(before), (provider, len(moved), len(before))


def test_same_loop_same_step_with_equal_weights():
    """The diffusers DiT + torch AdamW and fastgen's DiT (its weights) + FusedAdamW, torch backend:
    the same losses and the same weights after 3 steps (eval mode: no label dropout)."""
    pytest.importorskip("diffusers")
    import fastgen.models

    case = bench.cases("cpu", quick=True)[0]
    ref_model = bench.build_model("torch", case.variant, "cpu", torch.float32)
    ours = fastgen.models.DiT.from_diffusers(copy.deepcopy(ref_model), backend="torch")
    ref_model.eval(), ours.eval()  # no label dropout (it draws from the global RNG); gradients still flow
    ref = bench.build("torch", case, "cpu", model=ref_model)
    got = bench.build("fastgen-models", case, "cpu", backend="torch", model=ours)
    for _ in range(3):
        torch.testing.assert_close(got(), ref(), rtol=1e-4, atol=1e-5)
    want = ours.to_diffusers_state_dict() if hasattr(ours, "to_diffusers_state_dict") else ours.state_dict()
    have = ref_model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(v, have[k], rtol=1e-4, atol=1e-5, msg=k)


def test_harness_runs_the_suite(tmp_path):
    result = harness.run(["train"], device="cpu", quick=True, out=str(tmp_path), progress=False,
                         stream=open(str(tmp_path / "log.txt"), "w"))
    rows = {r["provider"]: r for r in result["rows"]}
    assert rows["fastgen-models"]["status"] == "ok", rows["fastgen-models"]
    tp = bench.throughput(rows["fastgen-models"])
    assert tp["images_per_s"] > 0 and tp["tokens_per_s"] == tp["images_per_s"] * 16
    assert rows["fastgen-models"]["tflops"] > 0
    if importlib.util.find_spec("diffusers"):
        assert rows["torch"]["status"] == "ok" and rows["fastgen-models"]["speedup_vs_torch"] > 0
    else:
        assert rows["torch"]["status"].startswith("skipped: diffusers is not installed")
