"""A recorded GPU run, read back: which tests passed per op and implementation, and what
``AUTO_ON_CUDA`` it justifies.

``scripts/gpu_suite.sh`` leaves, in its ``$OUT``:

- ``tests.xml`` and ``candidates.xml``: the GPU tier's JUnit reports (``pytest -m gpu --junitxml``);
- ``headline.jsonl`` (and/or ``bench/results.json``): benchmark rows with ``op``, ``variant``,
  ``provider``, ``status`` and ``speedup_vs_torch``.

:func:`digest_tests` turns the JUnit report into per-op, per-implementation counts and the
first line of every failure (``summary.txt`` prints them grouped by op). :func:`propose`
reads both and proposes the table: an op gets ``"triton"`` or ``"cuda"`` only if **every** GPU
test of that op and implementation passed in that run (at least one ran, none failed) **and**
that implementation beat the eager reference there (geometric mean of ``speedup_vs_torch``
over its rows > 1; the faster of the two where both qualify). Everything else stays
``"torch"``. ``fastgen bench --apply-auto RUN`` prints the diff with the evidence and, with
``--write``, edits ``fastgen/backend.py``.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

IMPLS = ("triton", "cuda")

# Test file -> the ops whose kernels it tests; a test's name picks one when it names it.
TEST_FILES: dict[str, tuple[str, ...]] = {
    "test_rms_norm": ("rms_norm",),
    "test_cuda_build": ("rms_norm",),
    "test_layer_norm": ("layer_norm",),
    "test_modulate": ("layer_norm_modulate", "rms_norm_modulate", "gated_residual",
                      "gated_residual_layer_norm_modulate"),
    "test_group_norm": ("group_norm",),
    "test_rope": ("apply_rope",),
    "test_qk_norm_rope": ("qk_norm_rope",),
    "test_qk_norm_rope_cuda": ("qk_norm_rope",),
    "test_attention": ("attention",),
    "test_autotune": ("attention",),
    "test_glu": ("glu",),
    "test_adamw": ("adamw",),
    "test_lion_clip_ema": ("lion", "clip_grad_norm_", "ema"),
}
# Benchmark (op, variant) -> the AUTO_ON_CUDA op it measures.
BENCH_OPS: dict[tuple[str, str], str] = {
    ("layer_norm", "modulate"): "layer_norm_modulate",
    ("layer_norm", "gated"): "gated_residual_layer_norm_modulate",
    ("rope", ""): "apply_rope", ("rope", "halves"): "apply_rope", ("rope", "interleaved"): "apply_rope",
    ("rope", "qk_norm"): "qk_norm_rope",
    ("clip_grad_norm", ""): "clip_grad_norm_",
}
_KEYWORDS = {"lion": "lion", "clip": "clip_grad_norm_", "ema": "ema", "rms_norm_modulate": "rms_norm_modulate",
             "gated": "gated_residual_layer_norm_modulate", "layer_norm_modulate": "layer_norm_modulate"}


def _ops_of(module: str, name: str) -> tuple[str, ...]:
    ops = TEST_FILES.get(module, ())
    if len(ops) > 1:
        named = tuple(op for key, op in _KEYWORDS.items() if key in name.lower() and op in ops)
        return named or ops
    return ops


def _impls_of(name: str) -> tuple[str, ...]:
    named = tuple(i for i in IMPLS if re.search(rf"(?<![a-z]){i}(?![a-z])", name.lower()))
    return named or IMPLS  # a test that names neither checks the op through both (or through "auto")


def digest_tests(*junit_xml: str | Path) -> dict[str, Any]:
    """{"ops": {op: {impl: {"passed", "failed", "skipped"}}}, "failures": {op: [first lines]},
    "totals": {...}} from one or more JUnit XML reports."""
    cases = [c for path in junit_xml for c in ET.parse(path).getroot().iter("testcase")]
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: {i: {"passed": 0, "failed": 0, "skipped": 0}
                                                                        for i in IMPLS})
    failures: dict[str, list[str]] = defaultdict(list)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        module = (case.get("classname") or "").split(".")[-1]
        name = case.get("name") or ""
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        outcome = "failed" if bad is not None else ("skipped" if case.find("skipped") is not None else "passed")
        totals[outcome] += 1
        ops = _ops_of(module, name) or (f"(other: {module})",)
        for op in ops:
            for impl in _impls_of(name):
                counts[op][impl][outcome] += 1
        if bad is not None:
            text = (bad.get("message") or bad.text or "").strip().splitlines()
            first = text[0][:200] if text else "(no message)"
            for op in ops:
                failures[op].append(f"{module}::{name}: {first}")
    return {"ops": {k: v for k, v in counts.items()}, "failures": dict(failures), "totals": totals}


def format_digest(d: dict[str, Any]) -> str:
    t = d["totals"]
    lines = [f"gpu tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"]
    for op in sorted(d["ops"]):
        c = d["ops"][op]
        cells = "  ".join(f"{i}: {c[i]['passed']} ok / {c[i]['failed']} failed" for i in IMPLS)
        lines.append(f"  {op:<36} {cells}")
        for f in d["failures"].get(op, [])[:10]:
            lines.append(f"      FAIL {f}")
        if len(d["failures"].get(op, [])) > 10:
            lines.append(f"      ... and {len(d['failures'][op]) - 10} more")
    return "\n".join(lines)


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Benchmark rows from headline.jsonl files and/or results.json files."""
    rows: list[dict[str, Any]] = []
    for p in paths:
        text = Path(p).read_text()
        if str(p).endswith(".jsonl"):
            rows += [r for r in map(json.loads, filter(None, text.splitlines())) if r.get("kind") != "header"]
        else:
            rows += json.loads(text).get("rows", [])
    return rows


