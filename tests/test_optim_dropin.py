"""FusedAdamW / FusedLion / EMA as drop-ins: every torch.optim.AdamW argument, the common Lion
arguments, EMA over a module or a parameter list with frozen parameters left out, mismatched
models named, other optimizers' state dicts refused (torch reference path: CPU, no kernels)."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastgen.optim import EMA, FusedAdamW, FusedLion


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_adamw_takes_every_torch_adamw_argument():
    """Every parameter of torch.optim.AdamW's signature is a parameter of FusedAdamW, with the same default."""
    ours = inspect.signature(FusedAdamW.__init__).parameters
    for name, p in inspect.signature(torch.optim.AdamW.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].default == p.default or name == "differentiable", name


@pytest.mark.parametrize("flags", [dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False),
                                   dict(capturable=True), dict(fused=True, capturable=True, foreach=None)])
def test_adamw_flags_are_accepted_and_change_nothing(flags):
    a, b = _model(), _model()
    ours = FusedAdamW(a.parameters(), lr=1e-2, backend="torch", **flags)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        _step(a, ours, x)
        _step(b, ref, x)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert ours.param_groups[0]["capturable"] == flags.get("capturable", False)
    # a torch AdamW with the same flags loads our state dict, and we load its
    c = torch.optim.AdamW(b.parameters(), lr=1e-2, foreach=False)
    c.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())


def test_adamw_tensor_betas_and_named_parameters():
    a = _model()
    opt = FusedAdamW(a.named_parameters(), lr=1e-2, betas=(torch.tensor(0.5), torch.tensor(0.25)), backend="torch")
    assert opt.param_groups[0]["betas"] == (0.5, 0.25)
    _step(a, opt, torch.randn(2, 6))


@pytest.mark.parametrize("cls", [FusedAdamW, FusedLion])
def test_differentiable_is_refused_clearly(cls):
    with pytest.raises(ValueError, match="differentiable=True .* not supported"):
        cls(_model().parameters(), differentiable=True)
    with pytest.raises(TypeError, match="fused must be None or a bool"):
        cls(_model().parameters(), fused="yes")


def test_lion_takes_the_common_arguments():
    a, b = _model(), _model()
    ours = FusedLion(a.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, maximize=False,
                     foreach=True, fused=True, capturable=True, use_triton=True, backend="torch")
    plain = FusedLion(b.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, backend="torch")
    x = torch.randn(3, 6)
    for _ in range(3):
        _step(a, ours, x)
        _step(b, plain, x)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True is not supported"):
        FusedLion(a.parameters(), decoupled_weight_decay=True)


def test_state_dicts_of_another_kind_are_refused():
    a = _model()
    adamw, lion = FusedAdamW(a.parameters(), backend="torch"), FusedLion(a.parameters(), backend="torch")
    x = torch.randn(2, 6)
    _step(a, adamw, x)
    _step(a, lion, x)
    with pytest.raises(ValueError, match="another optimizer kind"):
        adamw.load_state_dict(lion.state_dict())
    with pytest.raises(ValueError, match="another optimizer kind"):
        lion.load_state_dict(adamw.state_dict())


def test_docstrings_give_the_update():
    assert "1 - beta1^t" in FusedAdamW.__doc__ and "sign(c)" in FusedLion.__doc__
    assert "shadow <- shadow + (1 - d) * (param - shadow)" in EMA.__doc__


# ----------------------------------------------------------------------------- EMA


def _lora_like():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    m[0].requires_grad_(False)  # a frozen base
    return m


def test_ema_tracks_only_trainable_parameters_by_default():
    m = _lora_like()
    ema = EMA(m, decay=0.5, warmup=False, backend="torch")
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    assert set(EMA(m, trainable_only=False).shadow) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["1.weight"], m[1].weight.detach() - 0.5)
    frozen = m[0].weight.detach().clone()
    ema.copy_to(m)  # the frozen base is not touched
    assert torch.equal(m[0].weight, frozen)
    with pytest.raises(ValueError, match="pass trainable_only=False"):
        EMA(torch.nn.Linear(2, 2).requires_grad_(False))


def test_ema_over_an_iterable_of_parameters():
    m = _lora_like()
    params = list(m.parameters())
    ema = EMA(params, decay=0.5, warmup=False, backend="torch")
    assert set(ema.shadow) == {"2", "3"}  # positions in the list given; 0 and 1 are frozen
    start = params[2].detach().clone()
    with torch.no_grad():
        params[2].add_(2.0)
    ema.update()  # defaults to the parameters given
    torch.testing.assert_close(ema.shadow["2"], start + 1.0)
    with ema.average_parameters():
        torch.testing.assert_close(params[2].detach(), start + 1.0)
    torch.testing.assert_close(params[2].detach(), start + 2.0)
    ema.update(params)  # the same list passed again is fine


def test_ema_update_with_another_architecture_names_the_parameter():
    ema = EMA(_model(), backend="torch")
    other = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"parameter '2.weight' has shape \(4, 8\) in the model given but \(3, 8\)"):
        ema.update(other)
    with pytest.raises(ValueError, match="parameter '2.weight' is averaged but the model given has no such"):
        ema.update(torch.nn.Sequential(torch.nn.Linear(6, 8)))
    bigger = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="parameter '3.weight' of the model given has no average"):
        ema.update(bigger)
    assert ema.num_calls == 0  # nothing was counted
