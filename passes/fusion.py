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


GATE_UP_WEIGHT = re.compile(r"^(?P<base>.*)\.ffn_(?P<which>gate|up)(?P<suffix>_exps|_shexp)?\.weight$")
# SWIGLU over the two halves of one merged product: the single-input SWIGLU (the MOE_SWIGLU
# fusion's form)
HALVES = Pat("SWIGLU", Pat("SLICE", Pat.any("y"), name="a"), Pat("SLICE", Pat.any("y"), name="b"))


def _merged_name(gate_name: str) -> str:
    return gate_name.replace("ffn_gate", "ffn_gate_up", 1)


def _bias_of(mm: Node, users) -> tuple[Node, Node] | None:
    """(ADD node, bias WEIGHT) where mm's only use adds a bias: a [F] weight, or per expert
    GET_ROWS([E, F] weight, the same ids) (gpt-oss's expert biases)."""
    us = users.get(mm, [])
    if len(us) != 1 or us[0].op != "ADD" or us[0].inputs[0] is not mm:
        return None
    b = us[0].inputs[1]
    if b.op == "WEIGHT" and b.dtype == F32 and mm.op == "MUL_MAT":
        return us[0], b
    if (b.op == "GET_ROWS" and mm.op == "MUL_MAT_ID" and b.inputs[1] is mm.inputs[2]
            and b.inputs[0].op == "WEIGHT" and b.inputs[0].dtype == F32):
        return us[0], b.inputs[0]
    return None


@register_pass("fuse_up_gate")
def fuse_up_gate(graph: Graph) -> Graph:
    """The gate and up products of an FFN (dense, shared expert or experts: MUL_MAT or
    MUL_MAT_ID on the same input and ids) -> one product on [gate; up] (per expert: gate rows then
    up rows, the layout of llama.cpp's ffn_gate_up_exps) and two SLICEs, their biases merged the
    same way; a SWIGLU of the two halves becomes the one-input SWIGLU. The merge llama.cpp's
    converter does ahead of time (--fuse_gate_up_exps), here at compile time from an ordinary
    GGUF, whatever activation follows (gpt-oss's clamped one included)."""
    pairs: dict[tuple, dict[str, Node]] = defaultdict(dict)
    for n in graph.toposort():
        if n.op in ("MUL_MAT", "MUL_MAT_ID") and n.inputs[0].op == "WEIGHT":
            m = GATE_UP_WEIGHT.match(n.inputs[0].name)
            if m:
                ids = n.inputs[2].id if n.op == "MUL_MAT_ID" else None
                pairs[(m["base"], m["suffix"] or "", n.op, n.inputs[1].id, ids)][m["which"]] = n
    users = graph.users()
    for d in pairs.values():
        if set(d) != {"gate", "up"}:
            continue
        gate, up = d["gate"], d["up"]
        wg, wu = gate.inputs[0], up.inputs[0]
        if wg.dtype != wu.dtype or wg.shape != wu.shape:
            continue
        F, name = wg.shape[-2], _merged_name(wg.name).removesuffix(".weight")
        w = graph.weight(concat_weights(_merged_name(wg.name), [wg.data, wu.data], axis=-2))
        y = graph.node(gate.op, w, *gate.inputs[1:], name=name)
        outs = (gate, up)
        bg, bu = _bias_of(gate, users), _bias_of(up, users)
        if bg and bu:
            b = np.concatenate([bg[1].data.dequantize(), bu[1].data.dequantize()], axis=-1)
            bw = graph.weight(WeightData.from_array(f"{name}.bias", b))
            y = graph.add(y, graph.get_rows(bw, gate.inputs[2]) if gate.op == "MUL_MAT_ID" else bw)
            outs = (bg[0], bu[0])
        for out, start in zip(outs, (0, F)):
            graph.replace_all_uses(out, graph.slice(y, axis=-1, start=start, stop=start + F))

    def one_input(g: Graph, m):
        n2 = m.y.shape[-1]
        if not (isinstance(n2, int) and m.a.attrs["axis"] in (-1, m.y.rank - 1) and m.b.attrs["axis"] == m.a.attrs["axis"]
                and (m.a.attrs["start"], m.a.attrs["stop"], m.b.attrs["start"], m.b.attrs["stop"]) == (0, n2 // 2, n2 // 2, n2)):
            return None
        return g.swiglu(m.y, name=m.root.name)
    rewrite(graph, [(HALVES, one_input)])
    graph.remove_dead()
    return graph
