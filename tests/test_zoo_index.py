"""docs/index.md tracks every model, method and zoo page: each page is listed, each link exists,
and every row marked "done" names code that imports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX = (ROOT / "docs" / "index.md").read_text()
ROW = re.compile(r"^\| \[[^\]]+\]\(([^)]+)\) \| (.+?) \| (done|in progress|not started) \|$", re.M)


def test_every_model_method_and_zoo_page_is_listed():
    linked = {m.group(1) for m in ROW.finditer(INDEX)}
    pages = {str(p.relative_to(ROOT / "docs")) for d in ("models", "methods", "zoo")
             for p in (ROOT / "docs" / d).glob("*.md")}
    assert pages <= linked, f"pages missing from docs/index.md: {sorted(pages - linked)}"
    missing = [p for p in linked if not (ROOT / "docs" / p).exists()]
    assert not missing, f"docs/index.md links to missing pages: {missing}"


def test_done_rows_name_code_that_imports():
    names = 0
    for m in ROW.finditer(INDEX):
        if m.group(3) != "done":
            continue
        for dotted in re.findall(r"`(fastgen(?:\.\w+)+)`", m.group(2)):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):  # longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
                names += 1
                break
            else:
                raise AssertionError(f"{dotted} (docs/index.md) does not import")
    assert names >= 20
