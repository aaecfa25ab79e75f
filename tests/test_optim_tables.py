"""The multi-tensor launch tables (kernels/multi_tensor.py): the cache never evicts a table that a
captured CUDA graph uses, evicts the least recently used otherwise, and builds CUDA tables from
page-locked memory; the AdamW kernel's division and square root are IEEE-rounded (div_rn /
sqrt_rn) when compiled for sm_90."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

from fastgen.kernels import multi_tensor as mt


@pytest.fixture
def small_cache(monkeypatch):
    monkeypatch.setattr(mt, "_cache", mt.OrderedDict())
    monkeypatch.setattr(mt, "_pinned", set())
    monkeypatch.setattr(mt, "_CACHE_LIMIT", 4)
    return mt


def _tensors(n, size=3):
    return [torch.zeros(size + i) for i in range(n)]


def test_tables_used_during_capture_are_never_evicted(small_cache, monkeypatch):
    captured = _tensors(2)
    monkeypatch.setattr(mt, "capturing", lambda: False)
    warm = mt.pointer_table(captured)  # built by a warm-up step
    monkeypatch.setattr(mt, "capturing", lambda: True)
    assert mt.pointer_table(captured) is warm  # looked up by the captured step: now pinned
    chunks = mt.chunk_table(captured, 2)
    monkeypatch.setattr(mt, "capturing", lambda: False)
    keep = [torch.zeros(1) for _ in range(40)]  # distinct addresses, alive for the whole test
    for i in range(20):  # many other tables: the cache stays bounded, the pinned ones stay
        mt.pointer_table(keep[2 * i: 2 * i + 2])
        assert len(mt._cache) <= max(mt._CACHE_LIMIT, len(mt._pinned))
    assert mt.pointer_table(captured) is warm
    assert mt.chunk_table(captured, 2) is chunks
    assert torch.equal(warm, torch.tensor([t.data_ptr() for t in captured]))


def test_eviction_is_least_recently_used(small_cache, monkeypatch):
    monkeypatch.setattr(mt, "capturing", lambda: False)
    keep = [torch.zeros(1) for _ in range(5)]
    tables = [mt.pointer_table([t]) for t in keep[:4]]
    assert mt.pointer_table([keep[0]]) is tables[0]  # touched: most recent now
    mt.pointer_table([keep[4]])  # evicts keep[1]'s table, the least recently used
    assert mt.pointer_table([keep[0]]) is tables[0]
    assert mt.pointer_table([keep[1]]) is not tables[1]


def test_chunk_table_covers_every_element():
    ts = [torch.zeros(n) for n in (1, 5, 8, 9)]
    table = mt.chunk_table(ts, 4)
    got = sorted((int(i), int(o)) for i, o in zip(table.chunk_ids, table.chunk_offs))
    assert got == [(0, 0), (1, 0), (1, 4), (2, 0), (2, 4), (3, 0), (3, 4), (3, 8)]
    assert table.numels.tolist() == [1, 5, 8, 9]


def test_adamw_kernel_divides_and_takes_roots_exactly_on_sm90():
    """PTX of the AdamW kernel for sm_90 (compiled in a child process with the interpreter off):
    div.rn / sqrt.rn only, never the approximate div.full / sqrt.approx that `/` and tl.sqrt give."""
    script = textwrap.dedent("""
        import re, sys
        sys.path.insert(0, sys.argv[1])
        import triton
        from triton.compiler import ASTSource
        import sm90
        for name, fn, sig, consts, nw in sm90.optim_cases("bf16"):
            if name.startswith("adamw"):
                s = dict(sig); s.update({k: "constexpr" for k in consts})
                ptx = triton.compile(ASTSource(fn, s, consts), target=sm90.TARGET, options={"num_warps": nw}).asm["ptx"]
                print(name, *sorted(set(re.findall(r"\\b((?:div|sqrt|rcp|rsqrt)\\.[a-z.0-9]+)", ptx))))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        ops = set(line.split()[3:])
        assert {"div.rn.f32", "sqrt.rn.f32"} <= ops, line
        assert not any("approx" in op or "full" in op for op in ops), line


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_graph_survives_a_flooded_table_cache(backend):
    """A captured FusedAdamW step keeps replaying correctly after hundreds of other tables
    passed through the cache (they would have evicted its tables before)."""
    from fastgen.optim import FusedAdamW

    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (1000, 4097, 3)]
    eager = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedAdamW(params, lr=torch.tensor(1e-2, device="cuda"), backend=backend, capturable=True)
    ref = torch.optim.AdamW(eager, lr=1e-2)
    for p, q in zip(params, eager):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    junk = [torch.zeros(1, device="cuda") for _ in range(2 * mt._CACHE_LIMIT)]
    for t in junk:
        mt.pointer_table([t])
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(params, eager):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
