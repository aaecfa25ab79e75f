"""The CUDA C++ sources and the fastgen._C extension.

CPU tier: every csrc/**/*.cu compiles with nvcc for sm_80 and sm_90 (skipped
when nvcc is absent); fastgen._C imports, reports its build and fails cleanly
without a GPU. GPU tier (``-m gpu``): fastgen.cuda.rms_norm against a float64
torch reference.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import c_entry

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HAS_CUDA = torch.cuda.is_available()


def _nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
SKIP_BUILD = os.environ.get("FASTGEN_SKIP_CUDA_BUILD", "0").strip().lower() in ("1", "true", "yes", "on")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _run_nvcc(args, tmp_path):
    proc = subprocess.run([NVCC, *args], cwd=tmp_path, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"nvcc failed ({proc.returncode}): {' '.join(args)}\n--- stderr ---\n{proc.stderr}\n"
                    f"--- stdout ---\n{proc.stdout}", pytrace=False)
    return proc


CU_FILES = sorted(CSRC.rglob("*.cu"))


@needs_nvcc
@pytest.mark.parametrize("src", CU_FILES, ids=[str(p.relative_to(CSRC)) for p in CU_FILES])
def test_cu_compiles_sm80_sm90(src, tmp_path):
    """Each .cu compiles to an object with cubins for sm_80 and sm_90 (no -use_fast_math),
    and ptxas reports no register spills in any kernel for either arch."""
    proc = _run_nvcc(["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--threads", "2", "-Xptxas", "-v",
                      "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                      f"-I{CSRC}", "-c", str(src), "-o", str(tmp_path / "out.o")], tmp_path)
    assert (tmp_path / "out.o").stat().st_size > 0
    report = proc.stdout + proc.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", report)
    assert {arch for _, arch in kernels} >= {"sm_80", "sm_90"}, report[-2000:]
    spills = [
        (name, arch, line)
        for (name, arch), line in zip(kernels, re.findall(r".*bytes spill stores.*", report))
        if not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", line)
    ]
    assert not spills, "register spills:\n" + "\n".join(map(str, spills))


@needs_nvcc
def test_bindings_compile(tmp_path):
    """csrc/bindings.cpp compiles (host only, -O0) against pybind11 and Python headers."""
    pybind11 = pytest.importorskip("pybind11")
    import sysconfig

    _run_nvcc(["-x", "c++", "-O0", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
               "-c", str(CSRC / "bindings.cpp"), "-o", str(tmp_path / "bindings.o")], tmp_path)


def test_no_fast_math_in_setup():
    """rsqrt accuracy close to torch: the build must not use fast math."""
    text = (ROOT / "setup.py").read_text()
    assert "fast_math" not in text and "fmad=false" not in text


def _expected_archs():
    spec = os.environ.get("FASTGEN_CUDA_ARCHS", "80;90")
    return sorted({int(t) for t in re.split(r"[;,\s]+", spec.replace(".", "")) if t.isdigit()})


def _import_C():
    if SKIP_BUILD:
        pytest.skip("FASTGEN_SKIP_CUDA_BUILD=1: fastgen._C is not built")
    try:
        from fastgen import _C
    except ImportError as exc:
        if NVCC is None:
            pytest.skip("nvcc not found (fastgen._C is only built where nvcc is present)")
        pytest.fail(f"nvcc is present but fastgen._C does not import ({exc}); reinstall: "
                    "pip install --no-build-isolation -e .", pytrace=False)
    return _C


def test_extension_imports_and_build_info():
    C = _import_C()
    info = C.build_info()
    for key in ("archs", "ptx", "cuda_version", "nvcc_version", "compiled_with"):
        assert key in info, key
    archs = info["archs"]
    assert all(isinstance(a, int) for a in archs)
    for a in _expected_archs():
        assert a in archs, f"sm_{a} missing from fastgen._C build_info()['archs'] = {archs}"
    assert info["ptx"] == max(archs)
    assert info["cuda_version"].isdigit()
    n = C.device_count()
    assert isinstance(n, int) and n >= 0
    if not HAS_CUDA:
        assert n == 0


def test_extension_info():
    from fastgen.cuda import extension_info, load_extension

    info = extension_info()
    assert isinstance(info["built"], bool)
    if info["built"]:
        assert info["error"] is None and "archs" in info
        assert load_extension() is load_extension()
    else:
        assert "fastgen._C" in info["error"]
        with pytest.raises(RuntimeError, match="pip install"):
            load_extension()


def test_extension_argument_errors():
    C = _import_C()
    # unsupported dtype codes -> ValueError, before anything touches the GPU
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "rms_norm_fwd", 0, 0, 0, 0, 0, 0, 4, 8, 8, 0, 5, 5, 1e-6, 0)
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "rms_norm_fwd", 0, 0, 0, 0, 0, 0, 4, 8, 8, 0, 1, 2, 1e-6, 0)  # fp16 x, bf16 w
    with pytest.raises(ValueError, match="unsupported dtypes"):
        c_entry(C, "rms_norm_bwd", 0, 0, 0, 0, 0, 0, 0, 4, 8, 8, 8, 0, 0, 3, 1, 0)  # fp32 x, fp16 w
    with pytest.raises(ValueError):
        c_entry(C, "rms_norm_fwd", 0, 0, 0, 0, 0, 0, -1, 8, 8, 0, 0, 0, 1e-6, 0)
    # empty problems return without launching
    c_entry(C, "rms_norm_fwd", 0, 0, 0, 0, 0, 0, 0, 8, 8, 0, 0, 0, 1e-6, 0)
    c_entry(C, "rms_norm_fwd", 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 2, 0, 1e-6, 0)
    c_entry(C, "rms_norm_bwd", 0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 0, 1, 1, 0, 0)


def test_parameter_structs_refuse_misspelled_and_missing_fields():
    """Every entry point but the optimizers' takes one struct filled by name: a misspelled field
    is an AttributeError, a field left unset a ValueError that names it, before any launch."""
    C = _import_C()
    for name in ("RmsNormFwdParams", "RmsNormBwdParams", "GroupNormFwdParams", "GroupNormBwdParams",
                 "ApplyRopeParams", "QkNormRopeFwdParams", "QkNormRopeBwdParams"):
        params = getattr(C, name)
        assert params.fields[-1] == "stream" and len(set(params.fields)) == len(params.fields)
        with pytest.raises(AttributeError):
            params(not_a_field=0)
        p = params()
        with pytest.raises(AttributeError):
            p.strid_x = 1
    with pytest.raises(ValueError, match="rms_norm_fwd: fields not set: eps, stream"):
        C.rms_norm_fwd(C.RmsNormFwdParams(**dict(zip(C.RmsNormFwdParams.fields[:-2], [0] * 12))))
    with pytest.raises(ValueError, match="qk_norm_rope_bwd: fields not set: dqo_ptr, dko_ptr, .*, stream$"):
        C.qk_norm_rope_bwd(C.QkNormRopeBwdParams())
    with pytest.raises(TypeError):  # positional pointers are gone
        C.rms_norm_fwd(0, 0, 0, 0, 0, 0, 0, 8, 8, 0, 0, 0, 1e-6, 0)
    # filled by name, the same call as before: an empty problem returns without launching
    c_entry(C, "rms_norm_fwd", x_ptr=0, w_ptr=0, r_ptr=0, y_ptr=0, h_ptr=0, rstd_ptr=0, M=0, N=8, stride_x=8,
            stride_r=0, x_dtype=0, w_dtype=0, eps=1e-6, stream=0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error path")
def test_launch_without_gpu_raises_runtime_error():
    C = _import_C()
    if C.device_count() != 0:
        pytest.skip("a CUDA device is visible to fastgen._C")
    with pytest.raises(RuntimeError, match="CUDA error"):
        c_entry(C, "rms_norm_fwd", 256, 0, 0, 512, 0, 1024, 4, 8, 8, 0, 0, 0, 1e-6, 0)


# ----------------------------------------------------------------------------- GPU tier

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
NS = [1, 7, 123, 1024, 4096, 65536, 70000, 131072]  # 65536: bf16/fp16 rows kept in registers at 8 vectors per thread
# (weight, fp32 weight, residual, dh_out)
CASES = [
    (True, False, True, True),
    (False, False, False, False),
    (True, False, False, False),
    (True, True, True, False),
    (False, False, True, True),
]


def _rows(N):
    return 37 if N <= 4096 else 6


def _ref_fwd(x, w, r, eps):
    """float64 reference from the same rounded inputs; h rounded to x.dtype as the kernels store it."""
    h = x if r is None else (x + r)  # torch adds in fp32 and rounds once, like the kernel
    hd = h.double()
    rstd = torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)
    y = hd * rstd
    if w is not None:
        y = y * w.double()
    return y, h, rstd.squeeze(-1)


def _ref_bwd(dy, h, w, rstd, dh):
    hd, dyd, rs = h.double(), dy.double(), rstd.double().unsqueeze(-1)
    xhat = hd * rs
    g = dyd * (w.double() if w is not None else 1.0)
    dx = rs * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.double()
    dw = (dyd * xhat).sum(0) if w is not None else None
    return dx, dw


class _CudaRmsNorm:
    """The CUDA C++ RMSNorm launchers with their outputs allocated by the op (fastgen.ops.rms_norm
    allocates, the launchers in fastgen.cuda.rms_norm only launch); None for absent outputs."""

    @staticmethod
    def rms_norm_fwd(x, w, r, eps):
        import fastgen.ops.rms_norm  # noqa: F401  (registers torch.ops.fastgen.rms_norm_*)

        y, h, rstd = torch.ops.fastgen.rms_norm_fwd(x, w, r, eps, "cuda")
        return y, (h if r is not None else None), rstd

    @staticmethod
    def rms_norm_bwd(dy, h, w, rstd, dh):
        import fastgen.ops.rms_norm  # noqa: F401

        dx, dw = torch.ops.fastgen.rms_norm_bwd(dy, h, w, rstd, dh, "cuda")
        return dx, (dw if w is not None else None)


def _close(actual, expected, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "w%d_w32%d_r%d_dh%d" % c)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", NS)
def test_cuda_rms_norm_matches_reference(N, dtype, case, strided=False):
    K = _CudaRmsNorm

    has_w, w32, has_r, has_dh = case
    if w32 and dtype == torch.float32:
        pytest.skip("fp32 weight with fp32 input is the plain case")
    torch.manual_seed(N)
    M, dev, eps = _rows(N), "cuda", 1e-6
    if strided:  # rows of a wider buffer, unit stride along N
        x = torch.randn(M, N + 24, device=dev, dtype=dtype)[:, 5:5 + N]
    else:
        x = torch.randn(M, N, device=dev, dtype=dtype)
    w = None
    if has_w:
        w = (1 + 0.5 * torch.randn(N, device=dev)).to(torch.float32 if w32 else dtype)
    r = torch.randn(M, N, device=dev, dtype=dtype) if has_r else None

    y, h, rstd = K.rms_norm_fwd(x, w, r, eps)
    y_ref, h_ref, rstd_ref = _ref_fwd(x, w, r, eps)
    assert y.shape == (M, N) and y.dtype == dtype and y.is_contiguous()
    assert rstd.shape == (M,) and rstd.dtype == torch.float32
    if has_r:
        assert h is not None and h.dtype == dtype
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    else:
        assert h is None
    _close(rstd, rstd_ref, torch.float32, "rstd")
    _close(y, y_ref, dtype, "y")

    dy = torch.randn(M, N, device=dev, dtype=dtype)
    dh = torch.randn(M, N, device=dev, dtype=dtype) if has_dh else None
    h_in = h if has_r else x
    dx, dw = K.rms_norm_bwd(dy, h_in, w, rstd, dh)
    dx_ref, dw_ref = _ref_bwd(dy, h_in, w, rstd_ref, dh)
    assert dx.shape == (M, N) and dx.dtype == dtype and dx.is_contiguous()
    _close(dx, dx_ref, dtype, "dx")
    if has_w:
        assert dw is not None and dw.dtype == w.dtype and dw.shape == (N,)
        # a sum over M rows: scale the tolerance with the row count
        _close(dw, dw_ref, w.dtype if w.dtype != torch.float32 else dtype, "dw", scale=max(1.0, M ** 0.5))
        dx2, dw2 = K.rms_norm_bwd(dy, h_in, w, rstd, dh)
        assert torch.equal(dw, dw2) and torch.equal(dx, dx2), "backward must be deterministic"
    else:
        assert dw is None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [7, 1024, 70000])
def test_cuda_rms_norm_row_strided(N, dtype):
    test_cuda_rms_norm_matches_reference(N, dtype, (True, False, True, True), strided=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 3, 1000, 20000])
def test_cuda_rms_norm_many_rows(M):
    """More rows than backward partials (several rows per block) and odd row counts."""
    K = _CudaRmsNorm

    torch.manual_seed(M)
    for N, dtype in ((64, torch.bfloat16), (768, torch.float16), (5001, torch.float32)):
        x = torch.randn(M, N, device="cuda", dtype=dtype)
        w = torch.randn(N, device="cuda", dtype=dtype)
        y, _, rstd = K.rms_norm_fwd(x, w, None, 1e-5)
        y_ref, _, rstd_ref = _ref_fwd(x, w, None, 1e-5)
        _close(y, y_ref, dtype, "y")
        dy = torch.randn_like(x)
        dx, dw = K.rms_norm_bwd(dy, x, w, rstd, None)
        dx_ref, dw_ref = _ref_bwd(dy, x, w, rstd_ref, None)
        _close(dx, dx_ref, dtype, "dx")
        _close(dw, dw_ref, dtype, "dw", scale=max(1.0, M ** 0.5))


def test_cuda_launchers_fill_every_field_by_name():
    """The launchers in fastgen/cuda (which run only on a GPU) name exactly the fields of each
    struct they fill: read from their source, so a typo or a forgotten field fails here on CPU."""
    import ast

    C = _import_C()
    found, filled = 0, set()
    for path in sorted((ROOT / "fastgen" / "cuda").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr.endswith("Params")):
                continue
            names = set()
            for kw in call.keywords:
                if kw.arg is not None:
                    names.add(kw.arg)
                elif kw.value.func.id == "named_strides":
                    names |= {k.arg + axis for k in kw.value.keywords for axis in "bsh"}
                else:
                    assert kw.value.func.id == "named_tables", ast.dump(kw.value)
                    names |= {"scb", "scs", "ssb", "sss"}
            fields = set(getattr(C, call.func.attr).fields)
            filled.add(call.func.attr)
            assert names == fields, f"{path.name}: {call.func.attr} missing {fields - names}, unknown {names - fields}"
            found += 1
    structs = {n for n in dir(C) if n.endswith("Params")}
    assert found >= len(structs) and filled == structs, f"filled {sorted(filled)}, structs {sorted(structs)}"
