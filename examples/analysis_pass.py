"""An analysis pass: FLOPs and bytes moved per op for one decode step and one prompt step, and the
bytes of weights read per generated token (the number a memory-bandwidth roofline divides into).

A pass need not change the graph: this one walks it, stores a report in graph.meta and returns the
graph unchanged, so it can sit anywhere in a pipeline (here: after the fusions, after slicing).
Weights count in their GGML type (quantized blocks as stored), activations as F32, the KV cache in
its own type (F16 by default); views (RESHAPE, PERMUTE, SLICE) move nothing, their readers pay.
A MUL_MAT_ID reads only the experts chosen: k of E for one token, at most min(T*k, E) for T.

    python examples/analysis_pass.py
"""
import math
from collections import defaultdict

import moegraph
from moegraph.data import DEFAULT_MODEL
from moegraph.ir import static_shape
from moegraph.passes import register_pass, run_passes
from moegraph.quants import row_bytes

VIEWS = {"RESHAPE", "PERMUTE", "SLICE"}        # no data moved: whoever reads the view pays
LEAVES = {"INPUT", "WEIGHT", "STATE"}
# FLOPs per output element of the element-wise ops (exp, sqrt, division count as one).
COLUMNS = ("count", "flops", "weight_bytes", "act_bytes", "written")
PER_ELEMENT = {"ADD": 1, "MUL": 1, "DIV": 1, "SCALE": 2, "CLAMP": 2, "SILU": 4, "SIGMOID": 3,
               "GELU": 8, "SWIGLU": 5, "RMS_NORM": 3, "NORM": 5, "SOFT_MAX": 5, "ROPE": 3}


def _numel(shape):
    return math.prod(shape)


def _nbytes(dtype, shape):
    """Bytes of a tensor in its own type: GGML blocks for quantized weights, 2 for an F16 cache."""
    return _numel(shape[:-1]) * row_bytes(dtype, shape[-1]) if shape else row_bytes(dtype, 1)


def _source(n):
    """The node a chain of views reads from (a WEIGHT for weights, anything else = activation)."""
    while n.op in VIEWS:
        n = n.inputs[0]
    return n


def node_cost(n, bind):
    """(flops, weight bytes read, activation bytes read, bytes written) of one node."""
    if n.op in LEAVES or n.op in VIEWS:
        return 0, 0, 0, 0
    def shape(x):                                             # T and KV bound to numbers
        return static_shape(x.shape, bind)

    out = shape(n)
    flops, w_read, a_read = 0, 0, 0
    if n.op in ("MUL_MAT", "MUL_MAT_ID"):
        flops = 2 * _numel(out) * shape(n.inputs[0])[-1]     # out elements x K multiply-adds
    elif n.op in ("SUM", "TOP_K"):
        flops = _numel(shape(n.inputs[0]))
    elif n.op == "RMS_NORM" and n.inputs[1] is not None:
        flops = 4 * _numel(out)
    else:
        flops = PER_ELEMENT.get(n.op, 0) * _numel(out)
    for slot, x in enumerate(n.inputs):
        if x is None or (n.op == "SET_ROWS" and slot == 0):   # the cache is written, not read
            continue
        xs = shape(x)
        if n.op == "GET_ROWS" and slot == 0:                  # only the looked-up rows are read
            xs = (_numel(shape(n.inputs[1])), xs[-1])
        nbytes = _nbytes(x.dtype, xs)
        if _source(x).op != "WEIGHT":
            a_read += nbytes
        elif n.op == "MUL_MAT_ID" and slot == 0:              # only the experts the tokens chose
            n_expert, (T, k) = xs[0], shape(n.inputs[2])
            w_read += nbytes * min(T * k, n_expert) // n_expert   # upper bound for T > 1
        else:
            w_read += nbytes
    written = _nbytes(n.dtype, out)
    if n.op == "SET_ROWS":                                    # T rows of the cache
        written = _nbytes(n.dtype, shape(n.inputs[1]))
    return flops, w_read, a_read, written


