#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one go, inside one 10-minute device call:
#   1. set-up (scripts/setup.sh: builds fastgen._C with the image's nvcc; offline),
#      plus optional peer wheels (liger-kernel, diffusers, ...) from a folder;
#   2. the whole test suite on the GPU (the CPU tier's tests run on CUDA tensors there,
#      and the `gpu` tier at real sizes, Triton and CUDA C++);
#   3. compute-sanitizer memcheck over the CUDA C++ tests;
#   4. the full `fastgen bench`.
# Results land in $OUT (at most 8 files, at most one folder down):
#   summary.txt  setup.log  tests.log  sanitizer.log  bench/results.{json,md}  bench/plots.tar.gz
# Commit bench/results.* and the unpacked plots to benchmarks/results/<device>/ and quote
# summary.txt in the closing note.
#
# Usage:  OUT=/some/dir bash scripts/gpu_suite.sh [WHEELS_DIR]
#         (WHEELS_DIR, or FASTGEN_WHEELS: a folder of .whl files to install offline first)
#         STAGES="tests sanitizer bench" (default: all three) runs a subset, e.g. a
#         second call with STAGES=bench when the first ran out of time.
#         STAGES=models (in a call of its own: it builds and compiles SD3-medium, the SDXL
#         UNet, a Flux block stack and the SDXL VAE) runs `fastgen bench --ops models`
#         into $OUT/models/results.{json,md}.
#         The full bench runs with FASTGEN_AUTOTUNE=0 (each kernel's default launch config):
#         tuning compiles and times every candidate tile once per shape class, which for
#         attention (up to ~10 tiles x 3 kernels per head dim) does not fit the shared call.
#         STAGES=tuned (a call of its own) runs `fastgen bench --ops attention` with the tuner
#         on (TMA tiles included on Hopper) into $OUT/tuned/results.{json,md}.
#         STAGES=vae (also a call of its own) runs the VAE decode sweep of
#         benchmarks/bench_vae.py over 1024..8192 px images (full, diffusers-tiled, fastgen-tiled,
#         colour-consistent: time and peak memory) into $OUT/vae/sweep.{json,png}.
# Each stage has a time limit (the whole suite fits the device tool's 600 s per call;
# SUITE_SECONDS changes the budget) so that the logs come back even when one hangs; an
# interrupted bench still writes the rows it measured. The exit status is non-zero when
# any stage failed. When one call is not enough, run STAGES="tests sanitizer" and then
# STAGES=bench in a second call.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export FASTGEN_WHEELS=${1:-${FASTGEN_WHEELS:-}}
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
summary="$OUT/summary.txt"
: >"$summary"
status=0

stage() {  # stage NAME LIMIT_S LOG -- command...
    local name=$1 limit=$2 log=$3
    shift 4
    local t0=$SECONDS rc
    timeout --signal=INT --kill-after=20 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$log" | cut -c1-150)" | tee -a "$summary"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
} >>"$summary"

STAGES=${STAGES:-tests sanitizer bench}
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
BUDGET=${SUITE_SECONDS:-560}  # the device tool allows 600 s per call
# What is left of the budget after setup is shared among the chosen stages by weight.
weight() { case $1 in tests) echo 5 ;; sanitizer) echo 2 ;; bench) echo 4 ;; *) echo 4 ;; esac; }
limit_for() {  # limit_for STAGE: its share of the seconds left among it and the stages after it
    local total=0 s after=0
    for s in tests sanitizer bench tuned models vae; do
        [ "$s" = "$1" ] && after=1
        if [ "$after" = 1 ] && want "$s"; then total=$((total + $(weight "$s"))); fi
    done
    local left=$((BUDGET - SECONDS))
    echo $(( left * $(weight "$1") / (total > 0 ? total : 1) ))
}

stage setup 150 "$OUT/setup.log" -- bash scripts/setup.sh || { cat "$summary"; exit 1; }
.venv/bin/fastgen info >>"$OUT/setup.log" 2>&1

# pytest-xdist (in the GPU image) spreads the tests over the CPU cores; the GPU is shared.
xdist=()
.venv/bin/python -c "import xdist" >/dev/null 2>&1 && xdist=(-n 8)

if want tests; then
    stage tests "$(limit_for tests)" "$OUT/tests.log" -- .venv/bin/python -m pytest -q -ra -p no:cacheprovider \
        --durations=15 "${xdist[@]}"
fi

if ! want sanitizer; then
    :
elif command -v compute-sanitizer >/dev/null 2>&1; then
    # Every test whose id names the CUDA C++ backend, under memcheck.
    stage sanitizer "$(limit_for sanitizer)" "$OUT/sanitizer.log" -- compute-sanitizer --tool memcheck \
        --error-exitcode 99 --target-processes all .venv/bin/python -m pytest -q -x -p no:cacheprovider -k cuda \
        tests/test_rms_norm.py tests/test_cuda_build.py tests/test_rope.py tests/test_group_norm.py \
        tests/test_adamw.py tests/test_lion_clip_ema.py tests/test_qk_norm_rope_cuda.py tests/test_qk_norm_rope.py
else
    echo "sanitizer  not run: compute-sanitizer is not on PATH" | tee -a "$summary"
    status=1
fi

if want bench; then
    full=$(mktemp -d)
    stage bench "$(limit_for bench)" "$OUT/bench.log" -- env FASTGEN_AUTOTUNE=0 .venv/bin/fastgen bench \
        --no-progress --out "$full"
    # Keep the file count within what comes back: the table and JSON as they are, the
    # plots (one PNG per op) in one archive.
    mkdir -p "$OUT/bench"
    cp "$full"/results.json "$full"/results.md "$OUT/bench/" 2>/dev/null
    (cd "$full" && ls ./*.png >/dev/null 2>&1 && tar czf "$OUT/bench/plots.tar.gz" ./*.png)
    tail -n 80 "$OUT/bench.log" >>"$summary"
    rm -f "$OUT/bench.log"
fi

if want tuned; then
    mkdir -p "$OUT/tuned"
    stage tuned "$(limit_for tuned)" "$OUT/tuned.log" -- env FASTGEN_AUTOTUNE=1 .venv/bin/fastgen bench \
        --ops attention --no-progress --out "$OUT/tuned"
    rm -f "$OUT/tuned"/*.png
    tail -n 40 "$OUT/tuned.log" >>"$summary"
    rm -f "$OUT/tuned.log"
fi

if want models; then
    mkdir -p "$OUT/models"
    stage models "$(limit_for models)" "$OUT/models.log" -- .venv/bin/fastgen bench --ops models --no-progress \
        --out "$OUT/models"
    rm -f "$OUT/models"/*.png
    tail -n 40 "$OUT/models.log" >>"$summary"
    rm -f "$OUT/models.log"
fi

if want vae; then
    mkdir -p "$OUT/vae"
    stage vae "$(limit_for vae)" "$OUT/vae.log" -- .venv/bin/python -m fastgen.benchmarks.bench_vae \
        --sizes 128 256 512 1024 --tile 128 --out "$OUT/vae/sweep.json" --plot "$OUT/vae/sweep.png"
    tail -n 40 "$OUT/vae.log" >>"$summary"
    rm -f "$OUT/vae.log"
fi

echo "gpu_suite: exit $status" | tee -a "$summary"
exit "$status"
