"""Consistency distillation and LCM distillation from the trainer's config: validation, the teacher
adapters against exact Gaussian denoisers, tiny runs that move the student toward the teacher, and
bit-exact resume with the target network.

The tiny runs use a fastgen DiT (1 layer, 8x8 images, 2 classes) and a teacher trained for 60 steps
by the trainer itself (a checkpoint folder); the measure is the mean squared distance between the
student's one-step sample and the teacher's multi-step ODE / DDIM solution from the same noise.
A w-conditioned LCM student (``WNet``, diffusers' ``timestep_cond``) learns at both ends of its w range,
and spies check that the w of the teacher's guidance is the w embedded into the student, in training
and in validation sampling.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch

from fastgen.train import Config, ConfigError, Trainer
from fastgen.train.consistency import ModelDenoiser
from fastgen.train.data import TensorImageDataset
from fastgen.train.objectives import make_betas
from test_train_resume import _assert_identical, _state, _straight_and_resumed, _tensor_data, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
DIT = dict(in_channels=3, sample_size=8, patch_size=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
           num_embeds_ada_norm=2, class_dropout_prob=0.1)


def _err(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        Config.from_dict(d)
    return str(e.value)


# --------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("obj,extra,msg", [
    ({"kind": "consistency_distillation"}, {}, "objective.teacher is required for objective.kind = "
                                               "'consistency_distillation'"),
    ({"kind": "lcm"}, {}, "objective.teacher is required for objective.kind = 'lcm'"),
    ({"kind": "lcm", "teacher": "t", "target_decy": 0.9}, {},
     "unknown key 'objective.target_decy' (did you mean 'objective.target_decay'?)"),
    ({"kind": "lcm", "teacher": "t", "target_decay": 1.0}, {}, "objective.target_decay must be in [0, 1), got 1.0"),
    ({"kind": "consistency_distillation", "teacher": "t", "teacher_solver": "ddim"}, {},
     "objective.teacher_solver must be one of 'auto', 'euler', 'heun' for consistency_distillation, got 'ddim'"),
    ({"kind": "lcm", "teacher": "t", "teacher_solver": "heun"}, {}, "objective.teacher_solver must be one of 'auto', "
                                                                     "'ddim' for lcm"),
    ({"kind": "lcm", "teacher": "t", "teacher_kind": "flow"}, {},
     "objective.teacher_kind must be one of 'auto', 'denoising' for lcm, got 'flow'"),
    ({"kind": "lcm", "teacher": "t", "prediction": "sample"}, {}, "objective.prediction must be one of 'epsilon', "
                                                                  "'v_prediction' for lcm"),
    ({"kind": "lcm", "teacher": "t", "lcm_w_min": 5.0, "lcm_w_max": 2.0}, {}, "need 0 <= lcm_w_min <= lcm_w_max"),
    ({"kind": "lcm", "teacher": "t", "lcm_num_ddim_timesteps": 2000}, {}, "lcm_num_ddim_timesteps must be in "
                                                                          "1..num_train_timesteps (1000)"),
    ({"kind": "consistency_distillation", "teacher": "t", "cd_num_scales": 1}, {}, "cd_num_scales must be >= 2"),
    ({"kind": "consistency_distillation", "teacher": "t", "distill_loss": "mse"}, {},
     "objective.distill_loss must be one of 'huber', 'l2'"),
    ({"kind": "consistency_distillation", "teacher": "t", "loss_weighting": "snr"}, {},
     "objective.loss_weighting must be one of 'none' for consistency_distillation"),
    ({"kind": "consistency_distillation", "teacher": "t", "teacher_kind": "denoising", "beta_schedule": "cos"}, {},
     "objective.beta_schedule must be one of"),
    ({"kind": "consistency_distillation", "teacher": "t"}, {"train": {"parallel": "fsdp"}},
     "train.parallel = 'fsdp' is not supported with objective.kind = 'consistency_distillation'"),
    ({"kind": "lcm", "teacher": "t", "teacher_factory": "TinyNet"}, {},
     "objective.teacher_factory must look like 'module:callable', got 'TinyNet'"),
])
def test_distillation_config_errors_name_the_key(obj, extra, msg):
    assert msg in _err({"objective": obj, **extra})


def test_distillation_config_defaults_and_round_trip():
    cfg = Config.from_dict({"objective": {"kind": "lcm", "teacher": "runs/t", "lcm_w_min": 3}})
    o = cfg.objective
    assert (o.target_decay, o.teacher_solver, o.teacher_kind, o.lcm_w_min, o.lcm_w_max) == (0.95, "auto", "auto",
                                                                                            3.0, 14.0)
    assert Config.from_dict(tomllib.loads(cfg.to_toml())) == cfg
    assert "# consistency_distillation, lcm: EMA decay mu of the target network" in cfg.to_toml()
    from test_train_resume import TinyNet  # a callable teacher_factory is written as 'module:name'
    cfg = Config.from_dict({"objective": {"kind": "lcm", "teacher": "t.safetensors", "teacher_factory": TinyNet}})
    assert Config.from_dict(tomllib.loads(cfg.to_toml())).objective.teacher_factory == "test_train_resume:TinyNet"


def test_example_config_is_valid():
    cfg = Config.from_toml(str(ROOT / "configs" / "train" / "dit_consistency_distillation.toml"))
    o = cfg.objective
    assert o.kind == "consistency_distillation" and o.teacher == "runs/dit_shapes" and o.init_from_teacher
    teacher_cfg = Config.from_toml(str(ROOT / "configs" / "train" / "dit_shapes.toml"))
    assert teacher_cfg.output_dir == o.teacher and teacher_cfg.model.kwargs == cfg.model.kwargs


# --------------------------------------------------------------------------- teacher adapters

MU, STD = torch.tensor([0.7, -0.4], dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)


def _gauss_D(x, sigma):
    """E[x0 | x0 + sigma z] for x0 ~ N(MU, diag(STD^2)), float64."""
    s2, g2 = STD ** 2, sigma.reshape(-1, 1) ** 2
    return MU + s2 / (s2 + g2) * (x - MU)


def test_flow_and_ddpm_teachers_become_the_exact_edm_denoiser():
    """Exact flow / DDPM models of Gaussian data through ModelDenoiser equal the exact EDM denoiser."""
    g = torch.Generator().manual_seed(0)
    T = 1000

    def flow_model(xs, t, class_labels=None):  # exact velocity E[z - x0 | x_s] at s = t / T
        s = (t.double() / T).reshape(-1, 1)
        s2 = STD ** 2
        x0 = MU + (1 - s) * s2 / ((1 - s) ** 2 * s2 + s ** 2) * (xs - (1 - s) * MU)
        return (xs - (1 - s) * x0) / s - x0

    sigma = torch.tensor([0.002, 0.1, 1.0, 7.5, 80.0], dtype=torch.float64)
    x = MU + torch.randn(5, 2, generator=g, dtype=torch.float64) * (STD ** 2 + sigma.reshape(-1, 1) ** 2).sqrt()
    den = ModelDenoiser("flow", T)
    torch.testing.assert_close(den(flow_model, x, sigma), _gauss_D(x, sigma).float(), rtol=1e-5, atol=1e-5)

    abar = torch.cumprod(1 - make_betas("scaled_linear", T, 0.00085, 0.012).double(), 0)
    for pred in ("epsilon", "v_prediction", "sample"):
        def ddpm_model(xt, t, class_labels=None):  # exact prediction at integer steps (independent table)
            a = abar[t.round().long()].reshape(-1, 1)
            s2 = STD ** 2
            x0 = MU + a.sqrt() * s2 / (a * s2 + 1 - a) * (xt - a.sqrt() * MU)
            eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
            return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[pred]

        t = torch.tensor([0, 10, 250, 500, 999])
        sig = ((1 - abar[t]) / abar[t]).sqrt()
        den = ModelDenoiser("denoising", T, abar, pred)
        torch.testing.assert_close(den.timestep(sig), t.float(), rtol=0, atol=1e-3)
        x = MU + torch.randn(5, 2, generator=g, dtype=torch.float64) * (STD ** 2 + sig.reshape(-1, 1) ** 2).sqrt()
        torch.testing.assert_close(den(ddpm_model, x, sig), _gauss_D(x, sig).float(), rtol=1e-5, atol=1e-5)
        assert den.sigma_max == pytest.approx(float(sig[-1]), rel=1e-9)
    # between two steps the timestep is interpolated in log sigma
    mid = (sig[1].log() + sig[2].log()) / 2
    assert 10 < den.timestep(mid.exp().reshape(1)).item() < 250


# --------------------------------------------------------------------------- tiny runs from config

def _toy():
    g = torch.Generator().manual_seed(0)
    lab = torch.arange(32) % 2
    col = torch.tensor([[0.8, -0.6, -0.2], [-0.5, 0.2, 0.9]])[lab]
    return TensorImageDataset((col[:, :, None, None] + 0.1 * torch.randn(32, 3, 8, 8, generator=g)).clamp(-1, 1), lab)


def _dit_cfg(out, kind, steps=60, lr=3e-3, **objective):
    return Config.from_dict({
        "output_dir": str(out), "model": {"factory": "fastgen.models:DiT", "kwargs": DIT},
        "objective": {"kind": kind, **objective},
        "optim": {"lr": lr, "ema_decay": 0.0},
        "train": {"steps": steps, "batch_size": 8, "progress": False, "device": "cpu"},
        "checkpoint": {"every": 0, "keep_last": 1}})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A flow teacher and a v-prediction DDPM teacher, 60 steps each, as trainer checkpoint folders."""
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("teachers")
    Trainer(_dit_cfg(root / "flow", "flow"), dataset=_toy(), log=lambda s: None).fit()
    Trainer(_dit_cfg(root / "ddpm", "denoising", prediction="v_prediction"), dataset=_toy(), log=lambda s: None).fit()
    return root


