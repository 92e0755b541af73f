"""From a Graph to what the LLVM backend runs: a storage View for every node's value (views are
free: RESHAPE/PERMUTE/SLICE only change offsets and strides), buffers placed in one arena by
liveness (as ggml-alloc does), and the list of Steps (kernels) in execution order.

Symbolic dims are laid out at their maximum (T <= max_tokens, KV <= n_ctx), so every stride is a
compile-time constant and only loop extents are read at run time."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from moegraph.errors import MoeGraphError
from moegraph.ir import F16, F32, I32, Graph, Node
from moegraph.quants import is_quantized, row_bytes, type_size

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
    b: View                   # [T, S, K] activations
    ids: View                 # [T, k] chosen experts
    scratch_node: Node        # the node owning the scratch (activation rows, token lists)
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
    def __init__(self, graph: Graph, max_tokens: int, n_ctx: int, repack: bool = False):
        self.graph = graph
        self.maxes = {"T": max_tokens, "KV": n_ctx, "O": max_tokens}
        self.order = graph.toposort()
        self.views: dict[int, View] = {}
        self.slots: list[tuple[str, object]] = [("arena", None)]   # (kind, node or name)
        self.steps: list[Step] = []
        self.arena_size = 0
        self.tiles: set = set()    # (weight type, RW, RA) of the product tiles kernels call
        self.repacked = self._repackable() if repack else set()   # weights in gemm.py's x8 layout
        self._fuse()
        for info in self.moe_swiglu.values():   # a merged [gate; up] is read from row F too
            w = info["gate"].inputs[0]
            if info["up"] is None and (w.shape[-2] // 2) % 8:
                self.repacked.discard(w.id)
        self._place()

    # -- helpers
    def moe_operands(self, n: Node, swiglu=None) -> MoeOperands:
        """n: a MUL_MAT_ID; swiglu: (SWIGLU node, up MUL_MAT_ID or None for a merged [gate; up]
        tensor) when the two products are fused."""
        out = self.views.get(n.id)           # absent when fused into a SWIGLU
        a, b, ids = (self.views[i.id] for i in n.inputs)
        scratch_node, a_up, up_weight, up_row0 = n, None, None, 0
        if swiglu is not None:
            scratch_node, up = swiglu
            out = self.views[scratch_node.id]
            if up is None:                   # merged: rows [0, F) gate, [F, 2F) up
                a_up, up_weight, up_row0 = a, n.inputs[0], a.shape[1] // 2
            else:
                a_up, up_weight = self.views[up.inputs[0].id], up.inputs[0]
        E, N, K = a.shape
        T, S, _ = b.shape
        return MoeOperands(out, a, b, ids, scratch_node, a_up, up_weight, up_row0, E, up_row0 or N, K, T, S,
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

    # -- fusion: nodes computed inside another node's kernel are not materialized
    def _fuse(self) -> None:
        users = self.graph.users()
        self.fused_into: dict[int, Node] = {}
        self.attention: dict[int, dict] = {}
        self.moe_swiglu: dict[int, dict] = {}
        for n in self.order:
            # SWIGLU over expert matmuls: gate and up computed in one kernel, never stored
            if n.op == "SWIGLU":
                g, u = n.inputs
                if (u is None and g.op == "MUL_MAT_ID" and len(users[g]) == 1
                        and g.inputs[0].op == "WEIGHT"):
                    self.moe_swiglu[n.id] = dict(gate=g, up=None)
                    self.fused_into[g.id] = n
                elif (u is not None and g.op == u.op == "MUL_MAT_ID" and g.inputs[1] is u.inputs[1]
                      and g.inputs[2] is u.inputs[2] and g.inputs[0].dtype == u.inputs[0].dtype
                      and g.inputs[0].shape == u.inputs[0].shape and len(users[g]) == 1
                      and len(users[u]) == 1 and g is not u):
                    self.moe_swiglu[n.id] = dict(gate=g, up=u)
                    self.fused_into[g.id] = n
                    self.fused_into[u.id] = n
                continue
            # softmax(q k^T * scale + mask) v  ->  one attention kernel (no [H, T, KV] buffer)
            if n.op != "MUL_MAT" or n.inputs[1].op != "SOFT_MAX":
                continue
            p = n.inputs[1]
            kq = p.inputs[0]
            pv, pk = n.inputs[0], kq.inputs[0] if kq.op == "MUL_MAT" else None
            if (kq.op != "MUL_MAT" or pk is None or pk.op != "PERMUTE" or pv.op != "PERMUTE"
                    or tuple(pk.attrs["axes"]) != (1, 0, 2) or tuple(pv.attrs["axes"]) != (1, 2, 0)
                    or kq.inputs[1].op != "PERMUTE" or tuple(kq.inputs[1].attrs["axes"]) != (1, 0, 2)
                    or len(users[p]) != 1 or len(users[kq]) != 1):
                continue
            self.attention[n.id] = dict(q=kq.inputs[1].inputs[0], k=pk.inputs[0], v=pv.inputs[0],
                                        mask=p.inputs[1], scale=p.attrs["scale"])
            self.fused_into[p.id] = n
            self.fused_into[kq.id] = n

    # -- storage
    def _place(self) -> None:
        last_use: dict[int, int] = {}
        root: dict[int, int] = {}          # view node -> node owning the storage
        position = {n.id: i for i, n in enumerate(self.order)}
        for i, n in enumerate(self.order):
            at = position[self.fused_into[n.id].id] if n.id in self.fused_into else i
            for x in n.inputs:
                if x is not None:
                    r = root.get(x.id, x.id)
                    last_use[r] = max(last_use.get(r, 0), at)
            if n.op in ("RESHAPE", "PERMUTE", "SLICE", "SET_ROWS"):
                root[n.id] = root.get(n.inputs[0].id, n.inputs[0].id)
        for n in self.graph.outputs.values():
            last_use[root.get(n.id, n.id)] = len(self.order)

        free: list[tuple[int, int]] = []     # (offset, size) holes in the arena
        live: dict[int, tuple[int, int]] = {}
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

        for i, n in enumerate(self.order):
            v = self._view_of(n)
            if v is None:
                if n.id in self.fused_into:
                    continue
                size = self.nbytes(n.shape, n.dtype)
                off = alloc(size)
                live[n.id] = (off, size)
                es = elem_size(n.dtype)
                v = View(0, off // es, n.shape, dense_strides(self.max_shape(n.shape), n.dtype), n.dtype)
                step_scratch = self._scratch_bytes(n)
                if step_scratch:
                    self.scratch[n.id] = alloc(step_scratch)
                    release(self.scratch[n.id], step_scratch)   # only used within the step
                self.steps.append(Step(self._kind(n), n))
            elif n.op == "SET_ROWS":
                self.steps.append(Step("SET_ROWS", n))
            self.views[n.id] = v
            for r in [r for r, (_, _) in live.items() if last_use.get(r, -1) <= i and r != n.id]:
                release(*live.pop(r))

    def _repackable(self) -> set[int]:
        """Weights of a type with an x8 layout (gemm.py) whose only readers are products (as the
        weight) and whose rows come in eights get it; embeddings (GET_ROWS) keep the GGUF one."""
        from .gemm import X8
        out = set()
        for w, readers in self.graph.users().items():
            if (w.op == "WEIGHT" and w.dtype in X8 and readers and w.rank >= 2
                    and w.shape[-2] % 8 == 0 and w.shape[-1] % X8[w.dtype][0] == 0
                    and all(r.op in ("MUL_MAT", "MUL_MAT_ID") and r.inputs[0] is w and r.inputs[1] is not w
                            for r in readers)):
                out.add(w.id)
        return out

    def _kind(self, n: Node) -> str:
        if n.id in self.attention:
            return "ATTENTION"
        if n.id in self.moe_swiglu:
            return "MOE_SWIGLU"
        return n.op

    def _scratch_bytes(self, n: Node) -> int:
        from moegraph.quants import vec_dot_type

        from .quantk import act_row_bytes
        if n.id in self.moe_swiglu:
            n = self.moe_swiglu[n.id]["gate"]
        if n.op in ("MUL_MAT", "MUL_MAT_ID") and n.id not in self.attention:
            a, b = n.inputs[0], n.inputs[1]
            vt = vec_dot_type(a.dtype)
            rows = math.prod(self.max_shape(b.shape[:-1]))
            act = rows * act_row_bytes(vt, b.shape[-1]) if vt != F32 else 0
            lists = 0
            if n.op == "MUL_MAT_ID":   # per-expert counts, (token, slot) lists, active experts
                E = a.shape[0]
                lists = 4 * (2 * E + 1) + 4 * E * math.prod(self.max_shape(n.inputs[2].shape)) + 64
            return act + lists + 64
        return 0

    def _view_of(self, n: Node) -> View | None:
        """Views share their input's storage; leaves get their own slot."""
        if n.op == "WEIGHT":
            return View(self.slot("weight", n), 0, n.shape, dense_strides(n.shape, n.dtype), n.dtype)
        if n.op == "INPUT":
            return View(self.slot("input", n), 0, n.shape, dense_strides(self.max_shape(n.shape), n.dtype), n.dtype)
        if n.op == "STATE":
            return View(self.slot("state", n), 0, n.shape, dense_strides(n.shape, n.dtype), n.dtype)
        if n.op == "SET_ROWS":
            return self.views[n.inputs[0].id]
        if n.op == "PERMUTE":
            x = self.views[n.inputs[0].id]
            ax = n.attrs["axes"]
            return View(x.slot, x.offset, n.shape, tuple(x.strides[a] for a in ax), x.dtype)
        if n.op == "SLICE":
            x = self.views[n.inputs[0].id]
            ax = n.attrs["axis"] % x.rank
            return View(x.slot, x.offset + n.attrs["start"] * x.strides[ax], n.shape, x.strides, x.dtype)
        if n.op == "RESHAPE":
            x = self.views[n.inputs[0].id]
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
