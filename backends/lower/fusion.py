"""Fusion rules: patterns (the pattern language users write passes with) whose match becomes one
FUSED op of the op table, which a backend then runs as one kernel. A rule applies only for a
target that has a kernel for its op; the reference backend runs the op's decomposition, so each
rule's pattern and its op's `decompose` in moegraph/ir.py describe the same computation.

    rule = FusionRule("MY_OP", pattern, build)   # build(graph, match) -> the fused Node or None
    FUSION_RULES.append(rule)

To add one: define the FUSED op (defop with kind=Kind.FUSED and decompose=...), write its
pattern and builder here, and give each backend that should run it a kernel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from moegraph.ir import Graph, Node
from moegraph.passes.pattern import Match, Pat, rewrite


@dataclass(frozen=True)
class FusionRule:
    op: str                                        # the FUSED op it makes
    pattern: Pat
    build: Callable[[Graph, Match], Node | None]   # None: declined (a condition the Pat can't say)


# softmax(q k^T * scale + mask) v: no [H, T, KV] scores buffer
ATTENTION = Pat("MUL_MAT",
                Pat("PERMUTE", Pat.any("v"), attrs={"axes": lambda a: tuple(a) == (1, 2, 0)}),
                Pat("SOFT_MAX",
                    Pat("MUL_MAT",
                        Pat("PERMUTE", Pat.any("k"), attrs={"axes": lambda a: tuple(a) == (1, 0, 2)}),
                        Pat("PERMUTE", Pat.any("q"), attrs={"axes": lambda a: tuple(a) == (1, 0, 2)}),
                        users=1),
                    Pat.any("mask"), Pat.any("sinks", optional=True), name="p", users=1))


def _attention(g: Graph, m: Match) -> Node | None:
    return g.attention(m.q, m.k, m.v, m.mask, m.get("sinks"), scale=m.p.attrs["scale"], name=m.root.name)


# silu(gate . x) * (up . x) over the chosen experts, from two tensors or a merged [gate; up] one
_EXPERTS = dict(users=1, where=lambda n: n.inputs[0].op == "WEIGHT")
MOE_SWIGLU_SPLIT = Pat("SWIGLU",
                       Pat("MUL_MAT_ID", Pat.weight("gate"), Pat.any("x"), Pat.any("ids"), **_EXPERTS),
                       Pat("MUL_MAT_ID", Pat.weight("up"), Pat.any("x"), Pat.any("ids"), **_EXPERTS))
MOE_SWIGLU_MERGED = Pat("SWIGLU", Pat("MUL_MAT_ID", Pat.weight("gate"), Pat.any("x"), Pat.any("ids"),
                                      **_EXPERTS), None)


def _moe_swiglu(g: Graph, m: Match) -> Node | None:
    up = m.get("up")
    if up is not None and (up is m.gate or up.dtype != m.gate.dtype or up.shape != m.gate.shape):
        return None   # both products run one kernel: same type and shape
    return g.moe_swiglu(m.gate, up, m.x, m.ids, name=m.root.name)


FUSION_RULES: list[FusionRule] = [
    FusionRule("ATTENTION", ATTENTION, _attention),
    FusionRule("MOE_SWIGLU", MOE_SWIGLU_SPLIT, _moe_swiglu),
    FusionRule("MOE_SWIGLU", MOE_SWIGLU_MERGED, _moe_swiglu),
]


def fuse(graph: Graph, ops) -> int:
    """Applies the rules whose op is in `ops` (those the target has kernels for), in place."""
    rules = [(r.pattern, r.build) for r in FUSION_RULES if r.op in ops]
    return rewrite(graph, rules) if rules else 0