def _frozen(tr):
    return tr.teacher is not None and not tr.teacher.training and not any(p.requires_grad for p in
                                                                            tr.teacher.parameters())


def _distill(tr, distance):
    before = [p.detach().clone() for p in tr.teacher.parameters()]
    d0 = distance()
    losses = [v for _, v in tr.fit()["losses"]]
    d1 = distance()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.teacher.parameters()))  # the teacher never trains
    assert not all(torch.equal(a, b) for a, b in zip(tr.target.parameters(), tr.model.parameters()))
    return d0, d1, sum(losses[:5]) / 5, sum(losses[-5:]) / 5


@torch.no_grad()
def _one_step_distance(tr, one_step, reference):
    tr.model.eval()
    try:
        return (one_step() - reference).pow(2).mean().item()
    finally:
        tr.model.train()


@pytest.mark.parametrize("init", [False, True])
def test_cd_from_config_moves_the_one_step_student_toward_the_teacher_ode(teachers, tmp_path, init):
    lines = []
    tr = Trainer(_dit_cfg(tmp_path, "consistency_distillation", teacher=str(teachers / "flow"), cd_num_scales=8,
                          target_decay=0.9, init_from_teacher=init), dataset=_toy(), log=lines.append)
    assert _frozen(tr) and any("teacher:" in s and "step-00000060" in s and "'flow'" in s for s in lines)
    o = tr.objective
    assert o.solver == "heun" and o.target_decay == 0.9 and (o.student_denoiser is not None) == init
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(16) % 2
    ref = o.teacher_sample(noise, labels)
    d0, d1, l0, l1 = _distill(tr, lambda: _one_step_distance(
        tr, lambda: o.sample(tr.model, noise, labels, sigmas=(o.sigma_max,)), ref))
    print(f"CD (init_from_teacher={init}): one-step vs teacher-ODE distance {d0:.4f} -> {d1:.4f}, "
          f"loss {l0:.3f} -> {l1:.3f} (teacher samples: mean square {ref.pow(2).mean():.3f})")
    assert d1 < 0.9 * d0 and l1 < l0
    x = tr.generate(labels[:2])  # validation samples: consistency steps down the Karras grid
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_lcm_from_config_moves_the_one_step_student_toward_the_guided_teacher(teachers, tmp_path):
    # the teacher as a bare safetensors file: architecture from [model], schedule from [objective]
    weights = teachers / "ddpm" / "checkpoints" / "step-00000060" / "model.safetensors"
    lines = []
    tr = Trainer(_dit_cfg(tmp_path, "lcm", teacher=str(weights), prediction="v_prediction",
                          lcm_num_ddim_timesteps=10, lcm_w_min=1.0, lcm_w_max=1.0, lcm_guidance_kwarg="",
                          target_decay=0.9), dataset=_toy(), log=lines.append)
    assert _frozen(tr) and any("objective.teacher_kind = 'denoising'" in s for s in lines)
    o = tr.objective
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(16) % 2
    ref = o.teacher_sample(noise, 1.0, labels, torch.full_like(labels, 2)).float()
    d0, d1, l0, l1 = _distill(tr, lambda: _one_step_distance(
        tr, lambda: o.sample(tr.model, noise, 1.0, labels, timesteps=(int(o.ddim_timesteps[-1]),)), ref))
    print(f"LCM: one-step vs guided-teacher DDIM distance {d0:.4f} -> {d1:.4f}, loss {l0:.4f} -> {l1:.4f} "
          f"(teacher samples: mean square {ref.pow(2).mean():.3f})")
    assert d1 < 0.9 * d0 and l1 < l0
    tr.cfg.validation.num_steps = 2  # validation samples: two LCM steps at w = 1
    seen = []
    inner = tr.model.forward
    tr.model.forward = lambda x, t, **k: seen.append(t[0].item()) or inner(x, t, **k)
    x = tr.generate(labels[:2])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all() and seen == [999, 99]


