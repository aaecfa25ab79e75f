"""Build and install fastgen.

Python packages: ``fastgen`` and its subpackages, plus ``fastgen.kernels``
(from the top-level ``kernels/`` folder) and ``fastgen.benchmarks`` (from
``benchmarks/``). There is never a top-level module called ``kernels``.

CUDA extension ``fastgen._C`` (pybind11 + nvcc + ninja, no torch headers,
CUDA runtime linked statically): built when nvcc is found, as
``$CUDA_HOME/bin/nvcc`` or on PATH, unless ``FASTGEN_SKIP_CUDA_BUILD=1``.
Without nvcc the pure-Python package is installed and a notice printed. With
nvcc, a failed compilation fails the install.

Environment:
    FASTGEN_SKIP_CUDA_BUILD=1   do not build fastgen._C
    FASTGEN_CUDA_ARCHS="80;90"  SM architectures (cubins), plus PTX of the newest
    MAX_JOBS                    parallel compile jobs (default: os.cpu_count())
    CUDA_HOME / CUDA_PATH       where to look for bin/nvcc first
    NVCC_APPEND_FLAGS etc.      honoured by nvcc itself

Install: ``pip install --no-build-isolation -e .`` (editable) or ``pip install .``
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90"


def _log(msg: str) -> None:
    print(f"[fastgen setup] {msg}", file=sys.stderr, flush=True)


def find_nvcc():
    """Path of nvcc: $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else on PATH; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def parse_archs(spec: str) -> list[int]:
    """'80;90' / '8.0 9.0' / '80,90' -> [80, 90] (sorted, unique)."""
    archs = set()
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        tok = tok.lower().removeprefix("sm_").removeprefix("compute_")
        m = re.fullmatch(r"(\d+)\.(\d)|(\d+)", tok)
        if not m:
            raise ValueError(f"FASTGEN_CUDA_ARCHS: cannot parse {tok!r} in {spec!r} (expected e.g. '80;90')")
        archs.add(int(m.group(1)) * 10 + int(m.group(2)) if m.group(1) else int(m.group(3)))
    if not archs:
        raise ValueError(f"FASTGEN_CUDA_ARCHS={spec!r} names no architecture")
    return sorted(archs)


def skip_cuda_build() -> bool:
    return os.environ.get("FASTGEN_SKIP_CUDA_BUILD", "0").strip().lower() in ("1", "true", "yes", "on")


def find_ninja() -> str:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja  # the PyPI package ships the binary

        cand = Path(ninja.BIN_DIR) / "ninja"
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    raise RuntimeError("fastgen: building fastgen._C needs ninja (pip install ninja), or set FASTGEN_SKIP_CUDA_BUILD=1")


