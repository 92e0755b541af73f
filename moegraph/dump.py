"""Graph dumps: text (one line per live node), Graphviz DOT (clustered per layer), JSON, and a
unified diff of two text dumps (what a pass changed).

    %12 = MUL_MAT(%3 blk.0.attn_q.weight, %11) [T, 256] F32
    %40 blk.0.expert_ids = TOP_K(%39) [T, 2] I32 {k=2}

Only the nodes the outputs depend on are shown, in the graph's deterministic topological order.
Leaves print what they are: `INPUT`, `STATE` (the KV cache) or `WEIGHT` with its GGML type, shape
and size in the file."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import MoeGraphError
from .ir import OPS, Graph, Kind, Node

_LEAF_ATTRS = ("name", "shape", "dtype")   # repeated on the node itself; not printed as attrs


# --------------------------------------------------------------------------- small formatters
def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable


def _fmt_value(v: Any) -> str:
    if isinstance(v, enum.Enum):
        return v.name
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, Node):
        return f"%{v.id}"
    return str(v)


def _attrs(n: Node) -> dict[str, Any]:
    return {k: v for k, v in n.attrs.items() if not (OPS[n.op].kind == Kind.LEAF and k in _LEAF_ATTRS)}


def _fmt_attrs(n: Node) -> str:
    a = _attrs(n)
    return "{" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in a.items()) + "}" if a else ""


def _ref(x: Node | None) -> str:
    if x is None:
        return "_"
    return f"%{x.id} {x.name}" if x.op == "WEIGHT" and x.name else f"%{x.id}"


def _nbytes(n: Node) -> int | None:
    data = getattr(n, "data", None)
    return int(data.nbytes) if data is not None and hasattr(data, "nbytes") else None


# --------------------------------------------------------------------------- text
def node_line(n: Node) -> str:
    lhs = f"%{n.id} {n.name}" if n.name else f"%{n.id}"
    if n.op == "WEIGHT":
        nb = _nbytes(n)
        size = f" ({fmt_bytes(nb)})" if nb is not None else ""
        return f"{lhs} = WEIGHT {n.dtype.name} {fmt_shape(n.shape)}{size}"
    if OPS[n.op].kind == Kind.LEAF:
        return f"{lhs} = {n.op} {fmt_shape(n.shape)} {n.dtype.name}"
    args = ", ".join(_ref(x) for x in n.inputs)
    attrs = _fmt_attrs(n)
    return f"{lhs} = {n.op}({args}) {fmt_shape(n.shape)} {n.dtype.name}" + (f" {attrs}" if attrs else "")


def to_text(graph: Graph, view: "View | None" = None) -> str:
    """One line per live node in topological order, after a header with the graph's name and the
    number of nodes per op; then the outputs. `view` (select_view) shows some layers only."""
    order = graph.toposort()
    counts = Counter(n.op for n in order)
    weights = [n for n in order if n.op == "WEIGHT"]
    wbytes = sum(_nbytes(n) or 0 for n in weights)
    lines = [f"# graph {graph.name}: {len(order)} live nodes"
             + (f" ({len(graph.nodes) - len(order)} dead)" if len(graph.nodes) != len(order) else "")
             + f", {len(weights)} weights ({fmt_bytes(wbytes)})",
             "# ops: " + ", ".join(f"{op} {c}" for op, c in sorted(counts.items()))]
    if view is None:
        lines += [node_line(n) for n in order]
    else:
        lines += view.notes
        lines += [node_line(n) for n in order if n.id in view.ids]
    lines.append("outputs: " + ", ".join(f"{k} = %{v.id}" for k, v in graph.outputs.items()))
    return "\n".join(lines) + "\n"


def diff_text(before: str, after: str, before_name: str = "before",
              after_name: str = "after", context: int = 3) -> str:
    """A unified diff of two to_text dumps (empty when they are equal)."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True),
                                        after.splitlines(keepends=True),
                                        fromfile=before_name, tofile=after_name, n=context))


# --------------------------------------------------------------------------- layers
_LAYER_RE = (re.compile(r"^blk\.(\d+)\."), re.compile(r"^[A-Za-z_]+\.(\d+)$"))  # blk.N.x, cache_k.N