def test_teacher_errors_are_explained(teachers, tmp_path):
    def err(**obj):
        kind = obj.pop("kind", "consistency_distillation")
        with pytest.raises(ConfigError) as e:
            Trainer(_dit_cfg(tmp_path, kind, steps=1, **obj), dataset=_toy(), log=lambda s: None)
        return str(e.value)

    assert "objective.teacher 'no/such/teacher.safetensors' is no file or folder, nor a preset" in \
        err(teacher="no/such/teacher.safetensors")
    weights = str(teachers / "ddpm" / "checkpoints" / "step-00000060" / "model.safetensors")
    assert "does not fit model.factory built with model.kwargs + objective.teacher_kwargs" in \
        err(teacher=weights, teacher_kwargs={"num_layers": 2})
    # a DDPM teacher's largest sigma bounds the CD grid
    assert "objective.ct_sigma_max = 200.0 is above the teacher's largest sigma 157.4" in \
        err(teacher=str(teachers / "ddpm"), ct_sigma_max=200.0)
    # LCM uses the teacher's schedule: a mismatch is named
    assert "objective.prediction = 'epsilon', but the teacher was trained with 'v_prediction'" in \
        err(kind="lcm", teacher=str(teachers / "ddpm"))
    assert "the teacher is a 'flow' model" in err(kind="lcm", teacher=str(teachers / "flow"))
    # a student without the w input that lcm_guidance_kwarg names (the default 'timestep_cond')
    assert ("objective.lcm_guidance_kwarg = 'timestep_cond', but DiT.forward takes no such keyword" in
            err(kind="lcm", teacher=str(teachers / "ddpm"), prediction="v_prediction", lcm_guidance_kwarg=
                "timestep_cond"))
    # a file teacher of another architecture: the error points at objective.teacher_factory
    with pytest.raises(ConfigError, match="set objective.teacher_factory"):
        cfg = _dit_cfg(tmp_path, "lcm", steps=1, teacher=weights, prediction="v_prediction")
        cfg.model.factory, cfg.model.kwargs = WNet, {}
        Trainer(cfg, dataset=_toy(), log=lambda s: None)
    # LCM guides the teacher with its null class: a teacher without one is refused
    from fastgen.models import DiT
    from fastgen.train import checkpoint as ckpt

    no_null = tmp_path / "no_null.safetensors"
    ckpt.save_tensors(str(no_null), DiT(DiT.config_class(**{**DIT, "class_dropout_prob": 0.0})).state_dict())
    assert "the teacher has none (class_dropout_prob = 0)" in err(kind="lcm", teacher=str(no_null),
                                                                  teacher_kwargs={"class_dropout_prob": 0.0})
    # a teacher that is no teacher
    Trainer(_dit_cfg(tmp_path / "ct", "consistency", steps=1), dataset=_toy(), log=lambda s: None).fit()
    assert "trained with objective.kind = 'consistency'" in err(teacher=str(tmp_path / "ct"))