class NinjaNvccBuildExt(build_ext):
    """Builds fastgen._C with nvcc through a generated build.ninja.

    .cu files and bindings.cpp are compiled by nvcc (one ninja edge each), then
    nvcc links them into a shared library with the CUDA runtime linked
    statically, at self.get_ext_fullpath(ext.name) (so inplace / editable
    installs put it next to fastgen/__init__.py).
    """

    def build_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc is None:  # decided at setup() time already; be safe
            raise RuntimeError("fastgen: nvcc disappeared between configuration and build")
        import pybind11

        archs = parse_archs(os.environ.get("FASTGEN_CUDA_ARCHS", DEFAULT_ARCHS))
        ptx = archs[-1]
        version = nvcc_version(nvcc)
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = (Path(self.build_temp) / "fastgen_C").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        includes = [str(CSRC), pybind11.get_include(), sysconfig.get_paths()["include"]]
        plat_inc = sysconfig.get_paths().get("platinclude")
        if plat_inc and plat_inc not in includes:
            includes.append(plat_inc)
        inc_flags = " ".join(f"-I{shlex.quote(p)}" for p in includes)

        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
        cu_flags = common + ["-lineinfo"] + gencode
        defines = [
            f"-DFASTGEN_ARCHS={shlex.quote(chr(34) + ','.join(map(str, archs)) + chr(34))}",
            f"-DFASTGEN_PTX_ARCH={ptx}",
            f"-DFASTGEN_NVCC_VERSION={shlex.quote(chr(34) + version + chr(34))}",
        ]
        cxx_flags = common + defines
        ldflags = ["-shared", "-cudart=static", "-Xlinker", "--exclude-libs,ALL", "-Xlinker", "--as-needed"]

        cu_sources = sorted(CSRC.rglob("*.cu"))
        cpp_sources = [CSRC / "bindings.cpp"]

        def obj_for(src: Path) -> str:
            rel = src.relative_to(CSRC)
            return str(build_dir / (str(rel).replace(os.sep, "_") + ".o"))

        def esc(p) -> str:  # ninja path escaping
            return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        lines = [
            "# generated by fastgen setup.py; do not edit",
            "ninja_required_version = 1.3",
            f"nvcc = {shlex.quote(nvcc)}",
            f"cu_flags = {' '.join(cu_flags)} {inc_flags}",
            f"cxx_flags = {' '.join(cxx_flags)} {inc_flags}",
            f"ldflags = {' '.join(ldflags)}",
            "",
            "rule cu",
            "  command = $nvcc $cu_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = NVCC $in",
            "",
            "rule cxx",
            "  command = $nvcc -x c++ $cxx_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
            "",
            "rule link",
            "  command = $nvcc $ldflags $in -o $out",
            "  description = LINK $out",
            "",
        ]
        objs = []
        for src in cu_sources:
            o = obj_for(src)
            objs.append(o)
            lines.append(f"build {esc(o)}: cu {esc(src)}")
        for src in cpp_sources:
            o = obj_for(src)
            objs.append(o)
            lines.append(f"build {esc(o)}: cxx {esc(src)}")
        lines.append(f"build {esc(out)}: link {' '.join(esc(o) for o in objs)}")
        lines.append(f"default {esc(out)}")
        new = "\n".join(lines) + "\n"
        ninja_file = build_dir / "build.ninja"
        if not ninja_file.exists() or ninja_file.read_text() != new:
            ninja_file.write_text(new)

        _log(f"building fastgen._C with {nvcc} (CUDA {version}), archs {archs} + PTX {ptx}, {jobs} jobs")
        t0 = time.time()
        cmd = [find_ninja(), "-f", str(ninja_file), "-j", str(jobs)]
        if self.verbose:
            cmd.append("-v")
        try:
            subprocess.run(cmd, cwd=build_dir, check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                "fastgen: compiling the CUDA extension fastgen._C failed (see the nvcc output above). "
                "Fix the sources, or install without it: FASTGEN_SKIP_CUDA_BUILD=1 pip install --no-build-isolation ."
            ) from e
        _log(f"built {out} in {time.time() - t0:.1f}s")


def cuda_extensions():
    if skip_cuda_build():
        _log("FASTGEN_SKIP_CUDA_BUILD=1: not building the CUDA extension fastgen._C (pure-Python install).")
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        _log(
            "NOTICE: nvcc was not found ($CUDA_HOME/bin/nvcc or on PATH): not building the CUDA extension "
            "fastgen._C; installing the pure-Python package (Triton and torch backends only). To build it, "
            "reinstall with nvcc on PATH: pip install --no-build-isolation -e ."
        )
        return []
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.rglob("*.cu"))] + ["csrc/bindings.cpp"]
    return [Extension("fastgen._C", sources=sources)]


def packages_and_dirs():
    pkgs = find_packages(include=["fastgen", "fastgen.*"])
    if "fastgen" not in pkgs:
        pkgs.insert(0, "fastgen")
    package_dir = {}
    for folder, name in (("kernels", "fastgen.kernels"), ("benchmarks", "fastgen.benchmarks")):
        package_dir[name] = folder
        pkgs.append(name)
        for sub in find_packages(where=folder):
            pkgs.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return pkgs, package_dir


PACKAGES, PACKAGE_DIR = packages_and_dirs()

setup(
    name="fastgen",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for generative models, for PyTorch",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=["torch>=2.11", "triton>=3.6", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["fastgen = fastgen.cli:main"]},
    ext_modules=cuda_extensions(),
    cmdclass={"build_ext": NinjaNvccBuildExt},
    zip_safe=False,
)
