"""Compile Triton kernels for an H100 (sm_90) without a GPU and read ptxas's resource report.

Used by the static tier (tests/test_static_sm90.py) and handy by hand when tuning
launch configs: ``python tests/sm90.py`` prints registers and spills per config.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def resource_usage(fn, signature: dict, constexprs: dict, num_warps: int) -> dict:
    """{'registers', 'spill_stores', 'spill_loads', 'stack'} of ``fn`` compiled for sm_90."""
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [ptxas_path(), "-v", f"--gpu-name={arch}", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    regs = re.search(r"Used (\d+) registers", out)
    return {
        "registers": int(regs.group(1)),
        "stack": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def rms_norm_cases(dtype: str = "bf16"):
    """(name, fn, signature, constexprs, num_warps) for every config the RMSNorm launchers pick
    over representative widths, with and without weight / residual / upstream h gradient."""
    import torch

    from fastgen.kernels import rms_norm as k

    p, wdt = f"*{dtype}", f"*{dtype}"
    fwd_sig = {"X": p, "R": p, "W": wdt, "Y": p, "H": p, "RSTD": "*fp32", "M": "i32", "N": "i32",
               "stride_x": "i64", "stride_r": "i64", "eps": "fp32"}
    bwd_sig = {"DY": p, "H": p, "W": wdt, "RSTD": "*fp32", "DHOUT": p, "C": "*fp32", "DX": p,
               "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "stride_dy": "i64", "stride_h": "i64",
               "stride_dho": "i64", "num_row_programs": "i32",
               "tiles_per_program": "i32"}
    dot_sig = {"DY": p, "H": p, "W": wdt, "RSTD": "*fp32", "C": "*fp32", "N": "i32", "stride_dy": "i64",
               "stride_h": "i64"}
    cuda = torch.device("cuda", 0)
    k._sm_count.cache_clear()
    for N in (128, 1024, 4096, 8192, 16384, 65536):
        M = 32768
        for has_w, has_r in ((True, False), (True, True)):
            cfg = k.fwd_config(M, N, has_r)
            cfg.pop("grid")
            nw = cfg.pop("num_warps")
            yield (f"fwd N={N} w={has_w} r={has_r}", k._rms_norm_fwd_kernel, fwd_sig,
                   dict(cfg, HAS_W=has_w, HAS_R=has_r, INTERPRET=False), nw)
        # bwd_config needs the SM count only for the grid, which does not change the code.
        orig = k._max_row_programs
        k._max_row_programs = lambda device: 4 * 132
        try:
            bcfg = k.bwd_config(M, N, cuda)
        finally:
            k._max_row_programs = orig
        bcfg.pop("grid")
        nw = bcfg.pop("num_warps")
        for has_w, has_d in ((True, False), (True, True)):
            yield (f"bwd N={N} w={has_w} dhout={has_d}", k._rms_norm_bwd_kernel, bwd_sig,
                   dict(bcfg, HAS_W=has_w, HAS_DHOUT=has_d, INTERPRET=False), nw)
        if not bcfg["FULL_ROW"]:
            yield (f"rowdot N={N}", k._rms_norm_bwd_rowdot_kernel, dot_sig,
                   dict(HAS_W=True, BLOCK_N=bcfg["BLOCK_N"]), nw)


def report(dtypes=("bf16", "fp32")) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for name, fn, sig, consts, nw in rms_norm_cases(dtype):
            rows.append(dict(name=f"{name} {dtype}", num_warps=nw, **resource_usage(fn, sig, consts, nw)))
    return rows


if __name__ == "__main__":
    # Kernels must be JIT-compiled here, not interpreted.
    import json
    import os
    import sys

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"
    rows = report()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:45s} warps={r['num_warps']:2d} regs={r['registers']:3d} "
                  f"spills={r['spill_stores']}/{r['spill_loads']} stack={r['stack']}")
