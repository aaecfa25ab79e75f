"""fastgen.patch decides on typed records (fastgen/patch/records.py), and one AdaLN implementation
(fastgen/nn/ada_norm.py) serves fastgen.nn and the patched diffusers modules.

- a static check (AST) that no code in fastgen/patch branches on report text (``"rope" in after``,
  ``after.split(" + ")``, ``reason.startswith(...)``, ``why == "..."``), shown to catch those;
- the report's rows on tiny diffusers models are the ones the string-keyed patcher wrote (recorded
  before the change), and every row's text is its plan's text;
- the patched AdaLN forwards run fastgen.nn.ada_norm's functions: bit-equal to fastgen.nn's modules
  on the same weights and backend (the same code), close to diffusers' unpatched modules;
- no function over 80 lines in fastgen/patch and fastgen/nn/ada_norm.py.
"""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest
import torch
from torch import nn

import fastgen
import fastgen.patch as fp
from fastgen.nn import ada_norm
from fastgen.patch.records import ROPE_OPS, Plan, Step

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCH = ROOT / "fastgen" / "patch"

# ----------------------------------------------------------------------------- no decisions on text

TEXT_NAMES = {"after", "before", "reason", "why", "kernel", "what", "text", "note", "notes", "detail", "message"}
STR_METHODS = {"split", "rsplit", "startswith", "endswith", "partition", "rpartition", "find", "rfind", "index",
               "count", "replace"}
# (file, function, code): string tests that are not decisions on report text
ALLOWED = {
    ("core.py", "PatchReport.count", "after_contains in r.after"): "the report's text query for callers",
    ("norms.py", "_unknown_norm_reason", "'Norm' in cls.__name__"): "names an unknown diffusers module a norm",
    ("serve.py", "_has_cuda", "'cuda' in backend.implementations(op)"): "the backend registry's names",
    ("serve.py", "short", "reason.split('; ')"): "trims an op's message for display",
}


def _name(node):
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _is_text(node) -> bool:
    return _name(node) in TEXT_NAMES or (isinstance(node, ast.Call) and _name(node.func) in ("str", "repr"))


def _is_str(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _string_tests(node) -> bool:
    """``x in <text>``, ``"const" in <not a literal container>``, ``<text> == "const"``, ``<text>.split(...)``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in STR_METHODS and _is_text(node.func.value)
    if not isinstance(node, ast.Compare):
        return False
    sides = [node.left, *node.comparators]
    for op, left, right in zip(node.ops, sides, sides[1:]):
        literal = isinstance(right, (ast.Tuple, ast.List, ast.Set, ast.Dict))
        if isinstance(op, (ast.In, ast.NotIn)) and (_is_text(right) or (_is_str(left) and not literal)):
            return True
        if isinstance(op, (ast.Eq, ast.NotEq)) and ((_is_text(left) and _is_str(right)) or
                                                    (_is_str(left) and _is_text(right))):
            return True
    return False


def string_keyed(source: str) -> list:
    """``[(function, code)]`` of every string test in ``source``."""
    tree = ast.parse(source)
    out = []

    def visit(node, scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + [node.name]
        if _string_tests(node):
            out.append((".".join(scope) or "<module>", ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return out


def test_the_check_catches_string_keyed_decisions():
    """What fastgen.patch did before the typed records, each one found."""
    old = '''
def patch_attention(after, reference, why, s):
    rotary = "rope" in after
    head = after.split(" + ")[0]
    fused = "qk_norm_rope" in after
    already = why == "already a fastgen model"
    on_ref = s.reason.startswith(ON_REFERENCE)
    op = after.split("fastgen.ops.")[1]
    ok = op in ("layer_norm",) and "x" in ("x", "y")
'''
    found = [code for _, code in string_keyed(old)]
    assert found == ["'rope' in after", "after.split(' + ')", "'qk_norm_rope' in after",
                     "why == 'already a fastgen model'", "s.reason.startswith(ON_REFERENCE)",
                     "after.split('fastgen.ops.')"]


def test_no_decision_in_fastgen_patch_reads_report_text():
    found = {(f.name, *hit) for f in sorted(PATCH.glob("*.py")) for hit in string_keyed(f.read_text())}
    unexpected = sorted(found - set(ALLOWED))
    assert not unexpected, f"string-keyed decisions in fastgen/patch (decide on the Plan instead): {unexpected}"


def test_functions_under_80_lines():
    files = sorted(PATCH.glob("*.py")) + [ROOT / "fastgen" / "nn" / "ada_norm.py"]
    long = [(f.name, n.name, n.end_lineno - n.lineno + 1) for f in files for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 >= 80]
    assert not long


def test_no_adaln_math_left_in_patch():
    """The patched AdaLN forwards hold no projection / chunking of their own: fastgen.nn.ada_norm's."""
    tree = ast.parse((PATCH / "norms.py").read_text())
    names = {"_modulate", "_fused_kind", "_ada_zero_forward", "_ada_zero_single_forward", "_sd35_ada_zero_x_forward",
             "_ada_continuous_forward"}
    forwards = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name in names]
    assert len(forwards) == len(names)
    calls = [ast.unparse(n) for f in forwards for n in ast.walk(f) if isinstance(n, ast.Call)
             and _name(n.func) in ("chunk", "linear", "silu", "layer_norm_modulate", "rms_norm_modulate")]
    assert not calls