def _name_layer(name: str) -> int | None:
    for rx in _LAYER_RE:
        m = rx.match(name or "")
        if m:
            return int(m.group(1))
    return None


def node_layers(graph: Graph, order: list[Node] | None = None) -> dict[int, int | None]:
    """Node id -> layer index (None = outside the layers: embeddings, output head, inputs).

    A name with the `blk.N.` prefix (or a state like `cache_k.N`) decides; a leaf or a node using
    weights is otherwise decided by its name / its weights' names (global weights such as
    output_norm.weight put it outside the layers); other nodes inherit from upstream (the deepest
    layer of their inputs), then a node that only inherited moves to its users' layer when they
    all agree on one (the norm at the start of layer N+1 reads layer N's output)."""
    order = graph.toposort() if order is None else order
    layer: dict[int, int | None] = {}
    explicit: set[int] = set()
    for n in order:
        lay = _name_layer(n.name)
        weights = [x for x in n.inputs if x is not None and x.op == "WEIGHT"]
        if lay is not None or OPS[n.op].kind == Kind.LEAF:
            explicit.add(n.id)
        elif weights:
            found = [layer[w.id] for w in weights if layer.get(w.id) is not None]
            lay = max(found) if found else None
            explicit.add(n.id)
        else:
            found = [layer[x.id] for x in n.inputs if x is not None and layer.get(x.id) is not None]
            lay = max(found) if found else None
        layer[n.id] = lay
    users: dict[int, list[int]] = {n.id: [] for n in order}
    for n in order:
        for x in n.inputs:
            if x is not None and x.id in users:
                users[x.id].append(n.id)
    for n in reversed(order):
        if n.id in explicit or not users[n.id]:
            continue
        ul = {layer[u] for u in users[n.id]}
        if len(ul) == 1:
            layer[n.id] = ul.pop()
    return layer


# --------------------------------------------------------------------------- big graphs
@dataclasses.dataclass
class View:
    """The nodes a dump shows (ids) and what it says about the rest (notes, '# ...' lines)."""
    ids: set[int]
    notes: list[str]