# --------------------------------------------------------------------------- exact resume

def _cd_resume_cfg(teacher):
    def make(out):
        return Config.from_dict({
            "output_dir": str(out), "model": {"factory": "test_train_resume:TinyNet"},
            "objective": {"kind": "consistency_distillation", "teacher": str(teacher), "cd_num_scales": 10,
                          "target_decay": 0.9, "init_from_teacher": True, "cond_dropout": 0.2},
            "optim": {"lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "grad_clip": 0.5, "ema_decay": 0.9},
            "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "progress": False, "device": "cpu"},
            "checkpoint": {"every": 2, "keep_last": 2}})
    return make


def test_cd_resume_is_bit_exact_with_the_target_network(tmp_path, requires_safetensors):
    from fastgen.train import checkpoint as ckpt
    from test_train_resume import TinyNet

    torch.manual_seed(3)
    teacher = tmp_path / "teacher.safetensors"
    ckpt.save_tensors(str(teacher), TinyNet().state_dict())
    straight, resumed, lines = _straight_and_resumed(tmp_path, _cd_resume_cfg(teacher), _tensor_data)
    assert straight.step == resumed.step == 6
    _assert_identical(_state(straight), _state(resumed))
    ta, tb = straight.target.state_dict(), resumed.target.state_dict()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the check can fail: the target is neither the student nor its start (the teacher's weights)
    start = ckpt.load_tensors(str(teacher))
    assert not all(torch.equal(ta[k], straight.model.state_dict()[k]) for k in ta)
    assert not any(torch.equal(ta[k], start[k]) for k in ta if ta[k].is_floating_point())
    assert (tmp_path / "b" / "checkpoints" / "step-00000006" / "target.safetensors").exists()
    # a (verified) checkpoint without its target network is refused, not silently restarted
    folder = tmp_path / "b" / "checkpoints" / "step-00000006"
    (folder / "target.safetensors").unlink()
    ckpt.write_index(str(folder))
    with pytest.raises(ckpt.CheckpointError, match="has no target.safetensors"):
        Trainer(_cd_resume_cfg(teacher)(tmp_path / "b"), dataset=_tensor_data(), resume=True, log=lambda s: None)


@pytest.mark.parametrize("precision", ["bf16", "bf16-pure"])
def test_teacher_follows_the_students_precision(tmp_path, requires_safetensors, precision):
    """bf16 autocast: the teacher's forwards run under it; bf16-pure: teacher and target are bf16
    (a fastgen DiT there: TinyNet feeds fp32 timesteps to its Linear)."""
    from fastgen.models import DiT
    from fastgen.train import checkpoint as ckpt
    from test_train_resume import TinyNet

    dit = {**DIT, "num_embeds_ada_norm": 4}
    model = {"factory": "test_train_resume:TinyNet"} if precision == "bf16" else \
        {"factory": "fastgen.models:DiT", "kwargs": dit}
    net = TinyNet() if precision == "bf16" else DiT(DiT.config_class(**dit))
    ckpt.save_tensors(str(tmp_path / "t.safetensors"), net.state_dict())
    for kind in ("consistency_distillation", "lcm"):
        cfg = Config.from_dict({
            "output_dir": str(tmp_path / kind), "model": model,
            "objective": {"kind": kind, "teacher": str(tmp_path / "t.safetensors"), "lcm_guidance_kwarg": "",
                          "lcm_w_min": 1.0, "lcm_w_max": 1.0},
            "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu", "precision": precision}})
        tr = Trainer(cfg, dataset=_tensor_data(), log=lambda s: None)
        seen = []
        inner = tr.teacher.forward
        tr.teacher.forward = lambda *a, **k: seen.append((torch.is_autocast_enabled("cpu"), a[0].dtype)) or inner(
            *a, **k)
        losses = [v for _, v in tr.fit()["losses"]]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        if precision == "bf16":
            assert seen and all(on for on, _ in seen)
        else:
            assert seen and all(dt == torch.bfloat16 for _, dt in seen)
            assert {p.dtype for m in (tr.teacher, tr.target, tr.model) for p in m.parameters()} == {torch.bfloat16}


def test_teacher_sources_from_pretrained_folder_and_ema_weights(tmp_path, requires_safetensors):
    import json

    from fastgen.models import DiT
    from fastgen.train import checkpoint as ckpt

    # a from_pretrained folder of model.factory (diffusers layout: config.json + safetensors)
    net = DiT(DiT.config_class(**DIT))
    (tmp_path / "hub").mkdir()
    ckpt.save_tensors(str(tmp_path / "hub" / "diffusion_pytorch_model.safetensors"), net.to_diffusers_state_dict())
    (tmp_path / "hub" / "config.json").write_text(json.dumps(net.diffusers_config()))
    lines = []
    tr = Trainer(_dit_cfg(tmp_path / "s", "consistency_distillation", steps=1, teacher=str(tmp_path / "hub")),
                 dataset=_toy(), log=lines.append)
    want, got = net.state_dict(), tr.teacher.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any("(from_pretrained, objective.teacher_kind = 'flow')" in s for s in lines)

    # a trainer run: its EMA weights by default, its raw weights with teacher_use_ema = false
    from test_train_resume import TinyNet  # noqa: F401  (the run's model.factory)

    run = Config.from_dict({"output_dir": str(tmp_path / "run"), "model": {"factory": "test_train_resume:TinyNet"},
                            "objective": {"kind": "denoising"}, "optim": {"ema_decay": 0.5, "lr": 1e-2},
                            "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu"}})
    Trainer(run, dataset=_tensor_data(), log=lambda s: None).fit()
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    ema = {k[7:]: v for k, v in ckpt.load_tensors(str(folder / "ema.safetensors")).items() if k.startswith("shadow.")}
    raw = ckpt.load_tensors(str(folder / "model.safetensors"))
    for use_ema, ref in ((True, ema), (False, raw)):
        lines = []
        cfg = Config.from_dict({"output_dir": str(tmp_path / f"s{use_ema}"),
                                "model": {"factory": "test_train_resume:TinyNet"},
                                "objective": {"kind": "consistency_distillation", "teacher": str(tmp_path / "run"),
                                              "teacher_use_ema": use_ema, "ct_sigma_max": 50.0},
                                "train": {"steps": 1, "batch_size": 4, "progress": False, "device": "cpu"}})
        tr = Trainer(cfg, dataset=_tensor_data(), log=lines.append)
        got = tr.teacher.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert any(("EMA weights" if use_ema else "(weights,") in s and "'denoising'" in s for s in lines)
    assert not all(torch.equal(ema[k], raw[k]) for k in ema)  # the two sources differ: the check can fail


