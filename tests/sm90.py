"""Compile Triton kernels for an H100 (sm_90) without a GPU and read ptxas's resource report.

Used by the static tier (tests/test_static_sm90.py) and handy by hand when tuning
launch configs: ``python tests/sm90.py`` prints registers and spills per config.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def _widths():
    try:  # run as a script (tests/ on the path) or imported as tests.sm90
        import widths
    except ImportError:  # pragma: no cover
        from tests import widths
    return widths


def resource_usage(fn, signature: dict, constexprs: dict, num_warps: int, launch: bool = False,
                   values: dict | None = None) -> dict:
    """{'registers', 'shared', 'spill_stores', 'spill_loads', 'stack'} of ``fn`` compiled for sm_90.

    ``launch``: with the specialization a real launch on contiguous, aligned tensors gets
    (tests/widths.compile_launch: pointers 16-byte aligned, integer arguments divisible by 16
    unless ``values`` says otherwise); without it, the unhinted code an odd view runs."""
    if launch:
        compiled = _widths().compile_launch(fn, signature, constexprs, num_warps, values)
    else:
        sig = dict(signature)
        sig.update({name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run(
            [ptxas_path(), "-v", f"--gpu-name={arch}", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    regs = re.search(r"Used (\d+) registers", out)
    return {
        "registers": int(regs.group(1)),
        "shared": int(compiled.metadata.shared),  # bytes of shared memory per block (TMA / pipelining buffers)
        "stack": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def rms_norm_cases(dtype: str = "bf16"):
    """(name, fn, signature, constexprs, num_warps) for every config the RMSNorm launchers pick
    over representative widths, with and without weight / residual / upstream h gradient."""
    import torch

    from fastgen.kernels import rms_norm as k

    p, wdt = f"*{dtype}", f"*{dtype}"
    fwd_sig = {"X": p, "R": p, "W": wdt, "Y": p, "H": p, "RSTD": "*fp32", "M": "i32", "N": "i32",
               "stride_x": "i64", "stride_r": "i64", "eps": "fp32"}
    bwd_sig = {"DY": p, "H": p, "W": wdt, "RSTD": "*fp32", "DHOUT": p, "C": "*fp32", "DX": p,
               "DW_PARTIAL": "*fp32", "M": "i32", "N": "i32", "stride_dy": "i64", "stride_h": "i64",
               "stride_dho": "i64", "num_row_programs": "i32",
               "tiles_per_program": "i32"}
    dot_sig = {"DY": p, "H": p, "W": wdt, "RSTD": "*fp32", "C": "*fp32", "N": "i32", "stride_dy": "i64",
               "stride_h": "i64"}
    cuda = torch.device("cuda", 0)
    for N in (128, 1024, 4096, 8192, 16384, 65536):
        M = 32768
        for has_w, has_r in ((True, False), (True, True)):
            cfg = k.fwd_config(M, N, has_r)
            cfg.pop("grid")
            nw = cfg.pop("num_warps")
            yield (f"fwd N={N} w={has_w} r={has_r}", k._rms_norm_fwd_kernel, fwd_sig,
                   dict(cfg, HAS_W=has_w, HAS_R=has_r, INTERPRET=False), nw)
        # bwd_config needs the SM count only for the grid, which does not change the code.
        orig = k.max_programs
        k.max_programs = lambda device: 4 * 132
        try:
            bcfg = k.bwd_config(M, N, cuda)
        finally:
            k.max_programs = orig
        bcfg.pop("grid")
        nw = bcfg.pop("num_warps")
        for has_w, has_d in ((True, False), (True, True)):
            yield (f"bwd N={N} w={has_w} dhout={has_d}", k._rms_norm_bwd_kernel, bwd_sig,
                   dict(bcfg, HAS_W=has_w, HAS_DHOUT=has_d, INTERPRET=False), nw)
        if not bcfg["FULL_ROW"]:
            yield (f"rowdot N={N}", k._rms_norm_bwd_rowdot_kernel, dot_sig,
                   dict(HAS_W=True, BLOCK_N=bcfg["BLOCK_N"]), nw)


def rope_cases(dtype: str = "bf16"):
    """(name, fn, signature, constexprs, num_warps) for the RoPE and fused QK-norm + RoPE launch
    configs over representative head shapes (Flux 24 x 128, GQA, partial rotary, D = 72 / 40)."""
    from fastgen.kernels import qk_norm_rope as kq
    from fastgen.kernels import rope as kr

    p = f"*{dtype}"
    strides = lambda *names: {f"s{n}{a}": "i64" for n in names for a in "bsh"}  # noqa: E731
    dims = {"T": "i32", "S": "i32", "HQ": "i32", "HK": "i32", "R": "i32", "D": "i32"}
    tables = {"scb": "i64", "scs": "i64", "ssb": "i64", "sss": "i64"}
    rope_sig = {"Q": p, "K": p, "QO": p, "KO": p, "COS": "*fp32", "SIN": "*fp32", **dims,
                **strides("q", "k", "oq", "ok"), **tables, "n_q_hblocks": "i32"}
    fwd_sig = {"Q": p, "K": p, "WQ": p, "WK": p, "QO": p, "KO": p, "COS": "*fp32", "SIN": "*fp32", **dims,
               **strides("q", "k", "oq", "ok"), **tables, "eps": "fp32", "n_q_hblocks": "i32"}
    bwd_sig = {"DQO": p, "DKO": p, "Q": p, "K": p, "WQ": p, "WK": p, "DQ": p, "DK": p, "DW_PARTIAL": "*fp32",
               "COS": "*fp32", "SIN": "*fp32", **dims, **strides("dq", "dk", "q", "k", "oq", "ok"), **tables,
               "eps": "fp32", "n_q_hblocks": "i32", "n_hblocks": "i32", "num_t_programs": "i32",
               "tiles_per_program": "i32"}
    T = 4608
    for hq, hk, D, R in ((24, 24, 128, 128), (32, 8, 128, 64), (16, 16, 64, 64), (12, 12, 72, 72), (8, 8, 40, 40),
                         (8, 2, 256, 256)):
        for inter in (True, False):
            tag = f"hq={hq} hk={hk} D={D} R={R} {'inter' if inter else 'halves'}"
            cfg = kr.rope_config(T, hq, hk, D, R, inter)
            for k in ("grid", "n_q_hblocks"):
                cfg.pop(k)
            nw = cfg.pop("num_warps")
            for inverse in (False, True):
                yield (f"rope {tag} inverse={inverse}", kr._rope_kernel, rope_sig,
                       dict(cfg, INVERSE=inverse, INTERLEAVED=inter, COPY_PASS=D > R, INTERPRET=False), nw)
            cfg = kq.qk_norm_rope_fwd_config(T, hq, hk, D, R, inter)
            for k in ("grid", "n_q_hblocks"):
                cfg.pop(k)
            nw = cfg.pop("num_warps")
            yield (f"qk_norm_rope fwd {tag}", kq._qk_norm_rope_fwd_kernel, fwd_sig,
                   dict(cfg, INTERLEAVED=inter, HAS_PASS=D > R, INTERPRET=False), nw)
            cfg = kq.qk_norm_rope_bwd_config(T, hq, hk, D, R, 4 * 132, inter)
            for k in ("grid", "n_q_hblocks", "n_hblocks", "num_t_programs", "tiles_per_program"):
                cfg.pop(k)
            nw = cfg.pop("num_warps")
            yield (f"qk_norm_rope bwd {tag}", kq._qk_norm_rope_bwd_kernel, bwd_sig,
                   dict(cfg, INTERLEAVED=inter, HAS_PASS=D > R, INTERPRET=False), nw)


def group_norm_cases(dtype: str = "bf16"):
    """(name, fn, signature, constexprs, num_warps) for the GroupNorm (+ SiLU) launch configs over
    representative UNet / VAE shapes (K = C / G from 3 to 1024, the kernels' limit; one program
    per group and split reductions), contiguous and channels-last; configs that compile to the
    same code are yielded once."""
    from fastgen.kernels import group_norm as k

    p, f32 = f"*{dtype}", "*fp32"
    dims = {"C": "i32", "S": "i32", "G": "i32", "K": "i32", "chunk_s": "i32", "iters": "i32"}
    gdims = {"C": "i32", "S": "i32", "G": "i32", "K": "i32", "iters": "i32"}
    fwd_sig = {"X": p, "W": p, "B": p, "Y": p, "MEAN": f32, "RSTD": f32, **gdims, "eps": "fp32"}
    bwd_sig = {"DY": p, "X": p, "W": p, "B": p, "MEAN": f32, "RSTD": f32, "DWP": f32, "DBP": f32, "DX": p,
               **gdims, "inv_l": "fp32"}
    stats_sig = {"X": p, "PART": f32, **dims}
    comb_sig = {"PART": f32, "MEAN": f32, "RSTD": f32, "splits": "i32", "iters": "i32", "eps": "fp32"}
    apply_sig = {"X": p, "W": p, "B": p, "MEAN": f32, "RSTD": f32, "Y": p, **dims}
    red_sig = {"DY": p, "X": p, "W": p, "B": p, "MEAN": f32, "RSTD": f32, "DWP": f32, "DBP": f32, **dims}
    bcomb_sig = {"DWP": f32, "DBP": f32, "W": p, "C1": f32, "C2": f32, "C": "i32", "G": "i32", "K": "i32",
                 "splits": "i32", "iters": "i32", "inv_l": "fp32"}
    dx_sig = {"DY": p, "X": p, "W": p, "B": p, "MEAN": f32, "RSTD": f32, "C1": f32, "C2": f32, "DX": p, **dims}
    seen = set()

    def once(name, fn, sig, consts, nw):
        key = (fn.__name__, tuple(sorted(consts.items())), nw)
        if key not in seen:
            seen.add(key)
            yield name, fn, sig, consts, nw

    for N, C, S, G in ((8, 512, 128 * 128, 32), (1, 128, 1024 * 1024, 32), (4, 64, 16 * 64 * 64, 1),
                       (1, 1024, 64, 1), (2, 96, 17 * 13, 32), (2, 1280, 8 * 8, 32), (2, 320, 32 * 32, 32),
                       (2, 64, 64 * 64, 32), (2, 512, 8 * 8, 1), (2, 1024, 8 * 8, 32)):
        cfg = k.group_norm_config(N, C, S, G)
        nw = cfg["num_warps"]
        shape = f"N={N} C={C} S={S} G={G}"
        for cl in (False, True):
            tag = f"{shape} {'nhwc' if cl else 'nchw'}"
            tile = dict(BLOCK_K=cfg["BLOCK_K"], BLOCK_S=cfg["BLOCK_S"],
                        ALIGN=k.align_hint(C // G, S, cfg["chunk_s"], cl))  # as the launchers pass them
            flags = dict(HAS_W=True, HAS_B=True, SILU=True, CHANNELS_LAST=cl)
            if cfg["splits"] == 1:
                consts = dict(tile, **flags, INTERPRET=False)
                yield from once(f"gn fwd {tag}", k._group_norm_fwd_kernel, fwd_sig, consts, nw)
                yield from once(f"gn bwd {tag}", k._group_norm_bwd_kernel, bwd_sig, consts, nw)
                # group_norm_apply (given statistics: the colour-consistent VAE tiling) at this tile
                yield from once(f"gn apply {tag}", k._group_norm_apply_kernel, apply_sig, consts, nw)
                continue
            yield from once(f"gn stats {tag}", k._group_norm_stats_kernel, stats_sig, dict(tile, CHANNELS_LAST=cl), nw)
            yield from once(f"gn apply {tag}", k._group_norm_apply_kernel, apply_sig,
                            dict(tile, **flags, INTERPRET=False), nw)
            yield from once(f"gn bwd_reduce {tag}", k._group_norm_bwd_reduce_kernel, red_sig, dict(tile, **flags), nw)
            yield from once(f"gn bwd_dx {tag}", k._group_norm_bwd_dx_kernel, dx_sig,
                            dict(tile, **flags, INTERPRET=False), nw)
        if cfg["splits"] > 1:
            ccfg = k.combine_config(cfg["splits"])
            yield from once(f"gn combine {shape}", k._group_norm_combine_kernel, comb_sig,
                            dict(BLOCK_SP=ccfg["BLOCK_SP"]), ccfg["num_warps"])
            bcfg = k.combine_config(cfg["splits"], C // G)
            yield from once(f"gn bwd_combine {shape}", k._group_norm_bwd_combine_kernel, bcomb_sig,
                            dict(HAS_W=True, BLOCK_SP=bcfg["BLOCK_SP"], BLOCK_K=cfg["BLOCK_K"]), bcfg["num_warps"])


def optim_cases(dtype: str = "bf16"):
    """The multi-tensor optimizer kernels (AdamW, 8-bit AdamW, Lion, schedule-free AdamW, EMA, clipping) for
    ``dtype`` parameters."""
    import triton.language as tl

    from fastgen.kernels import adamw, adamw8bit, clip_grad, ema, lion, schedulefree

    pdt = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[dtype]
    tables = {"NUMELS": "*i64", "CHUNK_IDS": "*i32", "CHUNK_OFFS": "*i64"}
    adamw_sig = {"P_PTRS": "*i64", "G_PTRS": "*i64", "M_PTRS": "*i64", "V_PTRS": "*i64", "VMAX_PTRS": "*i64",
                 "STEP_PTRS": "*i64", **tables, "LR": "*fp32", "beta1": "fp32", "beta2": "fp32",
                 "ln_beta1": "fp32", "ln_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32", "seed": "i32",
                 "COEF": "*fp32", "SH_PTRS": "*i64", "ema_weight": "fp32"}
    cfg = adamw.adamw_config()
    nw = cfg.pop("num_warps")
    adamw_cases = [(f" amsgrad={ams} stochastic={sr}" + (" clip+ema" if one_pass else ""), adamw._adamw_kernel,
                    adamw_sig, dict(P_DTYPE=pdt, G_DTYPE=pdt, S_DTYPE=tl.float32, LR_IS_PTR=True, AMSGRAD=ams,
                                    MAXIMIZE=False, STOCHASTIC=sr, CLIP=one_pass, EMA=one_pass,
                                    SH_DTYPE=tl.float32, INTERPRET=False, **cfg), nw)
                   for ams, sr, one_pass in ((False, False, False), (True, dtype == "bf16", False),
                                             (False, dtype == "bf16", True))]
    q8_sig = {"P_PTRS": "*i64", "G_PTRS": "*i64", "QM_PTRS": "*i64", "AM_PTRS": "*i64", "QV_PTRS": "*i64",
              "AV_PTRS": "*i64", "STEP_PTRS": "*i64", **tables, "SMAP": "*fp32", "SBOUND": "*fp32", "UMAP": "*fp32",
              "UBOUND": "*fp32", "LR": "*fp32", "beta1": "fp32", "beta2": "fp32", "ln_beta1": "fp32",
              "ln_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32", "seed": "i32", "COEF": "*fp32",
              "SH_PTRS": "*i64", "ema_weight": "fp32"}
    for aligned in (True, False):
        cfg = adamw8bit.adamw8bit_config(aligned)
        nw = cfg.pop("num_warps")
        for one_pass in (False, True):
            yield (f"adamw8bit{' clip+ema' if one_pass else ''}{'' if aligned else ' unaligned'}",
                   adamw8bit._adamw8bit_kernel, q8_sig,
                   dict(P_DTYPE=pdt, G_DTYPE=pdt, LR_IS_PTR=True, MAXIMIZE=False, STOCHASTIC=dtype == "bf16",
                        CLIP=one_pass, EMA=one_pass, SH_DTYPE=tl.float32, INTERPRET=False, ALIGNED=aligned,
                        **cfg), nw)
    lion_sig = {"P_PTRS": "*i64", "G_PTRS": "*i64", "M_PTRS": "*i64", **tables, "LR": "fp32", "beta1": "fp32",
                "beta2": "fp32", "weight_decay": "fp32", "COEF": "*fp32", "SH_PTRS": "*i64", "ema_weight": "fp32"}
    cfg = lion.lion_config()
    nw = cfg.pop("num_warps")
    cases = [("adamw" + a, k, sig, c, n) for a, k, sig, c, n in adamw_cases]
    for one_pass in (False, True):
        cases.append(("lion" + (" clip+ema" if one_pass else ""), lion._lion_kernel, lion_sig,
                      dict(P_DTYPE=pdt, G_DTYPE=pdt, S_DTYPE=tl.float32, LR_IS_PTR=False, MAXIMIZE=False,
                           CLIP=one_pass, EMA=one_pass, SH_DTYPE=tl.float32, INTERPRET=False, **cfg), nw))
    cfg = ema.ema_config()
    nw = cfg.pop("num_warps")
    for device_weight in (False, True):  # a host decay, or the warm-up decay read on the device
        cases.append(("ema" + (" device-decay" if device_weight else ""), ema._ema_kernel,
                      {"S_PTRS": "*i64", "P_PTRS": "*i64", **tables, "weight": "*fp32" if device_weight else "fp32"},
                      dict(S_DTYPE=tl.float32, P_DTYPE=pdt, INTERPRET=False, WEIGHT_IS_PTR=device_weight, **cfg), nw))
    cfg = schedulefree.schedulefree_config()
    nw = cfg.pop("num_warps")
    cases.append(("schedulefree", schedulefree._schedulefree_kernel,
                  {"Y_PTRS": "*i64", "G_PTRS": "*i64", "Z_PTRS": "*i64", "V_PTRS": "*i64", **tables, "SCALARS": "*fp32",
                   **{k: "fp32" for k in ("beta2", "eps", "weight_decay")}},
                  dict(P_DTYPE=pdt, G_DTYPE=pdt, INTERPRET=False, **cfg), nw))
    cfg = clip_grad.clip_config()
    nw = cfg.pop("num_warps")
    cases.append(("clip sum_squares", clip_grad._sum_squares_kernel,
                  {"G_PTRS": "*i64", **tables, "PARTIAL": "*fp32"}, dict(G_DTYPE=pdt, **cfg), nw))
    cases.append(("clip scale", clip_grad._scale_kernel, {"G_PTRS": "*i64", **tables, "COEF": "*fp32"},
                  dict(G_DTYPE=pdt, INTERPRET=False, **cfg), nw))
    # What the launchers pass for contiguous tensors of ordinary shapes (16-byte-aligned bases):
    # ALIGNED=True; an odd view goes to its own ALIGNED=False launch, compiled too.
    # (compiled for bf16 only: the unaligned configs are the same code with scalar accesses, and bf16 is
    # the dtype whose rounding needs the most registers).
    for name, k, sig, consts, n in cases:
        yield name, k, sig, dict(consts, ALIGNED=True), n
        if dtype == "bf16":
            yield name + " unaligned", k, sig, dict(consts, ALIGNED=False), n


def optim_hot_bytes(name: str, p_bytes: int) -> tuple[list[int], list[int]]:
    """Bytes per element of each hot (per-element) tensor an optimizer kernel case loads and
    stores, parameters and gradients ``p_bytes``, fp32 states and shadows, uint8 codes."""
    P, one_pass = p_bytes, "clip+ema" in name
    shadow = [4] if one_pass else []
    if name.startswith("adamw8bit"):
        return [P, P, 1, 1] + shadow, [P, 1, 1] + shadow
    if name.startswith("adamw"):
        vmax = [4] if "amsgrad=True" in name else []
        return [P, P, 4, 4] + vmax + shadow, [P, 4, 4] + vmax + shadow
    if name.startswith("lion"):
        return [P, P, 4] + shadow, [P, 4] + shadow
    if name.startswith("ema"):
        return [4, P], [4]
    if name.startswith("schedulefree"):  # y, g, z, v in the parameter's dtype
        return [P, P, P, P], [P, P, P]
    if name.startswith("clip sum_squares"):
        return [P], []
    if name.startswith("clip scale"):
        return [P], [P]
    raise KeyError(name)


WIDTH_EXCEPTIONS = {
    "ld.global.b64": "address tables, element counts and chunk starts (one per program)",
    "ld.global.b32 / b16 / b8": "scalars (step, lr, clip coefficient), 8-bit AdamW's per-block absmax and map "
                                "lookups, and a tensor's last, partial chunk (masked, scalar on purpose)",
}


def _vectors(byte_list, per_thread: int) -> Counter:
    """The 16-byte (v4.b32) and 8-byte (v2.b32) accesses that ``per_thread`` elements of each tensor need."""
    out = Counter()
    for b in byte_list:
        total = per_thread * b
        if total >= 16:
            out["v4.b32"] += total // 16
        elif total == 8:
            out["v2.b32"] += 1
    return out


def widths(dtypes=("bf16", "fp32")) -> list[dict]:
    """Global loads and stores by width of every aligned optimizer kernel case, compiled for sm_90
    as its launcher specializes it, with the vector accesses its hot tensors need
    (``optim_hot_bytes``): each hot tensor read once and written once per element block."""
    rows = []
    for dtype in dtypes:
        p_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
        for name, fn, sig, consts, nw in optim_cases(dtype):
            if name.endswith("unaligned"):
                continue
            s = dict(sig)
            s.update({k: "constexpr" for k in consts})
            ptx = triton.compile(ASTSource(fn, s, consts), target=TARGET, options={"num_warps": nw}).asm["ptx"]
            count = lambda op: Counter(m.removeprefix(op + ".global.")  # noqa: E731
                                       for m in re.findall(op + r"\.global\.[\w.]+", ptx))
            elements = consts.get("BLOCK") or consts["QB"] * consts["QBLOCK"]
            loads, stores = optim_hot_bytes(name, p_bytes)
            per_thread = elements // (32 * nw)
            rows.append(dict(name=f"{name} {dtype}", loads=dict(count("ld")), stores=dict(count("st")),
                             want_loads=dict(_vectors(loads, per_thread)),
                             want_stores=dict(_vectors(stores, per_thread))))
    return rows


def layer_norm_cases(dtype: str = "bf16"):
    """(name, fn, signature, constexprs, num_warps) for the configs the LayerNorm / modulation launchers
    (fastgen/kernels/layer_norm.py) pick over representative widths, for each fused form."""
    import torch

    from fastgen.kernels import layer_norm as k

    p = f"*{dtype}"
    strides = lambda *names: {n: "i64" for n in names}  # noqa: E731
    fwd_sig = {"X": p, "Y": p, "GATE": p, "SHIFT": p, "SCALE": p, "W": p, "BIAS": p, "OUT": p, "XNEW": p,
               "MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "N": "i32", "S": "i32",
               **strides("sx_b", "sx_s", "sy_b", "sy_s", "sg_b", "sg_s", "ssh_b", "ssh_s", "ssc_b", "ssc_s"),
               "eps": "fp32"}
    bwd_sig = {"DOUT": p, "DXNEW": p, "H": p, "Y": p, "GATE": p, "SCALE": p, "W": p, "BIAS": p,
               "MEAN": "*fp32", "RSTD": "*fp32", "C": "*fp32", "DH": p, "DY": p, "DSCALE": p, "DGATE": p,
               "DW_P": "*fp32", "DB_P": "*fp32", "DSHIFT_P": "*fp32", "DSCALE_P": "*fp32", "DGATE_P": "*fp32",
               "M": "i32", "N": "i32", "S": "i32", "GROUP": "i32", "P": "i32", "tiles_per_program": "i32",
               **strides("sdo_b", "sdo_s", "sdx_b", "sdx_s", "sh_b", "sh_s", "sy_b", "sy_s", "sg_b", "sg_s",
                         "ssc_b", "ssc_s")}
    chunked_sig = {n: v for n, v in fwd_sig.items() if n != "M"}
    chunked_sig["n_chunks"] = "i32"
    stats_sig = {"DOUT": p, "H": p, "SCALE": p, "W": p, "MEAN": "*fp32", "RSTD": "*fp32", "C": "*fp32",
                 "N": "i32", "S": "i32", **strides("sdo_b", "sdo_s", "sh_b", "sh_s", "ssc_b", "ssc_s")}
    # name: (NORM, HAS_W, HAS_B, HAS_MOD, HAS_RES)
    forms = {
        "ln_wb": (1, True, True, False, False),
        "ln_mod": (1, False, False, True, False),
        "ln_wb_mod": (1, True, True, True, False),
        "rms_w_mod": (2, True, False, True, False),
        "gated_ln_mod": (1, False, False, True, True),
        "gated_ln_wb_mod": (1, True, True, True, True),
        "gated": (0, False, False, False, True),
    }
    cuda = torch.device("cuda", 0)
    B, S = 8, 4096
    # The widths where the configs change (rows per program, warps, full row vs column blocks); fp32 fewer.
    for N in (128, 512, 1024, 3072, 8192) if dtype == "bf16" else (1024, 8192):
        cfg = k.layer_norm_fwd_config(B * S, N)
        cfg.pop("grid")
        nw = cfg.pop("num_warps")
        for form, (norm, w, b, mod, res) in forms.items():
            yield (f"ln fwd N={N} {form}", k._layer_norm_fwd_kernel, fwd_sig,
                   dict(cfg, NORM=norm, HAS_W=w, HAS_B=b, HAS_MOD=mod, HAS_RES=res, INTERPRET=False), nw)
        orig = k.max_programs
        k.max_programs = lambda device: 4 * 132  # the grid only; the code does not depend on it
        try:
            for form, (norm, w, b, mod, res) in forms.items():
                for ps in (False, True) if (mod or res) else (False,):
                    acc = k.bwd_load(w, b, ps and mod, ps and mod, ps and res, res and norm != 0)
                    bcfg = k.layer_norm_bwd_config(B, S, N, ps, acc, cuda)
                    for key in ("grid", "GROUP"):
                        bcfg.pop(key)
                    bnw = bcfg.pop("num_warps")
                    yield (f"ln bwd N={N} {form} {'per_sample' if ps else 'per_token'}", k._layer_norm_bwd_kernel,
                           bwd_sig, dict(bcfg, NORM=norm, HAS_W=w, HAS_B=b, HAS_MOD=mod, HAS_RES=res,
                                         HAS_DXNEW=res, SHIFT_PS=ps and mod, SCALE_PS=ps and mod,
                                         GATE_PS=ps and res, INTERPRET=False), bnw)
        finally:
            k.max_programs = orig
        if N > k.MAX_FULL_ROW_BWD:
            yield (f"ln rowstats N={N}", k._layer_norm_bwd_rowstats_kernel, stats_sig,
                   dict(NORM=1, HAS_W=True, HAS_MOD=True, BLOCK_N=k.CHUNK_N), k.warps_for(k.CHUNK_N))
    # Rows wider than MAX_FULL_ROW_FWD: the chunked forward (its code does not depend on N; the
    # backward of these widths compiles to the N = 8192 column-block configs above).
    for N in (16384, 65536) if dtype == "bf16" else (65536,):
        cfg = k.layer_norm_fwd_chunked_config(B * S, N)
        for key in ("grid", "n_chunks"):
            cfg.pop(key)
        nw = cfg.pop("num_warps")
        for form, (norm, w, b, mod, res) in forms.items():
            yield (f"ln fwd N={N} {form}", k._layer_norm_fwd_chunked_kernel, chunked_sig,
                   dict(cfg, NORM=norm, HAS_W=w, HAS_B=b, HAS_MOD=mod, HAS_RES=res, INTERPRET=False), nw)


def _candidates(name, fn, sig, candidates, flags):
    """Every config the GPU autotuner may launch (kernels/autotune.py): the default under ``name``,
    the alternatives as ``name alt=BMxBNxW``. num_stages is 3 in all of them, Triton's default,
    which resource_usage compiles with."""
    for i, cfg in enumerate(candidates):
        cfg = dict(cfg)
        nw = cfg.pop("num_warps")
        assert cfg.pop("num_stages") == 3
        alt = "" if i == 0 else f" alt={cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{nw}"
        yield f"{name}{alt}", fn, sig, dict(cfg, **flags), nw


def _tma_cases(name, fn, sig, candidates, causal, dtype, tensors):
    """The ``TMA=True`` candidates of an attention kernel (not varlen): each tensor in ``tensors``
    ("Q", "K", "V", "DO") read through a 4-D descriptor ``<T>D`` (and ``<T>DR`` for the head-dim
    remainder) whose block is [1, 1, rows, cols], rows BLOCK_M for Q / DO and BLOCK_N for K / V."""
    tma = [c for c in candidates if c.get("TMA")]
    for i, cfg in enumerate(tma):
        cfg = dict(cfg)
        nw = cfg.pop("num_warps")
        assert cfg.pop("num_stages") == 3 and cfg.pop("TMA")
        bm, bn, bd, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["BLOCK_DR"]
        tma_sig, consts = dict(sig), dict(cfg, CAUSAL=causal, VARLEN=False, DOT_F32=False, INTERPRET=False,
                                          HOST_BOUNDS=False, TMA=True)
        for t in tensors:
            rows = bm if t in ("Q", "DO") else bn
            tma_sig[f"{t}D"] = f"tensordesc<{dtype}[1, 1, {rows}, {bd}]>"
            if br:
                tma_sig[f"{t}DR"] = f"tensordesc<{dtype}[1, 1, {rows}, {br}]>"
            else:
                consts[f"{t}DR"] = None
        alt = "" if i == 0 else f" alt={bm}x{bn}x{nw}" + (f" d={bd}+{br}" if br else "")
        yield f"{name}{alt}", fn, tma_sig, consts, nw


def attention_cases(dtype: str = "bf16"):
    """(name, fn, signature, constexprs, num_warps) for the flash-attention forward and backward
    configs per head-dim block (BLOCK_D = 16 / 32 / 64 / 128 / 256), plain and causal + varlen,
    and the split head-dim blocks of D = 40 (32 + 16), 80 (64 + 16, also 72) and 96 (64 + 32 in
    the forward); every head dim the kernels take compiles to one of these. The kernels take bf16 / fp16 only: nothing
    for fp32 (fp16 compiles to the same code with another MMA type; bf16 stands for both)."""
    if dtype == "fp32":
        return
    from fastgen.kernels import attention as k
    from fastgen.kernels import attention_bwd as kb
    from fastgen.kernels import attention_configs as c

    p, f32 = f"*{dtype}", "*fp32"
    st = lambda *names: {f"s{n}{a}": "i32" for n in names for a in "bhs"}  # noqa: E731
    lse_st = {"slb": "i32", "slh": "i32"}
    dims = {"Sq": "i32", "Sk": "i32", "D": "i32"}
    for D in (16, 32, 40, 64, 80, 96, 128, 160, 192, 256):
        for causal, varlen in ((False, False), (True, True)):
            cu = "*i32" if varlen else f32
            tag = f"D={D} causal={causal} varlen={varlen}"
            fwd_sig = {"Q": p, "K": p, "V": p, "O": p, "LSE": f32, "CU_Q": cu, "CU_K": cu, **st("q", "k", "v", "o"),
                       **lse_st, "H": "i32", "GROUP": "i32", **dims, "qk_scale": "fp32", "n_kv_blocks": "i32"}
            flags = dict(CAUSAL=causal, VARLEN=varlen, DOT_F32=False, INTERPRET=False, HOST_BOUNDS=False)
            no_tma = dict(flags, TMA=False, QD=None, KD=None, VD=None, QDR=None, KDR=None, VDR=None)
            yield from _candidates(f"attn fwd {tag}", k._attn_fwd_kernel, fwd_sig, c.attention_fwd_candidates(D),
                                   no_tma)
            # The TMA paths (not varlen): tiles through 4-D tensor descriptors.
            yield from _tma_cases(f"attn fwd tma D={D} causal={causal}", k._attn_fwd_kernel, fwd_sig,
                                  c.attention_fwd_candidates(D, tma=True), causal, dtype, ("Q", "K", "V"))
            dkdv_sig = {"Q": p, "K": p, "V": p, "DO": p, "LSE": f32, "DELTA": f32, "DK": p, "DV": p, "CU_Q": cu,
                        "CU_K": cu, **st("q", "k", "v", "do"), **lse_st, **st("dk", "dv"), "HK": "i32",
                        "GROUP": "i32", **dims, "qk_scale": "fp32", "sm_scale": "fp32", "n_q_blocks": "i32"}
            no_tma_bwd = dict(flags, TMA=False, **{f"{n}{r}": None for n in ("QD", "KD", "VD", "DOD") for r in ("", "R")})
            yield from _candidates(f"attn bwd_dkdv {tag}", kb._attn_bwd_dkdv_kernel, dkdv_sig,
                                   c.attention_bwd_dkdv_candidates(D), no_tma_bwd)
            yield from _tma_cases(f"attn bwd_dkdv tma D={D} causal={causal}", kb._attn_bwd_dkdv_kernel, dkdv_sig,
                                  c.attention_bwd_dkdv_candidates(D, tma=True), causal, dtype, ("Q", "K", "V", "DO"))
            dq_sig = {"Q": p, "K": p, "V": p, "DO": p, "LSE": f32, "DELTA": f32, "DQ": p, "CU_Q": cu, "CU_K": cu,
                      **st("q", "k", "v", "do"), **lse_st, **st("dq"), "H": "i32", "GROUP": "i32", **dims,
                      "qk_scale": "fp32", "sm_scale": "fp32", "n_kv_blocks": "i32"}
            yield from _candidates(f"attn bwd_dq {tag}", kb._attn_bwd_dq_kernel, dq_sig,
                                   c.attention_bwd_dq_candidates(D), no_tma_bwd)
            yield from _tma_cases(f"attn bwd_dq tma D={D} causal={causal}", kb._attn_bwd_dq_kernel, dq_sig,
                                  c.attention_bwd_dq_candidates(D, tma=True), causal, dtype, ("Q", "K", "V", "DO"))
        pre_sig = {"O": p, "DO": p, "DELTA": f32, "CU_Q": "*i32", **st("o", "do"), **lse_st, "H": "i32",
                   "Sq": "i32", "D": "i32"}
        cfg = c.attention_preprocess_config(D)
        nw = cfg.pop("num_warps")
        yield f"attn bwd_preprocess D={D}", kb._attn_bwd_preprocess_kernel, pre_sig, dict(cfg, VARLEN=True), nw


def glu_cases(dtype: str = "bf16"):
    """The GLU kernels (forward, backward) for every activation, at narrow and wide rows."""
    from fastgen.kernels import glu as k

    p = f"*{dtype}"
    sig = {"X": p, "Y": p, "M": "i32", "N": "i32", "stride_x": "i64"}
    bwd_sig = {"DY": p, "X": p, "DX": p, "M": "i32", "N": "i32", "stride_x": "i64"}
    for N in (64, 1280, 5120):
        cfg = k.glu_config(4096, N)
        cfg.pop("grid")
        nw = cfg.pop("num_warps")
        for act in k.ACTIVATIONS:
            consts = dict(cfg, ACT=act, INTERPRET=False)
            yield f"glu fwd N={N} {act}", k._glu_fwd_kernel, sig, consts, nw
            yield f"glu bwd N={N} {act}", k._glu_bwd_kernel, bwd_sig, consts, nw


CASES = (rope_cases, rms_norm_cases, layer_norm_cases, optim_cases, group_norm_cases, attention_cases, glu_cases)
# The memory-bound kernels, compiled a second time with the launch specialization (named
# "<case> launch"): a contiguous launch runs that code, and the alignment and divisibility hints
# change its vectorization and so its registers. Attention is compiled unhinted only.
LAUNCH_CASES = tuple(gen for gen in CASES if gen is not attention_cases)
_cases: list = []  # filled before the worker processes fork; they compile by index


def _usage_of(i: int) -> dict:
    name, fn, sig, consts, nw, launch = _cases[i]
    values = _widths().gn_values(name) if launch else None
    return dict(name=name + (" launch" if launch else ""), num_warps=nw, launch=launch,
                **resource_usage(fn, sig, consts, nw, launch, values))


def report(dtypes=("bf16", "fp32"), workers: int | None = None, launch: bool = True) -> list[dict]:
    """Resource usage of every case of every op, compiled in parallel (one process per core);
    with ``launch``, the cases of ``LAUNCH_CASES`` also with the launch specialization."""
    import multiprocessing
    import os

    _cases[:] = [(f"{name} {dtype}", fn, sig, consts, nw, False)
                 for dtype in dtypes for gen in CASES for name, fn, sig, consts, nw in gen(dtype)]
    if launch:
        _cases.extend((f"{name} {dtype}", fn, sig, consts, nw, True)
                      for dtype in dtypes for gen in LAUNCH_CASES for name, fn, sig, consts, nw in gen(dtype))
    workers = workers or min(os.cpu_count() or 1, 16)
    if workers == 1:
        return [_usage_of(i) for i in range(len(_cases))]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_usage_of, range(len(_cases)), chunksize=4)


if __name__ == "__main__":
    # Kernels must be JIT-compiled here, not interpreted.
    import json
    import os
    import sys

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"
    if "--widths" in sys.argv:  # issue: 16-byte accesses in the memory-bound optimizer kernels
        rows = widths()
        if "--json" in sys.argv:
            print(json.dumps(rows))
        else:
            print(f"{'kernel (aligned launch)':40s} {'global loads':55s} global stores")
            for r in rows:
                print(f"{r['name']:40s} {str(r['loads']):55s} {r['stores']}")
            print("hot tensors need (v4 = 16 bytes):")
            for r in rows:
                print(f"  {r['name']:38s} loads {r['want_loads']} stores {r['want_stores']}")
            print("exceptions (scalar on purpose):")
            for k, v in WIDTH_EXCEPTIONS.items():
                print(f"  {k}: {v}")
        sys.exit(0)
    rows = report()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:45s} warps={r['num_warps']:2d} regs={r['registers']:3d} "
                  f"spills={r['spill_stores']}/{r['spill_loads']} stack={r['stack']}")