def _bench_op(row: dict[str, Any]) -> str:
    op, variant = row.get("op", ""), row.get("variant", "")
    return BENCH_OPS.get((op, variant), BENCH_OPS.get((op, ""), op))


def propose(tests: dict[str, Any], rows: list[dict[str, Any]], current: dict[str, str]):
    """(table, evidence): the proposed AUTO_ON_CUDA and, per op, the reason for its entry."""
    speed: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        prov = r.get("provider", "")
        if prov.startswith("fastgen-") and r.get("status") == "ok" and r.get("speedup_vs_torch"):
            speed[_bench_op(r)][prov.removeprefix("fastgen-")].append(float(r["speedup_vs_torch"]))
    table, evidence = {}, {}
    for op in current:
        c = tests.get("ops", {}).get(op)
        best, why = "torch", []
        best_gain = 1.0
        for impl in IMPLS:
            n = c[impl] if c else {"passed": 0, "failed": 0}
            ratios = speed.get(op, {}).get(impl, [])
            gain = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
            tested = n["passed"] > 0 and n["failed"] == 0
            why.append(f"{impl}: tests {n['passed']} passed / {n['failed']} failed, "
                       + (f"{gain:.2f}x eager over {len(ratios)} rows" if gain else "no timing"))
            if tested and gain is not None and gain > best_gain:
                best, best_gain = impl, gain
        table[op] = best
        evidence[op] = "; ".join(why)
    return table, evidence


def format_diff(current: dict[str, str], table: dict[str, str], evidence: dict[str, str]) -> str:
    lines = []
    for op in sorted(table):
        mark = "  " if table[op] == current.get(op) else "->"
        lines.append(f"{mark} {op:<36} {current.get(op, '-'):>6} -> {table[op]:<6}  {evidence[op]}")
    return "\n".join(lines)


def write_table(table: dict[str, str], backend_file: str | Path) -> None:
    """Rewrite the entries of AUTO_ON_CUDA in fastgen/backend.py (nothing else)."""
    path = Path(backend_file)
    src = path.read_text()
    for op, impl in table.items():
        src, n = re.subn(rf'^(\s*"{re.escape(op)}": )"[a-z]+",$', rf'\1"{impl}",', src, flags=re.M)
        if n != 1:
            raise ValueError(f"AUTO_ON_CUDA entry for {op!r} not found once in {path}")
    path.write_text(src)


def apply_auto(run: str | Path, write: bool = False, stream=None) -> dict[str, str]:
    """Read a recorded run folder (tests.xml + headline.jsonl / bench/results.json) or a results
    file beside a tests.xml, print the proposed AUTO_ON_CUDA diff, and optionally write it."""
    import sys

    from fastgen import backend

    stream = stream or sys.stdout
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist: pass a recorded run's folder or its results file")
    folder = run if run.is_dir() else run.parent
    junit = folder / "tests.xml"
    if not junit.exists():
        raise FileNotFoundError(f"{junit} is missing: a recorded run needs the GPU tier's JUnit report "
                                "(scripts/gpu_suite.sh writes it)")
    results = [run] if run.is_file() else [p for p in (folder / "headline.jsonl", folder / "bench" / "results.json")
                                            if p.exists()]
    if not results:
        raise FileNotFoundError(f"no benchmark rows in {folder} (headline.jsonl or bench/results.json)")
    tests = digest_tests(*[p for p in (junit, folder / "candidates.xml") if p.exists()])
    table, evidence = propose(tests, read_rows(results), dict(backend.AUTO_ON_CUDA))
    print(format_diff(backend.AUTO_ON_CUDA, table, evidence), file=stream)
    if write:
        write_table(table, backend.__file__)
        print(f"wrote {backend.__file__}", file=stream)
    return table
