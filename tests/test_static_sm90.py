"""Static tier: every launch config the Triton launchers pick compiles for sm_90 without spilling.

No GPU needed: Triton compiles for GPUTarget("cuda", 90, 32) on any machine and
its bundled ptxas reports registers and spills. The compile runs in a child
process because this test session may have Triton's interpreter switched on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def usage():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90.py")), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_rms_norm_config_was_compiled(usage):
    names = {r["name"] for r in usage}
    for n in (1024, 4096, 8192, 16384, 65536):
        assert f"fwd N={n} w=True r=True bf16" in names and f"bwd N={n} w=True dhout=True bf16" in names
    assert "rowdot N=65536 bf16" in names


def test_rms_norm_configs_do_not_spill_on_sm90(usage):
    bad = [r for r in usage if r["spill_stores"] or r["spill_loads"]]
    assert not bad, "\n".join(map(str, bad))
    for r in usage:
        assert r["registers"] <= 65536 // (32 * r["num_warps"]), r
