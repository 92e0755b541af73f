"""From a lowered Graph to what a native backend runs: a storage View for every node's value (views are
free: RESHAPE/PERMUTE/SLICE only change offsets and strides), buffers placed in one arena by
liveness (as ggml-alloc does), and the list of Steps (kernels) in execution order.

Symbolic dims are laid out at their maximum (T <= max_tokens, KV <= n_ctx), so every stride is a
compile-time constant and only loop extents are read at run time."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from moegraph.ir import F32, OPS, Graph, Kind, Node
from moegraph.quants import is_quantized, row_bytes, type_size, vec_dot_type

from .groups import ROWWISE, act_key, has_prelude, is_product, joins, prelude_joins, storage_of

if TYPE_CHECKING:
    from . import Target

SYMBOLS = ("T", "KV", "O")          # index in the run-time syms array


@dataclass
class View:
    slot: int                   # which base pointer (ptrs[slot])
    offset: int                 # in elements (bytes for quantized types)
    shape: tuple                # dims: int or symbol
    strides: tuple[int, ...]    # element strides (row bytes for quantized, last dim = 1 block row)
    dtype: object

    @property
    def rank(self) -> int:
        return len(self.shape)

    def contiguous_rows(self) -> bool:
        return self.strides[-1] == 1


@dataclass
class Step:
    """One kernel: the nodes it computes (a fused group has several) and its kind."""
    kind: str
    node: Node
    extra: dict = field(default_factory=dict)


def elem_size(dtype) -> int:
    if is_quantized(dtype):
        return 1
    return type_size(dtype)


def dense_strides(max_shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    if is_quantized(dtype):   # rows of blocks: strides in bytes, innermost "1 element" = a row
        rb = row_bytes(dtype, max_shape[-1])
        out, acc = [1], rb
        for d in reversed(max_shape[:-1]):
            out.append(acc)
            acc *= d
        return tuple(reversed(out))
    out, acc = [], 1
    for d in reversed(max_shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


@dataclass(frozen=True)
class MoeOperands:
    """What a MUL_MAT_ID kernel (or a fused SwiGLU over one) works on, for every backend."""
    out: View                 # [T, k, N] output (the SWIGLU's when fused)
    a: View                   # [E, rows, K] expert weights (the gate's, or the merged [gate; up])
    weight: Node              # their WEIGHT node
    b: View                   # [T, S, K] activations
    ids: View                 # [T, k] chosen experts
    scratch_node: Node        # the node owning the scratch (activation rows, token lists): the step's
    a_up: View | None         # the up weights when fused (a itself when merged)
    up_weight: Node | None    # their WEIGHT node
    up_row0: int              # first up row in a_up (F when merged, else 0)
    E: int
    N: int                    # output rows per expert (F when fused)
    K: int
    T: object                 # tokens (a symbol)
    S: int
    kk: int                   # experts per token


class Plan:
    """Storage and steps of a lowered graph (lower.lower: fusion already done) for `target`."""

    def __init__(self, graph: Graph, target: "Target", max_tokens: int, n_ctx: int, repack: bool = False):
        self.graph = graph
        self.target = target
        self.maxes = {"T": max_tokens, "KV": n_ctx, "O": max_tokens}
        self.order: list[Node] = []     # the schedule (_group)
        self.views: dict[int, View] = {}
        self.slots: list[tuple[str, object]] = [("arena", None)]   # (kind, node or name)
        self.steps: list[Step] = []
        self.arena_size = 0
        self.codegen: dict = {}    # what the backend's generators gather over all steps (tiles)
        self.repacked = target.repacked(graph) if repack else set()   # weights in a backend layout
        self._place()

    # -- helpers
    def moe_operands(self, n: Node) -> MoeOperands:
        """n: a MUL_MAT_ID, or a MOE_SWIGLU (gate and up products fused)."""
        out = self.views[n.id]
        if n.op == "MOE_SWIGLU":
            gate_w, up_w, b_n, ids_n = n.inputs
        else:
            (gate_w, b_n, ids_n), up_w = n.inputs, None
        a, b, ids = (self.views[i.id] for i in (gate_w, b_n, ids_n))
        a_up, up_weight, up_row0 = None, None, 0
        if n.op == "MOE_SWIGLU":
            if up_w is None:                 # merged: rows [0, F) gate, [F, 2F) up
                a_up, up_weight, up_row0 = a, gate_w, a.shape[1] // 2
            else:
                a_up, up_weight = self.views[up_w.id], up_w
        E, N, K = a.shape
        T, S, _ = b.shape
        return MoeOperands(out, a, gate_w, b, ids, n, a_up, up_weight, up_row0, E, up_row0 or N, K, T, S,
                           ids.shape[1])

    def max_shape(self, shape) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else self.maxes[d] for d in shape)

    def nbytes(self, shape, dtype) -> int:
        ms = self.max_shape(shape)
        if is_quantized(dtype):
            return math.prod(ms[:-1]) * row_bytes(dtype, ms[-1])
        return math.prod(ms) * elem_size(dtype)

    def slot(self, kind: str, what) -> int:
        self.slots.append((kind, what))
        return len(self.slots) - 1

    # -- schedule, steps and groups
    def _group(self) -> dict[int, int]:
        """Orders the nodes (a topological order that keeps groups long, groups.py), decides which
        become steps (kernels) and groups them:
          - "rows": consecutive row-wise steps, plus the activation prelude of the product after
            them (threads share the tokens; no barrier inside);
          - "products": consecutive products independent of each other whose activations are
            ready (threads share each one's rows; no barrier between them);
          - a single step otherwise.
        A dense product reading the activations another one already converted shares its
        scratch (self.shared_act). Fills self.order, self.groups ((node, part) entries, part
        "all", "prelude" or "rest"), self.group_kind; returns node id -> group index (a view or
        leaf gets the index of the last group before it)."""
        views: dict[int, View] = {}
        time: dict[int, int] = {}
        self.groups, self.group_kind = [], []
        self.preludes: dict[int, int] = {}      # product id -> the group its prelude runs in
        self.shared_act: dict[int, int] = {}    # product id -> the product whose activations it reads
        converted: dict[tuple, Node] = {}       # activation key -> product that converts them
        members: set[int] = set()               # ids computed in the open group
        kind = None                             # the open group's kind, None when closed

        def is_step(n: Node) -> bool:
            v = self._view_of(n, views, lambda kind, what: -1)
            views[n.id] = v or View(0, 0, n.shape, dense_strides(self.max_shape(n.shape), n.dtype), n.dtype)
            return v is None or n.op == "SET_ROWS"

        def reads_group(n: Node) -> bool:
            return any(x is not None and storage_of(x)[0].id in members for x in n.inputs)

        def needs_prelude(n: Node) -> bool:   # only dense products share (their scratch is all act)
            return has_prelude(n) and not (n.op == "MUL_MAT" and act_key(n) in converted)

        def rank(n: Node) -> int:
            """Which ready node comes next (lowest first): free nodes, then what extends the open
            group, then the rest in the graph's own order."""
            if OPS[n.op].kind in (Kind.LEAF, Kind.VIEW) and n.op != "RESHAPE":
                return 0
            if kind == "rows" and (joins(n, members) or (has_prelude(n) and prelude_joins(n, members))):
                return 1
            if kind == "products" and is_product(n) and not needs_prelude(n) and not reads_group(n):
                return 1
            return 2

        for n in self._schedule(rank):
            if is_step(n):
                if kind == "rows" and joins(n, members):
                    self.groups[-1].append((n, "all"))
                elif kind == "products" and is_product(n) and not needs_prelude(n) and not reads_group(n):
                    self.groups[-1].append((n, "all"))
                elif kind == "rows" and needs_prelude(n) and prelude_joins(n, members):
                    self.preludes[n.id] = len(self.groups) - 1
                    self.groups[-1].append((n, "prelude"))
                    self.groups.append([(n, "rest")])
                    self.group_kind.append("products")
                    members, kind = set(), "products"
                else:
                    self.groups.append([(n, "all")])
                    kind = "rows" if ROWWISE.match(n) is not None else "products" if is_product(n) else None
                    self.group_kind.append(kind or "single")
                    members = set()
                members.add(n.id)
                if has_prelude(n):
                    if not needs_prelude(n):
                        self.shared_act[n.id] = converted[act_key(n)].id
                    elif n.op == "MUL_MAT":
                        converted[act_key(n)] = n
            time[n.id] = len(self.groups) - 1
        return time

    def _schedule(self, rank):
        """Yields the live nodes in a topological order, choosing among the ready ones by
        rank(node) and then by the graph's own order. rank sees the state as of the last node
        yielded."""
        topo = self.graph.toposort()
        pos = {n.id: i for i, n in enumerate(topo)}
        waiting = {n.id: len({x.id for x in n.inputs if x is not None}) for n in topo}
        users: dict[int, list[Node]] = {n.id: [] for n in topo}
        for n in topo:
            for x in {x.id: x for x in n.inputs if x is not None}.values():
                users[x.id].append(n)
        ready = [n for n in topo if waiting[n.id] == 0]
        order = []
        while ready:
            n = min(ready, key=lambda m: (rank(m), pos[m.id]))
            ready.remove(n)
            order.append(n)
            yield n
            for u in users[n.id]:
                waiting[u.id] -= 1
                if waiting[u.id] == 0:
                    ready.append(u)
        self.order = order

    # -- storage
    def _place(self) -> None:
        """Buffers by liveness at group granularity: what a group reads or writes stays in place
        until the group ends (its threads are at different tokens of different members)."""
        time = self._group()
        self.graph_node = {n.id: n for n in self.order}
        last_use: dict[int, int] = {}
        root: dict[int, int] = {}          # view node -> node owning the storage
        for n in self.order:
            for x in n.inputs:
                if x is not None:
                    r = root.get(x.id, x.id)
                    last_use[r] = max(last_use.get(r, 0), time[n.id])
            if OPS[n.op].kind in (Kind.VIEW, Kind.SIDE_EFFECT):   # SET_ROWS returns its dst
                root[n.id] = root.get(n.inputs[0].id, n.inputs[0].id)
        for n in self.graph.outputs.values():
            last_use[root.get(n.id, n.id)] = len(self.groups)

        free: list[tuple[int, int]] = []     # (offset, size) holes in the arena
        live: dict = {}                      # node id (or ("scratch", id)) -> (offset, size)
        self.scratch: dict[int, int] = {}    # node id -> arena offset of its scratch buffer

        def alloc(size: int) -> int:
            size = (size + 63) // 64 * 64
            for j, (off, sz) in enumerate(free):
                if sz >= size:
                    free[j] = (off + size, sz - size)
                    if free[j][1] == 0:
                        free.pop(j)
                    return off
            off = self.arena_size
            self.arena_size += size
            return off

        def release(off: int, size: int) -> None:
            size = (size + 63) // 64 * 64
            free.append((off, size))
            free.sort()
            merged = []
            for o, s in free:
                if merged and merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + s)
                else:
                    merged.append((o, s))
            free[:] = merged

        # a product's scratch (its converted activations) lives from the group that converts them
        # to the last product that reads them
        until = {p: time[p] for p in self.graph_node}
        for q, p in self.shared_act.items():
            until[p] = max(until[p], time[q])

        def scratch_for(p: int) -> None:
            size = self._scratch_bytes(self.graph_node[p])
            if size:
                self.scratch[p] = alloc(size)
                live[("scratch", p)] = (self.scratch[p], size)
                last_use[("scratch", p)] = until[p]

        started: set[int] = set()
        for i, n in enumerate(self.order):
            if time[n.id] not in started:     # a group begins: scratch of the preludes it runs
                started.add(time[n.id])
                for p, g in self.preludes.items():
                    if g == time[n.id]:
                        scratch_for(p)
            v = self._view_of(n, self.views, self.slot)
            if v is None:
                size = self.nbytes(n.shape, n.dtype)
                off = alloc(size)
                live[n.id] = (off, size)
                es = elem_size(n.dtype)
                v = View(0, off // es, n.shape, dense_strides(self.max_shape(n.shape), n.dtype), n.dtype)
                if n.id in self.shared_act:      # reads the activations another product converted
                    self.scratch[n.id] = self.scratch[self.shared_act[n.id]]
                elif n.id not in self.preludes:
                    scratch_for(n.id)
                self.steps.append(Step(n.op, n))
            elif n.op == "SET_ROWS":
                self.steps.append(Step("SET_ROWS", n))
            self.views[n.id] = v
            if i + 1 < len(self.order) and time[self.order[i + 1].id] == time[n.id]:
                continue        # inside a group: nothing is released
            for r in [r for r, (_, _) in live.items() if last_use.get(r, -1) <= time[n.id] and r != n.id]:
                release(*live.pop(r))
        index = {id(st.node): j for j, st in enumerate(self.steps)}
        self.groups = [[(index[id(n)], part) for n, part in g] for g in self.groups]   # step indices

    def _scratch_bytes(self, n: Node) -> int:
        """Products quantize their activations into scratch (rows in the target's layout of the
        vec_dot type); expert products also bucket (token, slot) pairs by expert there."""
        if n.op not in ("MUL_MAT", "MUL_MAT_ID", "MOE_SWIGLU"):
            return 0
        a, b = n.inputs[0], n.inputs[-2 if n.op != "MUL_MAT" else 1]
        vt = vec_dot_type(a.dtype)
        rows = math.prod(self.max_shape(b.shape[:-1]))
        act = rows * self.target.act_row_bytes(vt, b.shape[-1]) if vt != F32 else 0
        lists = 0
        if n.op != "MUL_MAT":   # per-expert counts, (token, slot) lists, active experts
            E = a.shape[0]
            lists = 4 * (2 * E + 1) + 4 * E * math.prod(self.max_shape(n.inputs[-1].shape)) + 64
        return act + lists + 64

    def _view_of(self, n: Node, views: dict[int, View], slot) -> View | None:
        """Views share their input's storage (views: those of the inputs); leaves get their own
        slot (slot(kind, node) -> its index)."""
        if n.op == "WEIGHT":
            return View(slot("weight", n), 0, n.shape, dense_strides(n.shape, n.dtype), n.dtype)
        if n.op == "INPUT":
            return View(slot("input", n), 0, n.shape, dense_strides(self.max_shape(n.shape), n.dtype), n.dtype)
        if n.op == "STATE":
            return View(slot("state", n), 0, n.shape, dense_strides(n.shape, n.dtype), n.dtype)
        if n.op == "SET_ROWS":
            return views[n.inputs[0].id]
        if n.op == "PERMUTE":
            x = views[n.inputs[0].id]
            ax = n.attrs["axes"]
            return View(x.slot, x.offset, n.shape, tuple(x.strides[a] for a in ax), x.dtype)
        if n.op == "SLICE":
            x = views[n.inputs[0].id]
            ax = n.attrs["axis"] % x.rank
            return View(x.slot, x.offset + n.attrs["start"] * x.strides[ax], n.shape, x.strides, x.dtype)
        if n.op == "RESHAPE":
            x = views[n.inputs[0].id]
            strides = _reshape_strides(x, self.max_shape(x.shape), n.shape, self.max_shape(n.shape))
            if strides is not None:
                return View(x.slot, x.offset, n.shape, strides, x.dtype)
            return None   # needs a copy: a CONT-like kernel
        return None


def _reshape_strides(x: View, xmax, shape, smax):
    """Strides for a reshape without copying, or None: after the longest common prefix of the two
    shapes, the rest must be static, hold the same number of elements, and be dense in x."""
    if is_quantized(x.dtype):
        return None
    p = 0
    while p < min(len(shape), x.rank) and shape[p] == x.shape[p]:
        p += 1
    xs, ns = tuple(x.shape[p:]), tuple(shape[p:])
    if any(isinstance(d, str) for d in xs + ns) or math.prod(xs) != math.prod(ns):
        return None
    if tuple(x.strides[p:]) != (dense_strides(xs, x.dtype) if xs else ()):
        return None
    return tuple(x.strides[:p]) + (dense_strides(ns, x.dtype) if ns else ())
