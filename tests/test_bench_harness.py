"""The benchmark harness and the RMSNorm suite, run for real on CPU with tiny shapes."""

from __future__ import annotations

import importlib
import importlib.util
import json
import types

import pytest
import torch

from fastgen.cli import _benchmarks_package

_pkg = _benchmarks_package()
harness = importlib.import_module(_pkg.__name__ + ".harness")
bench = importlib.import_module(_pkg.__name__ + ".bench_rms_norm")


# ----------------------------------------------------------------------------- bytes formula


def test_rms_norm_bytes_by_hand():
    # M=2 rows, N=4, fp32 (e = ew = 4 bytes):
    #   fwd: x 2*4*4=32 + y 32 + w 4*4=16                          = 80
    #   bwd: dy 32 + x 32 + w 16 + rstd 2*4=8 + dx 32 + dw 16      = 136
    assert bench.rms_norm_bytes(2, 4, torch.float32, "fwd") == 80
    assert bench.rms_norm_bytes(2, 4, torch.float32, "bwd") == 136
    assert bench.rms_norm_bytes(2, 4, torch.float32, "fwd+bwd") == 216
    # bf16 (e = 2): fwd 16 + 16 + 8 = 40; bwd 16*3 + 8*2 + rstd 8 (fp32) = 72
    assert bench.rms_norm_bytes(2, 4, torch.bfloat16, "fwd") == 40
    assert bench.rms_norm_bytes(2, 4, torch.bfloat16, "bwd") == 72
    # residual: fwd adds residual read + h write (2 * 16); bwd adds dh read (16)
    assert bench.rms_norm_bytes(2, 4, torch.bfloat16, "fwd", residual=True) == 72
    assert bench.rms_norm_bytes(2, 4, torch.bfloat16, "bwd", residual=True) == 88
    # an fp32 weight with bf16 activations: w and dw count 4 bytes each
    assert bench.rms_norm_bytes(2, 4, torch.bfloat16, "fwd", weight_dtype=torch.float32) == 48
    with pytest.raises(ValueError):
        bench.rms_norm_bytes(2, 4, torch.float32, "sideways")


def test_bytes_moved_uses_case():
    case = harness.Case({"M": 3, "N": 8}, torch.float16, "residual")
    assert bench.bytes_moved(case, "fwd") == 4 * 3 * 8 * 2 + 8 * 2


def test_quantile_matches_linear_rule():
    vals = sorted([5.0, 1.0, 3.0, 2.0, 4.0])
    assert harness._quantile(vals, 0.5) == 3.0
    assert harness._quantile(vals, 0.2) == pytest.approx(1.8)
    assert harness._quantile([7.0], 0.8) == 7.0


def test_device_slug_cpu_and_default_out_dir_is_not_the_package(tmp_path, monkeypatch):
    assert harness.device_slug("cpu") == "cpu"
    monkeypatch.chdir(tmp_path)
    out = harness.default_out_dir("cpu")
    assert out == str(tmp_path / "fastgen-bench" / "cpu")
    assert not out.startswith(harness.PACKAGE_DIR)


def _row(**kw):
    row = dict(op="rms_norm", provider="torch", mode="fwd", shape={"M": 1, "N": 2}, shape_str="1x2",
               variant="", dtype="bf16", status="ok", ms=1.5, ms_p20=1.0, ms_p80=1.2, bytes=10,
               gbps=50.0, pct_copy_bw=50.0, peak_mem_bytes=None, mem_note=None,
               speedup_vs_torch=1.0, speedup_vs_compile=None)
    row.update(kw)
    return row


def test_flag_rows_noisy_and_above_copy():
    rows = [_row(), _row(provider="a", ms_p20=1.0, ms_p80=117.0), _row(provider="b", gbps=205.0),
            _row(provider="c", status="skipped: needs a CUDA GPU", ms=None, ms_p20=None, ms_p80=None, gbps=None)]
    assert harness.flag_rows(rows, copy_gbps=100.0, spread_limit=2.0) == 2
    assert rows[0]["flags"] == [] and rows[3]["flags"] == []
    assert rows[1]["flags"] == ["noisy: p80/p20 117.0 > 2"]
    assert rows[2]["flags"] == ["GB/s above the measured copy (205%)"]
    assert [harness.plottable(r) for r in rows] == [True, False, False, False]
    table = harness.format_table(rows).splitlines()
    assert "flags" in table[0] and "noisy: p80/p20 117.0 > 2" in table[3] and "above the measured copy" in table[4]


