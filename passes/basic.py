"""Housekeeping passes: dead-code elimination, common-subexpression elimination and elementwise
fusion of the norm weight into RMS_NORM."""
from __future__ import annotations

from moegraph.ir import F32, OPS, Graph, Node

from . import register_pass
from .pattern import Pat, rewrite


@register_pass("dce")
def dce(graph: Graph) -> Graph:
    """Removes nodes no output depends on."""
    graph.remove_dead()
    return graph


def _key(n: Node, canon: dict[int, Node]):
    """Two nodes are the same computation when op, attrs and (canonical) inputs agree; weights are
    the same when they share their bytes; INPUT and STATE leaves are never merged."""
    if n.op == "WEIGHT":
        return ("WEIGHT", id(n.data))
    if not OPS[n.op].pure:     # inputs, states and writes are never merged
        return None
    attrs = tuple(sorted((k, repr(v)) for k, v in n.attrs.items()))
    return (n.op, tuple(None if i is None else canon[i.id].id for i in n.inputs), attrs)


@register_pass("cse")
def cse(graph: Graph) -> Graph:
    """Merges nodes that compute the same value (e.g. a weight loaded twice, a repeated reshape)."""
    seen: dict[tuple, Node] = {}
    canon: dict[int, Node] = {}
    for n in graph.toposort():
        if any(i is not None and canon[i.id] is not i for i in n.inputs):
            n.inputs = tuple(None if i is None else canon[i.id] for i in n.inputs)
        key = _key(n, canon)
        canon[n.id] = seen.setdefault(key, n) if key is not None else n
    for name, out in graph.outputs.items():
        graph.outputs[name] = canon[out.id]
    graph.remove_dead()
    return graph


NORM_TIMES_WEIGHT = Pat("MUL", Pat("RMS_NORM", Pat.any("x"), None, name="norm", users=1),
                        Pat.any("w", dtype=F32))


@register_pass("fuse_norm")
def fuse_norm(graph: Graph) -> Graph:
    """MUL(RMS_NORM(x), w) -> RMS_NORM(x, w): the normalized x is not written and read again."""
    def fuse(g: Graph, m):
        return g.rms_norm(m.x, m.w, eps=m.norm.attrs["eps"], name=m.root.name)
    rewrite(graph, [(NORM_TIMES_WEIGHT, fuse)])
    return graph
