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


def _readme() -> str:
    import pathlib

    return (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_stands_alone():
    """No pointer outside the repository; every relative link names a file in it."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    text = _readme()
    assert "../" not in text and "shared/DESIGN.md" not in text
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/design.md" in links
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (root / link).exists(), link


def test_readme_first_example_runs_on_cpu_and_shows_the_interpreter():
    text = _readme()
    lines = text.splitlines()
    assert lines[3].startswith("bash scripts/setup.sh && .venv/bin/fastgen bench ")
    assert lines[4].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest ")
    use = text.split("## Use", 1)[1]
    first = use.split("```python\n", 1)[1].split("```", 1)[0]
    assert "cuda" not in first  # the first example is the CPU one
    assert "TRITON_INTERPRET=1" in use.split("On a GPU", 1)[0]
