"""Merging projections that read the same input into one matmul over concatenated weights,
done on the loaded weights at compile time, for any GGUF. Rows are concatenated as stored, so
quantized blocks are untouched and the result is the same arithmetic.

- fuse_qkv: Q, K and V projections (and their biases) -> one MUL_MAT + SLICEs.
- fuse_up_gate: SWIGLU(gate x, up x) -> SWIGLU over one matmul on [gate; up], for dense FFNs,
  shared experts and experts (MUL_MAT_ID, per expert: gate rows then up rows, the layout of
  llama.cpp's ffn_gate_up_exps).
"""
from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from moegraph.gguf_file import WeightData, concat_weights
from moegraph.ir import F32, Graph, Node

from . import register_pass
from .pattern import Pat, find, rewrite

QKV_WEIGHT = re.compile(r"^(?P<layer>.*)\.attn_(?P<which>[qkv])\.weight$")


def _is_qkv(n: Node) -> bool:
    return bool(QKV_WEIGHT.match(n.name))


PROJECTION = Pat("MUL_MAT", Pat.weight("w", where=_is_qkv), Pat.any("x"))
BIAS = Pat("ADD", Pat.any("mm"), Pat.weight("b", dtype=F32))


@register_pass("fuse_qkv")
def fuse_qkv(graph: Graph) -> Graph:
    """One matmul for the Q, K and V projections of each attention block. Where their GGML types
    differ (e.g. Q4_K_M keeps V in Q6_K in some layers) the projections of equal type are fused
    and the others left alone."""
    groups: dict[tuple, list] = defaultdict(list)
    for m in find(graph, PROJECTION):
        groups[(m.x.id, m.w.dtype)].append(m)
    users = graph.users()
    for (_, _), ms in groups.items():
        if len(ms) < 2:
            continue
        ms.sort(key=lambda m: "qkv".index(QKV_WEIGHT.match(m.w.name)["which"]))
        outs, biases = [], []
        for m in ms:   # a projection's bias is fused too when every member has one
            us = users[m.root]
            b = BIAS.match(us[0]) if len(us) == 1 else None
            biases.append(b.b if b is not None and b.mm is m.root else None)
        with_bias = all(b is not None for b in biases)
        outs = [users[m.root][0] if with_bias else m.root for m in ms]
        layer = QKV_WEIGHT.match(ms[0].w.name)["layer"]
        which = "".join(QKV_WEIGHT.match(m.w.name)["which"] for m in ms)
        w = graph.weight(concat_weights(f"{layer}.attn_{which}.weight", [m.w.data for m in ms]))
        y = graph.mul_mat(w, ms[0].x, name=f"{layer}.attn_{which}")
        if with_bias:
            b = np.concatenate([m.data.dequantize() for m in biases])
            y = graph.add(y, graph.weight(WeightData.from_array(f"{layer}.attn_{which}.bias", b)))
        start = 0
        for m, out in zip(ms, outs):
            n = m.w.shape[0]
            graph.replace_all_uses(out, graph.slice(y, axis=-1, start=start, stop=start + n,
                                                     name=out.name or m.w.name.replace(".weight", "")))
            start += n
    graph.remove_dead()
    return graph


DENSE_GATE_UP = Pat("SWIGLU", Pat("MUL_MAT", Pat.weight("wg"), Pat.any("x"), name="g"),
                    Pat("MUL_MAT", Pat.weight("wu"), Pat.any("x"), name="u"))
EXPERT_GATE_UP = Pat("SWIGLU", Pat("MUL_MAT_ID", Pat.weight("wg"), Pat.any("x"), Pat.any("ids"), name="g"),
                     Pat("MUL_MAT_ID", Pat.weight("wu"), Pat.any("x"), Pat.any("ids"), name="u"))


def _merged_name(gate_name: str) -> str:
    return gate_name.replace("ffn_gate", "ffn_gate_up", 1)


@register_pass("fuse_up_gate")
def fuse_up_gate(graph: Graph) -> Graph:
    """SWIGLU(W_gate x, W_up x) -> SWIGLU(W_[gate;up] x), the merge llama.cpp's converter does
    ahead of time (--fuse_gate_up_exps), here at compile time from an ordinary GGUF."""
    def merge(g: Graph, m):
        if m.wg.dtype != m.wu.dtype:
            return None
        w = g.weight(concat_weights(_merged_name(m.wg.name), [m.wg.data, m.wu.data], axis=-2))
        name = _merged_name(m.wg.name).removesuffix(".weight")
        if m.root.inputs[0].op == "MUL_MAT_ID":
            gu = g.mul_mat_id(w, m.x, m.ids, name=name)
        else:
            gu = g.mul_mat(w, m.x, name=name)
        return g.swiglu(gu, name=m.root.name)
    rewrite(graph, [(DENSE_GATE_UP, merge), (EXPERT_GATE_UP, merge)])
    return graph