# ----------------------------------------------------------------------------- plans


def test_plan_text_kernel_and_without():
    flux = Plan((Step(("attention",)), Step(("qk_norm_rope", "apply_rope"))), fuses=("norm_q", "norm_k"),
                fuser=Step(("qk_norm_rope",)))
    assert flux.ops == ("attention", "qk_norm_rope", "apply_rope") and flux.uses(ROPE_OPS)
    assert flux.text() == "fastgen.ops.scaled_dot_product_attention + qk_norm_rope / apply_rope"
    assert flux.text({"attention": "why"}) == "fastgen.ops.qk_norm_rope / apply_rope"
    assert flux.kernel() == "fastgen.ops.qk_norm_rope"
    plain = flux.without(ROPE_OPS)
    assert plain.ops == ("attention",) and plain.fuses == () and not plain.uses(ROPE_OPS)
    assert plain.text() == "fastgen.ops.scaled_dot_product_attention"
    x2 = Plan.of("layer_norm_modulate", passes=2, fuses=("norm",))
    assert (x2.text(), x2.kernel()) == ("fastgen.ops.layer_norm_modulate (x2)", "fastgen.ops.layer_norm_modulate")
    silu = Plan.of("group_norm", args="activation='silu'", fuses=("norm1",), detail="for norm1 + SiLU")
    assert silu.text() == "fastgen.ops.group_norm(activation='silu') for norm1 + SiLU"
    assert silu.kernel() == "fastgen.ops.group_norm(activation='silu')"


# ----------------------------------------------------------------------------- the report, as before


def _flux(dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).to(dtype)


def _sd35():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
                                 dual_attention_layers=(0,))


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _cog():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                       text_embed_dim=16, time_embed_dim=8, use_rotary_positional_embeddings=True)


def _misc():
    from diffusers.models.attention import FeedForward
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZeroSingle

    return nn.ModuleDict(dict(a=AdaLayerNormContinuous(16, 8, norm_type="rms_norm"), b=AdaLayerNormContinuous(16, 8),
                              c=AdaLayerNormZeroSingle(16), d=FeedForward(16, activation_fn="swiglu"),
                              e=FeedForward(16, activation_fn="geglu"), f=FeedForward(16, activation_fn="gelu"),
                              g=nn.LayerNorm((4, 4)), h=nn.GroupNorm(2, 4), i=nn.RMSNorm(16)))


ADA_ZERO = ("diffusers.AdaLayerNormZero", "fastgen.ops.layer_norm_modulate", ())
LN = ("torch.nn.LayerNorm", "fastgen.ops.layer_norm", ())
FLUX_FUSED_QK = {("LayerNorm", "fastgen.ops.layer_norm_modulate"): 4, ("RMSNorm", "fastgen.ops.qk_norm_rope"): 6}
FLUX_COMMON = {ADA_ZERO: 2, LN: 2, ("diffusers.AdaLayerNormZeroSingle", "fastgen.ops.layer_norm_modulate", ()): 1,
               ("diffusers.AdaLayerNormContinuous", "fastgen.ops.layer_norm_modulate", ()): 1}
