"""The lowering shared by the native backends (LLVM, CUDA): how a Graph becomes a list of kernels.

    target = Target("llvm", kernels=GENERATORS, ...)      # what the backend can run, and how
    graph = lower(graph, target)    # a copy: checked against the target, fusion rules applied
    plan = Plan(graph, target, max_tokens, n_ctx)          # views, arena, one Step per kernel

Backend specifics (repacked weight layouts, the scratch an activation row takes) come in through
the Target; this package imports neither backend. The run-time skeleton every executable shares
(binding symbols from input shapes, limits, n_ctx) is here too. See docs/lowering.md."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from moegraph.errors import InputError, MoeGraphError
from moegraph.ir import OPS, Graph, Kind, Node
from moegraph.quants import GGMLType, row_bytes

from .fusion import FUSION_RULES, fuse
from .plan import SYMBOLS, MoeOperands, Plan, Step, View, dense_strides, elem_size

__all__ = ["Target", "UnsupportedOpError", "lower", "check_supported", "bind_symbols", "graph_n_ctx",
           "check_limits", "require_memory", "available_memory", "Plan", "Step", "View", "MoeOperands", "SYMBOLS", "dense_strides", "elem_size",
           "FUSION_RULES", "lowered_steps"]


class UnsupportedOpError(MoeGraphError):
    """A graph holds an op (or an op on a dtype) that the chosen backend cannot run."""


def _no_repack(graph: Graph) -> set[int]:
    return set()


@dataclass(frozen=True)
class Target:
    """What a backend can run. `kernels`: op -> its code generator (the ops it supports, fused
    ones included: a fusion rule applies only when its op is here). `weight_types`: the weight
    dtypes its products take (None: every type). `repacked(graph)`: ids of weights it keeps in a
    layout of its own. `act_row_bytes(vec_dot_type, K)`: scratch bytes of one activation row."""
    name: str
    kernels: Mapping[str, Callable]
    weight_types: frozenset | None = None
    repacked: Callable[[Graph], set[int]] = _no_repack
    act_row_bytes: Callable[[GGMLType, int], int] = row_bytes
    notes: Mapping[str, str] = field(default_factory=dict)   # op -> why it is missing (errors)

    def supports(self, n: Node) -> str | None:
        """None if the target runs n, else the reason it cannot."""
        kind = OPS[n.op].kind
        if kind == Kind.LEAF or (kind == Kind.VIEW and n.op != "RESHAPE"):
            return None     # leaves are buffers; views are offsets and strides
        if n.op not in self.kernels:
            why = self.notes.get(n.op, "")
            return f"no kernel for {n.op}" + (f" ({why})" if why else "")
        if kind in (Kind.PRODUCT, Kind.FUSED) and self.weight_types is not None:
            for w in n.inputs[:2 if n.op == "MOE_SWIGLU" else 1]:
                if w is not None and w.op == "WEIGHT" and w.dtype not in self.weight_types:
                    return (f"{n.op} with {w.dtype.name} weights is not supported (supported: "
                            f"{', '.join(sorted(t.name for t in self.weight_types))})")
        return None


def check_supported(graph: Graph, target: Target) -> None:
    """Fails at compile time, naming the op, the node and the backend, for every node the target
    cannot run (all of them in one message)."""
    bad = [f"{n!r}: {why}" for n in graph.toposort() if (why := target.supports(n)) is not None]
    if bad:
        raise UnsupportedOpError(f"the {target.name} backend cannot run this graph:\n  " + "\n  ".join(bad))


def lower(graph: Graph, target: Target) -> Graph:
    """A copy of `graph` with the fusion rules for the target's fused ops applied, checked."""
    g = graph.copy()
    fuse(g, {op for op in target.kernels if OPS.get(op) is not None and OPS[op].kind == Kind.FUSED})
    g.verify()
    check_supported(g, target)
    return g


def lowered_steps(plan: Plan, kernels: list[tuple[list, str, tuple | None]]) -> list[dict]:
    """The program as `dump --lowered` shows it: kernel calls are (plan steps, kernel name, token
    range [lo, hi] or None for any T), a plan step being an index or a (index, part) entry of
    plan.groups; each lists the graph nodes its steps compute ("MUL_MAT:prelude" for a product's
    activation conversion run ahead of it)."""
    out = []
    for steps, name, tokens in kernels:
        steps = [s if isinstance(s, tuple) else (s, "all") for s in steps]
        nodes = [plan.steps[i].node for i, _ in steps]
        ops = [n.op + ("" if part == "all" else f":{part}") for n, (_, part) in zip(nodes, steps)]
        out.append({"kernel": name, "ops": ops, "nodes": [n.id for n in nodes],
                    "names": [n.name for n in nodes if n.name],
                    "shape": [d if isinstance(d, int) else str(d) for d in nodes[-1].shape],
                    "tokens": None if tokens is None else list(tokens)})
    return out


# --------------------------------------------------------------------------- executable skeleton
def graph_n_ctx(graph: Graph) -> int:
    """The context the graph was built for: its meta, else the KV cache's rows."""
    return graph.meta.get("n_ctx") or max([n.shape[0] for n in graph.states().values()] or [1])


def bind_symbols(graph: Graph, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Symbol values (T, KV, O) from the shapes of the inputs, which must agree."""
    bindings: dict[str, int] = {}
    for name, n in graph.inputs().items():
        if name not in inputs:
            raise InputError(f"missing graph input {name!r}")
        shape = np.shape(inputs[name])
        if len(shape) != n.rank:
            raise InputError(f"input {name!r} has shape {list(shape)}, expected {list(n.shape)}")
        for d, s in zip(n.shape, shape):
            if isinstance(d, str):
                if bindings.setdefault(d, s) != s:
                    raise InputError(f"input {name!r}: {d}={s} but another input has {d}={bindings[d]}")
            elif d != s:
                raise InputError(f"input {name!r} has shape {list(shape)}, expected {list(n.shape)}")
    return bindings


def available_memory() -> int | None:
    """Bytes of memory a new allocation can take without swapping (Linux: MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: int, what: str, hint: str) -> None:
    """Refuses an allocation the machine cannot hold before it is tried (n_ctx=10**9 used to
    end in a MemoryError after asking for 238 GiB, or in the OOM killer)."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise InputError(f"{what} needs {nbytes / 2**30:.1f} GiB, but this machine has "
                         f"{avail / 2**30:.1f} GiB available: {hint}")


def check_limits(bindings: dict[str, int], maxes: dict[str, int]) -> None:
    for sym, limit in maxes.items():
        if bindings.get(sym, 0) > limit:
            raise InputError(f"{sym}={bindings[sym]} exceeds what this compiled graph holds ({limit})")
