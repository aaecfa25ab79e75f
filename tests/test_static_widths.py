"""Static tier: the hot global loads and stores of every memory-bound kernel are 16 bytes wide,
and there are exactly as many as the kernel's tensors need.

Compiled for sm_90 without a GPU with the specialization a real launch gives contiguous,
aligned tensors of ordinary shapes (tests/widths.py). Narrower accesses are allowed only where
listed below with the reason; a kernel that gains a narrow access (a lost vectorization, a
doubled pass) fails, and one that loses one prompts a tighter entry.

Exact counts (``test_16_byte_accesses_are_exact``), for every norm / RoPE / GLU / scale-shift
config of tests/sm90.py (bf16), deduplicated: a program's tile of one tensor holds ``E``
elements of ``b`` bytes over ``32 * num_warps`` threads, so each thread owns ``E * b / (32 *
num_warps)`` bytes of it, in contiguous runs of ``run`` bytes along the unit-stride dim. When
both are at least 16, the tensor costs ``E * b / (512 * num_warps)`` 16-byte instructions
(``widths.v16``), otherwise none. The expected count sums that over the per-element tensors of
the kernel's docstring line for the pass (``Bytes per element``), once per copy of the code in
the PTX: a ``range`` loop with a runtime trip count is not unrolled, so its body appears once
(counted once); a peeled first iteration is a second copy; RoPE's q and k branches are two.
Per-column operands (the norms' weight and bias, their fp32 weight-gradient partials) get a
layout that Triton picks (their own 1-D layout, or the tile's replicated over the rows: 16-byte
or not for the same tile), so the cases are compiled with them off (``HAS_W`` / ``HAS_B`` =
False, the per-token backward): the tile and the per-element code are the launcher's. What the
rule does not derive is in ``NOT_DERIVED`` with the reason.

Each of those configs must also make 16-byte per-element accesses at all
(``test_every_config_is_16_byte_or_listed``); a layout that cannot (a channels-last group
of 2 to 4 channels: runs of 4 to 8 bytes) is listed in ``NOT_16_BYTE`` with the reason.
GroupNorm cases are compiled with the integer arguments their launch passes (``widths.gn_values``):
an odd S or a channels-last K that is not a multiple of 16 gets no divisibility from the JIT, and
the kernels' ``ALIGN`` hint (``align_hint``) restores the power of two that does divide it.
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
    "qk_norm_rope bwd": (12, 3, "per branch: the norm weights (one or two loads) and the fp32 cos / sin entries "
                                "(two or four: a and b in the halves layout), broadcast over the heads; the "
                                "fp32 weight-gradient partials (a, b and the pass-through dims), stored once"),
    "rope": (4, 0, "the cos / sin entries of a and b (fp32), read once per token block for BLOCK_H heads"),
    "glu fwd": (0, 0, ""),
    "glu bwd": (0, 0, ""),
    "scale_shift fwd": (0, 0, ""),
    "scale_shift bwd": (0, 2, "per sample: the fp32 dscale / dshift partials, one [BLOCK_N] row per program "
                              "after the loop (8 bytes per thread at N=64)"),
}

# Exact-count configs (tests/widths.exact_cases) whose per-element tensors cannot be 16-byte
# with the kernel's layout: name substring -> why. Every other config reads (and, where it writes a
# per-element tensor, writes) 16 bytes per access; an entry that no longer matches a narrow config
# fails too, so a fix removes it.
NOT_16_BYTE = {
    "C=128 S=1048576 G=32 nhwc": "channels-last with 4 channels per group: a group's contiguous run is 4 elements "
                                 "(8-byte accesses in bf16); the next channels belong to another group's program",
    "C=320 S=1024 G=32 nhwc": "channels-last with 10 channels per group: runs start at multiples of 10 elements, "
                              "4-byte aligned (4-byte accesses)",
    "C=64 S=4096 G=32 nhwc": "channels-last with 2 channels per group: runs of 4 bytes",
    "C=96 S=221 G=32 nhwc": "channels-last with 3 channels per group: runs of 6 bytes at odd offsets (2-byte)",
    "C=96 S=221 G=32 nchw": "17 x 13 positions: channel rows start at odd offsets (2-byte)",
    "C=1024 S=64 G=1 nchw": "1024 channels per group: 8 positions (16 bytes) per tile need 32 warps at 8 elements "
                            "per thread, which leave 64 registers, and the SiLU backward spills there; 4 "
                            "positions at 16 warps: 8-byte accesses in bf16 (16 in fp32)",
}
# Kernels with no per-element output: their stores are per-group or per-channel partials.
NO_ELEMENT_STORES = ("gn stats", "gn bwd_reduce")


# Kernels (or operands) whose exact 16-byte count the rule above does not derive, and why.
NOT_DERIVED = {
    "rms_norm rowdot": "reads dy and h once more for wide rows (docstring); its weight is per-column",
    "layer_norm rowstats": "reads dout, h (and scale) once more for wide rows; weight per-column",
    "layer_norm bwd per_sample": "the per-sample dshift / dscale / dgate are fp32 per-column partials; the "
                                 "per-token case at the same widths checks the per-element tensors",
    "rope / qk_norm_rope loads": "the cos / sin rows (and the norm weights) are broadcast over the heads "
                                 "with a layout Triton picks: the loads are checked as a lower bound, the "
                                 "stores exactly",
    "qk_norm_rope bwd dw partial stores": "fp32 [HALF] / [BLOCK_P] rows stored once per program after the loop, "
                                          "in a layout Triton picks: not counted (narrow in every config)",
    "group_norm combine, bwd_combine": "per-group partials only, no per-element tensor",
}


@pytest.fixture(scope="module")
def exact():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    here = Path(__file__).parent
    proc = subprocess.run([sys.executable, str(here / "widths.py"), "--exact", "--json"], capture_output=True,
                          text=True, env=env, cwd=here, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    unused = set(NARROW) - {_prefix(r["name"]) for r in widths}
    assert checked >= len(NARROW) and not unused, f"no kernel config for {sorted(unused)}"
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


def test_16_byte_accesses_are_exact(exact):
    errors = [f"{r['name']}: {r['error']}" for r in exact if "error" in r]
    assert not errors, "\n".join(errors)
    families = {"fwd N=", "bwd N=", "glu fwd", "glu bwd", "ln fwd", "ln bwd", "gn fwd", "gn bwd", "gn apply",
                "gn stats", "gn bwd_reduce", "gn bwd_dx", "rope", "qk_norm_rope fwd", "qk_norm_rope bwd",
                "scale_shift fwd", "scale_shift bwd"}
    missing = {f for f in families if not any(r["name"].startswith(f) for r in exact)}
    assert not missing, f"no case of {sorted(missing)}"
    assert sum(r["want_loads"] > 0 and r["want_stores"] > 0 for r in exact) >= 100, "the rule expects too little"
    problems = []
    for r in exact:
        at_least = r["why"].startswith("loads: at least")
        loads_ok = r["loads"] >= r["want_loads"] if at_least else r["loads"] == r["want_loads"]
        if not loads_ok or r["stores"] != r["want_stores"]:
            problems.append(f"{r['name']} ({r['kernel']}, {r['num_warps']} warps, {r['tile']}): 16-byte loads "
                            f"{r['loads']}, want {'>= ' if at_least else ''}{r['want_loads']}; stores "
                            f"{r['stores']}, want {r['want_stores']}")
    assert not problems, "\n".join(problems)


def test_v16_rule():
    sys.path.insert(0, str(Path(__file__).parent))
    from widths import v16

    assert v16(4096, 2, 16) == 1  # 8 bf16 per thread: one 16-byte access
    assert v16(4096, 4, 16) == 2  # 8 fp32 per thread: two
    assert v16(1024, 2, 16) == 0  # 2 bf16 per thread: narrower
    assert v16(4 * 512, 2, 8, run=4 * 2) == 0  # contiguous runs of 8 bytes (4 channels of a NHWC group)


def test_every_config_is_16_byte_or_listed(exact):
    """Each config's per-element loads (and stores) are 16-byte, unless NOT_16_BYTE says why not."""
    used, problems = set(), []
    for r in exact:
        if "error" in r:
            continue
        wide = r["loads"] > 0 and (r["stores"] > 0 or r["name"].startswith(NO_ELEMENT_STORES))
        why = [k for k in NOT_16_BYTE if k in r["name"]]
        used.update(why)
        if not wide and not why:
            problems.append(f"{r['name']} ({r['num_warps']} warps, {r['tile']}): no 16-byte per-element access "
                            f"(16-byte loads {r['loads']}, stores {r['stores']})")
        if wide and why:
            problems.append(f"{r['name']}: 16-byte now, remove NOT_16_BYTE[{why[0]!r}]")
    problems += [f"NOT_16_BYTE[{k!r}] matches no config" for k in set(NOT_16_BYTE) - used]
    assert not problems, "\n".join(problems)
