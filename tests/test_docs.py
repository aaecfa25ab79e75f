"""Every ```python block in README.md and docs/*.md runs (DESIGN.md: docs are tested)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in DOCS:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_block_runs(code):
    if '"cuda"' in code and "is_available" not in code and not torch.cuda.is_available():
        pytest.skip("this example needs a CUDA GPU")
    torch._dynamo.reset()
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})


def test_docs_have_examples():
    assert len(list(_blocks())) >= 4
