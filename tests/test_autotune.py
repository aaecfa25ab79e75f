"""kernels/autotune.py: the GPU launch-config tuner, and the attention candidates it times.

The selection logic runs on CPU with a stand-in clock (the timings themselves need a GPU);
the GPU tier tunes real attention launches and checks the outputs are still right.
"""

from __future__ import annotations


import pytest
import torch
from conftest import requires_gpu

from fastgen.kernels import attention_configs as cfgs
from fastgen.kernels import autotune


@pytest.fixture
def tuning_on(monkeypatch):
    """Tuning as on a GPU with FASTGEN_AUTOTUNE unset (the interpreter turns it off here)."""
    monkeypatch.setattr(autotune, "enabled", lambda: True)
    autotune.cache_clear()
    yield
    autotune.cache_clear()


def test_picks_the_fastest_and_caches_per_key(tuning_on):
    cands = [dict(BLOCK_M=64), dict(BLOCK_M=128), dict(BLOCK_M=32)]
    cost = {64: 3.0, 128: 1.0, 32: 2.0}
    launched, timed = [], []

    def launch(cfg):
        launched.append(cfg["BLOCK_M"])

    def timer(fn):
        fn()
        timed.append(launched[-1])
        return cost[launched[-1]]

    assert autotune.pick("k1", cands, launch, timer=timer) == dict(BLOCK_M=128)
    assert timed == [64, 128, 32]
    # cached: no more timing for the same key, a new key is timed again
    assert autotune.pick("k1", cands, launch, timer=timer) == dict(BLOCK_M=128) and len(timed) == 3
    cost[32] = 0.5
    assert autotune.pick("k2", cands, launch, timer=timer) == dict(BLOCK_M=32) and len(timed) == 6
    # the returned config is a copy: a launcher that pops keys does not damage the cache
    autotune.pick("k1", cands, launch, timer=timer).clear()
    assert autotune.pick("k1", cands, launch, timer=timer) == dict(BLOCK_M=128)


def test_fixed_and_failing_candidates(tuning_on):
    cands = [dict(c=0), dict(c=1), dict(c=2)]
    cost = {0: 2.0, 1: 0.1, 2: 1.0}
    last = []

    def launch(cfg):
        if cfg["c"] == 1:  # the fastest on paper, but it cannot launch on this GPU
            raise RuntimeError("out of shared memory")
        last.append(cfg["c"])

    def timer(fn):
        fn()
        return cost[last[-1]]

    def boom(fn):
        raise AssertionError("must not time")

    assert autotune.pick("f", cands, launch, fixed=True, timer=boom) == dict(c=0)  # deterministic=True
    assert autotune.pick("single", cands[:1], launch, timer=boom) == dict(c=0)
    assert autotune.pick("skip", cands, launch, timer=timer) == dict(c=2)
    # every candidate failing: the default (its own launch then reports the error)
    assert autotune.pick("all-bad", cands, lambda cfg: 1 / 0, timer=lambda fn: fn()) == dict(c=0)


def test_off_under_the_interpreter_and_by_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not autotune.enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    assert not autotune.enabled()
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "1")
    assert autotune.enabled()


def test_length_buckets():
    assert [autotune.length_bucket(n) for n in (1, 64, 65, 77, 4096, 4097, 17550)] == [64, 64, 128, 128, 4096,
                                                                                       8192, 32768]


