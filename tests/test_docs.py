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


# Packages an example may need that a machine may lack (the GPU image has none of them unless
# carried as wheels): the single example skips and says which, never the module.
OPTIONAL = {"diffusers", "transformers", "peft", "prodigyopt", "schedulefree", "vector_quantize_pytorch",
            "matplotlib", "tqdm", "liger_kernel", "scipy", "tensorboard"}


def _imported_packages(code: str) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_block_runs(code):
    if '"cuda"' in code and "is_available" not in code and not torch.cuda.is_available():
        pytest.skip("this example needs a CUDA GPU")
    for name in sorted(_imported_packages(code) & OPTIONAL):
        pytest.importorskip(name, reason=f"this example needs {name}")
    torch._dynamo.reset()
    try:
        exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})
    except ModuleNotFoundError as exc:  # a dependency the example reaches inside fastgen (safetensors, ...)
        if (exc.name or "").split(".")[0] in OPTIONAL | {"safetensors", "PIL"}:
            pytest.skip(f"this example needs {exc.name}, which is not installed")
        raise


def test_docs_have_examples():
    assert len(list(_blocks())) >= 4


def test_optional_imports_are_found():
    assert _imported_packages("import diffusers\nfrom transformers import T5Config\nfrom .x import y\n"
                              "import torch.nn as nn") == {"diffusers", "transformers", "torch"}
