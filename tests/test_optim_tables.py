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
from conftest import HAS_CUDA, INTERPRET, TRITON_DEVICE, capture_cuda_graph

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
    """PTX of the AdamW kernels for sm_90 (compiled in a child process with the interpreter off):
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
    assert len(lines) >= 6, proc.stdout  # AdamW and 8-bit AdamW, plain, amsgrad, one-pass; aligned and not
    for line in lines:
        ops = {w for w in line.split() if w.startswith(("div", "sqrt", "rcp", "rsqrt"))}
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
    graph, _ = capture_cuda_graph(opt.step)
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


def test_every_hot_access_of_the_optimizer_kernels_is_a_vector_on_sm90():
    """``python tests/sm90.py --widths``: each aligned optimizer kernel, compiled for sm_90 as its
    launcher specializes it, reads and writes every per-element tensor with exactly the 16-byte
    (8-byte for 8-bit codes) vector accesses that 8 elements per thread need — no scalar hot
    access, and no pass doubled. Scalar accesses left are the listed exceptions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90.py")), "--widths", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 24  # 12 kernel configs (with the EMA that reads a device decay), bf16 and fp32
    for r in rows:
        vec = lambda d: {k: v for k, v in d.items() if k.startswith("v")}  # noqa: E731
        assert vec(r["loads"]) == r["want_loads"], r
        assert vec(r["stores"]) == r["want_stores"], r
        assert r["want_loads"], r


@pytest.mark.skipif(not INTERPRET and TRITON_DEVICE != "cuda", reason="runs the Triton kernels")
def test_unaligned_views_get_their_own_launch_and_the_same_result():
    """A parameter that is a view starting 4 bytes into its storage (not 16-byte aligned) next
    to aligned ones: the kernels split the launch and every result matches the torch path."""
    from fastgen.optim import EMA, FusedAdamW, FusedAdamW8bit, FusedLion

    def params():
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(2501, generator=gen)
        ps = [torch.nn.Parameter(base[1:2049].to(TRITON_DEVICE)), torch.nn.Parameter(torch.randn(300, generator=gen)
                                                                                     .to(TRITON_DEVICE))]
        for p in ps:
            gbase = torch.randn(p.numel() + 1, generator=gen).to(TRITON_DEVICE)
            p.grad = gbase[1:]
        return ps

    assert params()[0].data_ptr() % 16 != 0 and params()[1].data_ptr() % 16 == 0
    for make in (lambda ps, b: FusedAdamW(ps, lr=1e-2, backend=b, max_grad_norm=0.5, ema=EMA(ps, backend=b)),
                 lambda ps, b: FusedAdamW8bit(ps, lr=1e-2, backend=b, min_8bit_size=256),
                 lambda ps, b: FusedLion(ps, lr=1e-2, backend=b)):
        a, b = params(), params()
        make(a, "torch").step()
        make(b, "triton").step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
