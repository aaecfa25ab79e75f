"""Widths of the global loads and stores of the CUDA C++ multi-tensor optimizer functors, from the
PTX that nvcc produces for sm_90 (no GPU needed).

Every functor walks a chunk with ``chunk_rounds`` (``csrc/common/multi_tensor.cuh``): a vector path
that moves each operand in 16-byte pieces (``ld.global.v4`` / ``st.global.v4``) and a scalar path
for tails and unaligned views. Each source is compiled twice:

- as built (``-O3 -std=c++17``), and
- with ``-DFASTGEN_VECTOR_PATH_ONLY``, which leaves the scalar path out: what remains is the hot
  path plus the per-chunk metadata (table entries, numels, chunk ids and offsets, step counts, lr,
  the clip coefficient, the per-chunk partial of the norm).

For a functor over operand types ``T_i`` (``VEC`` = 16 bytes of the narrowest, ``U`` = elements
per thread per round / ``VEC``, a group of ``VEC`` elements of operand i = ``VEC * sizeof(T_i) / 16``
pieces), the vector path has exactly ``U * sum(pieces_i)`` 16-byte loads over the operands it reads
and as many stores over those it writes: one access per operand per 16 bytes, no pass doubled.
The scalar path adds ``U`` narrow loads per read operand and ``U`` narrow stores per written one.
``tests/test_cuda_widths.py`` asserts both counts; ``python tests/cuda_widths.py`` prints the table.

The vector-path PTX is also assembled for sm_90 (``ptxas``) and disassembled (``cuobjdump -sass``,
which ships in Triton's package): ``LDG.E.128`` / ``STG.E.128`` there count the same as the 16-byte
accesses of the PTX, so the assembler split none of them.

Generic accesses (``ld.u16``, no state space: the compiler could not prove the address global)
are counted apart; the functors declare their table pointers global (``global_ptr``).

Compiled PTX is cached under ``$FASTGEN_CACHE`` (default ``~/.cache/fastgen``) by a hash of the
sources, the flags and the nvcc version, so a second run costs no compile.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# The sources of the optimizer functors (another helper's schedulefree.cu is checked when present).
SOURCES = ("optim/optim.cu",)
FLAGS = ("-ptx", "-arch=sm_90", "-O3", "-std=c++17")

# The functors: operand kinds in list order, "r" read, "w" written, "rw" both, and the elements per
# thread per round (kElemsPerThread of multi_tensor.cuh, kAdamWElems of optim.cu). Per-element
# scalars (step, lr, coef) are metadata, not operands. The first template arguments of the functor
# give the operands' types, in the order of `types`: indexes into the operand list.
FUNCTORS = {
    # AdamWOp<P, S, SH>: p, g, m, v, vmax (amsgrad: a runtime switch, so its accesses are in the code), and
    # the one-pass step's EMA shadow when SH is a type (NoShadow otherwise)
    "AdamWOp": dict(operands=(("p", 0, "rw"), ("g", 0, "r"), ("m", 1, "rw"), ("v", 1, "rw"), ("vmax", 1, "rw"),
                              ("shadow", 2, "rw")), elems=8),
    "LionOp": dict(operands=(("p", 0, "rw"), ("g", 0, "r"), ("m", 1, "rw"), ("shadow", 2, "rw")), elems=16),
    "NormOp": dict(operands=(("g", 0, "r"),), elems=16),
    "ScaleOp": dict(operands=(("g", 0, "rw"),), elems=16),
    "EmaOp": dict(operands=(("s", 0, "rw"), ("p", 1, "r")), elems=16),
    # ScheduleFreeOp<P> (optim/schedulefree.cu): y, g, z, v, all of the parameters' dtype
    "ScheduleFreeOp": dict(operands=(("y", 0, "rw"), ("g", 0, "r"), ("z", 0, "rw"), ("v", 0, "rw")), elems=8),
    # AdamW8bitOp<P, SH> (optim/adamw8bit.cu): 16 elements per thread; uint8 codes; the EMA shadow only
    # when SH is a type (NoShadow otherwise). The per-block absmax are metadata (one fp32 per 256 elements).
    "AdamW8bitOp": dict(operands=(("p", 0, "rw"), ("g", 0, "r"), ("qm", "unsigned char", "rw"),
                                  ("qv", "unsigned char", "rw"), ("shadow", 1, "rw")), elems=16),
    # Prodigy's two passes (optim/prodigy.cu), every operand of the parameters' dtype
    "ProdigyMomentsOp": dict(operands=(("p", 0, "r"), ("g", 0, "r"), ("p0", 0, "r"), ("m", 0, "rw"), ("v", 0, "rw"),
                                       ("s", 0, "rw")), elems=8),
    "ProdigyUpdateOp": dict(operands=(("p", 0, "rw"), ("n", 0, "r"), ("v", 0, "r")), elems=16),
}
TYPE_BYTES = {"float": 4, "__half": 2, "__nv_bfloat16": 2, "unsigned char": 1}

# Narrow accesses of the vector-path-only build that are not the hot path, per functor (upper
# bounds: the compiler may merge some). Every multi_tensor_apply_kernel reads its chunk's tensor id
# (4 B), offset (8 B), the tensor's numel (8 B) and one 8-byte address per list.
METADATA = {
    "AdamWOp": (3 + 7 + 3, 0, "chunk id / offset / numel, 7 table addresses, the step count, lr and the clip "
                "coefficient (fp32)"),
    "LionOp": (3 + 4 + 2, 0, "chunk id / offset / numel, 4 table addresses, lr and the clip coefficient (fp32)"),
    "NormOp": (3 + 1, 1, "chunk id / offset / numel, 1 table address; the chunk's fp32 partial"),
    "ScaleOp": (3 + 1 + 1, 0, "chunk id / offset / numel, 1 table address, the clip coefficient (fp32)"),
    "EmaOp": (3 + 2 + 1, 0, "chunk id / offset / numel, 2 table addresses, the device weight (fp32)"),
    "ScheduleFreeOp": (3 + 4 + 4, 0, "chunk id / offset / numel, 4 table addresses, the step's 4 fp32 scalars"),
    "AdamW8bitOp": (3 + 8 + 3 + 2 + 4, 2, "chunk id / offset / numel, 8 table addresses, step / lr / clip "
                    "coefficient, the block's two fp32 absmax (one per 256 elements) read and written, the 4 x 256 "
                    "quantization tables copied to shared memory (4-byte loads, once per chunk)"),
    "ProdigyMomentsOp": (3 + 6 + 3, 2, "chunk id / offset / numel, 6 table addresses, c1 / c2 / c3 (fp32); the "
                         "chunk's two fp32 partial sums"),
    "ProdigyUpdateOp": (3 + 3 + 3, 0, "chunk id / offset / numel, 3 table addresses, w / a / e (fp32)"),
}
# Kernels that are not functors, with why their accesses are narrow.
OTHER_KERNELS = {
    "norm_finalize_kernel": "one block sums the per-chunk fp32 partials (num_chunks floats, not the tensors)",
}

# ld / st [.global | no state space][.qualifiers][.vN].<type><bits>
_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)((?:\.[a-z0-9_]+)*?)(?:\.v(\d))?\.([bfsu])(\d+)\s", re.M)
_OTHER_SPACES = {".param", ".shared", ".local", ".const"}


def _tool(name: str) -> str | None:
    """``name`` from CUDA_HOME/bin, PATH, next to nvcc, or Triton's bundled CUDA tools."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = [Path(home) / "bin" / name] if home else []
    found = shutil.which(name)
    cands += [Path(found)] if found else []
    nvcc = find_nvcc()
    cands += [Path(nvcc).resolve().parent / name] if nvcc else []
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:  # pragma: no cover
        pass
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def find_sass_tools() -> tuple[str, str] | None:
    """(ptxas, cuobjdump), or None when either is missing."""
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    return (ptxas, cuobjdump) if ptxas and cuobjdump else None


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cache_dir() -> Path:
    d = Path(os.environ.get("FASTGEN_CACHE", Path.home() / ".cache" / "fastgen")) / "cuda_widths"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_ptx(source: str, vector_only: bool, nvcc: str) -> str:
    """PTX of ``csrc/<source>`` for sm_90 (cached on the sources, flags and nvcc version)."""
    flags = list(FLAGS) + ["-I" + str(CSRC)] + (["-DFASTGEN_VECTOR_PATH_ONLY"] if vector_only else [])
    h = hashlib.sha256()
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout.encode())
    h.update(" ".join(flags).encode())
    for path in sorted([CSRC / source, *CSRC.glob("common/*"), *(CSRC / source).parent.glob("*.h")]):
        h.update(path.name.encode() + path.read_bytes())
    out = _cache_dir() / f"{h.hexdigest()[:24]}.ptx"
    if not out.exists():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([nvcc, *flags, str(CSRC / source), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
        tmp.replace(out)
    return out.read_text()


# width qualifiers of LDG / STG (none: 32 bits)
_SASS_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def sass_widths(ptx: str, tools: tuple[str, str]) -> dict[str, collections.Counter]:
    """Demangled kernel name -> Counter of ("LDG" / "STG", bits) in the sm_90 SASS of ``ptx`` (cached)."""
    ptxas, cuobjdump = tools
    key = hashlib.sha256(ptx.encode() + subprocess.run([ptxas, "--version"], capture_output=True,
                                                       text=True).stdout.encode()).hexdigest()[:24]
    out = _cache_dir() / f"{key}.sass"
    if not out.exists():
        src = _cache_dir() / f"{key}.{os.getpid()}.ptx"
        cubin = src.with_suffix(".cubin")
        src.write_text(ptx)
        try:
            subprocess.run([ptxas, "-arch=sm_90", "-O3", str(src), "-o", str(cubin)], check=True, capture_output=True)
            sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
        finally:
            src.unlink(missing_ok=True)
            cubin.unlink(missing_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(sass)
        tmp.replace(out)
    parts = re.split(r"Function : (\S+)", out.read_text())
    names, bodies = parts[1::2], parts[2::2]
    result = {}
    for name, body in zip(_demangle(names), bodies):
        c: collections.Counter = collections.Counter()
        for kind, quals in re.findall(r"\b(LDG|STG)\.E((?:\.[A-Z0-9]+)*)", body):
            c[(kind, _SASS_BITS.get(next((q for q in quals.split(".") if q in _SASS_BITS), ""), 32))] += 1
        result[name] = c
    return result


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    proc = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else names


def entries(ptx: str) -> dict[str, str]:
    """Demangled kernel name -> its PTX body."""
    parts = re.split(r"^\s*\.(?:visible\s+)?entry\s+([A-Za-z0-9_$]+)\s*\(", ptx, flags=re.M)
    names, bodies = parts[1::2], parts[2::2]
    return dict(zip(_demangle(names), bodies))


def access_widths(body: str) -> collections.Counter:
    """Counter of (kind, space, bytes) over the memory accesses of a kernel body that may touch global
    memory: kind "ld" / "st", space "global" or "generic" (no state space named)."""
    out: collections.Counter = collections.Counter()
    for kind, quals, vec, _t, bits in _ACCESS.findall(body):
        spaces = set(re.findall(r"\.[a-z0-9_]+", quals))
        if spaces & _OTHER_SPACES:
            continue
        space = "global" if ".global" in spaces else "generic"
        out[(kind, space, int(vec or 1) * int(bits) // 8)] += 1
    return out


def functor_of(name: str) -> tuple[str, list[str]] | None:
    """("AdamWOp", ["__nv_bfloat16", "float"]) from a demangled multi_tensor_apply_kernel name."""
    m = re.search(r"\b(" + "|".join(FUNCTORS) + r")<([^>]*)>", name)
    if m is None:
        return None
    types = [t.strip() for t in m.group(2).split(",") if t.strip() in TYPE_BYTES]
    return m.group(1), types


def expected(functor: str, types: list[str]) -> dict:
    """The hot path's 16-byte loads and stores, and the scalar path's narrow ones, from FUNCTORS."""
    spec = FUNCTORS[functor]
    # an operand typed by a template argument the functor does not have (8-bit AdamW's NoShadow) is absent
    ops = [op for op in spec["operands"] if isinstance(op[1], str) or op[1] < len(types)]
    sizes = [TYPE_BYTES[i if isinstance(i, str) else types[i]] for _, i, _ in ops]
    vec = 16 // min(sizes)
    unroll = max(1, spec["elems"] // vec)
    pieces = [vec * s // 16 for s in sizes]
    return {
        "ld16": unroll * sum(pc for pc, (_, _, rw) in zip(pieces, ops) if "r" in rw),
        "st16": unroll * sum(pc for pc, (_, _, rw) in zip(pieces, ops) if "w" in rw),
        "ld_scalar": unroll * sum(1 for _, _, rw in ops if "r" in rw),
        "st_scalar": unroll * sum(1 for _, _, rw in ops if "w" in rw),
    }


def _split(c: collections.Counter) -> dict:
    return {
        "ld16": sum(n for (k, sp, b), n in c.items() if k == "ld" and sp == "global" and b == 16),
        "st16": sum(n for (k, sp, b), n in c.items() if k == "st" and sp == "global" and b == 16),
        "ld_narrow": sum(n for (k, sp, b), n in c.items() if k == "ld" and b < 16),
        "st_narrow": sum(n for (k, sp, b), n in c.items() if k == "st" and b < 16),
        "generic": sum(n for (k, sp, b), n in c.items() if sp == "generic"),
        "loads": {f"{sp[:3]}{b}": n for (k, sp, b), n in sorted(c.items()) if k == "ld"},
        "stores": {f"{sp[:3]}{b}": n for (k, sp, b), n in sorted(c.items()) if k == "st"},
    }


def table(nvcc: str | None = None) -> list[dict]:
    """One row per kernel of SOURCES (and csrc/optim/*.cu of the functors): widths as built and in
    the vector-path-only build, the functor and its expected counts."""
    nvcc = nvcc or find_nvcc()
    rows = []
    sources = list(SOURCES) + sorted(str(p.relative_to(CSRC)) for p in (CSRC / "optim").glob("*.cu")
                                     if str(p.relative_to(CSRC)) not in SOURCES)
    tools = find_sass_tools()
    for source in sources:
        built = entries(compile_ptx(source, False, nvcc))
        vector_ptx = compile_ptx(source, True, nvcc)
        vector = entries(vector_ptx)
        sass = sass_widths(vector_ptx, tools) if tools else {}
        for name, body in built.items():
            row = {"source": source, "kernel": name, "built": _split(access_widths(body)),
                   "vector_only": _split(access_widths(vector.get(name, "")))}
            if name in sass:
                row["sass"] = {"ld128": sass[name][("LDG", 128)], "st128": sass[name][("STG", 128)]}
            f = functor_of(name)
            if f is not None:
                row["functor"], row["types"] = f
                row["expected"] = expected(*f)
            rows.append(row)
    return rows


def _short(row) -> str:
    if "functor" in row:
        short = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "unsigned char": "u8"}
        return f"{row['functor']}<{', '.join(short[t] for t in row['types'])}>"
    return next((k for k in OTHER_KERNELS if k in row["kernel"]), row["kernel"][:34])


def _fmt(d: dict) -> str:
    return " ".join(f"{k}B x{n}" for k, n in sorted(d.items(), key=lambda kv: -int(re.sub(r'\D', '', kv[0])))) or "-"


if __name__ == "__main__":
    import json
    import sys

    nv = find_nvcc()
    if nv is None:
        sys.exit("nvcc not found (CUDA_HOME/bin or PATH)")
    rows = table(nv)
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print(f"{'kernel (sm_90 PTX, vector path only)':34s} {'global loads':34s} global stores")
        for r in rows:
            v = r["vector_only"]
            print(f"{_short(r):34s} {_fmt(v['loads']):34s} {_fmt(v['stores'])}")
        print(f"\n{'kernel (sm_90 PTX, as built)':34s} {'loads':34s} stores")
        for r in rows:
            b = r["built"]
            print(f"{_short(r):34s} {_fmt(b['loads']):34s} {_fmt(b['stores'])}")
