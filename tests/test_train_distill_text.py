"""Text-conditional LCM and consistency distillation from the trainer's config.

The teacher is a tiny text-conditional v-prediction net (``TinyTextNet`` of test_train_text,
``forward(x, timestep, encoder_hidden_states)``) trained by the trainer itself for 300 steps with
caption dropout, on 8x8 images whose colour is set by their caption (three captions, random
embeddings). The LCM student (``TextWNet``) adds diffusers' ``timestep_cond`` w input. Measured:
the distance between the student's one-step sample and the guided teacher's multi-step DDIM solution
``(1 + w) eps(c) - w eps(null)`` from the same noise and prompts falls; spies check that the caption
embeddings reach the student and the teacher, and the null embedding the teacher's unconditional half.
Also: text-conditional consistency distillation, bit-exact resume of a text-encoder LCM run, and the
Stable Diffusion case with tiny fastgen U-Nets (a text teacher, its ``time_cond_proj_dim`` student).
"""

from __future__ import annotations

import pytest
import torch

from fastgen.train import Config, Trainer
from fastgen.train.data import TensorImageDataset
from fastgen.train.text import null_batch, text_cond_model
from test_train_distill_config import _emb64
from test_train_resume import _assert_identical, _state, _straight_and_resumed, one_thread  # noqa: F401
from test_train_text import TinyTextNet

COLOURS = torch.tensor([[0.8, -0.6, -0.2], [-0.5, 0.2, 0.9], [0.1, 0.9, -0.7]])


class TextWNet(TinyTextNet):
    """``TinyTextNet`` plus the LCM w input ``timestep_cond`` ``(B, embedding_dim)`` (zero-initialised,
    so a student initialised from the teacher starts as the teacher)."""

    def __init__(self, channels: int = 3, text_dim: int = 8, width: int = 16, embedding_dim: int = 32):
        super().__init__(channels, text_dim, width)
        self.w = torch.nn.Linear(embedding_dim, width)
        torch.nn.init.zeros_(self.w.weight)
        torch.nn.init.zeros_(self.w.bias)
        self.conds: list = []

    def forward(self, x, timestep, encoder_hidden_states, timestep_cond=None):
        self.seen.append(encoder_hidden_states.detach().clone())
        self.conds.append(None if timestep_cond is None else timestep_cond.detach().clone())
        c = self.t(timestep.float()[:, None] / 1000) + self.txt(encoder_hidden_states).mean(1) + self.w(timestep_cond)
        return self.out(torch.nn.functional.silu(self.inp(x) + c[:, :, None, None]))


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(n) % 3
    emb = torch.randn(3, 5, 8, generator=g)
    images = (COLOURS[idx][:, :, None, None] + 0.1 * torch.randn(n, 3, 8, 8, generator=g)).clamp(-1, 1)
    return TensorImageDataset(images, torch.zeros(n, dtype=torch.long), text=emb[idx],
                              captions=[f"caption {i}" for i in idx.tolist()]), emb


def _cfg(out, kind, steps, factory, **objective):
    return Config.from_dict({
        "output_dir": str(out), "model": {"factory": factory, "kwargs": {"width": 32}},
        "objective": {"kind": kind, **objective},
        "optim": {"lr": 3e-3, "ema_decay": 0.0},
        "train": {"steps": steps, "batch_size": 8, "progress": False, "device": "cpu"},
        "checkpoint": {"every": 0, "keep_last": 1}})


@pytest.mark.parametrize("kind", ["lcm", "consistency_distillation"])
def test_text_encoder_with_distillation_is_a_valid_config(kind):
    cfg = Config.from_dict({"objective": {"kind": kind, "teacher": "runs/t"}, "data": {"text_encoder": "m:f"}})
    assert cfg.objective.kind == kind and cfg.data.text_encoder == "m:f"


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    """A text-conditional v-prediction DDPM teacher (caption dropout 0.2), a trainer checkpoint folder."""
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("text_teacher")
    cfg = _cfg(root, "denoising", 300, "test_train_text:TinyTextNet", cond_dropout=0.2, prediction="v_prediction")
    Trainer(cfg, dataset=_data()[0], log=lambda s: None).fit()
    return root


