"""UNet2DCondition with ``time_cond_proj_dim``: the LCM student's guidance-scale (w) embedding.

Against diffusers' ``UNet2DConditionModel(time_cond_proj_dim=...)`` (tiny random configs, fp32,
backend="torch"): output and every gradient (``time_embedding.cond_proj.weight`` included) with and
without ``timestep_cond``; strict state-dict round trip and from_pretrained; clear errors. Then a short
LCM distillation (:class:`fastgen.train.lcm.LCMDistillationObjective`) with a tiny text-conditioned
teacher U-Net and its w-conditioned student: the one-step samples move towards the guided teacher's
multi-step DDIM samples, and ``timestep_cond`` reaches the student.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastgen.models import UNet2DCondition, UNet2DConditionConfig
from test_models_unet import _close, _close_grads, _inputs, _kwargs

D = 16  # time_cond_proj_dim of the tests


def _reference(kind: str, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**_kwargs(kind), time_cond_proj_dim=D)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_timestep_cond_matches_diffusers_fp32(kind):
    """Output, d sample, d timestep_cond and every parameter gradient equal diffusers'; without
    timestep_cond both skip cond_proj (diffusers' behaviour), and the two outputs differ."""
    ref = _reference(kind)
    m = UNet2DCondition.from_diffusers(ref, backend="torch")
    assert m.config.time_cond_proj_dim == D and m.time_embedding.cond_proj.weight.shape == (32, D)
    x, t, ctx, kw = _inputs(kind)
    cond = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    cr, cf = cond.clone().requires_grad_(), cond.clone().requires_grad_()
    out_r = ref(xr, t, ctx, timestep_cond=cr, **kw).sample
    out_f = m(xf, t, ctx, timestep_cond=cf, **kw).sample
    _close(out_f, out_r, what="output")
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    _close(xf.grad, xr.grad, what="d sample")
    _close(cf.grad, cr.grad, what="d timestep_cond")
    want = UNet2DCondition.state_dict_from_diffusers({k: p.grad for k, p in ref.named_parameters()})
    got = {k: p.grad for k, p in m.named_parameters()}
    assert got["time_embedding.cond_proj.weight"].abs().max() > 0  # gradients reach cond_proj
    _close_grads(got, want)
    with torch.no_grad():
        plain_f, plain_r = m(x, t, ctx, **kw).sample, ref(x, t, ctx, **kw).sample
    _close(plain_f, plain_r, what="output without timestep_cond")
    assert (plain_f - out_f.detach()).abs().max() > 1e-3 * out_f.abs().max()


def test_timestep_cond_state_dict_round_trip_and_from_pretrained(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref = _reference("sd15")
    sd = UNet2DCondition.from_diffusers(ref).to_diffusers_state_dict()
    assert sd["time_embedding.cond_proj.weight"].shape == (32, D)
    fresh = diffusers.UNet2DConditionModel(**_kwargs("sd15"), time_cond_proj_dim=D)
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    ref.save_pretrained(tmp_path)
    m = UNet2DCondition.from_pretrained(str(tmp_path), backend="torch")
    assert m.config.time_cond_proj_dim == D
    x, t, ctx, _ = _inputs("sd15")
    cond = torch.randn(2, D)
    with torch.no_grad():
        _close(m(x, t, ctx, timestep_cond=cond).sample, ref(x, t, ctx, timestep_cond=cond).sample)


def test_timestep_cond_errors():
    cfg = dict(_kwargs("sd15"))
    plain = UNet2DCondition(UNet2DConditionConfig(**cfg), backend="torch")
    assert plain.time_embedding.cond_proj is None
    assert "time_embedding.cond_proj.weight" not in plain.state_dict()
    x, t, ctx, _ = _inputs("sd15")
    with pytest.raises(ValueError, match="timestep_cond was given but this config has time_cond_proj_dim=None"):
        plain(x, t, ctx, timestep_cond=torch.zeros(2, D))
    m = UNet2DCondition(UNet2DConditionConfig(**cfg, time_cond_proj_dim=D), backend="torch")
    with pytest.raises(ValueError, match=r"timestep_cond must be \(B=2, time_cond_proj_dim=16\), got \(2, 8\)"):
        m(x, t, ctx, timestep_cond=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="time_cond_proj_dim must be None or a positive int"):
        UNet2DCondition(UNet2DConditionConfig(**cfg, time_cond_proj_dim=0))


# --------------------------------------------------------------------------- LCM with a U-Net student


def _tiny_unet_config(**kw) -> UNet2DConditionConfig:
    return UNet2DConditionConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                 cross_attention_dim=12, attention_head_dim=2, **kw)


def test_lcm_distillation_with_unet_student():
    """LCM (Luo et al. 2023) as diffusers' train_lcm_distill_sd recipe builds it: the student is the
    teacher's weights plus a zero ``cond_proj`` (time_cond_proj_dim = the w-embedding width), text
    through ``encoder_hidden_states`` (cond / an all-zero null text for the teacher's CFG). 200 steps
    (~10 s on CPU): the loss falls, one-step samples move towards the guided teacher's 10-step DDIM
    samples, and changing w moves them the way it moves the teacher's."""
    from fastgen.train.consistency import update_target
    from fastgen.train.lcm import LCMDistillationObjective, guidance_embedding

    E, B, L = 16, 8, 3
    torch.manual_seed(0)
    teacher = UNet2DCondition(_tiny_unet_config(), backend="torch").eval().requires_grad_(False)
    student = UNet2DCondition(_tiny_unet_config(time_cond_proj_dim=E), backend="torch")
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    target = copy.deepcopy(student).requires_grad_(False)
    o = LCMDistillationObjective(teacher, num_ddim_timesteps=10, w_min=2.0, w_max=6.0, embedding_dim=E,
                                 cond_kwarg="encoder_hidden_states", guidance_kwarg="timestep_cond")

    g = torch.Generator().manual_seed(1)
    texts = torch.randn(2, L, 12, generator=g)  # two "prompts"
    null = torch.zeros(1, L, 12)
    # data: the guided teacher's own DDIM samples (its distribution), one pool per prompt
    pool_c = torch.arange(64) % 2
    with torch.no_grad():
        pool = o.teacher_sample(torch.randn(64, 4, 8, 8, generator=g), 4.0, texts[pool_c], null.expand(64, -1, -1))
    ev_noise, ev_c = torch.randn(B, 4, 8, 8, generator=g), torch.arange(B) % 2

    refs = {}
    with torch.no_grad():
        for w in (3.0, 5.0):
            refs[w] = o.teacher_sample(ev_noise, w, texts[ev_c], null.expand(B, -1, -1))

    def dist():
        """Relative L2 distance of one-step student samples to the teacher's DDIM samples (mean over w),
        and the cosine between the student's and the teacher's sample change from w = 3 to w = 5."""
        with torch.no_grad():
            s = {w: o.sample(student, ev_noise, w, texts[ev_c], timesteps=(999,)) for w in refs}
        d = sum(((s[w] - r).norm() / r.norm()).item() for w, r in refs.items()) / len(refs)
        ds, dt = (s[5.0] - s[3.0]).flatten(), (refs[5.0] - refs[3.0]).flatten()
        return d, (ds @ dt / (ds.norm() * dt.norm()).clamp_min(1e-30)).item()

    seen = []
    inner = student.forward

    def spy(x, t, **kw):
        seen.append({k: v.detach().clone() for k, v in kw.items()})
        return inner(x, t, **kw)

    student.forward = spy
    before, cos_before = dist()
    assert cos_before == 0.0  # zero cond_proj: the student's samples do not depend on w yet
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for step in range(200):
        idx = torch.randint(0, 64, (B,), generator=g)
        w = 2.0 + 4.0 * torch.rand(B, generator=g)
        seen.clear()
        loss = o.loss(student, pool[idx], cond=texts[pool_c[idx]], uncond=null.expand(B, -1, -1),
                      target_model=target, generator=g, w=w)
        if step == 0:  # the spy: the w-embedding and the text reach the student's forward
            assert len(seen) == 1 and set(seen[0]) == {"timestep_cond", "encoder_hidden_states"}
            torch.testing.assert_close(seen[0]["timestep_cond"], guidance_embedding(w, E))
            torch.testing.assert_close(seen[0]["encoder_hidden_states"], texts[pool_c[idx]])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert student.time_embedding.cond_proj.weight.grad.abs().max() > 0
        opt.step()
        update_target(target, student, o.target_decay)
        losses.append(loss.item())
    after, cos_after = dist()
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    print(f"LCM with a U-Net student: loss {first:.4f} -> {last:.4f}; one-step relative distance to the "
          f"guided 10-step DDIM samples {before:.3f} -> {after:.3f}; cosine of the w = 3 -> 5 change "
          f"{cos_before:.2f} -> {cos_after:.2f}")
    assert student.time_embedding.cond_proj.weight.abs().max() > 0
    assert last < 0.75 * first
    assert after < 0.8 * before  # seeds 0 / 1 / 2 on CPU: 0.66 / 0.81 / 0.81 of before (seed 0 here)
    assert cos_after > 0.05  # w now moves the samples the teacher's way (seeds 0 / 1 / 2: 0.28 / 0.15 / 0.09;
    #                          a direction unrelated to the teacher's would give |cos| ~ 1 / sqrt(2048) ~ 0.02)
