"""Static tier: the hot global loads and stores of the CUDA C++ optimizer functors are 16 bytes wide.

Reads the sm_90 PTX that nvcc produces (tests/cuda_widths.py; cached, no GPU). In the build without
the scalar path (``-DFASTGEN_VECTOR_PATH_ONLY``) every access of an operand tensor must be a 16-byte
``ld.global.v4`` / ``st.global.v4``, at least one per 16 bytes of every operand of a round; the only
narrower accesses allowed are the per-chunk metadata listed in ``cuda_widths.METADATA`` with their
reason. The build as shipped adds the scalar path (tails, unaligned views): its 16-byte
accesses are the same, and it has the narrow fallback accesses that keep odd views correct. In the
SASS (ptxas + cuobjdump) each of those 16-byte accesses is one LDG.E.128 / STG.E.128.
"""

from __future__ import annotations

import shutil

import pytest

import cuda_widths as cw

_TOOLS = [
    pytest.mark.skipif(cw.find_nvcc() is None, reason="nvcc not found (CUDA_HOME/bin or PATH): the CUDA C++ width "
                                                      "check compiles with it"),
    pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) not found: the check reads the "
                                                               "functors' types from demangled kernel names"),
]


def needs_tools(fn):
    for mark in _TOOLS:
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def rows():
    return cw.table()


def test_parser_counts_widths_and_spaces():
    """The counter sees global and generic accesses (vector, predicated, non-coherent) and skips
    param / shared / local ones, so a narrow or generic access cannot slip past the checks."""
    ptx = """
        ld.global.nc.v4.u32 	{%r1, %r2, %r3, %r4}, [%rd1];
        @%p3 st.global.v4.f32 	[%rd2], {%f1, %f2, %f3, %f4};
        @!%p4 ld.global.v2.f32 	{%f5, %f6}, [%rd3];
        ld.u16 	%rs1, [%rd4];
        st.global.b16 	[%rd5], %rs2;
        ld.param.u64 	%rd6, [param_0];
        ld.shared.f32 	%f7, [%r5];
        st.local.u32 	[%rd7], %r6;
    """
    assert cw.access_widths(ptx) == {("ld", "global", 16): 1, ("st", "global", 16): 1, ("ld", "global", 8): 1,
                                     ("ld", "generic", 2): 1, ("st", "global", 2): 1}


@needs_tools
def test_every_functor_compiles_and_is_checked(rows):
    found = {r["functor"] for r in rows if "functor" in r}
    assert found == set(cw.FUNCTORS), f"functors found: {sorted(found)}"
    unknown = [r["kernel"] for r in rows if "functor" not in r and not any(k in r["kernel"] for k in cw.OTHER_KERNELS)]
    assert not unknown, f"kernels that are neither a checked functor nor a listed exception: {unknown}"


@needs_tools
def test_hot_accesses_are_16_bytes(rows):
    problems = []
    for r in rows:
        if "functor" not in r:
            continue
        v, want = r["vector_only"], r["expected"]
        max_ld, max_st, why = cw.METADATA[r["functor"]]
        name = f"{r['functor']}<{', '.join(r['types'])}>"
        if v["generic"]:
            problems.append(f"{name}: {v['generic']} generic (not global) accesses")
        if v["ld16"] < want["ld16"] or v["st16"] < want["st16"]:
            problems.append(f"{name}: {v['ld16']} / {v['st16']} 16-byte loads / stores, at least {want['ld16']} / "
                            f"{want['st16']} expected (one per 16 bytes of every operand of a round)")
        if v["ld_narrow"] > max_ld or v["st_narrow"] > max_st:
            problems.append(f"{name}: {v['ld_narrow']} loads / {v['st_narrow']} stores narrower than 16 bytes on the "
                            f"vector path, allowed {max_ld} / {max_st} ({why}); loads {v['loads']}, stores "
                            f"{v['stores']}")
    assert not problems, "\n".join(problems)


@needs_tools
def test_sass_keeps_every_16_byte_access_whole(rows):
    """ptxas turned each 16-byte PTX access of the vector path into one LDG.E.128 / STG.E.128."""
    if cw.find_sass_tools() is None:
        pytest.skip("ptxas / cuobjdump not found (CUDA_HOME/bin, PATH, next to nvcc, or Triton's bundled tools)")
    problems = []
    for r in rows:
        if "functor" not in r:
            continue
        v, s = r["vector_only"], r["sass"]
        if (s["ld128"], s["st128"]) != (v["ld16"], v["st16"]):
            problems.append(f"{r['functor']}<{', '.join(r['types'])}>: SASS LDG/STG.E.128 {s['ld128']} / "
                            f"{s['st128']}, PTX 16-byte loads / stores {v['ld16']} / {v['st16']}")
    assert not problems, "\n".join(problems)


@needs_tools
def test_scalar_path_is_the_only_addition(rows):
    """As built, the functors keep the vector path's 16-byte accesses and add the scalar fallback
    (narrow accesses of every operand) that tails and unaligned views need."""
    problems = []
    for r in rows:
        if "functor" not in r:
            continue
        b, v, want = r["built"], r["vector_only"], r["expected"]
        name = f"{r['functor']}<{', '.join(r['types'])}>"
        if (b["ld16"], b["st16"]) != (v["ld16"], v["st16"]):
            problems.append(f"{name}: 16-byte loads / stores {b['ld16']} / {b['st16']} as built, {v['ld16']} / "
                            f"{v['st16']} on the vector path alone")
        if b["generic"]:
            problems.append(f"{name}: {b['generic']} generic (not global) accesses as built")
        extra_ld, extra_st = b["ld_narrow"] - v["ld_narrow"], b["st_narrow"] - v["st_narrow"]
        if extra_ld < want["ld_scalar"] or extra_st < want["st_scalar"]:
            problems.append(f"{name}: the scalar path has {extra_ld} loads / {extra_st} stores, expected at least "
                            f"{want['ld_scalar']} / {want['st_scalar']} (one per operand per element of a round)")
    assert not problems, "\n".join(problems)
