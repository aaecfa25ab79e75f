#!/usr/bin/env bash
# Set up fastgen in ./.venv on a fresh machine; safe to run again (it skips what is done).
#
# - Uses the packages of the Python it is started with (PYTHON, default python3):
#   on a GPU image whose python3 already has torch + Triton, those are used as they are.
# - Otherwise installs torch 2.13.0 (the CPU build where that is what pip finds) and
#   Triton 3.9.0 from PyPI.
# - Installs the build and test tools that are missing, then fastgen itself, editable,
#   building the CUDA extension fastgen._C when nvcc is found.
# - FASTGEN_WHEELS=DIR: also install every wheel in DIR, offline (optional peers such
#   as liger-kernel or diffusers on a machine without network).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
quiet=(-q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    # Let the venv see the packages of the interpreter it was made from (a GPU
    # image's torch and Triton, say); packages installed in the venv come first.
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # Every site-packages folder the parent sees, including those of a parent that is itself a
    # venv (its own base's, added by its .pth files), not only site.getsitepackages().
    "$PY" -c 'import site, sys; ds = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))] + site.getsitepackages() + [site.getusersitepackages()]; ds = list(dict.fromkeys(ds)); print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in ds))' \
        >"$site/_fastgen_parent_site.pth"
fi
VPY="$VENV/bin/python"

have() { "$VPY" -c "import $1" >/dev/null 2>&1; }
# Offline (a GPU machine): FASTGEN_OFFLINE=1, or no answer from the package index within 3 s.
# Then nothing is downloaded: what is missing and only wanted is skipped at once, and pip
# never waits on the network.
if [ -z "${FASTGEN_OFFLINE:-}" ]; then
    if "$VPY" -c 'import socket; socket.create_connection(("pypi.org", 443), timeout=3).close()' >/dev/null 2>&1; then
        FASTGEN_OFFLINE=0
    else
        FASTGEN_OFFLINE=1
    fi
fi
if [ "$FASTGEN_OFFLINE" = 1 ]; then
    quiet+=(--no-index)
fi

if ! have torch; then
    "$VPY" -m pip install "${quiet[@]}" torch==2.13.0
fi
if ! have triton; then
    "$VPY" -m pip install "${quiet[@]}" triton==3.9.0
fi
# Needed to build and test (module:package).
missing=()
for spec in setuptools:setuptools wheel:wheel pybind11:pybind11 ninja:ninja pytest:pytest numpy:numpy; do
    have "${spec%%:*}" || missing+=("${spec#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    "$VPY" -m pip install "${quiet[@]}" "${missing[@]}"
fi
# Wanted: plots, progress bars, the diffusers models the tests compare with, the
# Liger-Kernel peer of the benchmarks (its RoPE adapter is tested on CPU). Offline
# (a GPU machine) they may be missing; what needs them then skips and says so.
wanted=()
# The test references of the optimizers, adapters and quantizers (prodigyopt, schedulefree,
# peft, vector-quantize-pytorch), the text encoders (transformers), safetensors for every
# file, hypothesis for the bad-input fuzzing. torch stays pinned to the one installed
# above, so no peer can pull another torch build.
for spec in pytest_benchmark:pytest-benchmark matplotlib:matplotlib tqdm:tqdm diffusers:diffusers \
    liger_kernel:liger-kernel safetensors:safetensors transformers:transformers peft:peft \
    prodigyopt:prodigyopt schedulefree:schedulefree vector_quantize_pytorch:vector-quantize-pytorch \
    hypothesis:hypothesis pytest_timeout:pytest-timeout; do
    have "${spec%%:*}" || wanted+=("${spec#*:}")
done
if [ ${#wanted[@]} -gt 0 ] && [ "$FASTGEN_OFFLINE" = 1 ]; then
    echo "setup.sh: offline; not installing ${wanted[*]} (what needs them skips and says so)" >&2
elif [ ${#wanted[@]} -gt 0 ]; then
    pin=$(mktemp)
    "$VPY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$pin"
    "$VPY" -m pip install "${quiet[@]}" -c "$pin" "${wanted[@]}" \
        || echo "setup.sh: could not install ${wanted[*]} (offline?); continuing without them" >&2
fi
if [ -n "${FASTGEN_WHEELS:-}" ]; then
    shopt -s nullglob
    wheels=("$FASTGEN_WHEELS"/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        "$VPY" -m pip install "${quiet[@]}" --no-index --no-deps "${wheels[@]}"
    fi
fi

# fastgen itself: editable, with the tools above (no build isolation: works offline).
if ! "$VPY" -c 'import fastgen, fastgen.kernels, fastgen.benchmarks' >/dev/null 2>&1 \
    || [ setup.py -nt "$VENV/.fastgen-installed" ] \
    || [ -n "$(find csrc -newer "$VENV/.fastgen-installed" -print -quit 2>/dev/null)" ]; then
    "$VPY" -m pip install "${quiet[@]}" --no-build-isolation --no-deps -e .
    touch "$VENV/.fastgen-installed"
fi
# nvcc found and the build not skipped: fastgen._C must import, or the CUDA tier would only skip.
skip_cuda=$(echo "${FASTGEN_SKIP_CUDA_BUILD:-0}" | tr '[:upper:]' '[:lower:]')
if { [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ] || command -v nvcc >/dev/null 2>&1; } \
    && ! [[ "$skip_cuda" =~ ^(1|true|yes|on)$ ]] && ! "$VPY" -c 'import fastgen._C' 2>/dev/null; then
    echo "setup.sh: nvcc is present but fastgen._C did not build or does not import:" >&2
    "$VPY" -c 'import fastgen._C' >&2 || true
    echo "setup.sh: rebuild with '$VPY -m pip install --no-build-isolation --no-deps -e .' and read its errors," >&2
    echo "          or set FASTGEN_SKIP_CUDA_BUILD=1 to go on without the CUDA C++ backend" >&2
    exit 1
fi
"$VPY" -c 'import fastgen, torch, triton; print(f"fastgen {fastgen.__version__} ready: torch {torch.__version__}, triton {triton.__version__}")'