# --------------------------------------------------------------------------- a w-conditioned LCM student

class WNet(torch.nn.Module):
    """A small conv student with diffusers' LCM w input: ``forward(x, t, class_labels, timestep_cond)``,
    ``timestep_cond`` (B, embedding_dim) added (through a linear map) to the timestep / class features."""

    def __init__(self, channels: int = 3, num_classes: int = 2, width: int = 32, embedding_dim: int = 32):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.t = torch.nn.Linear(1, width)
        self.y = torch.nn.Embedding(num_classes + 1, width)
        self.w = torch.nn.Linear(embedding_dim, width)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, class_labels=None, timestep_cond=None):
        c = self.t(t.float()[:, None] / 1000) + self.y(class_labels) + self.w(timestep_cond)
        h = torch.nn.functional.silu(self.inp(x) + c[:, :, None, None])
        return self.out(torch.nn.functional.silu(self.mid(h) + c[:, :, None, None]))


def _emb64(w, dim):
    """The w-embedding by its formula, float64: [sin(1000 w f_j), cos(1000 w f_j)], f_j = 10000^(-j/(dim/2-1))."""
    f = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2 - 1))
    arg = 1000 * w.double()[:, None] * f[None]
    return torch.cat([arg.sin(), arg.cos()], 1)


def test_lcm_from_config_trains_a_w_conditioned_student(teachers, tmp_path):
    W_MIN, W_MAX, DIM = 0.5, 3.0, 32
    cfg = _dit_cfg(tmp_path, "lcm", steps=80, teacher=str(teachers / "ddpm"), prediction="v_prediction",
                   lcm_num_ddim_timesteps=10, lcm_w_min=W_MIN, lcm_w_max=W_MAX, lcm_embedding_dim=DIM,
                   target_decay=0.9)
    cfg.model.factory, cfg.model.kwargs = "test_train_distill_config:WNet", {"embedding_dim": DIM}
    tr = Trainer(cfg, dataset=_toy(), log=lambda s: None)
    o = tr.objective
    assert o.guidance_kwarg == "timestep_cond" and _frozen(tr)
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(16) % 2
    refs = {w: o.teacher_sample(noise, w, labels, torch.full_like(labels, 2)).float() for w in (W_MIN, W_MAX)}

    def dist(w_student, w_teacher):
        return _one_step_distance(tr, lambda: o.sample(tr.model, noise, w_student, labels,
                                                       timesteps=(int(o.ddim_timesteps[-1]),)), refs[w_teacher])

    d0 = {w: dist(w, w) for w in refs}
    # spies: the w of the teacher's guidance and the embedding the student gets, step by step
    got, guided = [], []
    inner_fwd, inner_solver = tr.model.forward, o.solver_step
    tr.model.forward = lambda x, t, **k: got.append(k["timestep_cond"].detach().clone()) or inner_fwd(x, t, **k)
    o.solver_step = lambda x, t, tp, w, *a: guided.append(w.clone()) or inner_solver(x, t, tp, w, *a)
    losses = [v for _, v in tr.fit()["losses"]]
    assert len(got) == len(guided) == 80
    w_seen = torch.cat(guided)
    torch.testing.assert_close(torch.cat(got).double(), _emb64(w_seen, DIM), rtol=0, atol=1e-3)  # fp32 sin of 1000 w
    assert W_MIN <= w_seen.min() and w_seen.max() <= W_MAX and w_seen.std() > 0.5
    tr.model.forward = inner_fwd
    d1 = {w: dist(w, w) for w in refs}
    cross = {w: dist(W_MIN + W_MAX - w, w) for w in refs}  # the student at the other w
    print(f"LCM, w-conditioned student: one-step vs guided-teacher distance at w = {W_MIN}, {W_MAX}: "
          f"{d0[W_MIN]:.4f}, {d0[W_MAX]:.4f} -> {d1[W_MIN]:.4f}, {d1[W_MAX]:.4f} (at the other w: "
          f"{cross[W_MIN]:.4f}, {cross[W_MAX]:.4f}); loss {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f}")
    assert all(d1[w] < 0.9 * d0[w] for w in refs)
    assert all(d1[w] < cross[w] for w in refs)  # the student uses its w input

    # validation sampling passes w = validation.guidance_scale - 1
    tr.cfg.validation.num_steps, tr.cfg.validation.guidance_scale = 2, 2.5
    seen = []
    tr.model.forward = lambda x, t, **k: seen.append(k["timestep_cond"].clone()) or inner_fwd(x, t, **k)
    x = tr.generate(labels[:2])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all() and len(seen) == 2
    torch.testing.assert_close(torch.cat(seen).double(), _emb64(torch.full((4,), 1.5), DIM), rtol=0, atol=1e-3)
