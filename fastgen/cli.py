"""The ``fastgen`` command (also ``python -m fastgen``).

    fastgen bench [--ops rms_norm,...] [--quick] [--out DIR] [--device cuda|cpu]
                  [--providers torch,fastgen-triton,...] [--modes fwd,bwd,fwd+bwd]
                  [--no-progress] [--fail-on-error]
    fastgen info [--json]
    fastgen train CONFIG.toml [--resume] [--print-config]
    fastgen --version
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Sequence


def _benchmarks_package():
    """``fastgen.benchmarks`` (installed from the repo's ``benchmarks/`` folder).

    In a source checkout that is not installed, the folder next to the
    ``fastgen`` package is registered under the same name, so suites always
    import as ``fastgen.benchmarks.bench_<op>``.
    """
    try:
        return importlib.import_module("fastgen.benchmarks")
    except ModuleNotFoundError as exc:
        if exc.name != "fastgen.benchmarks":
            raise
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "benchmarks", "__init__.py")
    if not os.path.isfile(init):
        raise ModuleNotFoundError(
            "fastgen.benchmarks is not installed and no benchmarks/ folder was found next to "
            "the fastgen package; install fastgen from its repository (pip install -e .)",
            name="fastgen.benchmarks",
        )
    spec = importlib.util.spec_from_file_location(
        "fastgen.benchmarks", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastgen.benchmarks"] = module
    spec.loader.exec_module(module)
    import fastgen

    fastgen.benchmarks = module
    return module


def _csv(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _version() -> str:
    from fastgen import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgen", description="fastgen: fused kernels for generative models")
    p.add_argument("--version", action="version", version=f"fastgen {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("bench", help="benchmark ops against torch eager, torch.compile and peers",
                       description="Benchmark every op (or --ops) on this machine's device; prints a "
                                   "table and writes results.json, results.md and <op>.png.")
    b.add_argument("--ops", help="comma-separated ops (default: every benchmarks/bench_<op>.py but the "
                   "whole-model suites, which run only when named, e.g. --ops models)")
    b.add_argument("--quick", action="store_true", help="a few shapes only")
    b.add_argument("--out", help="output folder (default: ./fastgen-bench/<device>/ under the current directory)")
    b.add_argument("--device", choices=("cuda", "cpu"),
                   help="default: cuda when a GPU is visible, else cpu")
    b.add_argument("--providers", help="comma-separated subset of providers "
                                       "(torch, torch.compile, fastgen-triton, fastgen-cuda, liger-kernel)")
    b.add_argument("--modes", help="comma-separated subset of fwd, bwd, fwd+bwd")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 when any row ends in an error (skipped rows do not count)")
    b.add_argument("--apply-auto", metavar="RUN",
                   help="read a recorded scripts/gpu_suite.sh run (its folder: tests.xml + headline.jsonl) and "
                        "print the AUTO_ON_CUDA table it justifies, with the evidence; measures nothing")
    b.add_argument("--write", action="store_true", help="with --apply-auto: also edit fastgen/backend.py")

    i = sub.add_parser("info", help="versions, GPU, CUDA extension and backend choices")
    i.add_argument("--json", action="store_true", help="print the dict as JSON")

    from fastgen.train.cli import add_parser as _add_train_parser

    _add_train_parser(sub)
    return p


def _unwritable(out: str) -> str | None:
    """Why the report folder ``out`` cannot be created or written, or None."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if os.access(out, os.W_OK) else "permission denied"


def _bench(args) -> int:
    if args.apply_auto:
        from fastgen.recorded_run import apply_auto

        try:
            apply_auto(args.apply_auto, write=args.write)
        except (FileNotFoundError, ValueError) as exc:
            print(f"fastgen bench --apply-auto: {exc}", file=sys.stderr)
            return 2
        return 0
    pkg = _benchmarks_package()
    harness = importlib.import_module(pkg.__name__ + ".harness")
    known = harness.available_ops()
    ops = _csv(args.ops) or harness.default_ops()
    unknown = [op for op in ops if op not in known]
    if unknown:
        print(f"fastgen bench: no benchmark for {', '.join(unknown)} (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("fastgen bench: --device cuda, but torch sees no CUDA GPU here "
                  f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                  file=sys.stderr)
            return 2
    suites = [harness.load_suite(op) for op in ops]
    if args.providers:
        valid = {p for s in suites for p in s.PROVIDERS}
        bad = [p for p in _csv(args.providers) if p not in valid]
        if bad:
            print(f"fastgen bench: unknown provider(s) {', '.join(bad)} (known: {', '.join(sorted(valid))})",
                  file=sys.stderr)
            return 2
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or harness.default_out_dir(device)
    why = _unwritable(out)
    if why is not None:  # say so before measuring, not with a traceback after it
        print(f"fastgen bench: cannot write the reports to {out}: {why}; pass --out DIR", file=sys.stderr)
        return 2
    result = harness.run(suites=suites, device=device, quick=args.quick, out=out,
                         providers=_csv(args.providers), modes=_csv(args.modes),
                         progress=not args.no_progress)
    if args.fail_on_error and any(r["status"].startswith("error") for r in result["rows"]):
        return 1
    return 0


def _info(args) -> int:
    from fastgen import info

    data = info.collect()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(info.format_text(data))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastgen`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "info":
        return _info(args)
    if args.command == "train":
        from fastgen.train.cli import run as _train

        return _train(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
