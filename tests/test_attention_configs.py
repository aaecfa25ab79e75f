"""kernels/attention_configs.py: the attention kernels' launch configs as data.

The candidate lists and default rules replaced hand-written tuples spread over the kernel
files; ``attention_configs_before.json`` holds what that code produced (captured from it before
the change, TRITON_INTERPRET unset), and these tests hold the data-driven rules to it: the same
shipped defaults, the same candidate sets for the autotuner (so the static tier compiles the
same configs), and the same config launched under the interpreter and each test override.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import triton

from fastgen.kernels import attention_configs as cfgs
from fastgen.kernels.attention_configs import CANDIDATES, LaunchOverride, launch_config

BEFORE = json.loads((Path(__file__).with_name("attention_configs_before.json")).read_text())
HEAD_DIMS = range(16, 257, 8)  # every head dim the kernels take


def _row(c: dict) -> list:
    return [c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], c["BLOCK_D"], c["BLOCK_DR"],
            int(c.get("TMA", False))]


@pytest.mark.parametrize("kernel", list(CANDIDATES))
@pytest.mark.parametrize("tma", [False, True])
def test_candidates_equal_the_hand_written_lists(kernel, tma):
    """For every head dim: the same default first (the shipped config), the same set of candidates,
    no duplicates."""
    rule = (lambda D, tma: CANDIDATES[kernel](D, tma, old_ptxas=False)) if kernel == "bwd_dkdv" else CANDIDATES[kernel]
    for D in HEAD_DIMS:
        old = BEFORE["candidates"][f"{kernel} {D} {int(tma)}"]
        new = [_row(c) for c in rule(D, tma)]
        assert new[0] == old[0], (kernel, D, tma, "default")
        assert len(new) == len({tuple(r) for r in new}), (kernel, D, tma, "duplicates")
        assert sorted(new) == sorted(old), (kernel, D, tma)


def test_dkdv_candidates_before_triton_39_drop_only_the_tiles_its_ptxas_spills():
    """Triton 3.6's ptxas (the GPU image) spills 20-44 bytes in three causal dK/dV TMA tiles
    (measured by tests/test_static_sm90.py under 3.6): 64 x 64 x 8 at 48 / 64 head-dim columns,
    32 x 64 x 4 and 32 x 128 x 8 at 128. With ``old_ptxas`` exactly those leave the list; the
    default and every pointer-load tile stay."""
    def spills(r):
        bm, bn, nw, _, bd, dr, tma = r
        return tma == 1 and ((bm, bn, nw) == (64, 64, 8) and bd + dr > 32
                             or (bm, bn, nw) in ((32, 64, 4), (32, 128, 8)) and bd + dr == 128)

    removed = 0
    for D in HEAD_DIMS:
        for tma in (False, True):
            new = [_row(c) for c in cfgs.attention_bwd_dkdv_candidates(D, tma, old_ptxas=False)]
            old = [_row(c) for c in cfgs.attention_bwd_dkdv_candidates(D, tma, old_ptxas=True)]
            assert old == [r for r in new if not spills(r)], (D, tma)
            assert old[0] == new[0] and not spills(new[0]), (D, tma)
            removed += len(new) - len(old)
    assert removed >= 6  # D = 40, 64 (64 x 64) and D = 96, 128 (two tiles each), at least
    assert cfgs.OLD_PTXAS == (tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9))


def test_defaults_and_preprocess_equal_the_hand_written_rules():
    for D in HEAD_DIMS:
        for kernel, default in (("fwd", cfgs.attention_fwd_config), ("bwd_dkdv", cfgs.attention_bwd_dkdv_config),
                                ("bwd_dq", cfgs.attention_bwd_dq_config)):
            assert _row(default(D)) == BEFORE["candidates"][f"{kernel} {D} 0"][0]
        p = cfgs.attention_preprocess_config(D)
        assert [p["BLOCK_M"], p["BLOCK_D"], p["num_warps"]] == BEFORE["candidates"][f"preprocess {D}"]


# What the old module-global forcing helpers did, as overrides passed down the call.
_MODES = {
    "interp": (True, None),
    "interp_16x32": (True, LaunchOverride(blocks=(16, 32))),
    "interp_16x16_device_bounds": (True, LaunchOverride(blocks=(16, 16), device_bounds=True)),
    "interp_shipped": (True, LaunchOverride(shipped=True)),
    "interp_tma_on": (True, LaunchOverride(tma=True)),
    "interp_tma_off": (True, LaunchOverride(tma=False)),
    "interp_16x32_tma_on": (True, LaunchOverride(blocks=(16, 32), tma=True)),
    "gpu_tma_on": (False, LaunchOverride(tma=True)),
    "gpu_tma_off": (False, LaunchOverride(tma=False)),
}


@pytest.mark.parametrize("mode", list(_MODES))
def test_launched_config_under_the_interpreter_and_overrides(mode):
    """The one config a launch runs without the tuner, as the old forcing helpers chose it. Forcing
    TMA on a GPU may now pick another TMA tile of the same head-dim blocks (dQ at D = 96 / 192: the
    first split tile in the new list order); it is still a candidate."""
    interpret, launch = _MODES[mode]
    old = BEFORE["launched"][mode]
    assert cfgs.host_bounds(launch, interpret) == old["host_bounds"]
    for key, want in old.items():
        if key == "host_bounds":
            continue
        name, D, *tma = key.split()
        if name == "preprocess":
            p = cfgs.attention_preprocess_config(int(D), launch.blocks[0] if launch and launch.blocks else None)
            assert [p["BLOCK_M"], p["BLOCK_D"], p["num_warps"]] == want, key
            continue
        got = launch_config(name, int(D), bool(int(tma[0])), launch, interpret)
        if mode == "gpu_tma_on" and tma == ["1"]:
            assert got in [dict(c) for c in CANDIDATES[name](int(D), True) if c.get("TMA")], key
            assert _row(got)[4:] == want[4:], key  # same head-dim blocks, TMA
        else:
            assert _row(got) == want, key


def test_no_override_on_a_gpu_leaves_the_choice_to_the_tuner():
    assert all(launch_config(k, 64, tma, None, interpret=False) is None for k in CANDIDATES for tma in (0, 1))


def test_launch_override_round_trips_through_the_op_schema():
    for o in (LaunchOverride(), LaunchOverride(blocks=(16, 32), device_bounds=True), LaunchOverride(shipped=True),
              LaunchOverride(tma=False), LaunchOverride(blocks=(32, 64), tma=True)):
        assert all(isinstance(x, int) for x in o.encode())
        assert LaunchOverride.decode(o.encode()) == o
    assert LaunchOverride.decode(None) is None
    with pytest.raises(ValueError, match="exclude"):
        LaunchOverride(blocks=(16, 16), shipped=True)


def test_candidates_do_not_depend_on_the_interpreter(monkeypatch):
    """The lists are pure functions of the head dim: what the static tier compiles is what a GPU tunes."""
    lists = {(k, D, t): CANDIDATES[k](D, t) for k in CANDIDATES for D in (40, 96, 160) for t in (False, True)}
    for value in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert {key: CANDIDATES[key[0]](*key[1:]) for key in lists} == lists