def test_text_lcm_from_config_moves_the_student_toward_the_guided_teacher(text_teacher, tmp_path):
    W, DIM, STEPS = 0.5, 32, 60
    cfg = _cfg(tmp_path, "lcm", STEPS, "test_train_distill_text:TextWNet", teacher=str(text_teacher),
               lcm_num_ddim_timesteps=10, lcm_w_min=W, lcm_w_max=W, lcm_embedding_dim=DIM, target_decay=0.9,
               init_from_teacher=True, prediction="v_prediction")
    cfg.model.kwargs["embedding_dim"] = DIM
    data, emb = _data()
    tr = Trainer(cfg, dataset=data, log=lambda s: None)
    o, teacher = tr.objective, tr.teacher
    assert isinstance(teacher, TinyTextNet) and not isinstance(teacher, TextWNet)
    noise = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    text = {"embeds": emb[torch.arange(12) % 3]}
    ref = o.teacher_sample(noise, W, text, null_batch(tr.text_null, 12, text)).float()
    def dist():
        tr.model.eval()
        try:
            with torch.no_grad():
                one = o.sample(student, noise, W, text, timesteps=(int(o.ddim_timesteps[-1]),))
            return (one - ref).pow(2).mean().item()
        finally:
            tr.model.train()

    student = text_cond_model(tr.model, cfg.model.text_inputs)
    d0 = dist()
    tr.model.seen.clear(), tr.model.conds.clear(), teacher.seen.clear()
    losses = [v for _, v in tr.fit()["losses"]]
    # spies: each step the student gets the batch's caption embeddings (and its w), the teacher the same
    # embeddings for its conditional half and the null embedding (zeros) for its unconditional half
    assert len(tr.model.seen) == STEPS and len(teacher.seen) == 2 * STEPS
    for s in range(STEPS):
        rows = tr.model.seen[s]
        assert (rows[:, None] == emb[None]).flatten(2).all(2).any(1).all()
        assert torch.equal(teacher.seen[2 * s], rows) and teacher.seen[2 * s + 1].eq(0).all()
        assert tr.model.conds[s] is not None and tr.model.conds[s].shape == (8, DIM)
    d1 = dist()
    l0, l1 = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"text LCM: one-step vs guided-teacher DDIM distance at w = {W}: {d0:.4f} -> {d1:.4f}, "
          f"loss {l0:.4f} -> {l1:.4f} (teacher samples: mean square {ref.pow(2).mean():.3f})")
    assert d1 < 0.8 * d0 and l1 < l0

    # validation: the prompts with w = guidance_scale - 1, two LCM steps
    tr.cfg.validation.num_steps, tr.cfg.validation.guidance_scale, tr.cfg.validation.per_class = 2, 1.5, 1
    tr.model.seen.clear(), tr.model.conds.clear()
    x = tr.generate(torch.arange(3))
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all() and len(tr.model.seen) == 2
    assert all(torch.equal(s, emb) for s in tr.model.seen)  # prompts 0, 1, 2 = the three captions
    torch.testing.assert_close(torch.cat(tr.model.conds).double(), _emb64(torch.full((6,), W), DIM), rtol=0,
                               atol=1e-3)  # emb(w) by its formula (fp32 sin of 1000 w)


