"""A small pattern language for matching and rewriting subgraphs, in the spirit of tinygrad's
UPat and torch.fx's subgraph_rewriter.

    from moegraph.passes.pattern import Pat, rewrite
    norm_mul = Pat("MUL", Pat("RMS_NORM", Pat.any("x"), name="norm"), Pat.weight("w"))
    def fuse(g, m):                                   # m: captures by name, m.root = matched node
        return g.rms_norm(m.x, m.w, eps=m.norm.attrs["eps"])
    rewrite(graph, [(norm_mul, fuse)])

A Pat matches a Node when its op is one of `op`, its inputs match `inputs` in order (or in any
order with commutative=True; optional inputs left off the end must be absent), its attrs equal
`attrs` (values may be predicates), `dtype` and `where(node)` hold, and a repeated capture name
binds the same node each time. `Pat(..., optional=True)` also matches an absent input.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from moegraph.ir import Graph, Node


class Match(dict):
    """Captured nodes by name (also as attributes); `root` is the node the pattern matched."""
    root: Node

    def __getattr__(self, name: str) -> Node:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class Pat:
    op: str | tuple[str, ...] | None = None
    inputs: Sequence["Pat | None"] | None = None   # None = inputs not checked
    name: str | None = None                           # capture name
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: Any = None                                 # a dtype or a tuple of dtypes
    where: Callable[[Node], bool] | None = None
    commutative: bool = False
    users: int | None = None                          # required number of users (e.g. 1)
    optional: bool = False                            # also matches an absent input (None)

    def __init__(self, op=None, *inputs, name=None, attrs=None, dtype=None, where=None,
                 commutative=False, users=None, any_inputs=False, optional=False):
        self.op = op
        self.inputs = None if (any_inputs or (not inputs and op is None)) else list(inputs)
        self.name, self.attrs, self.dtype, self.where = name, attrs or {}, dtype, where
        self.commutative, self.users, self.optional = commutative, users, optional

    # -- shorthands
    @staticmethod
    def any(name: str | None = None, **kw) -> "Pat":
        """Any node (its inputs are not looked at)."""
        return Pat(None, name=name, any_inputs=True, **kw)

    @staticmethod
    def weight(name: str | None = None, **kw) -> "Pat":
        """A model weight."""
        return Pat("WEIGHT", name=name, any_inputs=True, **kw)

    # -- matching
    def match(self, node: Node | None, users: dict | None = None) -> Match | None:
        m = Match()
        if self._match(node, m, users):
            m.root = node
            return m
        return None

    def _match(self, node: Node | None, m: Match, users) -> bool:
        if node is None:
            return self.optional
        ops = (self.op,) if isinstance(self.op, str) else self.op
        if ops is not None and node.op not in ops:
            return False
        if self.dtype is not None:
            dts = self.dtype if isinstance(self.dtype, tuple) else (self.dtype,)
            if node.dtype not in dts:
                return False
        for k, v in self.attrs.items():
            have = node.attrs.get(k)
            if not (v(have) if callable(v) else have == v):
                return False
        if self.where is not None and not self.where(node):
            return False
        if self.users is not None and users is not None and len(users.get(node, ())) != self.users:
            return False
        if self.name is not None:
            if self.name in m and m[self.name] is not node:
                return False
        if self.inputs is not None:
            # trailing optional inputs the pattern does not list must be absent (so a pattern
            # written before an op gained an optional input still means what it meant)
            if len(self.inputs) > len(node.inputs) or any(i is not None for i in node.inputs[len(self.inputs):]):
                return False
            orders = itertools.permutations(range(len(self.inputs))) if self.commutative else [range(len(self.inputs))]
            for order in orders:
                trial = Match(m)
                if all(p is None and node.inputs[i] is None or
                       p is not None and p._match(node.inputs[i], trial, users)
                       for p, i in zip(self.inputs, order)):
                    m.update(trial)
                    break
            else:
                return False
        if self.name is not None:
            m[self.name] = node
        return True


Rule = tuple[Pat, Callable[[Graph, Match], Node | None]]


def find(graph: Graph, pat: Pat) -> list[Match]:
    """All matches, in topological order of their root nodes."""
    users = graph.users()
    return [m for n in graph.toposort() if (m := pat.match(n, users)) is not None]


def rewrite(graph: Graph, rules: Iterable[Rule], max_rounds: int = 20) -> int:
    """Applies the rules until none matches: each rule's function returns a replacement node
    (built in `graph`) or None to decline. Users of a replaced node are redirected to the new one;
    dead nodes are removed at the end. Returns the number of rewrites."""
    rules = list(rules)
    total = 0
    for _ in range(max_rounds):
        changed = 0
        users = graph.users()
        for node in graph.toposort():   # new nodes are visited in the next round
            for pat, fn in rules:
                m = pat.match(node, users)
                new = fn(graph, m) if m is not None else None
                if new is not None and new is not node:
                    graph.replace_all_uses(node, new)
                    users = graph.users()
                    changed += 1
                    break
        graph.remove_dead()
        total += changed
        if not changed:
            break
    return total