SDPA = "fastgen.ops.scaled_dot_product_attention"
SILU = "fastgen.ops.group_norm(activation='silu')"
# (model, patch options) -> (rows {(before, after, ops on the reference): n}, fused {(what, kernel): n}),
# as the patcher wrote them when it decided on the text (recorded on CPU before the typed records)
EXPECTED = {
    ("flux", "torch", True): ({**FLUX_COMMON, ("FluxAttnProcessor", SDPA + " + qk_norm_rope / apply_rope", ()): 2},
                              FLUX_FUSED_QK),
    ("flux", "triton", True): ({**FLUX_COMMON, ("FluxAttnProcessor", "fastgen.ops.qk_norm_rope / apply_rope",
                                                ("attention",)): 2}, FLUX_FUSED_QK),
    ("flux", "torch", False): ({**FLUX_COMMON, ("FluxAttnProcessor", SDPA, ()): 2,
                                ("torch.nn.RMSNorm", "fastgen.ops.rms_norm", ()): 6},
                               {("LayerNorm", "fastgen.ops.layer_norm_modulate"): 4}),
    ("flux16", "triton", True): ({**FLUX_COMMON, ("FluxAttnProcessor", SDPA + " + qk_norm_rope / apply_rope", ()): 2},
                                 FLUX_FUSED_QK),
    ("sd35", "torch", True): ({("diffusers.SD35AdaLayerNormZeroX", "fastgen.ops.layer_norm_modulate (x2)", ()): 1,
                               ADA_ZERO: 2, ("JointAttnProcessor2_0", SDPA, ()): 3, LN: 3,
                               ("diffusers.RMSNorm", "fastgen.ops.rms_norm", ()): 10,
                               ("diffusers.AdaLayerNormContinuous", "fastgen.ops.layer_norm_modulate", ()): 2},
                              {("LayerNorm", "fastgen.ops.layer_norm_modulate"): 5}),
    ("unet", "torch", True): ({("torch.nn.GroupNorm", "fastgen.ops.group_norm", ()): 5, LN: 12,
                               ("AttnProcessor2_0", SDPA, ()): 8,
                               ("diffusers.GEGLU", "fastgen.ops.glu(activation='gelu')", ()): 4,
                               ("diffusers.ResnetBlock2D", SILU + " for norm1 and norm2 + SiLU", ()): 8},
                              {("GroupNorm", SILU): 16}),
    ("cog", "triton", True): ({LN: 6, ("CogVideoXAttnProcessor2_0", "fastgen.ops.apply_rope", ("attention",)): 1}, {}),
    ("cog", "torch", False): ({LN: 6, ("CogVideoXAttnProcessor2_0", SDPA, ()): 1}, {}),
}
MISC_TEXT = """\
fastgen.patch (backend='torch'): 7 replaced, 3 fused into a parent, 2 left alone
  a        diffusers.AdaLayerNormContinuous -> fastgen.ops.rms_norm_modulate
  b        diffusers.AdaLayerNormContinuous -> fastgen.ops.layer_norm_modulate
  c        diffusers.AdaLayerNormZeroSingle -> fastgen.ops.layer_norm_modulate
  d.net.0  diffusers.SwiGLU -> fastgen.ops.glu(activation='silu')
  e.net.0  diffusers.GEGLU -> fastgen.ops.glu(activation='gelu')
  h        torch.nn.GroupNorm -> fastgen.ops.group_norm
  i        torch.nn.RMSNorm -> fastgen.ops.rms_norm
fused into a patched parent:
  a.norm   RMSNorm -> fastgen.ops.rms_norm_modulate (in a)
  b.norm   LayerNorm -> fastgen.ops.layer_norm_modulate (in b)
  c.norm   LayerNorm -> fastgen.ops.layer_norm_modulate (in c)
left alone:
  f.net.0  GELU: a Linear then one elementwise activation, which PyTorch already runs as one kernel; \
fusing further needs a GEMM epilogue (not in fastgen)
  g        LayerNorm: normalizes more than one dim"""
MAKERS = dict(flux=_flux, flux16=lambda: _flux(torch.bfloat16), sd35=_sd35, unet=_unet, cog=_cog)


def _check_rows_follow_plans(m, report, rope: bool):
    for r in report.replaced:
        assert r.plan is not None and r.after == r.plan.text(dict(r.reference)), r
        proc = getattr(m.get_submodule(r.path), "processor", None)
        if hasattr(proc, "fastgen_rope"):  # the processor's rotary switch is the plan's
            assert proc.fastgen_rope == rope and r.plan.uses(ROPE_OPS) == rope
    fused = collections.Counter((f.by, f.kernel) for f in report.fused)
    planned = collections.Counter((r.path, r.plan.kernel()) for r in report.replaced for _ in r.plan.fuses)
    assert fused == planned


@pytest.mark.parametrize("case", sorted(EXPECTED), ids=lambda c: "-".join(map(str, c)))
def test_report_rows_as_before(case):
    pytest.importorskip("diffusers")
    name, backend, rope = case
    m = MAKERS[name]()
    r = fp.patch(m, backend=backend, rope=rope)
    rows = collections.Counter((x.before, x.after, tuple(op for op, _ in x.reference)) for x in r.replaced)
    want_rows, want_fused = EXPECTED[case]
    assert rows == collections.Counter(want_rows)
    assert collections.Counter((f.what, f.kernel) for f in r.fused) == collections.Counter(want_fused)
    _check_rows_follow_plans(m, r, rope)