def test_flagged_rows_in_json_and_table_not_in_plots(tmp_path, capsys, monkeypatch):
    """A suite whose byte count is absurd: every ok row is above the measured copy bandwidth."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    plotted = []
    real_plot = Axes.plot

    def spy(self, x, y, *args, **kwargs):
        plotted.extend(y)
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    suite = _tiny_suite()
    suite.bytes_moved = lambda case, mode: 10**15
    result = harness.run(suites=[suite], device="cpu", out=str(tmp_path), progress=False,
                         providers=["torch"], modes=["fwd"])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and all(any("above the measured copy" in f for f in r["flags"]) for r in rows)
    assert "rows flagged" in printed and "above the measured copy" in printed
    assert "above the measured copy" in (tmp_path / "results.md").read_text()
    assert not plotted and result["header"]["spread_limit"] == harness.SPREAD_LIMIT["cpu"]


def test_ops_discovered():
    assert "rms_norm" in harness.available_ops()
    assert harness.load_suite("rms_norm") is bench
    with pytest.raises(ValueError, match="no benchmark suite"):
        harness.load_suite("no_such_op")


# ----------------------------------------------------------------------------- a real run


def _tiny_suite():
    """The RMSNorm suite on tiny shapes, plus a provider whose setup raises."""

    def setup(provider, case, mode, device):
        if provider == "broken":
            raise RuntimeError("this provider is broken on purpose")
        return bench.setup(provider, case, mode, device)

    return types.SimpleNamespace(
        OP="rms_norm",
        PROVIDERS=("torch", "broken", "fastgen-triton", "fastgen-cuda", "liger-kernel"),
        GPU_ONLY=bench.GPU_ONLY,
        MODES=bench.MODES,
        PLOT_X="N",
        cases=lambda device, quick: [
            harness.Case({"M": 8, "N": 64}, torch.bfloat16),
            harness.Case({"M": 8, "N": 128}, torch.bfloat16),
            harness.Case({"M": 8, "N": 64}, torch.float32, "residual"),
        ],
        setup=setup,
        bytes_moved=bench.bytes_moved,
    )


def test_cpu_run_writes_reports(tmp_path, capsys):
    suite = _tiny_suite()
    result = harness.run(suites=[suite], device="cpu", out=str(tmp_path), progress=False)
    printed = capsys.readouterr().out
    rows = result["rows"]
    assert len(rows) == 3 * 3 * 5  # cases x modes x providers

    by = {(r["provider"], r["mode"], r["shape_str"], r["variant"]): r for r in rows}
    for mode in bench.MODES:
        r = by[("torch", mode, "8x64", "")]
        assert r["status"] == "ok", r["status"]
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["bytes"] == bench.rms_norm_bytes(8, 64, torch.bfloat16, mode)
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / result["header"]["copy_gbps"])
        assert r["speedup_vs_torch"] == pytest.approx(1.0)
        assert r["speedup_vs_compile"] is None  # torch.compile was not in this run
        assert r["peak_mem_bytes"] is None and "CUDA" in r["mem_note"]
        # the residual variant runs forward and both gradients
        assert by[("torch", mode, "8x64", "residual")]["status"] == "ok"

        # a provider that raises is an error row, and the providers after it still ran
        broken = by[("broken", mode, "8x64", "")]
        assert broken["status"].startswith("error: RuntimeError: this provider is broken on purpose")
        assert broken["ms"] is None

        triton_row = by[("fastgen-triton", mode, "8x64", "")]
        assert triton_row["status"].startswith("skipped:") and "GPU" in triton_row["status"]
        assert "GPU" in by[("fastgen-cuda", mode, "8x64", "")]["status"]

        liger = by[("liger-kernel", mode, "8x64", "")]
        assert liger["status"].startswith("skipped:")
        if importlib.util.find_spec("liger_kernel") is None:
            assert "not installed" in liger["status"]

    # files
    data = json.loads((tmp_path / "results.json").read_text())
    head = data["header"]
    for key in ("device", "device_name", "date", "git_commit", "torch", "triton", "copy_gbps",
                "matmul_bf16_tflops", "ops"):
        assert key in head
    assert head["device"] == "cpu" and head["copy_gbps"] > 0 and head["matmul_bf16_tflops"] is None
    assert head["ops"] == ["rms_norm"]
    assert len(data["rows"]) == len(rows)
    md = (tmp_path / "results.md").read_text()
    assert "| rms_norm | fwd | 8x64 | bf16 | torch |" in md
    assert "copy bandwidth" in md
    png = tmp_path / "rms_norm.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # terminal: the table and the one-line GPU note
    assert "need a GPU" in printed
    assert "fastgen-triton" in printed and "error: RuntimeError" in printed


def test_speedup_and_filters(tmp_path):
    suite = _tiny_suite()
    result = harness.run(suites=[suite], device="cpu", out=str(tmp_path), progress=False,
                         providers=["torch", "broken"], modes=["fwd"], stream=open("/dev/null", "w"))
    rows = result["rows"]
    assert {r["provider"] for r in rows} == {"torch", "broken"}
    assert {r["mode"] for r in rows} == {"fwd"}
    assert len(rows) == 3 * 2


def test_format_table_is_aligned():
    row = dict(op="rms_norm", provider="torch", mode="fwd", shape={"M": 1, "N": 2}, shape_str="1x2",
               variant="", dtype="bf16", status="ok", ms=1.5, ms_p20=1.0, ms_p80=2.0, bytes=10,
               gbps=1e-5, pct_copy_bw=0.1, peak_mem_bytes=None, mem_note=None,
               speedup_vs_torch=1.0, speedup_vs_compile=None)
    other = dict(row, provider="fastgen-triton", status="skipped: needs a CUDA GPU", ms=None,
                 ms_p20=None, ms_p80=None, gbps=None, pct_copy_bw=None, speedup_vs_torch=None)
    lines = harness.format_table([row, other]).splitlines()
    assert len(lines) == 4
    # every column but the last starts at the same offset on every line
    assert lines[0].index("status") == lines[2].index("ok") == lines[3].index("skipped")


def test_peer_reports_why_it_cannot_run():
    with pytest.raises(harness.Unavailable, match="no-such-lib is not installed"):
        harness.peer("fastgen_no_such_module", "f", device="cuda", package="no-such-lib")
    with pytest.raises(harness.Unavailable, match="has no math.no_such_name"):
        harness.peer("math", "sqrt", "no_such_name", device="cuda", package="math")
    with pytest.raises(harness.Unavailable, match="needs a CUDA GPU \\(math is Triton-only\\)"):
        harness.peer("math", "sqrt", device="cpu", package="math")
    import math

    assert harness.peer("math", "sqrt", device="cuda") is math.sqrt
    assert harness.peer("math", "sqrt", "pi", device="cuda") == [math.sqrt, math.pi]
