"""Running fewer experts than the model was trained with, and pruning experts.

- slice_experts(n_expert_used=k, mode="soft"): top-k over all router probabilities with the
  smaller k, weighted as the model's gating says (renormalized over the k if the model renormalizes)
  — what llama.cpp computes with --override-kv <arch>.expert_used_count=int:k.
- slice_experts(..., mode="hard"): the model's own top-k is computed and weighted as trained; only
  its first (best) k are run, with their original weights, not renormalized.
- prune_experts(keep={layer: [expert, ...]}): whole experts are removed from the expert tensors
  and the router, so the router's softmax runs over the kept experts only; pick `keep` from
  measured usage with `expert_usage` (moegraph experts -f calibration.txt).
`n_expert_used` may be one k for every layer or one per layer (a list, or a dict layer -> k).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from moegraph.errors import MoeGraphError
from moegraph.gguf_file import WeightData
from moegraph.ir import Graph, Node

from . import register_pass
from .pattern import Pat, find

LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass
class MoEBlock:
    """The nodes of one MoE FFN that the expert passes edit, found by what they compute."""
    layer: int
    top_k: Node                                   # TOP_K over the routing scores: ids
    router: Node | None                           # the router WEIGHT [E, n_embd]
    # [E] weights on the way from the router to TOP_K: a router bias (gpt-oss), a selection
    # bias (DeepSeek-V3/GLM's exp_probs_b)
    router_biases: list[Node] = field(default_factory=list)
    grouped: bool = False                         # group-limited selection (GROUP_MASK) on the way
    expert_matmuls: list[Node] = field(default_factory=list)   # MUL_MAT_ID nodes using ids
    expert_tables: list[Node] = field(default_factory=list)    # GET_ROWS of [E, ...] weights by ids (expert biases)
    weighting: list[tuple[Node, int]] = field(default_factory=list)  # (MUL node, input slot) of the expert weights

    @property
    def k(self) -> int:
        return self.top_k.attrs["k"]


ANY_TOP_K = Pat("TOP_K", any_inputs=True, name="top_k")
ROUTING_OPS = ("SOFT_MAX", "SIGMOID", "ADD", "SCALE", "GROUP_MASK")   # between the router and TOP_K


def _routing(topk: Node) -> tuple[Node | None, list[Node], bool]:
    """The router weight (a MUL_MAT of E rows), the [E] weights the scores pass on their way to
    TOP_K, whichever gating, biases and activations lie between, and whether a GROUP_MASK does."""
    E = topk.inputs[0].shape[-1]
    router, biases, todo, seen, grouped = None, [], [topk.inputs[0]], set(), False
    while todo:
        n = todo.pop()
        if n is None or n.id in seen:
            continue
        seen.add(n.id)
        if n.op == "MUL_MAT" and n.inputs[0].op == "WEIGHT" and n.inputs[0].shape[0] == E and router is None:
            router = n.inputs[0]
        elif n.op == "WEIGHT" and n.shape == (E,):
            biases.append(n)
        elif n.op in ROUTING_OPS:
            grouped |= n.op == "GROUP_MASK"
            todo += [i for i in n.inputs if i is not None]
    return router, biases, grouped


def _unbiased(n: Node, id_nodes) -> Node:
    """n without an added per-expert bias (ADD(y, GET_ROWS(table, ids)) -> y)."""
    if n.op == "ADD" and n.inputs[1].op == "GET_ROWS" and any(n.inputs[1].inputs[1] is i for i in id_nodes):
        return n.inputs[0]
    return n


def moe_blocks(graph: Graph) -> list[MoEBlock]:
    """MoE FFNs in layer order, found by their structure (TOP_K ids feeding MUL_MAT_IDs)."""
    users = graph.users()
    muls = [n for n in graph.toposort() if n.op == "MUL"]
    blocks = []
    for i, m in enumerate(find(graph, ANY_TOP_K)):
        topk = m.top_k
        # the experts run on the ids, or on a leading slice of them (after a hard slice)
        id_nodes = [topk] + [u for u in users[topk] if u.op == "SLICE" and u.attrs["axis"] in (1, -1)]
        mms = [u for i in id_nodes for u in users[i] if u.op == "MUL_MAT_ID" and u.inputs[2] is i]
        if not mms:
            continue
        router, biases, grouped = _routing(topk)
        named = LAYER.match(topk.name or "") or next(
            (LAYER.match(u.inputs[0].name) for u in mms if LAYER.match(u.inputs[0].name)), None)
        tables = [u for i in id_nodes for u in users[i] if u.op == "GET_ROWS" and u.inputs[1] is i
                  and u.inputs[0].op == "WEIGHT"]
        b = MoEBlock(int(named.group(1)) if named else i, topk, router, biases, grouped, mms, tables)
        for n in muls:               # expert outputs (bias added or not) times their weights
            for slot in (0, 1):
                if _unbiased(n.inputs[slot], id_nodes) in mms and n.inputs[1 - slot].shape[-1] == 1:
                    b.weighting.append((n, 1 - slot))
        blocks.append(b)
    return blocks


def _per_layer(value, blocks: Sequence[MoEBlock]) -> dict[int, int]:
    layers = [b.layer for b in blocks]
    if isinstance(value, int):
        return {l: value for l in layers}
    if isinstance(value, dict):
        return {int(l): int(k) for l, k in value.items()}
    value = list(value)
    if len(value) != len(layers):
        raise MoeGraphError(f"n_expert_used has {len(value)} entries but the model has "
                            f"{len(layers)} MoE layers")
    return dict(zip(layers, (int(v) for v in value)))


@register_pass("slice_experts")
def slice_experts(graph: Graph, n_expert_used=None, mode: str = "soft") -> Graph:
    if mode not in ("soft", "hard"):
        raise MoeGraphError(f"slice mode must be 'soft' or 'hard', got {mode!r}")
    blocks = moe_blocks(graph)
    if not blocks:
        raise MoeGraphError("slice_experts: the graph has no MoE layers")
    if n_expert_used is None:
        raise MoeGraphError("slice_experts needs n_expert_used (one k, or one per layer)")
    ks = _per_layer(n_expert_used, blocks)
    for b in blocks:
        k = ks.get(b.layer, b.k)
        n_expert = b.top_k.inputs[0].shape[-1]
        if mode == "soft":
            if not 1 <= k <= n_expert:
                raise MoeGraphError(f"layer {b.layer}: n_expert_used={k} must be in 1..{n_expert}")
            b.top_k.attrs["k"] = k
            continue
        if not 1 <= k <= b.k:
            raise MoeGraphError(f"layer {b.layer}: hard slicing keeps 1..{b.k} of the model's "
                                f"top-{b.k} experts, got {k}")
        if k == b.k:
            continue
        ids = graph.slice(b.top_k, axis=1, start=0, stop=k, name=f"blk.{b.layer}.expert_ids_hard")
        for mm in b.expert_matmuls:
            mm.inputs = (mm.inputs[0], mm.inputs[1], ids)
        for t in b.expert_tables:      # the chosen experts' biases
            t.inputs = (t.inputs[0], ids)
        for mul, slot in b.weighting:
            w = graph.slice(mul.inputs[slot], axis=1, start=0, stop=k)
            mul.inputs = tuple(w if i == slot else x for i, x in enumerate(mul.inputs))
    graph.reinfer()
    graph.meta["n_expert_used"] = ks
    graph.meta["slice_mode"] = mode
    return graph


@register_pass("prune_experts")
def prune_experts(graph: Graph, keep: dict[int, Sequence[int]] | None = None) -> Graph:
    """Keeps only the listed experts of each layer: the expert tensors and biases (axis 0), the
    router's rows and the [E] biases on the routing path are sliced, so ids index the kept
    experts."""
    if not keep:
        raise MoeGraphError("prune_experts needs keep={layer: [expert ids]} (see expert_usage)")
    for b in moe_blocks(graph):
        if b.layer not in keep:
            continue
        kept = sorted(int(e) for e in keep[b.layer])
        if b.router is None:
            raise MoeGraphError(f"layer {b.layer}: cannot find the router weight to prune")
        if b.grouped:
            raise MoeGraphError(f"layer {b.layer}: the model routes within expert groups (DeepSeek-V3's "
                                "expert_group_count), defined over all its experts: pruning is not supported")
        n_expert = b.router.shape[0]
        if len(set(kept)) != len(kept) or not kept or kept[0] < 0 or kept[-1] >= n_expert:
            raise MoeGraphError(f"layer {b.layer}: experts to keep must be distinct ids in 0..{n_expert - 1}")
        if len(kept) < b.k:
            raise MoeGraphError(f"layer {b.layer}: keeping {len(kept)} experts is fewer than the "
                                f"{b.k} used per token; slice_experts first")
        _swap_weight(graph, b.router, b.router.data.select(kept))
        for bias in b.router_biases:   # [E] F32: one value per expert
            _swap_weight(graph, bias, WeightData.from_array(bias.name, bias.data.dequantize()[kept]))
        for w in {n.inputs[0] for n in b.expert_matmuls + b.expert_tables}:   # experts, their biases
            if w.op == "WEIGHT" and w.shape[0] == n_expert:
                _swap_weight(graph, w, w.data.select(kept))
        graph.meta.setdefault("pruned_experts", {})[b.layer] = kept
    graph.reinfer()
    return graph


def _swap_weight(graph: Graph, old: Node, data) -> None:
    graph.replace_all_uses(old, graph.weight(data, name=old.name))


# ----------------------------------------------------------------------------- usage statistics
@dataclass
class ExpertUsage:
    counts: dict[int, np.ndarray]     # layer -> selections per expert
    n_tokens: int

    def fractions(self) -> dict[int, np.ndarray]:
        return {l: c / c.sum() for l, c in self.counts.items()}

    def most_used(self, n: int) -> dict[int, list[int]]:
        """The n most selected experts per layer (ties: lower id first)."""
        return {l: sorted(np.argsort(-c, kind="stable")[:n].tolist()) for l, c in self.counts.items()}

    def to_json(self) -> dict:
        return {"n_tokens": self.n_tokens,
                "layers": {str(l): {"counts": c.tolist(), "fractions": (c / c.sum()).round(6).tolist()}
                           for l, c in self.counts.items()}}


def expert_usage(model, text, ctx: int = 128, n_chunks: int | None = None, backend: str | None = None,
                 progress=None) -> ExpertUsage:
    """Counts how often each expert is chosen, per layer, over a calibration text evaluated in
    chunks of `ctx` tokens from an empty cache."""
    from moegraph.backends import default_backend, get_backend
    from moegraph.runtime import Session
    graph = model.graph(n_ctx=ctx)
    blocks = moe_blocks(graph)
    if not blocks:
        raise MoeGraphError(f"{model.path}: the model has no experts")
    for b in blocks:
        graph.outputs[f"expert_ids.{b.layer}"] = b.top_k
    name = backend or default_backend()
    session = Session(model, graph, get_backend(name).compile(graph), name)
    ids = model.tokenizer.encode(text) if isinstance(text, str) else list(text)
    total = max(1, len(ids) // ctx) if len(ids) >= ctx else 1
    n_chunks = total if n_chunks is None else min(n_chunks, total)
    counts = {b.layer: np.zeros(b.top_k.inputs[0].shape[-1], np.int64) for b in blocks}
    n_tokens = 0
    for c in range(n_chunks):
        chunk = ids[c * ctx:(c + 1) * ctx]
        session.reset()
        out = session.run(chunk)
        for b in blocks:
            counts[b.layer] += np.bincount(out[f"expert_ids.{b.layer}"].reshape(-1), minlength=len(counts[b.layer]))
        n_tokens += len(chunk)
        if progress:
            progress(c + 1, n_chunks)
    return ExpertUsage(counts, n_tokens)