def test_text_cd_runs_from_config_with_the_text_at_student_and_teacher(text_teacher, tmp_path):
    cfg = _cfg(tmp_path, "consistency_distillation", 3, "test_train_text:TinyTextNet", teacher=str(text_teacher),
               cd_num_scales=6, ct_sigma_max=20.0, init_from_teacher=True)
    data, emb = _data()
    tr = Trainer(cfg, dataset=data, log=lambda s: None)
    tr.model.seen.clear(), tr.teacher.seen.clear()
    losses = [v for _, v in tr.fit()["losses"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert len(tr.model.seen) == 3 and len(tr.teacher.seen) == 3 * 2  # Heun: two teacher calls per step
    for s in range(3):
        assert (tr.model.seen[s][:, None] == emb[None]).flatten(2).all(2).any(1).all()
        assert torch.equal(tr.teacher.seen[2 * s], tr.model.seen[s])
    x = tr.generate(torch.arange(3))
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()


def test_text_lcm_resume_is_bit_exact_with_a_text_encoder(text_teacher, tmp_path):
    """data.text_encoder (cached caption embeddings) + LCM: straight run == interrupted and resumed."""
    pytest.importorskip("PIL")
    from test_train_data import make_shapes_folder

    folder = make_shapes_folder(tmp_path / "data", per_class=3, size=8)
    teacher = text_teacher / "checkpoints"

    def make(out):
        return Config.from_dict({
            "output_dir": str(out), "model": {"factory": "test_train_distill_text:TextWNet",
                                              "kwargs": {"width": 32, "embedding_dim": 16}},
            "objective": {"kind": "lcm", "teacher": str(teacher), "lcm_num_ddim_timesteps": 10,
                          "prediction": "v_prediction",
                          "lcm_w_min": 0.5, "lcm_w_max": 3.0, "lcm_embedding_dim": 16, "target_decay": 0.9,
                          "cond_dropout": 0.2},
            "optim": {"lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "grad_clip": 0.5, "ema_decay": 0.9},
            "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "progress": False, "device": "cpu"},
            "checkpoint": {"every": 2, "keep_last": 2},
            "data": {"path": str(folder), "resolution": 8, "text_encoder": "test_train_text:make_text_encoder",
                     "cache_dir": str(tmp_path / "cache")}})

    straight, resumed, _ = _straight_and_resumed(tmp_path, make, lambda: None)
    assert straight.text_null is not None and straight.target is not None
    _assert_identical(_state(straight), _state(resumed))
    assert all(torch.equal(a, b) for a, b in zip(straight.target.state_dict().values(),
                                                  resumed.target.state_dict().values()))


def test_text_lcm_from_config_with_fastgen_unets(tmp_path, requires_safetensors):
    """The Stable Diffusion case: a text-conditional fastgen UNet2DCondition teacher (a .safetensors file
    built by objective.teacher_factory) and its w-conditioned student (time_cond_proj_dim), latents and
    caption embeddings in memory. Hooks check what each U-Net's forward gets."""
    from fastgen.models import UNet2DCondition
    from fastgen.train import checkpoint as ckpt

    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], norm_num_groups=8,
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8, attention_head_dim=2)
    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    ckpt.save_tensors(str(weights), UNet2DCondition(UNet2DCondition.config_class(**unet)).state_dict())
    cfg = Config.from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"factory": "fastgen.models:UNet2DCondition", "kwargs": {**unet, "time_cond_proj_dim": 16}},
        "objective": {"kind": "lcm", "teacher": str(weights), "teacher_factory": "fastgen.models:UNet2DCondition",
                      "teacher_kwargs": unet, "init_from_teacher": True, "lcm_num_ddim_timesteps": 10,
                      "lcm_w_min": 2.0, "lcm_w_max": 6.0, "lcm_embedding_dim": 16},
        "optim": {"lr": 1e-3, "ema_decay": 0.0},
        "train": {"steps": 2, "batch_size": 4, "progress": False, "device": "cpu"},
        "checkpoint": {"every": 0, "keep_last": 1}})
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 3, 8, generator=g)
    data = TensorImageDataset(torch.randn(8, 4, 8, 8, generator=g), torch.zeros(8, dtype=torch.long),
                              text=emb[torch.arange(8) % 2], captions=[f"c{i % 2}" for i in range(8)])
    tr = Trainer(cfg, dataset=data, log=lambda s: None)
    seen = {"student": [], "teacher": []}
    for name, m in (("student", tr.model), ("teacher", tr.teacher)):
        m.register_forward_pre_hook(lambda mod, a, k, name=name: seen[name].append(k), with_kwargs=True)
    losses = [v for _, v in tr.fit()["losses"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert len(seen["student"]) == 2 and len(seen["teacher"]) == 4
    for s in range(2):
        st, tc, tu = seen["student"][s], seen["teacher"][2 * s], seen["teacher"][2 * s + 1]
        assert st["timestep_cond"].shape == (4, 16) and "timestep_cond" not in tc
        assert (st["encoder_hidden_states"][:, None] == emb[None]).flatten(2).all(2).any(1).all()
        assert torch.equal(tc["encoder_hidden_states"], st["encoder_hidden_states"])
        assert tu["encoder_hidden_states"].eq(0).all() and tu["encoder_hidden_states"].shape == (4, 3, 8)
    tr.cfg.validation.num_steps, tr.cfg.validation.per_class = 2, 1
    x = tr.generate(torch.arange(2))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
