"""What a ``fastgen.patch`` rule puts at a site, as a typed record: the patcher decides on it,
and the report's text is written from it (never the other way round).

A rule returns a :class:`Plan`: the steps of the site's new forward, each a :class:`Step`
naming the fastgen op it calls (or the alternatives it picks between per call), and the
child modules whose work a step does (reported as *fused* into the site)::

    Flux processor   Plan((Step(("attention",)), Step(("qk_norm_rope", "apply_rope"))),
                          fuses=("norm_q", "norm_k"), fuser=Step(("qk_norm_rope",)))
        .ops                         ("attention", "qk_norm_rope", "apply_rope")   -> facts checked per op
        .without(ROPE_OPS)           the plan under rope=False
        .text()                      "fastgen.ops.scaled_dot_product_attention + qk_norm_rope / apply_rope"
        .text({"attention": why})    "fastgen.ops.qk_norm_rope / apply_rope"  (steps on the reference unnamed)
        .kernel()                    "fastgen.ops.qk_norm_rope"   (what the fused children are reported as)

Op names are the keys of ``fastgen.patch.serve`` (``"attention"``); the text names the
``fastgen.ops`` function (``scaled_dot_product_attention``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# serve's op key -> the fastgen.ops function the report names, where they differ
OP_FUNCTIONS = {"attention": "scaled_dot_product_attention"}
ROPE_OPS = frozenset({"apply_rope", "qk_norm_rope"})


@dataclasses.dataclass(frozen=True)
class Step:
    """One stage of a patched forward."""

    ops: tuple          # (op,) or the alternatives the forward picks between per call ("qk_norm_rope", "apply_rope")
    args: str = ""      # keyword arguments as the report shows them ("activation='silu'"); display only
    passes: int = 1     # calls per forward (SD 3.5's AdaLayerNormZeroX modulates twice)

    def text(self, passes: bool = True) -> str:
        out = " / ".join(OP_FUNCTIONS.get(op, op) for op in self.ops)
        if self.args:
            out += f"({self.args})"
        if passes and self.passes > 1:
            out += f" (x{self.passes})"
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The steps of a site's patched forward and the children whose work one of them does."""

    steps: tuple                     # (Step, ...), in the order the forward runs them
    fuses: tuple = ()                # attribute names of the children the forward no longer calls
    fuser: Optional[Step] = None     # the op doing their work (default: the first step, one pass)
    detail: str = ""                 # words after the ops in the report ("for norm1 and norm2 + SiLU")

    @property
    def ops(self) -> tuple:
        """Every op the site may call, in step order."""
        return tuple(op for s in self.steps for op in s.ops)

    def uses(self, ops) -> bool:
        """Whether the site calls any of ``ops``."""
        return any(op in ops for op in self.ops)

    def without(self, ops) -> "Plan":
        """The plan with the steps that call only ``ops`` taken out; its children stay fused only
        while the op doing their work is still in the plan."""
        steps = tuple(s for s in self.steps if not all(op in ops for op in s.ops))
        left = [op for s in steps for op in s.ops]
        fuser = self.fuser if self.fuser is not None else self.steps[0]
        if all(op in left for op in fuser.ops):
            return dataclasses.replace(self, steps=steps)
        return dataclasses.replace(self, steps=steps, fuses=(), fuser=None)

    def text(self, reference=()) -> str:
        """The report's ``after``: the steps that run fastgen kernels (not all their ops in ``reference``)."""
        named = [s for s in self.steps if not all(op in reference for op in s.ops)] or list(self.steps)
        out = "fastgen.ops." + " + ".join(s.text() for s in named)
        return f"{out} {self.detail}" if self.detail else out

    def kernel(self) -> str:
        """How the fused children are reported: the op doing their work."""
        step = self.fuser if self.fuser is not None else self.steps[0]
        return "fastgen.ops." + step.text(passes=False)

    @classmethod
    def of(cls, op: str, args: str = "", passes: int = 1, fuses: tuple = (), detail: str = "") -> "Plan":
        """A plan of one step calling one op."""
        return cls((Step((op,), args, passes),), fuses=fuses, detail=detail)

    def children(self, module) -> list:
        """The child modules of ``module`` this plan fuses."""
        return [getattr(module, name) for name in self.fuses]