@pytest.mark.parametrize("D", [16, 40, 64, 72, 80, 96, 128, 160, 256])
def test_attention_candidates(D):
    """Default first, no duplicates, the head-dim blocks of the default; only the default (at 32 x 32
    tiles) under the interpreter (what the CPU tests run)."""
    for fn, kernel in ((cfgs.attention_fwd_candidates, "fwd"), (cfgs.attention_bwd_dkdv_candidates, "bwd"),
                       (cfgs.attention_bwd_dq_candidates, "bwd")):
        cands = fn(D)
        assert all((c["BLOCK_D"], c["BLOCK_DR"]) == cfgs.kernel_head_blocks(D, kernel) for c in cands)
        assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)
        assert (len(cands) == 1) == (cfgs.block_d(D) > 128)
    assert cfgs.launch_config("fwd", D, False, None, interpret=False) is None  # the tuner picks
    assert cfgs.launch_config("fwd", D, False, None, interpret=True) == dict(
        cfgs.attention_fwd_config(D), BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


@pytest.mark.gpu
@requires_gpu
def test_gpu_autotuned_attention_is_right(monkeypatch):
    from fastgen.ops import attention, attention_ref

    monkeypatch.setenv("FASTGEN_AUTOTUNE", "1")
    autotune.cache_clear()
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1000, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    o = attention(q, k, v, causal=True, backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    kinds = sorted(key[0] for key in autotune._CACHE)
    assert kinds == ["bwd_dkdv", "bwd_dq", "fwd"]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = attention_ref(q64, k64, v64, causal=True)
    g64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    for a, b in zip((o, *grads), (o64, *g64)):
        assert (a.double() - b).abs().max() <= 2e-2 * b.abs().max()
    # deterministic=True: the fixed defaults, whatever the cache holds
    o_fixed = attention(q, k, v, causal=True, backend="triton", deterministic=True)
    monkeypatch.setenv("FASTGEN_AUTOTUNE", "0")
    assert torch.equal(o_fixed, attention(q, k, v, causal=True, backend="triton"))
    autotune.cache_clear()


def test_candidates_are_built_only_on_a_miss(tuning_on):
    built = []

    def make():
        built.append(1)
        return [dict(c=0), dict(c=1)]

    timer = lambda fn: (fn(), 1.0)[1]  # noqa: E731
    assert autotune.pick("lazy", make, lambda cfg: None, timer=timer) == dict(c=0) and built == [1]
    assert autotune.pick("lazy", make, lambda cfg: None, timer=timer) == dict(c=0) and built == [1]
    assert autotune.pick("lazy", make, lambda cfg: None, fixed=True) == dict(c=0) and built == [1, 1]


def test_failing_candidates_are_logged_with_the_reason(tuning_on, caplog):
    autotune.FAILED.clear()

    def launch(cfg):
        if cfg["c"] == 1:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")

    with caplog.at_level("WARNING", logger="fastgen.autotune"):
        assert autotune.pick("k", [dict(c=0), dict(c=1)], launch, timer=lambda fn: (fn(), 1.0)[1]) == dict(c=0)
    assert autotune.FAILED["k"] == [({"c": 1}, "RuntimeError: out of resource: shared memory, Required: 262144, "
                                               "Hardware limit: 232448")]
    assert "candidate {'c': 1} failed to compile or launch" in caplog.text and "shared memory" in caplog.text
    autotune.FAILED.clear()


_CANDIDATES = cfgs.CANDIDATES


@pytest.mark.gpu
@pytest.mark.candidates
@requires_gpu
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("D", [40, 64, 72, 80, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("kernel", list(_CANDIDATES))
def test_gpu_every_candidate_matches_the_reference(kernel, D, tma, monkeypatch):
    """Every launch config the tuner may ship (alternative tiles, TMA tiles), each forced once at a
    small odd shape, against the fp32 reference by the FlashAttention rule: a fast but wrong tile
    can never win the tuner."""
    import math

    from conftest import assert_fa_rule

    from fastgen.ops import attention, attention_ref

    if tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tiles need a Hopper-class GPU")
    cands = _CANDIDATES[kernel](D, tma)
    if tma:
        cands = [c for c in cands if c.get("TMA")]
        if not cands:
            pytest.skip(f"no TMA candidate of {kernel} at D = {D}")
    g = torch.Generator(device="cuda").manual_seed(D)
    q = torch.randn(2, 203, 4, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 150, 2, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    do = torch.randn_like(q)
    ro = attention_ref(q, k, v, causal=True)
    rgrads = torch.autograd.grad(ro.float(), (q, k, v), do.float())
    lq, lk, lv = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))  # plain torch in bf16
    mask = torch.ones(203, 150, dtype=torch.bool, device="cuda").tril(150 - 203)
    lo = torch.nn.functional.scaled_dot_product_attention(lq, lk, lv, attn_mask=mask, enable_gqa=True,
                                                          scale=1 / math.sqrt(D))
    lgrads = [t.transpose(1, 2) for t in torch.autograd.grad(lo, (lq, lk, lv), do.transpose(1, 2))]
    lo = lo.transpose(1, 2)
    real_pick = autotune.pick
    for i, cfg in enumerate(cands):
        ran = []

        def pick(key, candidates, launch, fixed=False, timer=None):
            if key[0] != kernel:
                return real_pick(key, candidates, launch, fixed=True)
            ran.append(key)
            return dict(cfg)

        monkeypatch.setattr(autotune, "pick", pick)
        o = attention(q, k, v, causal=True, backend="triton")
        grads = torch.autograd.grad(o, (q, k, v), do)
        assert ran, f"{kernel} candidate {cfg} did not run"
        name = f"{kernel} candidate {i} {cfg}"
        if kernel == "fwd":
            assert_fa_rule(f"{name}: out", o, lo, ro.float(), 1e-3)
        for n, gr, lg, rg in zip(("dq", "dk", "dv"), grads, lgrads, rgrads):
            if kernel == "fwd" or (kernel == "bwd_dq") == (n == "dq"):
                assert_fa_rule(f"{name}: {n}", gr, lg, rg, 1e-3)