@register_pass("cost_report")
def cost_report(graph, T=1, n_past=0, n_out=1):
    """Stores graph.meta['cost'][f'T={T},KV={KV}'] = {op: {count, flops, weight_bytes, ...}} for a
    step of T new tokens after n_past cached ones, with logits for n_out of them (1 when
    generating); the graph is returned unchanged."""
    bind = {"T": T, "KV": n_past + T, "O": n_out}
    by_op = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))
    for n in graph.toposort():
        row = by_op[n.op]
        for key, value in zip(COLUMNS, (1, *node_cost(n, bind))):
            row[key] += value
    graph.meta.setdefault("cost", {})[f"T={T},KV={n_past + T}"] = dict(by_op)
    return graph


def print_table(title, report):
    """One row per op, heaviest first, and the totals (which it returns)."""
    def line(op, r):
        print(f"  {op:<11}{r['count']:>6}{r['flops'] / 1e6:>10.2f}{r['weight_bytes'] / 1024:>13.1f}"
              f"{r['act_bytes'] / 1024:>12.1f}{r['written'] / 1024:>13.1f}")

    print(f"\n{title}")
    print(f"  {'op':<11}{'nodes':>6}{'MFLOP':>10}{'weights KiB':>13}{'activ. KiB':>12}"
          f"{'written KiB':>13}")
    total = dict.fromkeys(COLUMNS, 0)
    for op, r in sorted(report.items(), key=lambda kv: -kv[1]["flops"]):
        if op not in LEAVES:
            line(op, r)
            total = {k: total[k] + r[k] for k in COLUMNS}
    line("total", total)
    return total


model = moegraph.load(DEFAULT_MODEL)
c = model.config
n_ctx, prompt = 512, 128
file_weights = sum(w.nbytes for w in model.file.tensors.values())
steps = [("cost_report", {"T": 1, "n_past": prompt}),           # one generated token at KV=129
         ("cost_report", {"T": prompt, "n_past": 0})]           # the 128-token prompt

# The analysis runs last, after the fusions: they change the node count, not the work.
graph = run_passes(model.graph(n_ctx=n_ctx), ["fuse_qkv", "fuse_up_gate", "fuse_norm"] + steps)
decode = print_table(f"decode step (T=1, KV={prompt + 1}), {c.n_expert_used} of {c.n_expert} "
                     "experts per token", graph.meta["cost"][f"T=1,KV={prompt + 1}"])
pp = print_table(f"prompt step (T={prompt}, KV={prompt}); each expert read once per step",
                 graph.meta["cost"][f"T={prompt},KV={prompt}"])

per_token = decode["weight_bytes"]
print(f"\nweights read per generated token: {per_token / 2**20:.2f} MiB of "
      f"{file_weights / 2**20:.2f} MiB in the file ({per_token / file_weights:.0%}); {decode['flops'] / 1e6:.1f} MFLOP, "
      f"{decode['flops'] / (per_token + decode['act_bytes']):.2f} FLOP/byte")
for bw in (50, 400):
    print(f"  memory-bandwidth roofline at {bw} GB/s: <= {bw * 1e9 / per_token:,.0f} tokens/s")
print(f"prompt: {pp['flops'] / prompt / 1e6:.1f} MFLOP/token, "
      f"{pp['flops'] / (pp['weight_bytes'] + pp['act_bytes']):.1f} FLOP/byte")

# Fewer experts per token read fewer expert bytes: soft slicing to k=2, then the same analysis.
g2 = run_passes(model.graph(n_ctx=n_ctx), [("slice_experts", {"n_expert_used": 2}), steps[0]])
k2 = sum(r["weight_bytes"] for r in g2.meta["cost"][f"T=1,KV={prompt + 1}"].values())
print(f"with slice_experts k=2: {k2 / 2**20:.2f} MiB of weights per token "
      f"({k2 / per_token:.0%} of k={c.n_expert_used})")