def test_report_text_as_before():
    pytest.importorskip("diffusers")
    m = _misc()
    r = fp.patch(m, backend="torch")
    assert "\n".join(line for line in str(r).splitlines() if not line.startswith("note:")) == MISC_TEXT
    assert r.on_reference() == {}
    _check_rows_follow_plans(m, r, True)


def test_resnet_scale_shift_plan_fuses_norm1_only():
    pytest.importorskip("diffusers")
    from diffusers.models.resnet import ResnetBlock2D

    m = nn.ModuleDict(dict(block=ResnetBlock2D(in_channels=8, temb_channels=8, groups=4,
                                               time_embedding_norm="scale_shift")))
    r = fp.patch(m, backend="torch")
    row = next(x for x in r.replaced if x.path == "block")
    assert row.after == SILU + " for norm1 + SiLU" and row.plan.fuses == ("norm1",)
    assert [(f.path, f.kernel) for f in r.fused] == [("block.norm1", SILU)]


def test_site_left_alone_carries_its_reference_ops():
    """on_reference() reads the typed ``Skipped.reference``, not the reason's wording."""
    m = nn.ModuleDict(dict(n=nn.LayerNorm(8), w=nn.LayerNorm(8)))
    r = fp.patch(m, backend="cuda")
    if r.replaced:
        pytest.skip("the CUDA extension serves layer_norm here")
    assert all(dict(s.reference).keys() == {"layer_norm"} for s in r.skipped)
    assert set(r.on_reference()) == {"n", "w"}


# ----------------------------------------------------------------------------- one AdaLN implementation


def _pair(theirs, ours, inputs, call):
    ours.load_state_dict(theirs.state_dict())
    ref = call(theirs, *inputs)
    fp.patch(theirs, backend="torch")
    patched, mine = call(theirs, *inputs), call(ours, *inputs)
    return [t if isinstance(t, tuple) else (t,) for t in (ref, patched, mine)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_adaln_is_fastgen_nn(dtype, monkeypatch):
    """Patched diffusers AdaLN modules and fastgen.nn's run the same functions: bit-equal on the same
    weights and backend (by construction), close to the unpatched diffusers module."""
    dn = pytest.importorskip("diffusers.models.normalization")
    seen = collections.Counter()
    for name in ("modulation", "norm_modulate"):
        def spy(*a, _f=getattr(ada_norm, name), _n=name, **k):
            seen[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(ada_norm, name, spy)
    torch.manual_seed(0)
    x, emb, cond = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 16, dtype=dtype), torch.randn(2, 8, dtype=dtype)
    cases = [(dn.AdaLayerNormZero(16), fastgen.nn.AdaLayerNormZero(16, backend="torch"), (x, emb),
              lambda m, a, e: m(a, emb=e))]
    for norm_type in ("layer_norm", "rms_norm"):
        cases.append((dn.AdaLayerNormContinuous(16, 8, elementwise_affine=True, eps=1e-6, norm_type=norm_type),
                      fastgen.nn.AdaLayerNormContinuous(16, 8, eps=1e-6, norm_type=norm_type, backend="torch"),
                      (x, cond), lambda m, a, c: m(a, c)))
    for theirs, ours, inputs, call in cases:
        with torch.no_grad():
            ref, patched, mine = _pair(theirs.to(dtype), ours.to(dtype), inputs, call)
        assert len(ref) == len(patched) == len(mine)
        for r, p, o in zip(ref, patched, mine):
            assert torch.equal(p, o)
            torch.testing.assert_close(p, r, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    assert seen == {"modulation": 6, "norm_modulate": 6}  # 3 cases x (patched, fastgen.nn)


def test_patched_adaln_zero_single_and_zero_x_against_diffusers(monkeypatch):
    dn = pytest.importorskip("diffusers.models.normalization")
    seen = collections.Counter()
    real = ada_norm.norm_modulate
    monkeypatch.setattr(ada_norm, "norm_modulate", lambda *a: seen.update(["norm_modulate"]) or real(*a))
    torch.manual_seed(0)
    x, emb = torch.randn(2, 5, 16), torch.randn(2, 16)
    for m in (dn.AdaLayerNormZeroSingle(16), dn.SD35AdaLayerNormZeroX(16)):
        with torch.no_grad():
            ref = m(x, emb=emb)
            fp.patch(m, backend="torch")
            out = m(x, emb=emb)
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r)
    assert seen["norm_modulate"] == 3  # one for ZeroSingle, two for ZeroX
