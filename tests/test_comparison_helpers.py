"""Every comparison helper of the suite fails on NaN or inf where the reference is finite.

A kernel that returns NaN is the most likely first-GPU bug (-inf - -inf in an online softmax);
a helper that maps NaN to 0 (nan_to_num) or compares with ``<=`` after a NaN-swallowing
reduction would let it pass. Each helper is fed the reference with one element replaced by
NaN, +inf and -inf, and must fail; fed the reference itself, it must pass (so the failure is
the NaN's, not the helper's).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import conftest


def _module(name):
    return importlib.import_module(name)


def _raises(fn):
    def check(a, b):
        fn(a, b)
    return check


def _below(fn, bound=1e-3):
    def check(a, b):
        value = fn(a, b)
        assert value <= bound, f"{value} > {bound}"  # NaN and inf never pass
    return check


HELPERS = {
    "conftest.assert_close": lambda: _raises(lambda a, b: conftest.assert_close(a, b)),
    "conftest.max_err": lambda: _below(conftest.max_err),
    "conftest.assert_fa_rule": lambda: _raises(lambda a, b: conftest.assert_fa_rule("x", a, b + 1e-3, b, 1e-2)),
    "test_cuda_build._close": lambda: _raises(lambda a, b: _module("test_cuda_build")._close(a, b, torch.float32,
                                                                                               "x")),
    "test_adapters._close": lambda: _raises(lambda a, b: _module("test_adapters")._close([a], [b])),
    "test_adapters_kernel._fa_close": lambda: _raises(
        lambda a, b: _module("test_adapters_kernel")._fa_close(a, b + 1e-3, b.double(), torch.float32, "x")),
    "test_models_cogvideox._close": lambda: _raises(lambda a, b: _module("test_models_cogvideox")._close(a, b)),
    "test_models_unet._close": lambda: _raises(lambda a, b: _module("test_models_unet")._close(a, b)),
    "test_models_dit.rel_err": lambda: _below(lambda a, b: _module("test_models_dit").rel_err(a, b)),
    "test_models_pixart.rel_err": lambda: _below(lambda a, b: _module("test_models_pixart").rel_err(a, b)),
    "test_models_sd3.rel_err": lambda: _below(lambda a, b: _module("test_models_sd3").rel_err(a, b)),
    "test_patch_models.rel_err": lambda: _below(lambda a, b: _module("test_patch_models").rel_err(a, b)),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(HELPERS))
def test_helper_fails_on_non_finite_output(name, bad):
    check = HELPERS[name]()
    ref = torch.linspace(-1, 1, 24).reshape(4, 6)
    check(ref.clone(), ref)  # the reference itself passes
    out = ref.clone()
    out[2, 3] = bad
    with pytest.raises(AssertionError):
        check(out, ref)


def test_max_err_counts_matching_infinities_as_agreement():
    lse = torch.tensor([0.5, -math.inf])
    assert conftest.max_err(lse, lse.clone()) == 0.0  # a row that sees no key: -inf on both sides
    assert conftest.max_err(torch.tensor([0.5, math.inf]), lse) == math.inf
