"""fastgen.train.sampling: the built-in Euler / DDIM samplers against diffusers' schedulers and an oracle."""

from __future__ import annotations

import pytest
import torch

from fastgen.train.objectives import DenoisingObjective, FlowMatchingObjective
from fastgen.train.sampling import sample, save_grid

TARGET = torch.tensor([0.5, -0.25, 0.75]).view(1, 3, 1, 1).expand(1, 3, 4, 4)


def _oracle(objective):
    """A model that knows the data is one point: its exact prediction for every (x, t)."""
    def model(x, t, class_labels=None):
        x0 = TARGET.expand_as(x)
        if isinstance(objective, FlowMatchingObjective):
            s = (t.float() / objective.num_train_timesteps).view(-1, 1, 1, 1)
            return (x - x0) / s
        a = objective.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        return {"epsilon": eps, "sample": x0, "v_prediction": v}[objective.prediction]
    return model


@pytest.mark.parametrize("sampler", ["builtin", "auto"])
@pytest.mark.parametrize("objective", [FlowMatchingObjective(shift=3.0), DenoisingObjective("epsilon"),
                                       DenoisingObjective("v_prediction", "squaredcos_cap_v2"),
                                       DenoisingObjective("sample", "scaled_linear")], ids=lambda o: getattr(
                                           o, "prediction", "flow") if isinstance(o, DenoisingObjective) else "flow")
def test_oracle_model_lands_on_the_data(objective, sampler):
    if sampler == "auto":
        pytest.importorskip("diffusers")
    labels = torch.zeros(5, dtype=torch.long)
    out = sample(_oracle(objective), objective, labels, (3, 4, 4), num_steps=8,
                 generator=torch.Generator().manual_seed(0), sampler=sampler)
    torch.testing.assert_close(out, TARGET.expand(5, 3, 4, 4), atol=2e-4, rtol=0)


@pytest.mark.parametrize("objective", [FlowMatchingObjective(shift=2.0), DenoisingObjective("epsilon"),
                                       DenoisingObjective("v_prediction", "squaredcos_cap_v2")],
                         ids=["flow", "eps", "v"])
def test_builtin_matches_diffusers_on_a_fixed_model(objective):
    pytest.importorskip("diffusers")
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * 0.3

    def model(x, t, class_labels=None):  # an arbitrary smooth function of (x, t, y)
        return torch.einsum("oc,bchw->bohw", w, x) * torch.cos(t.float() / 700).view(-1, 1, 1, 1) + 0.1 * (
            class_labels.float().view(-1, 1, 1, 1) - 1)

    labels = torch.tensor([0, 1, 2])
    a = sample(model, objective, labels, (3, 4, 4), 10, torch.Generator().manual_seed(3), "builtin")
    b = sample(model, objective, labels, (3, 4, 4), 10, torch.Generator().manual_seed(3), "auto")
    torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-3)  # fp32 rounding of the sigma grid


def test_guidance_combines_both_halves():
    obj = FlowMatchingObjective()
    calls = []

    def model(x, t, class_labels=None):
        calls.append(class_labels.clone())
        return torch.where(class_labels.view(-1, 1, 1, 1) == 9, torch.zeros_like(x), torch.ones_like(x))

    out = sample(model, obj, torch.tensor([1, 2]), (3, 2, 2), 4, torch.Generator().manual_seed(0), "builtin",
                 guidance_scale=3.0, null_label=9)
    assert torch.equal(calls[0], torch.tensor([1, 2, 9, 9]))
    x0 = torch.randn((2, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    # v = 0 + 3 * (1 - 0) = 3 everywhere; sigma goes 1 -> 0 so x = x0 - 3
    torch.testing.assert_close(out, x0 - 3.0, atol=1e-5, rtol=0)


def test_save_grid(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    p = tmp_path / "g.png"
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    save_grid(x, str(p), nrow=3)
    img = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float()
    assert img.shape == (3, 2 * 10 + 2, 3 * 10 + 2)
    # image 4 (row 1, column 1) sits at (2 + 10, 2 + 10), back in [-1, 1] within 8-bit rounding
    torch.testing.assert_close(img[:, 12:20, 12:20] / 127.5 - 1, x[4], atol=1 / 127.5, rtol=0)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"])
def test_named_diffusers_schedulers_with_an_oracle(name):
    pytest.importorskip("diffusers")
    obj = DenoisingObjective("epsilon", "scaled_linear", beta_start=0.00085, beta_end=0.012)
    out = sample(_oracle(obj), obj, torch.zeros(3, dtype=torch.long), (3, 4, 4), num_steps=10,
                 generator=torch.Generator().manual_seed(0), sampler=name)
    # DDPM's stochastic steps re-noise, but its last step (t = 0) returns the predicted x0
    torch.testing.assert_close(out, TARGET.expand(3, 3, 4, 4), atol=2e-3, rtol=0)


def test_unknown_diffusers_scheduler_is_named():
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="diffusers has no scheduler 'NoSuchScheduler'"):
        sample(lambda x, t, class_labels=None: x, FlowMatchingObjective(), torch.zeros(1, dtype=torch.long),
               (1, 2, 2), 2, sampler="NoSuchScheduler")
