"""The headline benchmark: the shapes fastgen is judged on, one case at a time, streamed to a file.

Run by ``scripts/gpu_suite.sh`` on a lent GPU (default launch configs, ``FASTGEN_AUTOTUNE=0``)::

    python -m fastgen.benchmarks.headline --out headline.jsonl      # GPU: measure
    python -m fastgen.benchmarks.headline --out h.jsonl --dry-run   # anywhere: check the wiring

The first line of the file is the header (commit, device, driver, torch / Triton versions, and
the copy bandwidth and bf16 matmul throughput measured at the start of the same run). Then
one line per measured row, appended as soon as its case (every provider, every mode) is done,
so a run cut off at its time limit keeps every finished case. Each row has the harness's
fields (median ms, p20/p80, GB/s, TFLOP/s) plus:

- ``pct_copy_bw``: GB/s as a percentage of the copy bandwidth of this run (memory-bound ops);
- ``pct_matmul``: TFLOP/s as a percentage of this run's bf16 matmul (attention);
- ``speedup_vs_torch`` / ``speedup_vs_compile``: time of eager torch (or torch.compile of the
  reference) over this row's time, same case and mode.

``--dry-run`` builds every case and evaluates its byte and flop formulas without launching
anything (rows carry ``status: "dry-run"``); a CPU test runs it so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch

from .harness import (Case, _add_speedups, header, load_suite, measure_copy_bandwidth, measure_matmul_tflops,
                      run_case)

BF16 = torch.bfloat16

# (op, shape, variant, modes): the headline shapes, in priority order.
HEADLINE: list[tuple[str, dict[str, int], str, tuple[str, ...]]] = [
    *[("rms_norm", {"M": 32768, "N": n}, "", ("fwd",)) for n in (1024, 4096, 16384, 65536)],
    ("layer_norm", {"B": 2, "S": 4096, "N": 3072}, "modulate", ("fwd", "bwd")),
    ("group_norm", {"N": 8, "C": 512, "H": 128, "W": 128, "G": 32}, "", ("fwd", "bwd")),
    ("group_norm", {"N": 1, "C": 128, "H": 1024, "W": 1024, "G": 32}, "", ("fwd", "bwd")),
    ("rope", {"B": 1, "S": 4608, "H": 24, "D": 128}, "", ("fwd", "bwd")),
    *[("attention", {"B": B, "H": H, "HK": H, "Sq": S, "Sk": S, "D": D}, "", ("fwd", "bwd"))
      for B, H, S, D in ((1, 24, 4608, 128), (1, 48, 17550, 64), (8, 16, 1024, 72), (2, 8, 4096, 40))],
    ("adamw", {"params": 1_000_000_000, "tensors": 200}, "", ("step",)),
]
# The reference rows the speed-ups are taken against, and fastgen's own.
PROVIDERS = ("torch", "torch.compile", "torch-fused", "fastgen-triton", "fastgen-cuda")


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def headline_cases() -> list[tuple[Any, Case, tuple[str, ...], list[str]]]:
    """(suite, case, modes, providers) for every headline row."""
    out = []
    for op, shape, variant, modes in HEADLINE:
        suite = load_suite(op)
        providers = [p for p in PROVIDERS if p in suite.PROVIDERS]
        out.append((suite, Case(dict(shape), BF16, variant), modes, providers))
    return out


def _finish(row: dict[str, Any], copy_gbps: float | None, matmul: float | None) -> dict[str, Any]:
    row.pop("traceback", None)
    row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps if row.get("gbps") and copy_gbps else None
    row["pct_matmul"] = 100 * row["tflops"] / matmul if row.get("tflops") and matmul else None
    return row


def run(out_path: str, device: str, dry_run: bool = False, stream=sys.stdout) -> list[dict[str, Any]]:
    cases = headline_cases()
    copy_gbps = matmul = None
    if not dry_run:
        copy_gbps = measure_copy_bandwidth(device)
        matmul = measure_matmul_tflops(device) if device == "cuda" else None
    head = header(device, sorted({s.OP for s, *_ in cases}), False, copy_gbps, matmul)
    head.update(kind="header", driver=driver_version(), dry_run=dry_run)
    rows: list[dict[str, Any]] = []
    with open(out_path, "w") as f:
        f.write(json.dumps(head) + "\n")
        f.flush()
        for suite, case, modes, providers in cases:
            t0 = time.perf_counter()
            batch = []
            for mode in modes:
                for provider in providers:
                    if dry_run:
                        row = {"op": suite.OP, "provider": provider, "mode": mode, "shape": case.shape,
                               "shape_str": case.shape_str, "variant": case.variant, "dtype": case.dtype_str,
                               "status": "dry-run", "ms": None, "bytes": int(suite.bytes_moved(case, mode)),
                               "flops": int(suite.flops(case, mode)) if hasattr(suite, "flops") else None}
                    else:
                        row = run_case(suite, provider, case, mode, device)
                    batch.append(row)
            if not dry_run:
                _add_speedups(batch, copy_gbps)
            for row in batch:
                f.write(json.dumps(_finish(row, copy_gbps, matmul)) + "\n")
            f.flush()
            rows += batch
            best = [r for r in batch if r["provider"].startswith("fastgen") and r.get("ms")]
            note = ", ".join(f"{r['provider']} {r['mode']} {r['ms']:.3f} ms ({r.get('speedup_vs_torch') or 0:.2f}x)"
                             for r in best) or batch[0]["status"]
            print(f"{suite.OP:<11} {case.shape_str:<22} {time.perf_counter() - t0:6.1f}s  {note}", file=stream,
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSONL file to write (header line, then one line per row)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="build every case, launch nothing")
    args = ap.parse_args(argv)
    if args.device != "cuda" and not args.dry_run:
        ap.error("the headline shapes need a GPU; use --dry-run to check the wiring here")
    run(args.out, args.device, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
