"""Widths of the global loads and stores of memory-bound Triton kernels, compiled for sm_90 without a GPU.

A memory-bound kernel reaches the copy bandwidth only with wide accesses: 16 bytes per thread
per access (``ld.global.v4.b32`` / ``st.global.v4.b32`` in the PTX). This compiles each kernel
the way Triton's JIT specializes it at a real launch on contiguous tensors of ordinary shapes:
every pointer 16-byte aligned and every integer argument (sizes, strides) divisible by 16,
which is what ``get_tensor_specialization`` / ``get_int_specialization`` report for such
arguments. Multi-tensor kernels read their tensors' addresses from a table, which no such
hint reaches; their counts show what the compiler can prove from the kernel itself.

``python tests/widths.py`` prints, per kernel, the global loads and stores by width in bytes;
``tests/test_static_widths.py`` asserts that the hot accesses are 16-byte wide.
"""

from __future__ import annotations

import collections
import re

import triton
from triton.compiler import ASTSource

try:  # run as a script or imported by the tests
    from sm90 import TARGET, glu_cases, group_norm_cases, layer_norm_cases, optim_cases, rms_norm_cases, rope_cases
except ImportError:  # pragma: no cover
    from tests.sm90 import (TARGET, glu_cases, group_norm_cases, layer_norm_cases, optim_cases, rms_norm_cases,
                            rope_cases)

# ld.global[.qualifiers][.v2|.v4].<type>: the vector count and the element bits give the bytes.
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*?)(?:\.v(\d))?\.([bfsu])(\d+)\b")


def access_widths(ptx: str) -> collections.Counter:
    """Counter of (kind, bytes) over the global memory instructions of a PTX listing
    (``("ld", 16)``: a 16-byte vector load)."""
    out: collections.Counter = collections.Counter()
    for kind, _quals, vec, _t, bits in _ACCESS.findall(ptx):
        out[(kind, int(vec or 1) * int(bits) // 8)] += 1
    return out


def compile_launch(fn, signature: dict, constexprs: dict, num_warps: int, values: dict | None = None):
    """``fn`` compiled for sm_90 with the launch-time specialization of contiguous, aligned inputs
    (Triton's ``CompiledKernel``; tests/sm90.py reads its resource usage too).
    ``values``: the integer arguments a launch passes, where the case knows them; such an argument
    is marked divisible by 16 only when it is (as the JIT does), the others are assumed to be."""
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    values = values or {}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in signature.items()
             if ty.startswith("*") or (ty in ("i32", "i64") and values.get(name, 0) % 16 == 0)}
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET, options={"num_warps": num_warps})


def compile_ptx(fn, signature: dict, constexprs: dict, num_warps: int, values: dict | None = None) -> str:
    """PTX of ``fn`` for sm_90 with the launch-time specialization (``compile_launch``)."""
    return compile_launch(fn, signature, constexprs, num_warps, values).asm["ptx"]


# ----------------------------------------------------------------------------- stated bytes per element

_HEADER = re.compile(r"^Bytes per element \(e: ")
# "<pass>: read <list>; write <list> = <total>", a list being "-" or "name (size), name (size), ..."
_LINE = re.compile(r"^\s+(?P<pass>[\w+ -]+?): read (?P<read>.+?); write (?P<write>.+?) = (?P<total>.+)$")
_ITEM = re.compile(r"^(?P<name>[\w]+) \((?P<size>[^()]+)\)$")


def _size(text: str) -> tuple[float, float]:
    """``a e + b`` as ``(a, b)`` from "e", "4", "3e + 16", "e + 8", "1/16"."""
    a = b = 0.0
    for term in text.replace(" ", "").split("+"):
        if term.endswith("e"):
            a += float(term[:-1] or 1)
        elif "/" in term:
            num, den = term.split("/")
            b += float(num) / float(den)
        else:
            b += float(term)
    return a, b


def _items(text: str) -> list[tuple[str, tuple[float, float]]]:
    if text.strip() == "-":
        return []
    out = []
    for item in text.split(", "):
        m = _ITEM.match(item.strip())
        if m is None:
            raise ValueError(f"not 'name (size)': {item!r}")
        out.append((m["name"], _size(m["size"])))
    return out


