"""scripts/gpu_suite.sh cannot rot: its dry run (every stage's logic, the GPU work skipped) runs here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the .venv of scripts/setup.sh")
def test_dry_run_writes_the_summary_and_at_most_8_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(DRY_RUN="1", OUT=str(tmp_path), SUITE_SECONDS="600")  # limits, not the time it takes (~40 s)
    proc = subprocess.run(["bash", "scripts/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for stage in ("setup ", "tests ", "headline ", "sanitizer "):
        assert stage in summary, f"stage {stage!r} missing from summary.txt:\n{summary}"
    assert "gpu tests:" in summary  # the JUnit report was digested
    lines = (tmp_path / "headline.jsonl").read_text().splitlines()
    head = json.loads(lines[0])
    assert head["kind"] == "header" and head["dry_run"] is True
    for key in ("git_commit", "device_name", "driver", "torch", "triton"):
        assert key in head, key
    rows = [json.loads(x) for x in lines[1:]]
    assert {r["op"] for r in rows} == {"rms_norm", "layer_norm", "group_norm", "rope", "attention", "adamw"}
    assert all(r["bytes"] and r["bytes"] > 0 for r in rows)
    assert all(r["flops"] and r["flops"] > 0 for r in rows if r["op"] == "attention")
