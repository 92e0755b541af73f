"""The IR: a Graph is a DAG of Nodes; every op is defined once, in OPS, with its inputs,
attributes, and shape/dtype inference (which is also its validation).

Shapes are in NumPy order (last axis contiguous). A dimension is an int or a symbol (a str such
as "T", the number of tokens of a step), so one graph serves every batch size: backends bind
symbols from the shapes of the graph inputs when it runs.

Leaves: INPUT (fed per run), WEIGHT (a model tensor, `node.data` is a WeightData backed by the
memory-mapped GGUF) and STATE (a buffer that lives across runs: the KV cache). SET_ROWS is the only
op that writes, into a STATE; whoever reads the cache reads SET_ROWS' result, so the order of
write-then-read is an edge of the graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx

from .errors import IRError
from .quants import GGMLType, block_size, is_quantized, row_bytes

DType = GGMLType
F32, F16, BF16, I32 = GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.I32
FLOAT_TYPES = (F32, F16, BF16)

Dim = int | str
Shape = tuple[Dim, ...]

REQUIRED = object()  # marker for attributes without a default


class Kind:
    """What an op does to memory and values: the one place passes, dumps, the lowering and the
    backends' generators learn an op's category from (tinygrad's GroupOp). The ops of a kind are
    `ops_of(kind)`."""
    LEAF = "leaf"                # INPUT / WEIGHT / STATE: values from outside the graph
    ELEMENTWISE = "elementwise"  # out[i] = f(in0[i], in1[broadcast i], ...): fusable into one loop
    VIEW = "view"                # new shape/strides over the same bytes (copied only if it must)
    MOVEMENT = "movement"        # copies data to a new layout (CONCAT)
    REDUCE = "reduce"            # a row of the last axis in, a row (or a value) out
    PRODUCT = "product"          # matrix products on weights (MUL_MAT, MUL_MAT_ID)
    OPAQUE = "opaque"            # its own kernel (ROPE, GET_ROWS)
    SIDE_EFFECT = "side_effect"  # writes a STATE (SET_ROWS): never merged, never dropped early
    FUSED = "fused"              # several ops in one kernel; `decompose` gives its semantics
    ALL = (LEAF, ELEMENTWISE, VIEW, MOVEMENT, REDUCE, PRODUCT, OPAQUE, SIDE_EFFECT, FUSED)


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]          # input names; a trailing "*xs" means variadic
    attrs: dict[str, Any]            # name -> default (REQUIRED if none)
    infer: Callable[..., tuple[Shape, DType]]
    doc: str = ""
    kind: str = Kind.OPAQUE
    # FUSED ops: (graph, node) -> a node computing the same value from other ops, built in graph
    decompose: Callable[["Graph", "Node"], "Node"] | None = None
    # row t of the output (tokens first) depends only on row t of the inputs, along any axis but
    # the first: the lowering may run it in one kernel group with its neighbours (token-local)
    rowwise: bool = False

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].startswith("*")

    @property
    def pure(self) -> bool:
        """Its value depends only on its inputs and attrs (so CSE may merge two of them)."""
        return self.kind not in (Kind.LEAF, Kind.SIDE_EFFECT)


OPS: dict[str, OpDef] = {}


ROWWISE_KINDS = (Kind.ELEMENTWISE, Kind.REDUCE, Kind.MOVEMENT, Kind.SIDE_EFFECT)


def defop(name: str, inputs: str = "", /, kind: str = Kind.OPAQUE, decompose=None, rowwise=None, **attrs):
    """Register an op: `inputs` are space-separated names ('?' suffix = optional, '*' prefix =
    variadic); `kind` is one of Kind; `attrs` give defaults. The decorated function infers
    (shape, dtype) from the input Nodes and attrs and raises IRError on misuse. Its docstring is
    the op's semantics. A FUSED op also gives `decompose(graph, node)`: its value built from
    other ops, which is what the reference backend runs. `rowwise` (default: true for the
    elementwise, reduce, movement and side-effect kinds) says row t of the output depends only on
    row t of the inputs."""
    if kind not in Kind.ALL:
        raise IRError(f"defop {name}: kind {kind!r} is not one of {', '.join(Kind.ALL)}")
    if (kind == Kind.FUSED) != (decompose is not None):
        raise IRError(f"defop {name}: a FUSED op needs a decompose function, and only it")

    def deco(infer):
        OPS[name] = OpDef(name, tuple(inputs.split()), attrs, infer, (infer.__doc__ or "").strip(),
                          kind, decompose, kind in ROWWISE_KINDS if rowwise is None else rowwise)
        return infer
    return deco


def ops_of(*kinds: str) -> frozenset[str]:
    """The ops of the given kinds, as the table holds them now (custom ops included)."""
    return frozenset(name for name, d in OPS.items() if d.kind in kinds)


# --------------------------------------------------------------------------- nodes and graphs
@dataclass(eq=False)
class Node:
    op: str
    inputs: tuple["Node", ...]
    attrs: dict[str, Any]
    shape: Shape
    dtype: DType
    name: str = ""
    data: Any = None                 # WeightData for WEIGHT nodes
    id: int = field(default=-1)

    def __repr__(self) -> str:
        return f"%{self.id} {self.name or ''} = {self.op}{list(self.shape)}:{self.dtype.name}"

    @property
    def rank(self) -> int:
        return len(self.shape)


class Graph:
    """A DAG of Nodes with named inputs and outputs. `g.node("MUL_MAT", w, x)` or, equally,
    `g.mul_mat(w, x)` appends a node after checking it against the op table."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[Node] = []
        self.outputs: dict[str, Node] = {}
        self.meta: dict[str, Any] = {}   # free-form facts for passes and dumps (arch, config)
        self._next_id = 0

    # -- construction
    def node(self, op: str, *inputs: Node | None, name: str = "", **attrs) -> Node:
        opdef = OPS.get(op)
        if opdef is None:
            raise IRError(f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
        attrs = _complete_attrs(opdef, attrs)
        _check_arity(opdef, inputs)
        if not opdef.variadic:  # absent optional inputs are None, so every node has all slots
            inputs = inputs + (None,) * (len(opdef.inputs) - len(inputs))
        shape, dtype = opdef.infer(*inputs, **attrs)
        node = Node(op, tuple(inputs), attrs, tuple(shape), dtype, name)
        return self._append(node)

    def input(self, name: str, shape: Shape, dtype: DType) -> Node:
        return self.node("INPUT", name=name, shape=tuple(shape), dtype=dtype)

    def weight(self, data: "WeightData", name: str | None = None) -> Node:
        node = self.node("WEIGHT", name=name or data.name, shape=tuple(data.shape), dtype=data.dtype)
        node.data = data
        return node

    def state(self, name: str, shape: Shape, dtype: DType) -> Node:
        return self.node("STATE", name=name, shape=tuple(shape), dtype=dtype)

    def _append(self, node: Node) -> Node:
        node.id = self._next_id
        self._next_id += 1
        self.nodes.append(node)
        return node

    def __getattr__(self, attr: str):
        op = attr.upper()
        if attr.islower() and op in OPS:
            return lambda *inputs, **kw: self.node(op, *inputs, **kw)
        raise AttributeError(attr)

    # -- queries
    def inputs(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes if n.op == "INPUT"}

    def states(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes if n.op == "STATE"}

    def weights(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "WEIGHT"]

    def users(self) -> dict[Node, list[Node]]:
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None:
                    users.setdefault(i, []).append(n)
        return users

    def to_networkx(self) -> nx.DiGraph:
        dg = nx.DiGraph()
        for n in self.nodes:
            dg.add_node(n.id, node=n)
            for i in n.inputs:
                if i is not None:
                    dg.add_edge(i.id, n.id)
        return dg

    def toposort(self) -> list[Node]:
        """Live nodes (those the outputs depend on) in a deterministic topological order."""
        dg = self.to_networkx()
        live = set()
        for out in self.outputs.values():
            live.add(out.id)
            live |= nx.ancestors(dg, out.id)
        order = nx.lexicographical_topological_sort(dg.subgraph(live))
        return [dg.nodes[i]["node"] for i in order]

    def verify(self) -> None:
        """Checks what every pass must preserve: a DAG, inputs that belong to this graph,
        shapes/dtypes that the op table re-derives, and outputs that exist."""
        ids = {id(n) for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None and id(i) not in ids:
                    raise IRError(f"{n!r} uses {i!r}, which is not in the graph (dangling input)")
            opdef = OPS.get(n.op)
            if opdef is None:
                raise IRError(f"{n!r}: unknown op {n.op!r} (not in the op table)")
            shape, dtype = opdef.infer(*n.inputs, **n.attrs)
            if tuple(shape) != n.shape or dtype != n.dtype:
                raise IRError(f"{n!r}: op table infers {list(shape)}:{dtype.name}")
            if n.op == "WEIGHT" and n.data is not None:     # kernels read exactly this many bytes
                need = math.prod(n.shape[:-1]) * row_bytes(n.dtype, n.shape[-1])
                have = int(getattr(n.data, "nbytes", need))
                if have != need:
                    raise IRError(f"{n!r}: weight {n.name} holds {have} bytes, its shape and type need {need}")
        for name, out in self.outputs.items():
            if id(out) not in ids:
                raise IRError(f"output {name!r} is not a node of the graph")
        if not nx.is_directed_acyclic_graph(self.to_networkx()):
            raise IRError("graph has a cycle")

    def reinfer(self) -> None:
        """Re-derives every node's shape and dtype from the op table, in topological order: a pass
        that changes a shape (fewer experts, a new k) edits attrs or weights and calls this."""
        for n in self.toposort():
            shape, dtype = OPS[n.op].infer(*n.inputs, **n.attrs)
            n.shape, n.dtype = tuple(shape), dtype

    def copy(self) -> "Graph":
        """A new Graph with new Nodes (same ids, names, attrs, weight data): a lowering or a pass
        may rewrite it without touching this one."""
        g = Graph(self.name)
        g.meta, g._next_id = dict(self.meta), self._next_id
        new: dict[int, Node] = {}
        dg = self.to_networkx()
        for i in nx.topological_sort(dg):   # the list order need not be topological after passes
            n = dg.nodes[i]["node"]
            new[id(n)] = Node(n.op, tuple(None if x is None else new[id(x)] for x in n.inputs),
                              dict(n.attrs), n.shape, n.dtype, n.name, n.data, n.id)
        g.nodes = [new[id(n)] for n in self.nodes]
        g.outputs = {k: new[id(v)] for k, v in self.outputs.items()}
        return g

    def expand_fused(self) -> int:
        """Replaces every FUSED node by its decomposition (what it means in plain ops)."""
        count = 0
        for n in [n for n in self.nodes if OPS[n.op].kind == Kind.FUSED]:
            self.replace_all_uses(n, OPS[n.op].decompose(self, n))
            count += 1
        if count:
            self.remove_dead()
        return count

    def replace_all_uses(self, old: Node, new: Node) -> None:
        for n in self.nodes:
            if any(i is old for i in n.inputs):
                n.inputs = tuple(new if i is old else i for i in n.inputs)
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new

    def remove_dead(self) -> int:
        live = {id(n) for n in self.toposort()}
        before = len(self.nodes)
        self.nodes = [n for n in self.nodes if id(n) in live]
        return before - len(self.nodes)

    def symbols(self) -> set[str]:
        return {d for n in self.nodes for d in n.shape if isinstance(d, str)}

    def __str__(self) -> str:
        from .dump import to_text
        return to_text(self)


def _complete_attrs(opdef: OpDef, attrs: dict) -> dict:
    unknown = set(attrs) - set(opdef.attrs)
    if unknown:
        raise IRError(f"{opdef.name}: unknown attribute(s) {sorted(unknown)}; "
                      f"it takes {sorted(opdef.attrs) or 'none'}")
    out = {}
    for k, default in opdef.attrs.items():
        if k in attrs:
            out[k] = attrs[k]
        elif default is REQUIRED:
            raise IRError(f"{opdef.name}: missing required attribute {k!r}")
        else:
            out[k] = default
    return out


def _check_arity(opdef: OpDef, inputs: tuple) -> None:
    fixed = [n for n in opdef.inputs if not n.startswith("*")]
    required = [n for n in fixed if not n.endswith("?")]
    if len(inputs) < len(required) or (not opdef.variadic and len(inputs) > len(fixed)):
        raise IRError(f"{opdef.name} takes inputs ({', '.join(opdef.inputs)}), got {len(inputs)}")
    for nm, x in zip(fixed, inputs):
        if x is None and not nm.endswith("?"):
            raise IRError(f"{opdef.name}: input {nm!r} is required")


# --------------------------------------------------------------------------- shape helpers
def _fail(op: str, msg: str):
    raise IRError(f"{op}: {msg}")


def _numel(shape: Shape) -> tuple[int, tuple[str, ...]]:
    """Static product and sorted symbols of a shape, to compare sizes of symbolic shapes."""
    static = math.prod(d for d in shape if isinstance(d, int))
    return static, tuple(sorted(d for d in shape if isinstance(d, str)))


def _need_float(op: str, *xs: Node):
    for x in xs:
        if x.dtype not in FLOAT_TYPES:
            _fail(op, f"expects float activations, got {x.dtype.name} for {x!r}")


def _need_f32(op: str, *xs: Node):
    for x in xs:
        if x.dtype != F32:
            _fail(op, f"expects F32, got {x.dtype.name} for {x!r}")


def _need_i32(op: str, x: Node):
    if x.dtype != I32:
        _fail(op, f"expects I32 indices, got {x.dtype.name} for {x!r}")


def _broadcastable(small: Shape, big: Shape) -> bool:
    """ggml's can_repeat in NumPy order: trailing-aligned, each dim equal or 1."""
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(reversed(small), reversed(big)))


def _optional_broadcast(op: str, what: str, y, x) -> None:
    """An optional F32 operand y that must broadcast to x (a norm weight, a mask)."""
    if y is not None:
        _need_f32(op, y)
        if not _broadcastable(y.shape, x.shape):
            _fail(op, f"{what} {list(y.shape)} does not broadcast to x {list(x.shape)}")


def _batch_divides(a: Shape, b: Shape) -> bool:
    """MUL_MAT broadcasting: each batch dim of a divides the matching one of b (GQA)."""
    if len(a) != len(b):
        return False
    for da, db in zip(a, b):
        if da == db:
            continue
        if not (isinstance(da, int) and isinstance(db, int) and db % da == 0):
            return False
    return True


def _axis(op: str, x: Node, axis: int) -> int:
    if not -x.rank <= axis < x.rank:
        _fail(op, f"axis {axis} out of range for rank {x.rank}")
    return axis % x.rank


# --------------------------------------------------------------------------- the op table
@defop("INPUT", kind=Kind.LEAF, shape=REQUIRED, dtype=REQUIRED)
def _input(shape, dtype):
    """A value fed by the caller on every run (token ids, positions, the attention mask)."""
    return tuple(shape), dtype


@defop("WEIGHT", kind=Kind.LEAF, shape=REQUIRED, dtype=REQUIRED)
def _weight(shape, dtype):
    """A model tensor; node.data holds its bytes (GGUF block layout for quantized types)."""
    if is_quantized(dtype) and (not shape or shape[-1] % block_size(dtype)):
        _fail("WEIGHT", f"row length {shape[-1] if shape else None} is not a multiple of "
                        f"the {dtype.name} block size {block_size(dtype)}")
    return tuple(shape), dtype


@defop("STATE", kind=Kind.LEAF, shape=REQUIRED, dtype=REQUIRED)
def _state(shape, dtype):
    """A buffer that persists across runs (KV cache), zero-initialized, written by SET_ROWS."""
    return tuple(shape), dtype


@defop("GET_ROWS", "table ids", kind=Kind.OPAQUE, rowwise=True)
def _get_rows(table, ids):
    """out[..., i, :] = dequantize(table[..., ids[..., i], :]): embedding lookup and gathering
    router weights. The table's batch dims are the trailing batch dims of ids (the table is
    broadcast over the others: per-expert biases gathered by [T, k] expert ids, ggml's
    add_id); any table dtype; result F32."""
    _need_i32("GET_ROWS", ids)
    tb, ib = table.shape[:-2], ids.shape[:-1]
    if table.rank < 2 or len(tb) > len(ib) or ib[len(ib) - len(tb):] != tb:
        _fail("GET_ROWS", f"table {list(table.shape)} and ids {list(ids.shape)} do not match "
                          "(table [..., rows, cols], ids [..., n])")
    return (*ids.shape, table.shape[-1]), F32


@defop("RMS_NORM", "x w?", kind=Kind.REDUCE, eps=REQUIRED)
def _rms_norm(x, w, eps):
    """x / sqrt(mean(x^2 over the last axis) + eps), times w (broadcast) when given: the norm
    weight, folded in by the fuse_norm pass so the normalized x is never stored."""
    _need_f32("RMS_NORM", x)
    _optional_broadcast("RMS_NORM", "w", w, x)
    return x.shape, F32


@defop("NORM", "x", kind=Kind.REDUCE, eps=REQUIRED)
def _norm(x, eps):
    """(x - mean) / sqrt(var + eps) over the last axis."""
    _need_f32("NORM", x)
    return x.shape, F32


def _binary(op, doc):
    def infer(a, b):
        _need_f32(op, a, b)
        if not _broadcastable(b.shape, a.shape):
            _fail(op, f"b {list(b.shape)} does not broadcast to a {list(a.shape)}")
        return a.shape, F32
    OPS[op] = OpDef(op, ("a", "b"), {}, infer, f"{doc}, b broadcast to a's shape (ggml repeat).",
                    Kind.ELEMENTWISE, rowwise=True)


_binary("ADD", "a + b")
_binary("MUL", "a * b")
_binary("DIV", "a / b")


@defop("SCALE", "x", kind=Kind.ELEMENTWISE, scale=REQUIRED, bias=0.0)
def _scale(x, scale, bias):
    """x * scale + bias."""
    _need_f32("SCALE", x)
    return x.shape, F32


def _unary(op, doc):
    def infer(x):
        _need_f32(op, x)
        return x.shape, F32
    OPS[op] = OpDef(op, ("x",), {}, infer, doc, Kind.ELEMENTWISE, rowwise=True)


_unary("SILU", "x * sigmoid(x).")
_unary("GELU", "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (ggml's tanh approximation).")
_unary("SIGMOID", "1 / (1 + exp(-x)).")
_unary("CONT", "x made contiguous: no change of value; marks where a view is materialized.")


@defop("CLAMP", "x", kind=Kind.ELEMENTWISE, min=-math.inf, max=math.inf)
def _clamp(x, min, max):
    """min(max(x, min), max)."""
    _need_f32("CLAMP", x)
    return x.shape, F32


@defop("SWIGLU", "gate up?", kind=Kind.ELEMENTWISE)
def _swiglu(gate, up):
    """silu(gate) * up. With one input x [..., 2n]: gate = x[..., :n], up = x[..., n:] (the
    merged [gate; up] projection)."""
    if up is None:
        _need_f32("SWIGLU", gate)
        n = gate.shape[-1]
        if not isinstance(n, int) or n % 2:
            _fail("SWIGLU", f"merged input needs an even last dim, got {n}")
        return (*gate.shape[:-1], n // 2), F32
    _need_f32("SWIGLU", gate, up)
    if gate.shape != up.shape:
        _fail("SWIGLU", f"gate {list(gate.shape)} and up {list(up.shape)} differ")
    return gate.shape, F32


@defop("MUL_MAT", "a b", kind=Kind.PRODUCT)
def _mul_mat(a, b):
    """y[..., m, n] = sum_k a[..., n, k] * b[..., m, k]  (y = b @ a.T; a is the weight).
    Batch dims of a broadcast over b's ggml-style: b batch i uses a batch i // (B_b / B_a), which
    is grouped-query attention. Like ggml-cpu, b is first rounded to vec_dot_type(a.dtype):
    F16/BF16 for F16/BF16 a, 8-bit blocks (Q8_0, Q8_1, Q8_K) for quantized a."""
    _need_f32("MUL_MAT", b)
    if a.rank < 2 or b.rank < 2 or a.rank != b.rank:
        _fail("MUL_MAT", f"a {list(a.shape)} and b {list(b.shape)} need equal rank >= 2")
    if a.shape[-1] != b.shape[-1]:
        _fail("MUL_MAT", f"inner dims differ: a {list(a.shape)} vs b {list(b.shape)}")
    if not _batch_divides(a.shape[:-2], b.shape[:-2]):
        _fail("MUL_MAT", f"batch dims of a {list(a.shape)} do not divide those of b {list(b.shape)}")
    return (*b.shape[:-1], a.shape[-2]), F32


@defop("MUL_MAT_ID", "a b ids", kind=Kind.PRODUCT)
def _mul_mat_id(a, b, ids):
    """Per-token expert matmul: y[t, j, :] = a[ids[t, j]] @ b[t, j or 0, :].
    a [E, N, K] (experts), b [T, S, K] with S = k or 1 (shared by all k), ids [T, k].
    Activations rounded as in MUL_MAT."""
    _need_f32("MUL_MAT_ID", b)
    _need_i32("MUL_MAT_ID", ids)
    if a.rank != 3 or b.rank != 3 or ids.rank != 2:
        _fail("MUL_MAT_ID", f"want a [E,N,K], b [T,S,K], ids [T,k]; got {list(a.shape)}, "
                            f"{list(b.shape)}, {list(ids.shape)}")
    if a.shape[2] != b.shape[2] or b.shape[0] != ids.shape[0] or b.shape[1] not in (1, ids.shape[1]):
        _fail("MUL_MAT_ID", f"shapes do not agree: a {list(a.shape)}, b {list(b.shape)}, "
                            f"ids {list(ids.shape)}")
    return (ids.shape[0], ids.shape[1], a.shape[1]), F32


@defop("TOP_K", "x", kind=Kind.REDUCE, k=REQUIRED)
def _top_k(x, k):
    """Indices of the k largest values along the last axis, largest first (I32)."""
    _need_f32("TOP_K", x)
    if not (isinstance(k, int) and 1 <= k and (not isinstance(x.shape[-1], int) or k <= x.shape[-1])):
        _fail("TOP_K", f"k={k} must be in 1..{x.shape[-1]}")
    return (*x.shape[:-1], k), I32


def _check_sinks(op: str, sinks, n_head) -> None:
    if sinks is not None:
        _need_f32(op, sinks)
        if sinks.shape != (n_head,):
            _fail(op, f"sinks {list(sinks.shape)} must be one value per head [{n_head}]")


@defop("GROUP_MASK", "x", kind=Kind.REDUCE, n_groups=REQUIRED, n_used=REQUIRED)
def _group_mask(x, n_groups, n_used):
    """Group-limited expert selection (DeepSeek-V3's, llama.cpp's n_expert_groups): the last axis
    (E scores) in n_groups groups of E / n_groups consecutive entries, each group scored by the sum
    of its two largest entries; the entries of the n_used best groups (ranked as TOP_K ranks:
    ties to the lower index) are kept, the others become -inf."""
    _need_f32("GROUP_MASK", x)
    E = x.shape[-1]
    if not (isinstance(E, int) and isinstance(n_groups, int) and n_groups > 1 and E % n_groups == 0
            and E // n_groups >= 2 and isinstance(n_used, int) and 1 <= n_used < n_groups):
        _fail("GROUP_MASK", f"{E} entries in {n_groups} groups of at least 2, {n_used} of them used: "
                            "not a valid grouping")
    return x.shape, F32


@defop("SOFT_MAX", "x mask? sinks?", kind=Kind.REDUCE, scale=1.0)
def _soft_max(x, mask, sinks, scale):
    """softmax(x * scale + mask) over the last axis; mask (additive, -inf = masked) broadcasts
    to x. With sinks [H] (gpt-oss's attention sinks, ggml_soft_max_add_sinks), a row of head h =
    the axis third from last takes an extra logit sinks[h] (not scaled) into its max and its sum,
    without an output of its own."""
    _need_f32("SOFT_MAX", x)
    _optional_broadcast("SOFT_MAX", "mask", mask, x)
    if sinks is not None and x.rank < 3:
        _fail("SOFT_MAX", f"sinks need x [..., H, T, KV], got {list(x.shape)}")
    _check_sinks("SOFT_MAX", sinks, x.shape[-3] if x.rank >= 3 else None)
    return x.shape, F32


ROPE_NORM, ROPE_NEOX = 0, 2  # ggml's mode numbers


@defop("ROPE", "x pos freq_factors?", kind=Kind.OPAQUE, rowwise=True, n_dims=REQUIRED, mode=ROPE_NORM,
       freq_base=10000.0, freq_scale=1.0, ext_factor=0.0, attn_factor=1.0, beta_fast=32.0,
       beta_slow=1.0, n_ctx_orig=0)
def _rope(x, pos, freq_factors, n_dims, mode, freq_base, freq_scale, ext_factor, attn_factor,
          beta_fast, beta_slow, n_ctx_orig):
    """Rotary embedding of x [T, H, D] at positions pos [T] (ggml_rope_ext): pair i < n_dims/2
    is rotated by theta_i; pairs are (2i, 2i+1) in mode NORM (0) and (i, i + n_dims/2) in mode
    NEOX (2); dims past n_dims pass through. theta_e = p * freq_base^(-2i/n_dims) / ff_i (ff:
    the optional freq_factors [n_dims/2], Llama 3's rope_freqs; 1 without), theta = freq_scale *
    theta_e; with ext_factor != 0 (YaRN) theta = theta * (1 - m_i) + theta_e * m_i, m_i the ramp
    over the correction dims (rope_yarn_ramp) times ext_factor. cos and sin are scaled by
    attn_factor, under YaRN times 1 + 0.1 ln(1/freq_scale) (rope_mscale)."""
    _need_f32("ROPE", x)
    _need_i32("ROPE", pos)
    if x.rank != 3 or pos.shape != (x.shape[0],):
        _fail("ROPE", f"want x [T,H,D] and pos [T], got {list(x.shape)} and {list(pos.shape)}")
    if mode not in (ROPE_NORM, ROPE_NEOX):
        _fail("ROPE", f"mode {mode} unsupported (0 = NORM, 2 = NEOX)")
    if not (0 < n_dims <= x.shape[2] and n_dims % 2 == 0):
        _fail("ROPE", f"n_dims={n_dims} must be even and <= head dim {x.shape[2]}")
    if freq_factors is not None and (freq_factors.dtype != F32 or freq_factors.shape != (n_dims // 2,)):
        _fail("ROPE", f"freq_factors must be F32 [{n_dims // 2}], got {list(freq_factors.shape)} "
                      f"{freq_factors.dtype.name}")
    if ext_factor != 0 and not (isinstance(n_ctx_orig, int) and n_ctx_orig > 0):
        _fail("ROPE", f"YaRN (ext_factor={ext_factor}) needs n_ctx_orig > 0, got {n_ctx_orig!r}")
    return x.shape, F32


def rope_yarn_corr_dims(attrs: dict) -> tuple[float, float]:
    """ROPE's YaRN correction dims (low, high), float32 as ggml_rope_yarn_corr_dims: floor/ceil
    of the dims whose wavelength fits beta_fast / beta_slow times in n_ctx_orig."""
    import numpy as np
    f32, nd = np.float32, attrs["n_dims"]

    def corr_dim(n_rot):
        return f32(nd) * f32(np.log(f32(attrs["n_ctx_orig"]) / (f32(n_rot) * f32(2) * f32(np.pi)))) / \
            (f32(2) * f32(np.log(f32(attrs["freq_base"]))))
    low = max(f32(0), f32(np.floor(corr_dim(attrs.get("beta_fast", 32.0)))))
    high = min(f32(nd - 1), f32(np.ceil(corr_dim(attrs.get("beta_slow", 1.0)))))
    return float(low), float(high)


def rope_yarn_ramp(attrs: dict):
    """ROPE's per-pair YaRN mix m_i (float32 [n_dims/2]): 1 - clamp((i - low) / max(0.001,
    high - low), 0, 1) over the correction dims, times ext_factor; zeros without YaRN."""
    import numpy as np
    f32, half = np.float32, attrs["n_dims"] // 2
    ext = f32(attrs.get("ext_factor", 0.0))
    if ext == 0:
        return np.zeros(half, f32)
    low, high = (f32(v) for v in rope_yarn_corr_dims(attrs))
    y = (np.arange(half, dtype=f32) - low) / max(f32(0.001), f32(high - low))
    return ((f32(1) - np.minimum(f32(1), np.maximum(f32(0), y))) * ext).astype(f32)


def rope_mscale(attrs: dict) -> float:
    """ROPE's factor on cos and sin: attn_factor, under YaRN times 1 + 0.1 ln(1/freq_scale)."""
    import numpy as np
    m = np.float32(attrs.get("attn_factor", 1.0))
    if attrs.get("ext_factor", 0.0) != 0:
        m = np.float32(m * np.float32(1.0 + 0.1 * np.log(1.0 / np.float32(attrs["freq_scale"]))))
    return float(m)


@defop("RESHAPE", "x", kind=Kind.VIEW, rowwise=True, shape=REQUIRED)
def _reshape(x, shape):
    """Same elements in row-major order, new shape (symbols must be carried over; one -1 is
    inferred from the static sizes)."""
    shape = tuple(shape)
    if shape.count(-1) == 1:
        have, _ = _numel(x.shape)
        known, _ = _numel(tuple(d for d in shape if d != -1))
        if known == 0 or have % known:
            _fail("RESHAPE", f"cannot reshape {list(x.shape)} to {list(shape)}")
        shape = tuple(have // known if d == -1 else d for d in shape)
    if _numel(shape) != _numel(x.shape):
        _fail("RESHAPE", f"cannot reshape {list(x.shape)} to {list(shape)}")
    return shape, x.dtype


@defop("PERMUTE", "x", kind=Kind.VIEW, axes=REQUIRED)
def _permute(x, axes):
    """out.shape[i] = x.shape[axes[i]] (numpy.transpose)."""
    if sorted(axes) != list(range(x.rank)):
        _fail("PERMUTE", f"axes {list(axes)} is not a permutation of 0..{x.rank - 1}")
    return tuple(x.shape[a] for a in axes), x.dtype


@defop("SLICE", "x", kind=Kind.VIEW, axis=REQUIRED, start=REQUIRED, stop=REQUIRED)
def _slice(x, axis, start, stop):
    """x[..., start:stop, ...] along `axis` (a view). `stop` may be a symbol (with start 0): the
    attention reads the first KV cells of the cache, KV bound when the graph runs."""
    ax = _axis("SLICE", x, axis)
    n = x.shape[ax]
    if isinstance(stop, str):
        if start != 0:
            _fail("SLICE", f"a symbolic stop ({stop}) needs start 0, got {start}")
        new = stop
    elif not isinstance(n, int) or not (0 <= start < stop <= n):
        _fail("SLICE", f"[{start}:{stop}] out of range for axis {axis} of {list(x.shape)}")
    else:
        new = stop - start
    if is_quantized(x.dtype) and ax == x.rank - 1:
        _fail("SLICE", "cannot slice inside the rows of a block-quantized tensor")
    return tuple(new if i == ax else d for i, d in enumerate(x.shape)), x.dtype


@defop("CONCAT", "*xs", kind=Kind.MOVEMENT, axis=REQUIRED)
def _concat(*xs, axis):
    """xs joined along `axis`; other dims and dtypes must agree."""
    if not xs:
        _fail("CONCAT", "needs at least one input")
    ax = _axis("CONCAT", xs[0], axis)
    for x in xs[1:]:
        if x.dtype != xs[0].dtype or x.rank != xs[0].rank or any(
                a != b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if i != ax):
            _fail("CONCAT", f"inputs disagree: {[list(y.shape) for y in xs]}, "
                            f"{[y.dtype.name for y in xs]}")
    if any(not isinstance(x.shape[ax], int) for x in xs):
        _fail("CONCAT", "cannot concatenate along a symbolic axis")
    if is_quantized(xs[0].dtype) and ax == xs[0].rank - 1:
        _fail("CONCAT", "cannot concatenate inside the rows of a block-quantized tensor")
    shape = list(xs[0].shape)
    shape[ax] = sum(x.shape[ax] for x in xs)
    return tuple(shape), xs[0].dtype


@defop("SUM", "x", kind=Kind.REDUCE, axis=REQUIRED)
def _sum(x, axis):
    """Sum over `axis`, which is removed."""
    _need_f32("SUM", x)
    ax = _axis("SUM", x, axis)
    return tuple(d for i, d in enumerate(x.shape) if i != ax), F32


@defop("CAST", "x", kind=Kind.ELEMENTWISE, dtype=REQUIRED)
def _cast(x, dtype):
    """Round x to F16/BF16 or back to F32 (round to nearest even)."""
    if x.dtype not in FLOAT_TYPES or dtype not in FLOAT_TYPES:
        _fail("CAST", f"casts between F32/F16/BF16 only, got {x.dtype.name} -> {dtype.name}")
    return x.shape, dtype


@defop("SET_ROWS", "dst src idx", kind=Kind.SIDE_EFFECT)
def _set_rows(dst, src, idx):
    """Writes src rows into the STATE dst at rows idx (converted to dst's dtype) and returns the
    updated dst; dst [R, ...], src [n, ...], idx [n]. Reads of the cache go through the result."""
    if dst.op != "STATE":
        _fail("SET_ROWS", f"dst must be a STATE node, got {dst!r}")
    _need_f32("SET_ROWS", src)
    _need_i32("SET_ROWS", idx)
    if src.shape[1:] != dst.shape[1:] or idx.shape != src.shape[:1]:
        _fail("SET_ROWS", f"dst {list(dst.shape)}, src {list(src.shape)}, idx {list(idx.shape)} "
                          "do not agree")
    return dst.shape, dst.dtype


# --------------------------------------------------------------------------- fused ops
# Made by the lowering's fusion rules (backends/lower/fusion.py) for backends that have a kernel
# for them; their meaning is their decomposition, which is what the reference backend runs.
def _attention_decompose(g: "Graph", n: "Node") -> "Node":
    q, k, v, mask, sinks = n.inputs
    kq = g.mul_mat(g.permute(k, axes=(1, 0, 2)), g.permute(q, axes=(1, 0, 2)))     # [H, T, KV]
    p = g.soft_max(kq, mask, sinks, scale=n.attrs["scale"])
    return g.mul_mat(g.permute(v, axes=(1, 2, 0)), p)                              # [H, T, Dv]


@defop("ATTENTION", "q k v mask sinks?", kind=Kind.FUSED, decompose=_attention_decompose, scale=REQUIRED)
def _attention(q, k, v, mask, sinks, scale):
    """out[h, t, :] = softmax(scale * q[t, h] . k[j, h/g] + mask[t, j]) . v[j, h/g] over the KV
    cells j, with g = H / Hkv query heads per KV head: q [T, H, D], k [KV, Hkv, D],
    v [KV, Hkv, Dv], mask [T, KV] (additive), out [H, T, Dv]; sinks [H] as in SOFT_MAX. q and the
    probabilities are rounded to k's and v's vec_dot type (F16 for an F16 cache) as the two
    MUL_MATs of its decomposition."""
    _need_f32("ATTENTION", q, mask)
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        _fail("ATTENTION", f"want q [T,H,D], k [KV,Hkv,D], v [KV,Hkv,Dv]; got {list(q.shape)}, "
                           f"{list(k.shape)}, {list(v.shape)}")
    (T, H, D), (KV, Hkv, Dk) = q.shape, k.shape
    if Dk != D or v.shape[:2] != (KV, Hkv) or not isinstance(H, int) or H % Hkv:
        _fail("ATTENTION", f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not agree")
    if not _broadcastable(mask.shape, (H, T, KV)):
        _fail("ATTENTION", f"mask {list(mask.shape)} does not broadcast to [{H}, {T}, {KV}]")
    _check_sinks("ATTENTION", sinks, H)
    return (H, T, v.shape[2]), F32


def _moe_swiglu_decompose(g: "Graph", n: "Node") -> "Node":
    gate, up, b, ids = n.inputs
    if up is None:
        return g.swiglu(g.mul_mat_id(gate, b, ids))
    return g.swiglu(g.mul_mat_id(gate, b, ids), g.mul_mat_id(up, b, ids))


@defop("MOE_SWIGLU", "gate up? b ids", kind=Kind.FUSED, decompose=_moe_swiglu_decompose)
def _moe_swiglu(gate, up, b, ids):
    """silu(MUL_MAT_ID(gate, b, ids)) * MUL_MAT_ID(up, b, ids), neither product stored. Without
    up, gate is the merged [E, 2F, K] tensor: rows [0, F) gate, [F, 2F) up. up has gate's type
    and shape (both products run the same kernel)."""
    shape, dtype = _mul_mat_id(gate, b, ids)
    if up is None:
        if shape[2] % 2:
            _fail("MOE_SWIGLU", f"merged [gate; up] tensor {list(gate.shape)} has an odd row count")
        return (*shape[:2], shape[2] // 2), dtype
    if up.shape != gate.shape or up.dtype != gate.dtype:
        _fail("MOE_SWIGLU", f"up {list(up.shape)}:{up.dtype.name} differs from gate "
                            f"{list(gate.shape)}:{gate.dtype.name}")
    return shape, dtype


def op_table_markdown() -> str:
    """The op table as documentation (used by docs and `moegraph dump --ops`)."""
    rows = ["| op | kind | inputs | attrs | semantics |", "| --- | --- | --- | --- | --- |"]
    for name, d in OPS.items():
        attrs = ", ".join(k if v is REQUIRED else f"{k}={v}" for k, v in d.attrs.items())
        rows.append(f"| {name} | {d.kind} | {' '.join(d.inputs)} | {attrs} | {' '.join(d.doc.split())} |")
    return "\n".join(rows)


def static_shape(shape: Shape, bindings: dict[str, int]) -> tuple[int, ...]:
    """Binds symbolic dims."""
    try:
        return tuple(d if isinstance(d, int) else bindings[d] for d in shape)
    except KeyError as e:
        raise IRError(f"symbol {e.args[0]!r} is unbound") from None


def iter_ops(nodes: Iterable[Node], *ops: str):
    return (n for n in nodes if n.op in ops)
