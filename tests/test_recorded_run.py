"""A recorded GPU run becomes AUTO_ON_CUDA mechanically (fastgen.recorded_run), on synthetic files."""

from __future__ import annotations

import json
import shutil

import pytest

from fastgen import backend, recorded_run

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.test_rms_norm" name="test_gpu_real[triton-bf16]"/>
  <testcase classname="tests.test_rms_norm" name="test_gpu_real[cuda-bf16]"/>
  <testcase classname="tests.test_group_norm" name="test_gpu_real[triton]"/>
  <testcase classname="tests.test_group_norm" name="test_gpu_real[cuda]">
    <failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3 / 100">trace</failure>
  </testcase>
  <testcase classname="tests.test_attention" name="test_gpu_real_sizes[1-4608]"/>
  <testcase classname="tests.test_lion_clip_ema" name="test_gpu_ema_matches[triton]"/>
  <testcase classname="tests.test_lion_clip_ema" name="test_gpu_clip[triton]">
    <error message="RuntimeError: CUDA error: an illegal memory access"/>
  </testcase>
  <testcase classname="tests.test_glu" name="test_gpu_glu"><skipped message="no"/></testcase>
</testsuite></testsuites>
"""


def _row(op, provider, speedup, variant="", status="ok"):
    return {"op": op, "variant": variant, "provider": provider, "status": status, "speedup_vs_torch": speedup}


ROWS = [
    _row("rms_norm", "fastgen-triton", 1.6), _row("rms_norm", "fastgen-triton", 1.4),
    _row("rms_norm", "fastgen-cuda", 1.9), _row("rms_norm", "torch", 1.0),
    _row("group_norm", "fastgen-triton", 2.0), _row("group_norm", "fastgen-cuda", 3.0),  # cuda failed its tests
    _row("attention", "fastgen-triton", 0.8),  # passed but slower than eager: stays torch
    _row("ema", "fastgen-triton", 1.5),
    _row("clip_grad_norm", "fastgen-triton", 4.0),  # its test errored
    _row("glu", "fastgen-triton", 1.3),  # its only test was skipped: nothing passed
    _row("layer_norm", "fastgen-triton", 1.2, "modulate"), _row("layer_norm", "fastgen-triton", 9.0, "modulate", "error: x"),
]


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "tests.xml").write_text(JUNIT)
    with open(tmp_path / "headline.jsonl", "w") as f:
        f.write(json.dumps({"kind": "header", "git_commit": "abc", "device_name": "H200"}) + "\n")
        for r in ROWS:
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_digest_groups_by_op_and_implementation(run_dir):
    d = recorded_run.digest_tests(run_dir / "tests.xml")
    assert d["totals"] == {"passed": 5, "failed": 2, "skipped": 1}
    assert d["ops"]["group_norm"]["cuda"] == {"passed": 0, "failed": 1, "skipped": 0}
    assert d["ops"]["group_norm"]["triton"]["passed"] == 1
    assert d["ops"]["attention"]["triton"]["passed"] == 1 and d["ops"]["attention"]["cuda"]["passed"] == 1
    assert d["ops"]["ema"]["triton"]["passed"] == 1 and "lion" not in d["ops"]
    assert d["failures"]["group_norm"] == ["test_group_norm::test_gpu_real[cuda]: AssertionError: Tensor-likes "
                                           "are not close!"]
    assert d["failures"]["clip_grad_norm_"][0].endswith("RuntimeError: CUDA error: an illegal memory access")
    text = recorded_run.format_digest(d)
    assert "group_norm" in text and "FAIL test_group_norm::test_gpu_real[cuda]" in text


def test_propose_lists_only_tested_winners(run_dir):
    tests = recorded_run.digest_tests(run_dir / "tests.xml")
    rows = recorded_run.read_rows([run_dir / "headline.jsonl"])
    table, evidence = recorded_run.propose(tests, rows, dict(backend.AUTO_ON_CUDA))
    assert set(table) == set(backend.AUTO_ON_CUDA)
    assert table["rms_norm"] == "cuda"  # both passed; cuda is faster (1.9x against 1.50x)
    assert table["group_norm"] == "triton"  # cuda was faster but failed a test
    assert table["attention"] == "torch"  # passed, but 0.8x of eager
    assert table["ema"] == "triton"
    assert table["clip_grad_norm_"] == "torch"  # a test errored
    assert table["glu"] == "torch"  # nothing passed (skipped)
    assert table["layer_norm_modulate"] == "torch"  # no GPU test of it ran; the error row is not a timing
    assert table["lion"] == "torch" and table["adamw"] == "torch"
    assert "1.9" in evidence["rms_norm"] and "1 failed" in evidence["group_norm"]


def test_apply_auto_prints_the_diff_and_writes_only_the_table(run_dir, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "backend_copy.py"
    shutil.copy(backend.__file__, copy)
    before = copy.read_text()
    monkeypatch.setattr(backend, "__file__", str(copy))
    table = recorded_run.apply_auto(run_dir, write=True)
    out = capsys.readouterr().out
    assert "-> rms_norm" in out and "torch -> cuda" in out
    after = copy.read_text()
    assert '    "rms_norm": "cuda",' in after and '    "group_norm": "triton",' in after
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(changed) == sum(v != "torch" for v in table.values()) == 3


def test_apply_auto_needs_the_test_report(tmp_path):
    (tmp_path / "headline.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="tests.xml is missing"):
        recorded_run.apply_auto(tmp_path)


def test_cli_apply_auto(run_dir, capsys):
    from fastgen.cli import main

    assert main(["bench", "--apply-auto", str(run_dir)]) == 0
    assert "torch -> cuda" in capsys.readouterr().out
    assert main(["bench", "--apply-auto", str(run_dir / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
