"""The named C++ ABI of the multi-tensor optimizer entry points of fastgen._C (CPU tier: the
extension imports without a GPU, and nothing here launches).

Each entry point takes one parameter struct (``MultiTensorAdamwParams`` ...) whose fields are
listed once in ``csrc/params.h``: a misspelled field is an AttributeError, a field left unset a
ValueError naming it, positional arguments a TypeError; filled by name, the op's own argument
checks still answer first.
"""

from __future__ import annotations

import pytest
from conftest import c_entry

ENTRIES = {
    "multi_tensor_adamw": ("MultiTensorAdamwParams", 29),
    "multi_tensor_lion": ("MultiTensorLionParams", 22),
    "multi_tensor_norm": ("MultiTensorNormParams", 10),
    "multi_tensor_norm_finalize": ("MultiTensorNormFinalizeParams", 7),
    "multi_tensor_scale": ("MultiTensorScaleParams", 9),
    "multi_tensor_ema": ("MultiTensorEmaParams", 12),
    "multi_tensor_adamw8bit": ("MultiTensorAdamw8bitParams", 29),
    "multi_tensor_prodigy_moments": ("MultiTensorProdigyMomentsParams", 20),
    "multi_tensor_prodigy_update": ("MultiTensorProdigyUpdateParams", 13),
}


def _C():
    from fastgen.cuda import extension_info, load_extension

    info = extension_info()
    if not info["built"]:
        pytest.skip(f"fastgen._C is not built: {info['error']}")
    return load_extension()


@pytest.mark.parametrize("fn", sorted(ENTRIES))
def test_struct_refuses_misspelled_missing_and_positional(fn):
    C = _C()
    name, n_fields = ENTRIES[fn]
    params = getattr(C, name)
    assert len(params.fields) == n_fields and params.fields[-1] == "stream"
    assert len(set(params.fields)) == n_fields
    with pytest.raises(AttributeError):
        params(chunks=4096)  # the field is "chunk" / "n"
    p = params()
    with pytest.raises(AttributeError):
        p.dtype = 0
    with pytest.raises(ValueError, match=f"{fn}: fields not set: {params.fields[0]}, .*, stream$"):
        getattr(C, fn)(params())
    # all but the last two set: exactly those two are named
    almost = params(**{f: 0 for f in params.fields[:-2]})
    with pytest.raises(ValueError, match=f"{fn}: fields not set: {params.fields[-2]}, stream$"):
        getattr(C, fn)(almost)
    with pytest.raises(TypeError):  # the positional signature is gone
        getattr(C, fn)(*([0] * n_fields))