def parse_layers(spec: str, n_layer: int) -> list[int]:
    """'3', '0-3', '0,47', '-1' (the last) -> sorted layer numbers, each checked."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise MoeGraphError(f"--layers: expected N, A-B or a comma list of them, got {part!r}")
        a = int(m.group(1)) + (n_layer if m.group(1).startswith("-") else 0)
        b = int(m.group(2)) if m.group(2) else a
        if not 0 <= a <= b < n_layer:
            raise MoeGraphError(f"--layers {part}: the model has layers 0-{n_layer - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def _spans(nums: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(nums):
        if start is None:
            start = v
        if i + 1 == len(nums) or nums[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


_LAYER_NAME = re.compile(r"\bblk\.\d+\.")
_CACHE_NAME = re.compile(r"\b(cache_[kv])\.\d+\b")      # the builder's KV cache states


def _layer_lines(nodes: list[Node]) -> tuple[str, ...]:
    """A layer's nodes as text with node ids made local and layer numbers removed: two layers
    with the same lines compute the same thing on the same kinds of weights."""
    local = {n.id: i for i, n in enumerate(nodes)}
    renum = re.compile(r"%(\d+)")
    return tuple(_CACHE_NAME.sub(r"\1.N", _LAYER_NAME.sub("blk.N.", renum.sub(
        lambda m: f"%L{local[int(m.group(1))]}" if int(m.group(1)) in local else "%ext", node_line(n))))
        for n in nodes)


def select_view(graph: Graph, layers: list[int] | None = None, collapse: bool = False) -> View:
    """The nodes of the chosen layers (None: all; nodes outside the layers, such as the
    embeddings and the output head, are shown only when no layer was chosen), and with collapse
    only the first of each run of identical layers, with a note naming the layers left out."""
    order = graph.toposort()
    lay = node_layers(graph, order)
    by_layer: dict[int, list[Node]] = {}
    for n in order:
        if lay[n.id] is not None:
            by_layer.setdefault(lay[n.id], []).append(n)
    wanted = sorted(by_layer) if layers is None else [x for x in layers if x in by_layer]
    notes: list[str] = []
    if layers is not None:
        notes.append(f"# layers {_spans(wanted)} of {len(by_layer)} (--layers): nodes outside them "
                     "are referred to by id only")
    shown = list(wanted)
    if collapse:
        first: dict[tuple, int] = {}
        same: dict[int, list[int]] = {}
        shown = []
        for x in wanted:
            sig = _layer_lines(by_layer[x])
            if sig in first:
                same[first[sig]].append(x)
            else:
                first[sig] = x
                same[x] = []
                shown.append(x)
        for x in shown:
            if same[x]:
                notes.append(f"# layers {_spans(same[x])}: the same as layer {x} (not shown)")
    ids = {n.id for x in shown for n in by_layer[x]}
    if layers is None:
        ids |= {n.id for n in order if lay[n.id] is None}
    return View(ids, notes)


def _plain_line(n: Node) -> str:
    """node_line without node ids (inputs by name, or op and shape): what a node is, wherever it
    sits in the order."""
    def ref(x: Node | None) -> str:
        if x is None:
            return "_"
        return x.name or f"{x.op}{fmt_shape(x.shape)}"
    line = re.sub(r"^%\d+ ?", "", node_line(n))
    if OPS[n.op].kind != Kind.LEAF:
        attrs = _fmt_attrs(n)
        line = (f"{n.name + ' ' if n.name else ''}= {n.op}({', '.join(ref(x) for x in n.inputs)}) "
                f"{fmt_shape(n.shape)} {n.dtype.name}" + (f" {attrs}" if attrs else ""))
    return line


def diff_graphs(before: Graph, after: Graph, before_name: str = "before", after_name: str = "after") -> str:
    """What changed between two graphs, ignoring node order and ids: nodes (described by op,
    inputs by name or op and shape, shape, dtype, attrs) only in one of them, with the same
    change in several layers written once (blk.N) with the layers it applies to. Empty when the
    graphs hold the same nodes."""
    def lines(g: Graph) -> Counter:
        return Counter(_plain_line(n) for n in g.toposort())
    a, b = lines(before), lines(after)
    removed, added = a - b, b - a
    if not removed and not added:
        return ""

    def grouped(c: Counter, sign: str) -> list[str]:
        groups: dict[str, list[int]] = {}
        count: Counter = Counter()
        for line, k in c.items():
            key = _LAYER_NAME.sub("blk.N.", line)
            groups.setdefault(key, []).extend(int(x) for x in re.findall(r"\bblk\.(\d+)\.", line)[:1])
            count[key] += k
        out = []
        for key in sorted(groups):
            ls = sorted(set(groups[key]))
            where = f"  [N = {_spans(ls)}]" if ls and "blk.N." in key else ""
            times = f" (x{count[key]})" if count[key] > 1 and not where else ""
            out.append(f"{sign} {key}{where}{times}")
        return out
    head = [f"--- {before_name}", f"+++ {after_name}",
            f"# {sum(removed.values())} nodes only before, {sum(added.values())} only after "
            "(order and node ids ignored)"]
    return "\n".join(head + grouped(removed, "-") + grouped(added, "+")) + "\n"


# --------------------------------------------------------------------------- DOT
_STYLE = {
    "INPUT": 'shape=invhouse, style=filled, fillcolor="#cfe2ff"',
    "WEIGHT": 'shape=box, style=filled, fillcolor="#fff3b0"',
    "STATE": 'shape=cylinder, style=filled, fillcolor="#f8c8c8"',
    "OUTPUT": 'shape=doubleoctagon, style=filled, fillcolor="#c8f0c8"',
}
_OP_STYLE = 'shape=box, style="rounded,filled", fillcolor="#ffffff"'
_HEAVY_STYLE = 'shape=box, style="rounded,filled", fillcolor="#e6dcff"'   # products, fused ops


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_label(n: Node) -> str:
    if n.op == "WEIGHT":
        return f"{n.name}\n{n.dtype.name} {fmt_shape(n.shape)}"
    if OPS[n.op].kind == Kind.LEAF:
        return f"{n.op.lower()} {n.name}\n{n.dtype.name} {fmt_shape(n.shape)}"
    head = f"%{n.id} {n.op}"
    lines = [head] + ([n.name] if n.name else [])
    attrs = _fmt_attrs(n)
    if attrs:
        lines.append(attrs if len(attrs) <= 48 else attrs[:45] + "...}")
    return "\n".join(lines)


def to_dot(graph: Graph, view: "View | None" = None) -> str:
    """Graphviz DOT: inputs, weights, states and outputs drawn as distinct shapes; edges labelled
    with the shape of the value they carry; one cluster per layer `blk.N`. With a `view`, only
    its nodes and the edges between them (and a note node saying what was left out)."""
    order = graph.toposort()
    layers = node_layers(graph, order)
    if view is not None:
        order = [n for n in order if n.id in view.ids]
    out = [f"digraph {_q(graph.name)} {{",
           "  rankdir=TB; newrank=true;",
           '  node [fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=8, color="#555555"];',
           f"  label={_q(graph.name)}; labelloc=t;"]

    def decl(n: Node, indent: str) -> str:
        style = _STYLE.get(n.op) or (_HEAVY_STYLE if OPS[n.op].kind in (Kind.PRODUCT, Kind.FUSED) else _OP_STYLE)
        return f"{indent}n{n.id} [label={_q(_dot_label(n))}, {style}];"

    by_layer: dict[int, list[Node]] = {}
    for n in order:
        lay = layers[n.id]
        if lay is None:
            out.append(decl(n, "  "))
        else:
            by_layer.setdefault(lay, []).append(n)
    for lay in sorted(by_layer):
        out += [f"  subgraph cluster_blk_{lay} {{",
                f'    label="blk.{lay}"; style="rounded,dashed"; color="#888888";']
        out += [decl(n, "    ") for n in by_layer[lay]]
        out.append("  }")
    shown = {n.id for n in order}
    for n in order:
        for x in n.inputs:
            if x is not None and x.id in shown:
                out.append(f"  n{x.id} -> n{n.id} [label={_q(fmt_shape(x.shape))}];")
    if view is not None and view.notes:
        out.append(f"  note [label={_q(chr(10).join(x.lstrip('# ') for x in view.notes))}, shape=note];")
    for i, (name, node) in enumerate(graph.outputs.items()):
        if node.id not in shown:
            continue
        out.append(f"  out{i} [label={_q(name)}, {_STYLE['OUTPUT']}];")
        out.append(f"  n{node.id} -> out{i} [label={_q(fmt_shape(node.shape))}];")
    out.append("}")
    return "\n".join(out) + "\n"


def render_svg(dot_text: str, out_path: str | Path, timeout: float = 120.0) -> bool:
    """Renders DOT text to an SVG file with Graphviz's `dot` binary. Returns False when `dot` is
    not on PATH; raises MoeGraphError when it fails."""
    exe = shutil.which("dot")
    if exe is None:
        return False
    try:
        proc = subprocess.run([exe, "-Tsvg", "-o", str(out_path)], input=dot_text.encode(),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MoeGraphError(f"Graphviz dot took more than {timeout:g} s to render {out_path}") from None
    if proc.returncode != 0:
        raise MoeGraphError(f"Graphviz dot failed ({proc.returncode}) rendering {out_path}: "
                            f"{proc.stderr.decode(errors='replace').strip()}")
    return True


# --------------------------------------------------------------------------- JSON
def json_safe(v: Any) -> Any:
    """Plain JSON values: enums -> names, tuples -> lists, dataclasses -> dicts, paths -> str,
    NumPy scalars -> Python numbers, non-finite floats -> strings."""
    if isinstance(v, enum.Enum):
        return v.name
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Node):
        return v.id
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [json_safe(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: json_safe(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0:  # NumPy scalar
        return json_safe(v.item())
    if hasattr(v, "tolist"):
        return json_safe(v.tolist())
    return str(v)


def to_json(graph: Graph, view: "View | None" = None) -> dict:
    """The live graph as a JSON-ready dict: nodes (id, op, name, inputs, attrs, shape, dtype, and
    layer; weights also nbytes), outputs (name -> id), op counts and the graph's meta. With a
    `view`, only its nodes (and "view": its notes)."""
    order = graph.toposort()
    layers = node_layers(graph, order)
    nodes = []
    for n in order:
        if view is not None and n.id not in view.ids:
            continue
        d = {"id": n.id, "op": n.op, "name": n.name,
             "inputs": [None if x is None else x.id for x in n.inputs],
             "attrs": json_safe(_attrs(n)), "shape": json_safe(n.shape), "dtype": n.dtype.name,
             "layer": layers[n.id]}
        nb = _nbytes(n) if n.op == "WEIGHT" else None
        if nb is not None:
            d["nbytes"] = nb
        nodes.append(d)
    out = {"name": graph.name, "meta": json_safe(graph.meta),
           "op_counts": dict(sorted(Counter(n.op for n in order).items())),
           "nodes": nodes, "outputs": {k: v.id for k, v in graph.outputs.items()}}
    if view is not None:
        out["view"] = [x.lstrip("# ") for x in view.notes]
    return out


def to_json_text(graph: Graph, indent: int | None = 1, view: "View | None" = None) -> str:
    return json.dumps(to_json(graph, view), indent=indent) + "\n"


# --------------------------------------------------------------------------- lowered programs
def lowered_program(graph: Graph, backend: str, max_tokens: int = 512, cc: int = 90) -> dict:
    """What `backend` runs for this graph, without running it: `steps` (kernel, op, graph nodes,
    token range: None = any T) and a summary counted per layer. `cc`: the CUDA device's compute
    capability (which product kernels exist); code is generated, never compiled or launched."""
    if backend == "llvm":
        from .backends.llvm import lowered_program as llvm_program
        plan, steps = llvm_program(graph, max_tokens)
        lowered = plan.graph
    elif backend == "cuda":
        from .backends.cuda.codegen import generate_for_graph, lowered
        plan, program = generate_for_graph(graph, max_tokens)
        steps, lowered = lowered(plan, program, cc), plan.graph
    elif backend == "numpy":   # the interpreter: one step per node of the decomposed graph
        lowered = graph.copy()
        lowered.expand_fused()
        steps = [{"kernel": n.op, "ops": [n.op], "nodes": [n.id], "names": [n.name] if n.name else [],
                  "shape": [d if isinstance(d, int) else str(d) for d in n.shape], "tokens": None}
                 for n in lowered.toposort() if OPS[n.op].kind not in (Kind.LEAF, Kind.VIEW)]
    else:
        raise MoeGraphError(f"--lowered: unknown backend {backend!r} (numpy, llvm, cuda)")
    return {"backend": backend, "steps": steps, "summary": lowered_summary(lowered, steps)}


def _runs_for(step: dict, T: int) -> bool:
    return step["tokens"] is None or step["tokens"][0] <= T <= step["tokens"][1]


def lowered_summary(graph: Graph, steps: list[dict]) -> dict:
    """Steps that run for a decode step (T = 1) and for a 128-token prompt, in all, per layer
    (the most of any layer) and outside the layers."""
    layers = node_layers(graph)
    out = {}
    for label, T in (("decode", 1), ("prompt128", 128)):
        per: Counter = Counter(layers.get(s["nodes"][0]) for s in steps if _runs_for(s, T))
        inside = [v for k, v in per.items() if k is not None]
        out[label] = {"steps": sum(per.values()), "max_per_layer": max(inside, default=0),
                      "layers": len(inside), "outside_layers": per.get(None, 0)}
    return out


def lowered_to_text(report: dict) -> str:
    width = max([len(s["kernel"]) for s in report["steps"]] + [6])
    lines = [f"# lowered for {report['backend']}: {len(report['steps'])} kernel calls"]
    for i, s in enumerate(report["steps"]):
        tok = "any T" if s["tokens"] is None else f"T in [{s['tokens'][0]}, {s['tokens'][1]}]"
        names = " ".join(s["names"])
        lines.append(f"{i:5d}  {s['kernel']:<{width}}  {'+'.join(s['ops'])}  %{',%'.join(map(str, s['nodes']))}"
                     f" {names} {fmt_shape(s['shape'])}  ({tok})")
    for label, v in report["summary"].items():
        lines.append(f"# {label}: {v['steps']} steps; at most {v['max_per_layer']} per layer over "
                     f"{v['layers']} layers, {v['outside_layers']} outside the layers")
    return "\n".join(lines) + "\n"
