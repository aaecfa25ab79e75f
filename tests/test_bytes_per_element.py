"""Each memory-bound kernel's docstring and its benchmark's bytes formula state the same bytes per element.

Every kernel module below carries, in its docstring, one line per pass in the format that
``tests/widths.py`` ``stated_bytes`` parses::

    Bytes per element (e: element size of x; per-row, per-column and per-sample terms omitted):

        fwd: read x (e); write y (e) = 2e
        bwd: read dy (e), h (e); write dx (e) = 3e

The tests check that each line's total is the sum of its tensors, and that the bench's formula
(``benchmarks/bench_*.py``, what the harness divides by the time to get GB/s), divided by the
elements at a large shape where the per-row / per-column / per-sample terms vanish, equals the
stated count for bf16 and fp32. Kernels without a bench formula (Lion, 8-bit AdamW,
schedule-free AdamW) are checked against the per-element tensor bytes of the static width
table instead (``tests/sm90.py`` ``optim_hot_bytes``, whose vector counts tests/test_optim_tables.py
checks in the compiled PTX). Prodigy has neither: only its lines' own sums are checked (its two
kernels are not in the static tables, and no bench times it). Lines no bench row times (the
per-token modulation of layer_norm and scale_shift, gated_residual alone, group_norm_apply) are
the tensor lists whose 16-byte accesses tests/test_static_widths.py counts in the PTX.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from widths import stated_bytes  # noqa: E402

from fastgen.cli import _benchmarks_package  # noqa: E402

MODULES = ("rms_norm", "layer_norm", "group_norm", "rope", "qk_norm_rope", "glu", "scale_shift", "adamw",
           "adamw8bit", "lion", "ema", "clip_grad", "prodigy", "schedulefree")
DTYPES = (torch.bfloat16, torch.float32)


def _bench(op):
    return importlib.import_module(f"{_benchmarks_package().__name__}.bench_{op}")


def _case(shape, dtype, variant=""):
    return importlib.import_module(f"{_benchmarks_package().__name__}.harness").Case(shape, dtype, variant)


def _stated(module, pass_, e):
    a, b = stated_bytes(module)[pass_]["total"]
    return a * e + b


def _close(got, want, what):
    # per-row / per-column terms at the shapes below are < 1e-3 byte per element
    assert abs(got - want) < 1e-3, f"{what}: bench formula gives {got:.4f} bytes per element, docstring {want}"


@pytest.mark.parametrize("module", MODULES)
def test_stated_totals_add_up(module):
    lines = stated_bytes(module)
    assert lines, module
    for pass_, line in lines.items():
        a = sum(s[0] for _, s in line["read"] + line["write"])
        b = sum(s[1] for _, s in line["read"] + line["write"])
        assert (a, b) == line["total"], f"{module} {pass_}: tensors sum to {a}e + {b}, line says {line['total']}"
        assert line["read"], f"{module} {pass_}: reads nothing"


# (module, pass, bench bytes for (mode, dtype), elements): shapes large enough that per-row
# (1 / N), per-column (1 / M) and per-sample (1 / S) terms are below 1e-3 byte per element.
def _norm_rows():
    rms, ln, gn, rope, glu, ss = (_bench(op) for op in ("rms_norm", "layer_norm", "group_norm", "rope", "glu",
                                                         "scale_shift"))
    M, N = 1 << 16, 1 << 16
    B, S = 4, 1 << 16
    rows = []
    for mode in ("fwd", "bwd"):
        for res in (False, True):
            rows.append(("rms_norm", f"{mode}{' residual' if res else ''}",
                         lambda dt, mode=mode, res=res: rms.rms_norm_bytes(M, N, dt, mode, residual=res), M * N))
        for variant in ("", "modulate", "gated"):
            rows.append(("layer_norm", f"{mode}{' ' + variant if variant else ''}",
                         lambda dt, mode=mode, v=variant: ln.layer_norm_bytes(B, S, N, dt, mode, v), B * S * N))
        rows.append(("group_norm", mode, lambda dt, mode=mode: gn.group_norm_bytes(8, 1 << 12, 1 << 16, 32, dt, mode),
                     8 * (1 << 12) * (1 << 16)))
        for module, fused in (("rope", False), ("qk_norm_rope", True)):
            # q and k of (1, S, H, D) each: 2 * S * H * D elements; the (S, D) tables are 1 / H per element
            rows.append((module, mode, lambda dt, mode=mode, f=fused: rope.rope_bytes(1, S, 1 << 14, 128, dt, mode, f),
                         2 * S * (1 << 14) * 128))
        rows.append(("glu", mode, lambda dt, mode=mode: glu.bytes_moved(_case({"M": M, "N": N}, dt), mode), M * N))
        for variant, tag in (("", ""), ("token", " per-token")):
            rows.append(("scale_shift", f"{mode}{tag}", lambda dt, mode=mode, v=variant: ss.bytes_moved(
                _case({"B": B, "S": S, "N": N}, dt, v), mode), B * S * N))
    return rows


@pytest.mark.parametrize("module, pass_, bench_bytes, elements", _norm_rows(),
                         ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_bench_formula_matches_docstring(module, pass_, bench_bytes, elements, dtype):
    e = torch.empty((), dtype=dtype).element_size()
    _close(bench_bytes(dtype) / elements, _stated(module, pass_, e), f"{module} {pass_} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optimizer_bench_formulas_match_docstrings(dtype):
    e = torch.empty((), dtype=dtype).element_size()
    n = 1 << 20
    case = _case({"params": n, "tensors": 8}, dtype)
    adamw, ema, clip = _bench("adamw"), _bench("ema"), _bench("clip_grad_norm")
    _close(adamw.bytes_moved(case, "step") / n, _stated("adamw", "step", e), "adamw step")
    # the one-pass tail: the clip's norm pass over g, then the step with the clip coefficient and the EMA
    _close(adamw.bytes_moved(case, "clip+step+ema") / n,
           _stated("clip_grad", "sum_squares", e) + _stated("adamw", "step clip+ema", e), "adamw clip+step+ema")
    _close(ema.bytes_moved(case, "update") / n, _stated("ema", "update", e), "ema update")
    _close(clip.bytes_moved(case, "clip") / n,
           _stated("clip_grad", "sum_squares", e) + _stated("clip_grad", "scale", e), "clip_grad_norm")


# Kernels without a bench formula: their per-element tensors against the static width table's.
# (width-table case name, module, pass)
NO_BENCH = (
    ("lion", "lion", "step"),
    ("lion clip+ema", "lion", "step clip+ema"),
    ("adamw8bit", "adamw8bit", "step"),
    ("adamw8bit clip+ema", "adamw8bit", "step clip+ema"),
    ("schedulefree", "schedulefree", "step"),
    ("adamw amsgrad=True", "adamw", "step amsgrad"),
)


@pytest.mark.parametrize("case, module, pass_", NO_BENCH)
@pytest.mark.parametrize("p_bytes", (2, 4))
def test_unbenched_optimizers_match_width_table(case, module, pass_, p_bytes):
    from sm90 import optim_hot_bytes

    line = stated_bytes(module)[pass_]
    size = lambda items: sorted(a * p_bytes + b for _, (a, b) in items)  # noqa: E731
    loads, stores = optim_hot_bytes(case, p_bytes)
    assert size(line["read"]) == sorted(loads), f"{module} {pass_}: reads {line['read']} vs table {loads}"
    assert size(line["write"]) == sorted(stores), f"{module} {pass_}: writes {line['write']} vs table {stores}"


def test_parser_reads_the_format():
    import widths

    items = widths._items("p (e), m (4), am (1/16)")
    assert items == [("p", (1.0, 0.0)), ("m", (0.0, 4.0)), ("am", (0.0, 0.0625))]
    assert widths._size("3e + 16") == (3.0, 16.0) and widths._size("e + 8") == (1.0, 8.0)
    assert widths._items("-") == []
    with pytest.raises(ValueError):
        widths._items("p e")
