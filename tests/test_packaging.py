"""The installed package: one top-level name, ``fastgen``; kernels and benchmarks live under it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_only_fastgen_is_installed_at_top_level():
    top = importlib.metadata.distribution("fastgen").read_text("top_level.txt")
    assert top is not None and top.split() == ["fastgen"]


def test_kernels_are_fastgen_kernels_not_a_top_level_module(tmp_path):
    # From a directory outside the repository: `kernels` (another PyPI package's name) must not resolve.
    code = (
        "import importlib.util, fastgen.kernels, fastgen.benchmarks\n"
        "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels module is importable'\n"
        "import fastgen.kernels.rms_norm, fastgen.benchmarks.harness\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