def test_named_fields_reach_the_op_checks():
    """Filled by name in field order, the values land where the op reads them: its own argument
    checks fire on the field they name, and an empty problem returns without launching."""
    C = _C()
    tables = dict(numels=0, chunk_ids=0, chunk_offs=0, num_chunks=0, chunk=4096)
    adamw = dict(p_list=0, g_list=0, m_list=0, v_list=0, vmax_list=0, step_list=0, **tables, p_dtype=2, g_dtype=2,
                 s_dtype=0, lr_ptr=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=0,
                 maximize=0, stochastic_rounding=1, seed=123, sh_list=0, sh_dtype=0, coef_ptr=0, ema_weight=0.0,
                 stream=0)
    c_entry(C, "multi_tensor_adamw", **adamw)  # empty: no launch
    with pytest.raises(ValueError, match="unsupported dtypes p=bfloat16, g=float32"):
        c_entry(C, "multi_tensor_adamw", **{**adamw, "g_dtype": 0})
    with pytest.raises(ValueError, match="states=float16"):
        c_entry(C, "multi_tensor_adamw", **{**adamw, "s_dtype": 1})
    with pytest.raises(ValueError, match="amsgrad needs the max_exp_avg_sq list"):
        c_entry(C, "multi_tensor_adamw", **{**adamw, "amsgrad": 1})
    with pytest.raises(ValueError, match="num_chunks >= 0 and chunk > 0"):
        c_entry(C, "multi_tensor_adamw", **{**adamw, "chunk": 0})
    # the one-pass step's shadow: float32 or the parameters' dtype, a finite weight
    c_entry(C, "multi_tensor_adamw", **{**adamw, "sh_list": 64, "sh_dtype": 2, "ema_weight": 0.01})
    with pytest.raises(ValueError, match="unsupported EMA shadow dtype float16 for bfloat16 parameters"):
        c_entry(C, "multi_tensor_adamw", **{**adamw, "sh_list": 64, "sh_dtype": 1})
    with pytest.raises(ValueError, match="multi_tensor_lion: ema_weight"):
        c_entry(C, "multi_tensor_lion", p_list=0, g_list=0, m_list=0, **tables, p_dtype=0, g_dtype=0, s_dtype=0,
                lr_ptr=0, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=0, sh_list=64, sh_dtype=0,
                coef_ptr=0, ema_weight=float("inf"), stream=0)
    lion = dict(p_list=0, g_list=0, m_list=0, **tables, p_dtype=0, g_dtype=0, s_dtype=2, lr_ptr=0, lr=1e-4,
                beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=1, sh_list=0, sh_dtype=0, coef_ptr=0,
                ema_weight=0.0, stream=0)
    c_entry(C, "multi_tensor_lion", **lion)
    with pytest.raises(ValueError, match="multi_tensor_lion: unsupported dtypes p=float32, g=float16"):
        c_entry(C, "multi_tensor_lion", **{**lion, "g_dtype": 1})
    with pytest.raises(ValueError, match="num_chunks >= 0"):
        c_entry(C, "multi_tensor_lion", **{**lion, "num_chunks": -1})
    with pytest.raises(ValueError, match="multi_tensor_norm_finalize: total_ptr is null"):
        c_entry(C, "multi_tensor_norm_finalize", partial_ptr=0, n=0, norm_type=2.0, max_norm=1.0, total_ptr=0,
                coef_ptr=0, stream=0)
    with pytest.raises(ValueError, match="multi_tensor_scale: coef_ptr is null"):
        c_entry(C, "multi_tensor_scale", g_list=0, **tables, g_dtype=0, coef_ptr=0, stream=0)
    with pytest.raises(ValueError, match="multi_tensor_ema: weight"):
        c_entry(C, "multi_tensor_ema", s_list=0, p_list=0, **tables, s_dtype=0, p_dtype=2, weight=float("nan"),
                weight_ptr=0, stream=0)
    # a device weight (a captured warm-up): the host weight is then not read
    c_entry(C, "multi_tensor_ema", s_list=0, p_list=0, **tables, s_dtype=0, p_dtype=2, weight=float("nan"),
            weight_ptr=64, stream=0)
    adamw8bit = dict(p_list=0, g_list=0, qm_list=0, am_list=0, qv_list=0, av_list=0, step_list=0, sh_list=0,
                     **tables, p_dtype=2, g_dtype=2, sh_dtype=0, maps=0, lr_ptr=0, lr=1e-3, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.01, maximize=0, stochastic_rounding=1, seed=7, coef_ptr=0,
                     ema_weight=0.0, stream=0)
    c_entry(C, "multi_tensor_adamw8bit", **adamw8bit)
    with pytest.raises(ValueError, match="multi_tensor_adamw8bit: unsupported dtypes p=bfloat16, g=float16"):
        c_entry(C, "multi_tensor_adamw8bit", **{**adamw8bit, "g_dtype": 1})
    with pytest.raises(ValueError, match="chunk == 4096"):
        c_entry(C, "multi_tensor_adamw8bit", **{**adamw8bit, "chunk": 2048})
    with pytest.raises(ValueError, match="maps is null"):
        c_entry(C, "multi_tensor_adamw8bit", **{**adamw8bit, "num_chunks": 1})
    with pytest.raises(ValueError, match="EMA shadow dtype"):
        c_entry(C, "multi_tensor_adamw8bit", **{**adamw8bit, "sh_list": 64, "sh_dtype": 9})
    moments = dict(p_list=0, g_list=0, p0_list=0, m_list=0, v_list=0, s_list=0, **tables, p_dtype=0, g_dtype=0,
                   coefs_ptr=0, dot_ptr=0, abs_ptr=0, beta1=0.9, beta2=0.999, beta3=0.9995, stream=0)
    c_entry(C, "multi_tensor_prodigy_moments", **moments)
    with pytest.raises(ValueError, match="multi_tensor_prodigy_moments: unsupported dtypes p=float32, g=bfloat16"):
        c_entry(C, "multi_tensor_prodigy_moments", **{**moments, "g_dtype": 2})
    with pytest.raises(ValueError, match="coefs_ptr is null"):
        c_entry(C, "multi_tensor_prodigy_moments", **{**moments, "num_chunks": 2})
    with pytest.raises(ValueError, match="dot_ptr / abs_ptr is null"):
        c_entry(C, "multi_tensor_prodigy_moments", **{**moments, "num_chunks": 2, "coefs_ptr": 64})
    update = dict(p_list=0, n_list=0, v_list=0, **tables, p_dtype=1, n_dtype=1, coefs_ptr=0, decoupled_wd=1, stream=0)
    c_entry(C, "multi_tensor_prodigy_update", **update)
    with pytest.raises(ValueError, match="multi_tensor_prodigy_update: need num_chunks >= 0"):
        c_entry(C, "multi_tensor_prodigy_update", **{**update, "chunk": -1})


