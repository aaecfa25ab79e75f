#!/usr/bin/env bash
# Everything a lent GPU machine runs, in ONE device call of at most 9 minutes (the loan is 15
# minutes in all, machine start included). Results stream into $OUT as they are made, so a
# call cut off at its limit still returns what it measured. In priority order:
#   1. setup      offline set-up (scripts/setup.sh, FASTGEN_OFFLINE=1), fastgen._C built for
#                 sm_90 only (FASTGEN_CUDA_ARCHS=90), in <= 90 s;
#   2. tests      the GPU tier only (pytest -m gpu: not the static, nvcc or interpreter tiers),
#                 a per-test timeout, no -x; then (candidates) every autotune / TMA launch config
#                 once against the reference; the JUnit reports are digested into summary.txt,
#                 grouped by op, with the first line of every failure;
#   3. headline   the headline benchmark (benchmarks/headline.py, default launch configs):
#                 each case appended to headline.jsonl as soon as it is measured;
#   4. sanitizer  compute-sanitizer memcheck over a short list of CUDA C++ tests, with
#                 PYTORCH_NO_CUDA_MEMORY_CACHING=1 so the caching allocator hides no overrun.
# $OUT gets at most 7 files: summary.txt setup.log tests.log tests.xml candidates.xml headline.jsonl sanitizer.log
# Afterwards (on the CPU machine): commit them under benchmarks/results/<device>/ and run
#   fastgen bench --apply-auto benchmarks/results/<device>/    # proposes AUTO_ON_CUDA from the run
#
# Usage:  OUT=/some/dir bash scripts/gpu_suite.sh [WHEELS_DIR]
#   WHEELS_DIR (or FASTGEN_WHEELS): Python 3.12 wheels of the peers (diffusers, liger-kernel,
#   pytest-timeout, ...) installed offline first; see the README for how to fetch them.
#   DRY_RUN=1: every stage's logic with the GPU work skipped (a CPU test runs it; < 3 minutes).
#   SUITE_SECONDS (default 540): the budget the stages share.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export FASTGEN_WHEELS=${1:-${FASTGEN_WHEELS:-}}
export PYTHONUNBUFFERED=1
export FASTGEN_AUTOTUNE=0          # default launch configs (the GPU tier runs every candidate itself)
export FASTGEN_CUDA_ARCHS=${FASTGEN_CUDA_ARCHS:-90}
DRY=${DRY_RUN:-0}
if [ "$DRY" != 1 ]; then
    unset TRITON_INTERPRET
    export FASTGEN_OFFLINE=${FASTGEN_OFFLINE:-1}
fi
BUDGET=${SUITE_SECONDS:-540}
summary="$OUT/summary.txt"
: >"$summary"
status=0
PY=.venv/bin/python

note() { echo "$*" | tee -a "$summary"; }

stage() {  # stage NAME LIMIT_S LOG -- command...
    local name=$1 limit=$2 log=$3
    shift 4
    local t0=$SECONDS rc
    if [ "$limit" -lt 10 ]; then
        note "$(printf '%-10s not run: %ss left of the %ss budget' "$name" "$((BUDGET - SECONDS))" "$BUDGET")"
        status=1
        return 1
    fi
    timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    note "$(printf '%-10s rc=%-3s %4ss (limit %ss)  %s' "$name" "$rc" "$((SECONDS - t0))" "$limit" \
        "$(tail -n 1 "$log" 2>/dev/null | cut -c1-140)")"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}
left() { echo $((BUDGET - SECONDS)); }
share() {  # share PCT CAP: PCT % of the seconds left, at most CAP
    local s=$(( $(left) * $1 / 100 ))
    [ "$s" -gt "$2" ] && s=$2
    echo "$s"
}

{
    date -u
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$( [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ' (dirty)')"
    if [ "$DRY" = 1 ]; then echo "DRY_RUN=1: GPU work skipped"; fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
} >>"$summary"

# 1. set-up ------------------------------------------------------------------------------
if [ "$DRY" = 1 ] && [ -x "$PY" ]; then
    stage setup 60 "$OUT/setup.log" -- "$PY" -c 'import fastgen, torch, triton; print("venv ready (dry run)")'
else
    stage setup "$(share 100 90)" "$OUT/setup.log" -- bash scripts/setup.sh || { cat "$summary"; exit 1; }
fi
"$PY" -m fastgen info >>"$OUT/setup.log" 2>&1

# 2. the GPU tier ------------------------------------------------------------------------
# pytest-timeout and pytest-xdist (carried as wheels when the image lacks them): a per-test
# limit, and the compile-bound tests spread over the CPU cores (the GPU is shared).
extra=(-q -rfE -p no:cacheprovider --durations=10)
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && extra+=(--timeout=90)
"$PY" -c "import xdist" >/dev/null 2>&1 && [ "$DRY" != 1 ] && extra+=(-n 8)
files=()
if [ "$DRY" = 1 ]; then  # on a CPU machine every GPU test skips: the selection, report and digest still run
    files=(tests/test_rms_norm.py tests/test_autotune.py)
fi
# The GPU tier, then every autotune / TMA launch config once (compile-bound: it gets what is left).
stage tests "$(share 55 300)" "$OUT/tests.log" -- "$PY" -m pytest -m "gpu and not candidates" \
    --junitxml="$OUT/tests.xml" "${extra[@]}" "${files[@]}"
stage candidates "$(share 35 150)" "$OUT/tests.log" -- "$PY" -m pytest -m "gpu and candidates" \
    --junitxml="$OUT/candidates.xml" "${extra[@]}" "${files[@]}"
for xml in "$OUT/tests.xml" "$OUT/candidates.xml"; do
    if [ -f "$xml" ]; then
        "$PY" -c 'import sys; from fastgen.recorded_run import digest_tests, format_digest; print(format_digest(digest_tests(sys.argv[1])))' \
            "$xml" >>"$summary" 2>&1
    else
        note "tests      no JUnit report $(basename "$xml") (the run was cut off before pytest wrote it)"
    fi
done

# 3. the headline benchmark --------------------------------------------------------------
headline=(-m fastgen.benchmarks.headline --out "$OUT/headline.jsonl")
[ "$DRY" = 1 ] && headline+=(--dry-run)
stage headline "$(share 80 240)" "$OUT/headline.log" -- "$PY" "${headline[@]}"
tail -n 20 "$OUT/headline.log" >>"$summary" 2>/dev/null
rm -f "$OUT/headline.log"

# 4. compute-sanitizer over the CUDA C++ tests ---------------------------------------------
san_tests=(tests/test_cuda_build.py tests/test_rms_norm.py tests/test_qk_norm_rope_cuda.py tests/test_adamw.py)
san=(compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all
     "$PY" -m pytest -q -p no:cacheprovider -m gpu -k cuda "${san_tests[@]}")
if [ "$DRY" = 1 ]; then
    for f in "${san_tests[@]}"; do [ -f "$f" ] || { note "sanitizer  missing test file $f"; status=1; }; done
    note "sanitizer  dry run: would run PYTORCH_NO_CUDA_MEMORY_CACHING=1 ${san[*]}"
elif command -v compute-sanitizer >/dev/null 2>&1; then
    stage sanitizer "$(share 100 120)" "$OUT/sanitizer.log" -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${san[@]}"
    grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/sanitizer.log" | head -5 >>"$summary"
else
    note "sanitizer  not run: compute-sanitizer is not on PATH"
    status=1
fi

note "gpu_suite: exit $status after ${SECONDS}s"
exit "$status"
