"""Static tier: the hot global loads and stores of every memory-bound kernel are 16 bytes wide.

Compiled for sm_90 without a GPU with the specialization a real launch gives contiguous,
aligned tensors of ordinary shapes (tests/widths.py). Narrower accesses are allowed only where
listed below with the reason; a kernel that gains a narrow access (a lost vectorization, a
doubled pass) fails, and one that loses one prompts a tighter entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# kernel config prefix -> (narrow loads allowed, narrow stores allowed, why). "Narrow" is below
# the hot width, 16 bytes.
NARROW = {
    "fwd N=4096 w=True r=True": (0, 1, "rstd: one fp32 per row"),
    "bwd N=4096 w=True dhout=True": (1, 0, "rstd: one fp32 per row"),
    "ln fwd": (0, 2, "mean and rstd: one fp32 each per row"),
    "ln bwd": (3, 2, "mean and rstd per row; the weight, read once per program; the weight-gradient partials"),
    "gn fwd": (2, 2, "per-channel weight and bias (one element per channel row); mean and rstd per group"),
    "gn bwd": (4, 2, "per-channel weight and bias, per-group mean and rstd; per-group partial sums"),
    "gn apply": (4, 0, "per-channel weight and bias, per-group mean and rstd"),
    "qk_norm_rope fwd": (2, 0, "the q / k norm weights, read per head-dim block as fp32"),
    "qk_norm_rope bwd": (6, 1, "norm weights, per-row rstd; the weight-gradient partial"),
    "rope": (4, 0, "the cos / sin entries of a and b (fp32), read once per token block for BLOCK_H heads"),
    "glu fwd": (0, 0, ""),
    "glu bwd": (0, 0, ""),
}


@pytest.fixture(scope="module")
def widths():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, str(here / "widths.py"), "--json"], capture_output=True, text=True,
                          env=env, cwd=here, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prefix(name):
    return next((p for p in NARROW if name.startswith(p)), None)


def test_every_kernel_compiles(widths):
    bad = [f"{r['name']}: {r['error']}" for r in widths if "error" in r]
    assert not bad, "\n".join(bad)


def test_hot_accesses_are_16_bytes(widths):
    checked, problems = 0, []
    for r in widths:
        prefix = _prefix(r["name"])
        if prefix is None or "error" in r:
            continue
        checked += 1
        hot = 16
        loads = {int(b): n for b, n in r["loads"].items()}
        stores = {int(b): n for b, n in r["stores"].items()}
        if not any(b >= hot for b in loads) or not any(b >= hot for b in stores):
            problems.append(f"{r['name']}: no {hot}-byte load or store (loads {loads}, stores {stores})")
        narrow_ld = sum(n for b, n in loads.items() if b < hot)
        narrow_st = sum(n for b, n in stores.items() if b < hot)
        max_ld, max_st, why = NARROW[prefix]
        if narrow_ld > max_ld or narrow_st > max_st:
            problems.append(f"{r['name']}: {narrow_ld} loads / {narrow_st} stores narrower than {hot} bytes, "
                            f"allowed {max_ld} / {max_st} ({why or 'none'}); loads {loads}, stores {stores}")
    assert checked == len(NARROW), f"checked {checked} kernels, expected {len(NARROW)}"
    assert not problems, "\n".join(problems)


def test_width_counter_reads_ptx():
    sys.path.insert(0, str(Path(__file__).parent))
    from widths import access_widths

    ptx = """
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
        @%p1 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
        st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
        st.global.b32 [ %rd5 + 0 ], { %r7 };
    """
    assert access_widths(ptx) == {("ld", 16): 1, ("ld", 2): 1, ("ld", 8): 1, ("st", 16): 1, ("st", 4): 1}