def test_launchers_fill_structs_the_entry_points_accept(monkeypatch):
    """fastgen.cuda.optim's launchers on CPU tensors, with each entry point called through a wrapper that
    sets num_chunks = 0 first: every struct they fill is complete, of the right field types, and passes
    the op's argument checks (no launch, no GPU needed)."""
    import contextlib

    import torch

    import fastgen.cuda.optim as K
    from fastgen.optim import quant8

    C = _C()
    called = []

    class NoLaunch:
        def __getattr__(self, name):
            if name.endswith("Params"):
                return getattr(C, name)

            def entry(params):
                params.num_chunks = 0
                getattr(C, name)(params)
                called.append(name)
            return entry

    monkeypatch.setattr(K, "load_extension", lambda: NoLaunch())
    monkeypatch.setattr(K, "_stream", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ps = [torch.randn(5000).bfloat16(), torch.randn(300).bfloat16()]
    gs = [torch.randn_like(p) for p in ps]
    ms, vs, sh = ([torch.zeros(p.shape) for p in ps] for _ in range(3))
    steps = [torch.ones(()) for _ in ps]
    coef = torch.ones(1)
    adamw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False)
    K.adamw_step(ps, gs, ms, vs, None, steps, lr=1e-3, amsgrad=False, stochastic_rounding=True, seed=5, coef=coef,
                 shadows=sh, ema_decay=0.9, **adamw)
    K.adamw_step(ps, gs, ms, vs, ms, steps, lr=torch.tensor(1e-3), amsgrad=True, **adamw)
    K.lion_step(ps, gs, ms, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=True, coef=coef,
                shadows=[s.half() for s in sh], ema_decay=0.5)  # fp16 shadows of bf16 params: an EMA launch after
    qs = [torch.zeros(p.shape, dtype=torch.uint8) for p in ps]
    absmax = [torch.zeros((p.numel() + 255) // 256) for p in ps]
    tables = (*quant8.tables(True, "cpu"), *quant8.tables(False, "cpu"))
    K.adamw8bit_step(ps, gs, qs, absmax, qs, absmax, steps, tables=tables, lr=1e-3, stochastic_rounding=True, seed=3,
                     coef=coef, shadows=sh, ema_decay=0.9, **adamw)
    coefs = torch.ones(3)
    K.prodigy_moments(ps, gs, ps, None, ps, ps, coefs, beta1=0.0, beta2=0.999, beta3=0.99, weight_decay=0.0,
                      coupled_wd=False)
    K.prodigy_update(ps, gs, ps, coefs, decoupled_wd=True)
    K.scale_(gs, coef)
    K.ema_update_(sh, ps, 0.9)
    K.ema_update_(sh, ps, weight=torch.full((), 0.1))
    with pytest.raises(ValueError, match="exactly one of decay"):
        K.ema_update_(sh, ps, 0.9, weight=torch.full((), 0.1))
    assert called == ["multi_tensor_adamw", "multi_tensor_adamw", "multi_tensor_lion", "multi_tensor_ema",
                      "multi_tensor_adamw8bit", "multi_tensor_prodigy_moments", "multi_tensor_prodigy_update",
                      "multi_tensor_scale", "multi_tensor_ema", "multi_tensor_ema"]