def stated_bytes(module: str) -> dict[str, dict]:
    """The "Bytes per element" lines of ``fastgen.kernels.<module>``'s docstring (read from the
    source, no import): ``{pass: {"read": [(tensor, (a, b))], "write": [...], "total": (a, b)}}``,
    a size ``(a, b)`` meaning ``a * e + b`` bytes, e the element size the header names."""
    import ast
    import importlib.util

    path = importlib.util.find_spec("fastgen.kernels").submodule_search_locations[0] + f"/{module}.py"
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    lines = doc.splitlines()
    start = next((i for i, ln in enumerate(lines) if _HEADER.match(ln)), None)
    if start is None:
        raise ValueError(f"{module}: no 'Bytes per element (e: ...' line in the module docstring")
    out, i = {}, start + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines) and lines[i].strip():
        m = _LINE.match(lines[i])
        if m is None:
            raise ValueError(f"{module}: not '<pass>: read ...; write ... = <total>': {lines[i]!r}")
        out[m["pass"]] = {"read": _items(m["read"]), "write": _items(m["write"]), "total": _size(m["total"])}
        i += 1
    return out


_GN_SHAPE = re.compile(r"N=(\d+) C=(\d+) S=(\d+) G=(\d+)")


def gn_values(name: str) -> dict | None:
    """The integer arguments the GroupNorm launchers pass to a per-element kernel of the case
    ``name`` (its shape is in the name), None for other kernels."""
    m = _GN_SHAPE.search(name)
    if not name.startswith("gn ") or m is None or "combine" in name:
        return None
    from fastgen.kernels.group_norm import group_norm_config

    N, C, S, G = map(int, m.groups())
    cfg = group_norm_config(N, C, S, G)
    return dict(C=C, S=S, G=G, K=C // G, chunk_s=cfg["chunk_s"], iters=cfg["iters"])


def _pick(gen, names):
    """The cases of ``gen`` whose names start with one of ``names`` (one config per kernel)."""
    seen = set()
    for name, fn, sig, consts, nw in gen("bf16"):
        for want in names:
            if name.startswith(want) and want not in seen:
                seen.add(want)
                yield name, fn, sig, consts, nw


# One representative config per memory-bound kernel (bf16), and why some accesses are narrow.
def cases():
    yield from _pick(rms_norm_cases, ("fwd N=4096 w=True r=True", "bwd N=4096 w=True dhout=True"))
    yield from _pick(layer_norm_cases, ("ln fwd", "ln bwd"))
    yield from _pick(group_norm_cases, ("gn fwd N=2 C=320", "gn apply N=2 C=64", "gn bwd N=2 C=320"))
    # groups of 512 channels (16 warps, 8 positions per tile) and the lowest-resolution UNet block
    yield from _pick(group_norm_cases, ("gn fwd N=2 C=512 S=64 G=1 nchw", "gn bwd N=2 C=512 S=64 G=1 nchw",
                                        "gn fwd N=2 C=1024 S=64 G=32 nchw", "gn bwd N=2 C=1024 S=64 G=32 nchw"))
    yield from _pick(rope_cases, ("rope hq=24 hk=24 D=128 R=128 halves", "qk_norm_rope fwd hq=24", "qk_norm_rope bwd hq=24"))
    # the QK-norm backward's halves layout (a and b read as one block: JOINED) and partial rotary
    yield from _pick(rope_cases, ("qk_norm_rope bwd hq=24 hk=24 D=128 R=128 halves",
                                  "qk_norm_rope bwd hq=32 hk=8 D=128 R=64 inter",
                                  "qk_norm_rope bwd hq=32 hk=8 D=128 R=64 halves"))
    yield from _pick(glu_cases, ("glu fwd N=1280 gelu", "glu bwd N=1280 gelu"))
    yield from _pick(optim_cases, ("adamw amsgrad=False stochastic=False", "adamw8bit", "lion", "ema", "clip"))
    # scale / shift of narrow rows (N=64: 4 tokens per tile) and wide ones
    for c in scale_shift_cases():
        if c["name"].split()[2] in ("N=64", "N=1152"):
            yield c["name"], c["fn"], c["sig"], c["consts"], c["nw"]


# ----------------------------------------------------------------------------- exact 16-byte counts

# The rule (tests/test_static_widths.py): a program's tile of one tensor holds ``elements``
# values; spread over ``32 * num_warps`` threads, each thread owns ``elements * bytes / (32 *
# num_warps)`` bytes of it, contiguous in runs of ``run`` bytes along the unit-stride dim. When
# both are at least 16, that tensor's access is ``per-thread bytes / 16`` 16-byte instructions in
# the PTX, once per loop body (a ``range`` loop with a runtime trip count is not unrolled: its
# body appears once). The expected count is that, summed over the tensors the kernel reads
# (loads) or writes (stores) per element: the docstring's tensor list for the pass.
def v16(elements: int, nbytes: int, num_warps: int, run: int | None = None) -> int:
    per_thread = elements * nbytes // (32 * num_warps)
    run = elements * nbytes if run is None else run
    return per_thread // 16 if per_thread >= 16 and run >= 16 else 0


def _stated(module, pass_):
    line = stated_bytes(module)[pass_]
    return [t for t, _ in line["read"]], [t for t, _ in line["write"]]


def _exact(name, fn, sig, consts, nw, loads, stores, e=2, why=""):
    """A case with the per-column / per-row operands off (their layout is Triton's choice, not the
    tile's) and its expected 16-byte loads and stores."""
    return dict(name=name, fn=fn, sig=sig, consts=consts, nw=nw, want_loads=loads, want_stores=stores, why=why)


def exact_cases():
    """Every norm / RoPE / GLU / scale-shift config of tests/sm90.py (bf16; deduplicated, one
    activation per GLU tile), with its expected 16-byte load and store counts."""
    e = 2
    seen = set()

    def once(c):
        # the specialization too: which integer arguments are not multiples of 16
        odd = tuple(sorted(n for n, v in (c.get("values") or {}).items() if v % 16))
        key = (c["fn"].__name__, tuple(sorted((k, str(v)) for k, v in c["consts"].items())), c["nw"], odd)
        if key not in seen:
            seen.add(key)
            yield c

    for name, fn, sig, consts, nw in rms_norm_cases("bf16"):
        if name.startswith("rowdot"):
            continue  # not derived: see test_static_widths.NOT_DERIVED
        c = dict(consts, HAS_W=False)
        tile = c["BLOCK_M"] * c["BLOCK_N"]
        if name.startswith("fwd"):
            rd, wr = _stated("rms_norm", "fwd residual" if c["HAS_R"] else "fwd")
            passes = 1 if c["SINGLE_PASS"] else 2  # the chunked path reads its inputs again in pass 2
            yield from once(_exact(name, fn, sig, c, nw, passes * len(rd) * v16(tile, e, nw),
                                   len(wr) * v16(tile, e, nw)))
        else:
            rd, wr = _stated("rms_norm", "bwd residual" if c["HAS_DHOUT"] else "bwd")
            yield from once(_exact(name, fn, sig, c, nw, len(rd) * v16(tile, e, nw), len(wr) * v16(tile, e, nw)))
    for name, fn, sig, consts, nw in glu_cases("bf16"):
        if consts["ACT"] != "gelu":
            continue  # the activation changes the math, not the accesses
        rd, wr = _stated("glu", name.split()[1])
        tile = consts["BLOCK_M"] * consts["BLOCK_N"]
        yield from once(_exact(name, fn, sig, consts, nw, len(rd) * v16(tile, e, nw), len(wr) * v16(tile, e, nw)))
    for name, fn, sig, consts, nw in layer_norm_cases("bf16"):
        if name.startswith("ln rowstats"):
            continue  # not derived: see test_static_widths.NOT_DERIVED
        c = dict(consts, HAS_W=False, HAS_B=False)
        norm, mod, res = c["NORM"], c["HAS_MOD"], c["HAS_RES"]
        tile = c.get("BLOCK_M", 1) * c["BLOCK_N"]
        if fn.__name__ == "_layer_norm_fwd_chunked_kernel":
            # one row per program in BLOCK_N chunks. Pass 1 forms h (reads x, and y and gate when
            # gated; stores x_new) in the peeled chunk 0 and in the loop body: two copies. Pass 2
            # (with a norm) forms h again in its loop body, reads the modulation, stores out.
            h_reads = 1 + (2 if res else 0)  # x, and y and gate when gated
            copies = 3 if norm else 2
            rd = copies * h_reads + (2 if (norm and mod) else 0)
            wr = (2 if res else 0) + (1 if norm else 0)
            yield from once(_exact(name, fn, sig, c, nw, rd * v16(tile, e, nw), wr * v16(tile, e, nw)))
            continue
        if "per_sample" in name:
            continue  # the per-sample partials are per-column: the per-token case covers the tile
        # The docstring's per-token line of the form: every modulation and gate read per element
        # (a per-sample one in the forward is the same code with a zero token stride). The weight
        # and bias are per-column: ln_wb is the plain line, ln_wb_mod / rms_w_mod are modulate.
        form = "" if norm and not (mod or res) else " modulate per-token" if not res else \
            " gated per-token" if norm else " residual per-token"
        rd, wr = _stated("layer_norm", name.split()[1] + form)
        yield from once(_exact(name, fn, sig, c, nw, len(rd) * v16(tile, e, nw), len(wr) * v16(tile, e, nw)))
    for name, fn, sig, consts, nw in group_norm_cases("bf16"):
        kind = name.split()[1]
        if kind in ("combine", "bwd_combine"):
            continue  # per-group partials only, no per-element tensor
        c = dict(consts)
        if "HAS_W" in c:
            c.update(HAS_W=False, HAS_B=False)
        tile = c["BLOCK_K"] * c["BLOCK_S"]
        # contiguous bytes along the unit stride that start at a multiple of ALIGN elements (K and C
        # channels-last, S and chunk_s contiguous: align_hint)
        run = min(c["BLOCK_K"] if c["CHANNELS_LAST"] else c["BLOCK_S"], c["ALIGN"]) * e
        v = v16(tile, e, nw, run)
        # loop bodies: fwd / bwd (one program per group) walk the group twice (statistics, then
        # the output), each reading x (fwd) or dy and x (bwd); the split kernels walk it once.
        # The split path's kernels: stats reads the forward's inputs, apply is the apply line; the
        # backward's reduce reads the backward's inputs, bwd_dx reads them again and writes dx.
        fwd, bwd, apply = (_stated("group_norm", p) for p in ("fwd", "bwd", "apply"))
        rd, wr = {"fwd": (2 * fwd[0], fwd[1]), "bwd": (2 * bwd[0], bwd[1]), "apply": apply, "stats": (fwd[0], []),
                  "bwd_reduce": (bwd[0], []), "bwd_dx": bwd}[kind]
        # bwd_reduce also stores the per-channel fp32 partials of dw and db: [BLOCK_K] vectors,
        # reduced over the tile's spatial dim (by the same rule: 16-byte only for wide groups)
        partials = 2 * v16(c["BLOCK_K"], 4, nw) if kind == "bwd_reduce" else 0
        yield from once(dict(_exact(name, fn, sig, c, nw, len(rd) * v, len(wr) * v + partials),
                             values=gn_values(name)))
    for name, fn, sig, consts, nw in rope_cases("bf16"):
        c = dict(consts, COPY_PASS=consts.get("COPY_PASS", consts.get("HAS_PASS")))  # qk_norm_rope: HAS_PASS
        rows = c["BLOCK_S"] * c["BLOCK_H"]
        # per branch (q, then k: the kernel's two code paths), the rotated columns: one load / store
        # of 2 * HALF interleaved (or halves read as one block: the QK-norm backward's JOINED), or
        # two (a, b) of HALF; plus the pass-through dims when copied
        one = c["INTERLEAVED"] or c.get("JOINED", False)
        pairs = [2 * c["HALF"]] if one else [c["HALF"], c["HALF"]]
        cols = pairs + ([c["BLOCK_P"]] if c["COPY_PASS"] else [])
        per_branch = sum(v16(rows * n, e, nw, n * e) for n in cols)
        # tensors per element (the docstring's line): rope (either direction) and the QK-norm forward
        # read x and write out; the QK-norm backward (one loop body per branch) reads dout and x and
        # writes dx
        module = "qk_norm_rope" if name.startswith("qk_norm_rope") else "rope"
        rd, wr = _stated(module, "bwd" if name.startswith("qk_norm_rope bwd") else "fwd")
        # The fp32 cos / sin rows of the token block (and qk_norm_rope's weights) are broadcast over
        # the heads: Triton gives them either their own layout or the tile's, replicated over the
        # head threads (16-byte then). Not derivable from the tile, so the loads are a lower bound
        # (test_static_widths.NOT_DERIVED). The backward's fp32 weight-gradient partials are
        # [HALF] / [BLOCK_P] rows stored after the loop, in a layout Triton picks (narrow here).
        yield from once(_exact(name, fn, sig, consts, nw, 2 * len(rd) * per_branch, 2 * len(wr) * per_branch,
                               why="loads: at least; the cos / sin (and norm weight) loads come on top"))
    yield from (c for sc in scale_shift_cases() for c in once(sc))


def scale_shift_cases():
    """The AdaLN scale / shift kernels at DiT, PixArt and Flux widths, per-sample and per-token
    backward, with their expected 16-byte counts."""
    import torch

    from fastgen.kernels import scale_shift as k

    p = "*bf16"
    ints = {n: "i32" for n in ("S", "N", "n_chunks", "chunk_s")}
    fwd_sig = {"X": p, "SCALE": p, "SHIFT": p, "Y": p, **ints, **{n: "i64" for n in
               ("sxb", "sxs", "scb", "scs", "shb", "shs")}}
    bwd_sig = {"DY": p, "X": p, "SCALE": p, "DX": p, "DSCALE": p, "DSHIFT": "*fp32", **ints,
               **{n: "i64" for n in ("sxb", "sxs", "scb", "scs")}}
    orig = k.max_programs
    k.max_programs = lambda device: 4 * 132  # the grid only
    try:
        for B, S, N in ((32, 256, 1152), (2, 4096, 3072), (2, 256, 64)):
            cfg = k.scale_shift_config(B, S, N, torch.device("cuda", 0))
            nw, bn, bs = cfg["num_warps"], cfg["BLOCK_N"], cfg["BLOCK_S"]
            v = v16(bs * bn, 2, nw, bn * 2)  # a [BLOCK_S, BLOCK_N] tile, contiguous along N
            rd, wr = _stated("scale_shift", "fwd per-token")
            yield _exact(f"scale_shift fwd N={N}", k._scale_shift_fwd_kernel, fwd_sig,
                         dict(BLOCK_S=bs, BLOCK_N=bn, INTERPRET=False), nw, len(rd) * v, len(wr) * v)
            rd, wr = _stated("scale_shift", "bwd per-token")
            yield _exact(f"scale_shift bwd N={N} per-token", k._scale_shift_bwd_kernel, bwd_sig,
                         dict(SCALE_PS=False, SHIFT_PS=False, BLOCK_S=bs, BLOCK_N=bn, INTERPRET=False), nw,
                         len(rd) * v, len(wr) * v)
            # per sample: dy, x and scale read per row; dx written; the fp32 partial sums of dscale
            # and dshift stored once per program after the loop (the tile summed over its rows: a
            # [BLOCK_N] row, 16-byte when a warp's threads hold 4 fp32 each)
            yield _exact(f"scale_shift bwd N={N} per-sample", k._scale_shift_bwd_kernel,
                         dict(bwd_sig, DSCALE="*fp32"), dict(SCALE_PS=True, SHIFT_PS=True, BLOCK_S=bs,
                                                             BLOCK_N=bn, INTERPRET=False), nw,
                         3 * v, v + 2 * v16(bn, 4, nw))
    finally:
        k.max_programs = orig


def exact_table() -> list[dict]:
    rows = []
    for c in exact_cases():
        row = {k: c[k] for k in ("name", "want_loads", "want_stores", "why")}
        row.update(kernel=c["fn"].__name__, num_warps=c["nw"],
                   tile={k: v for k, v in c["consts"].items() if k.startswith("BLOCK") or k in ("HALF", "ALIGN")})
        try:
            w = access_widths(compile_ptx(c["fn"], c["sig"], c["consts"], c["nw"], c.get("values")))
        except Exception as exc:  # reported, and failed by the test
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            row.update(loads=w[("ld", 16)], stores=w[("st", 16)])
        rows.append(row)
    return rows


def table() -> list[dict]:
    rows = []
    for name, fn, sig, consts, nw in cases():
        try:
            w = access_widths(compile_ptx(fn, sig, consts, nw, gn_values(name)))
        except Exception as exc:  # reported, and failed by the test
            rows.append({"name": name, "kernel": fn.__name__, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        rows.append({"name": name, "kernel": fn.__name__,
                     "loads": {b: n for (k, b), n in sorted(w.items()) if k == "ld"},
                     "stores": {b: n for (k, b), n in sorted(w.items()) if k == "st"}})
    return rows


def _fmt(d: dict) -> str:
    return " ".join(f"{b}B x{n}" for b, n in sorted(d.items(), reverse=True)) or "-"


if __name__ == "__main__":
    import json
    import os
    import sys

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"
    if "--exact" in sys.argv:
        rows = exact_table()
        if "--json" in sys.argv:
            print(json.dumps(rows))
        else:
            for r in rows:
                got = r.get("error") or f"16B loads {r['loads']} (want {r['want_loads']}), " \
                                        f"stores {r['stores']} (want {r['want_stores']})"
                print(f"{r['name']:50s} w={r['num_warps']:2d} {r['tile']} {got}")
        sys.exit(0)
    rows = table()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print(f"{'kernel config (bf16, sm_90)':50s} {'global loads':32s} global stores")
        for r in rows:
            if "error" in r:
                print(f"{r['name']:50s} compile failed: {r['error']}")
            else:
                print(f"{r['name']:50s} {_fmt(r['loads']):32s} {_fmt(r['stores'])}")
