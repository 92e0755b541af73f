"""Graph passes. A pass is a plain function `fn(graph, **options) -> Graph` (it may edit the graph
in place and return it), registered by name:

    from moegraph.passes import register_pass
    @register_pass("my_pass")
    def my_pass(graph, threshold=1.0):
        ...
        return graph

Registered passes are usable by name from the API (`model.compile(passes=["my_pass"])`) and the
CLI (`--passes my_pass`). The PassManager runs a pipeline, verifies the IR after every pass and can
hand the graph to a callback after each one (for `moegraph dump --after-each`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from moegraph.errors import MoeGraphError
from moegraph.ir import Graph

PASSES: dict[str, Callable[..., Graph]] = {}

PassSpec = str | Callable | tuple   # "name", fn, ("name", {options}) or (fn, {options})


def register_pass(name: str):
    def deco(fn):
        PASSES[name] = fn
        fn.pass_name = name
        return fn
    return deco


def get_pass(name: str) -> Callable[..., Graph]:
    _load_builtin()
    if name not in PASSES:
        raise MoeGraphError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def pass_names() -> list[str]:
    _load_builtin()
    return sorted(PASSES)


def parse_pass_list(text: str) -> list[str]:
    """'a,b , c' -> ['a', 'b', 'c']."""
    return [p.strip() for p in text.split(",") if p.strip()]


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


class PassManager:
    def __init__(self, passes: Sequence[PassSpec], verify: bool = True,
                 after_each: Callable[[str, Graph], None] | None = None):
        self.passes = [_resolve(p) for p in passes]
        self.verify, self.after_each = verify, after_each
        self.records: list[PassRecord] = []

    def run(self, graph: Graph) -> Graph:
        for name, fn, options in self.passes:
            before = len(graph.toposort())
            outputs = set(graph.outputs)
            t0 = time.perf_counter()
            try:
                out = fn(graph, **options)
            except MoeGraphError as e:
                raise type(e)(f"pass {name!r}: {e}") from e
            except Exception as e:       # a bug in the pass, or options it does not take
                raise MoeGraphError(f"pass {name!r} failed: {type(e).__name__}: {e}") from e
            if out is not None and not isinstance(out, Graph):
                raise MoeGraphError(f"pass {name!r} returned {type(out).__name__}, not a Graph (or None "
                                    "after editing the graph in place)")
            graph = out if out is not None else graph
            lost = sorted(outputs - set(graph.outputs))
            if lost:
                raise MoeGraphError(f"pass {name!r} removed the graph output(s) {lost}")
            if self.verify:
                try:
                    graph.verify()
                except MoeGraphError as e:
                    raise MoeGraphError(f"pass {name!r} left an invalid graph: {e}") from e
            self.records.append(PassRecord(name, time.perf_counter() - t0, before, len(graph.toposort())))
            graph.meta.setdefault("passes", []).append(name)
            if self.after_each:
                self.after_each(name, graph)
        return graph


def run_passes(graph: Graph, passes: Sequence[PassSpec], dump_each: Callable | None = None,
               verify: bool = True) -> Graph:
    return PassManager(passes, verify=verify, after_each=dump_each).run(graph)


def _resolve(spec: PassSpec) -> tuple[str, Callable, dict[str, Any]]:
    options: dict[str, Any] = {}
    if isinstance(spec, tuple):
        spec, options = spec
    if isinstance(spec, str):
        return spec, get_pass(spec), dict(options)
    if callable(spec):
        return getattr(spec, "pass_name", getattr(spec, "__name__", "custom")), spec, dict(options)
    raise MoeGraphError(f"not a pass: {spec!r}")


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import basic, experts, fusion  # noqa: F401  (they register themselves)
