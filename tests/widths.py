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


def compile_ptx(fn, signature: dict, constexprs: dict, num_warps: int) -> str:
    """PTX of ``fn`` for sm_90 with the launch-time specialization of contiguous, aligned inputs."""
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in signature.items() if ty.startswith("*") or ty in ("i32", "i64")}
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET,
                              options={"num_warps": num_warps})
    return compiled.asm["ptx"]


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
    yield from _pick(rope_cases, ("rope hq=24 hk=24 D=128 R=128 halves", "qk_norm_rope fwd hq=24", "qk_norm_rope bwd hq=24"))
    yield from _pick(glu_cases, ("glu fwd N=1280 gelu", "glu bwd N=1280 gelu"))
    yield from _pick(optim_cases, ("adamw amsgrad=False stochastic=False", "adamw8bit", "lion", "ema", "clip"))


def table() -> list[dict]:
    rows = []
    for name, fn, sig, consts, nw in cases():
        try:
            w = access_widths(compile_ptx(fn, sig, consts, nw))
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
