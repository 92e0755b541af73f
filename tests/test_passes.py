"""Passes: each leaves the logits unchanged where it should (max relative difference <= 1e-5 on
every fixture model, F32 KV), slice_experts soft reproduces llama.cpp's expert_used_count
override, and the pattern language and pass manager behave."""
import numpy as np
import pytest

import moegraph
from conftest import TINY_TYPES, kl_and_argmax, oracle_logits, oracle_tokens, tiny_path
from moegraph.data import DEFAULT_MODEL
from moegraph.errors import MoeGraphError
from moegraph.gguf_file import concat_weights, write_gguf
from moegraph.passes import PassManager, get_pass, pass_names, register_pass, run_passes
from moegraph.passes.experts import expert_usage, moe_blocks
from moegraph.passes.pattern import Pat, find, rewrite

EXACT_PASSES = ["dce", "cse", "fuse_norm", "fuse_qkv", "fuse_up_gate"]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def seq():
    return oracle_tokens()["tiny_qwen3moe_seq64"]


@pytest.mark.oracle
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("qtype", TINY_TYPES)
def test_passes_leave_logits_unchanged(qtype, backend, seq):
    model = moegraph.load(tiny_path(qtype))
    base = model.compile(backend=backend, n_ctx=128, kv_type="f32").forward(seq)
    pipelines = EXACT_PASSES + [EXACT_PASSES] if backend == "numpy" else [EXACT_PASSES]  # compile time
    for p in pipelines:
        passes = p if isinstance(p, list) else [p]
        logits = model.compile(backend=backend, n_ctx=128, kv_type="f32", passes=passes).forward(seq)
        assert _rel(logits, base) <= 1e-5, (qtype, passes)


def test_fusions_change_the_graph_as_intended():
    model = moegraph.load(DEFAULT_MODEL)
    g = run_passes(model.graph(n_ctx=32), ["fuse_qkv", "fuse_up_gate", "fuse_norm"])
    names = {n.name for n in g.toposort()}
    L = model.config.n_layer
    assert {f"blk.{i}.attn_qkv.weight" for i in range(L)} <= names
    assert {f"blk.{i}.ffn_gate_up_exps.weight" for i in range(L)} <= names
    ops = [n.op for n in g.toposort()]
    assert ops.count("MUL_MAT_ID") == 2 * L and ops.count("SWIGLU") == L
    assert all(n.inputs[1] is not None for n in g.toposort() if n.op == "RMS_NORM")
    w = next(n for n in g.toposort() if n.name == "blk.0.ffn_gate_up_exps.weight")
    assert w.shape == (16, 512, 256) and w.dtype.name == "Q8_0"


@pytest.mark.oracle
def test_fuse_qkv_with_mixed_types_fuses_what_it_can():
    model = moegraph.load(tiny_path("Q4_K_M"))   # attn_v is Q6_K in layers 2 and 3
    g = run_passes(model.graph(n_ctx=32), ["fuse_qkv"])
    names = {n.name for n in g.toposort() if n.op == "WEIGHT"}
    assert "blk.0.attn_qkv.weight" in names and "blk.3.attn_qk.weight" in names
    assert "blk.3.attn_v.weight" in names


@pytest.mark.oracle
def test_premerged_gguf_loads_and_matches(tmp_path, seq):
    """A file written the way llama.cpp's converter merges (blk.N.ffn_gate_up_exps, gate rows
    first per expert; blk.N.attn_qkv, rows Q, K, V) runs, with and without the passes."""
    src = moegraph.load(tiny_path("F32"))
    ts = dict(src.file.tensors)
    for i in range(src.config.n_layer):
        p = f"blk.{i}"
        gate, up = ts.pop(f"{p}.ffn_gate_exps.weight"), ts.pop(f"{p}.ffn_up_exps.weight")
        ts[f"{p}.ffn_gate_up_exps.weight"] = concat_weights(f"{p}.ffn_gate_up_exps.weight", [gate, up])
        q, k, v = (ts.pop(f"{p}.attn_{x}.weight") for x in "qkv")
        ts[f"{p}.attn_qkv.weight"] = concat_weights(f"{p}.attn_qkv.weight", [q, k, v])
    path = write_gguf(tmp_path / "merged.gguf", src.file.metadata, ts.values(), src.file.metadata_types)
    merged = moegraph.load(path)
    base = src.compile(n_ctx=128, kv_type="f32").forward(seq)
    for passes in ([], ["fuse_qkv", "fuse_up_gate"]):
        logits = merged.compile(n_ctx=128, kv_type="f32", passes=passes).forward(seq)
        assert _rel(logits, base) <= 1e-5


@pytest.mark.oracle
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("k", [2, 1])
def test_soft_slicing_matches_llama_cpp_expert_used_count(qtype, k, backend, seq):
    ref = oracle_logits(f"tiny-qwen3moe-kjv-{qtype}-k{k}")
    s = moegraph.load(tiny_path(qtype)).compile(backend=backend, n_ctx=128, n_expert_used=k, slice_mode="soft")
    kl, agree = kl_and_argmax(ref, s.forward(seq))
    max_kl, min_agree = (1e-5, 63) if qtype == "F32" else (1e-2, 60)
    print(f"{qtype} soft k={k}: KL {kl:.2e}, argmax {agree}/64")
    assert kl <= max_kl and agree >= min_agree


def test_hard_slicing_keeps_the_original_weights():
    model = moegraph.load(DEFAULT_MODEL)
    g = model.graph(n_ctx=32)
    g.outputs.update({f"ids{b.layer}": b.top_k for b in moe_blocks(g)})
    run_passes(g, [("slice_experts", {"n_expert_used": 2, "mode": "hard"})])
    blocks = moe_blocks(g)
    assert all(b.k == 4 for b in blocks)                # routing still picks the model's top-4
    for b in blocks:
        assert all(mm.inputs[2].shape[-1] == 2 for mm in b.expert_matmuls)
        assert all(mul.shape[1] == 2 for mul, _ in b.weighting)
    # numerically: the hard result equals running the top-2 experts with the top-4 normalization
    ids = model.tokenizer.encode("And God said, Let there be light")
    hard = model.compile(n_ctx=32, n_expert_used=2, slice_mode="hard").forward(ids)
    soft = model.compile(n_ctx=32, n_expert_used=2, slice_mode="soft").forward(ids)
    full = model.compile(n_ctx=32).forward(ids)
    assert not np.allclose(hard, soft) and not np.allclose(hard, full)


def test_per_layer_expert_counts():
    model = moegraph.load(DEFAULT_MODEL)
    g = run_passes(model.graph(n_ctx=32), [("slice_experts", {"n_expert_used": [4, 3, 2, 1]})])
    assert [b.k for b in moe_blocks(g)] == [4, 3, 2, 1]
    with pytest.raises(MoeGraphError, match="4 MoE layers"):
        run_passes(model.graph(n_ctx=32), [("slice_experts", {"n_expert_used": [2, 2]})])
    with pytest.raises(MoeGraphError, match="hard slicing keeps 1..4"):
        run_passes(model.graph(n_ctx=32), [("slice_experts", {"n_expert_used": 5, "mode": "hard"})])


def test_prune_experts_from_usage():
    model = moegraph.load(DEFAULT_MODEL)
    text = "In the beginning God created the heaven and the earth. And the earth was without form. " * 8
    usage = expert_usage(model, text, ctx=64)
    assert all(c.sum() == usage.n_tokens * 4 for c in usage.counts.values())
    keep = usage.most_used(8)
    s = model.compile(n_ctx=64, passes=[("prune_experts", {"keep": keep})])
    w = next(n for n in s.graph.toposort() if n.name == "blk.0.ffn_down_exps.weight")
    assert w.shape[0] == 8
    router = next(n for n in s.graph.toposort() if n.name == "blk.0.ffn_gate_inp.weight")
    assert router.shape == (8, 256)
    assert np.isfinite(s.forward(model.tokenizer.encode("And God said"))).all()
    # keeping every expert is the identity
    s_all = model.compile(n_ctx=64, passes=[("prune_experts", {"keep": {l: range(16) for l in range(4)}})])
    ids = model.tokenizer.encode("And God said")
    np.testing.assert_array_equal(s_all.forward(ids), model.compile(n_ctx=64).forward(ids))


def test_pattern_language_captures_and_commutes():
    from moegraph.ir import F32, Graph
    g = Graph()
    x = g.input("x", ("T", 4), F32)
    y = g.input("y", ("T", 4), F32)
    z = g.add(g.silu(x), y)
    g.outputs["z"] = z
    p = Pat("ADD", Pat.any("b"), Pat("SILU", Pat.any("a")), commutative=True)
    (m,) = find(g, p)
    assert m.a is x and m.b is y and m.root is z
    assert Pat("ADD", Pat.any("v"), Pat.any("v")).match(z) is None         # same capture twice
    assert Pat("ADD", Pat.any("v"), Pat.any("v")).match(g.add(x, x)) is not None
    n = rewrite(g, [(Pat("SILU", Pat.any("a")), lambda g, m: g.mul(m.a, g.sigmoid(m.a)))])
    assert n == 1 and "SILU" not in [q.op for q in g.toposort()]


def test_pass_manager_verifies_and_reports():
    model = moegraph.load(DEFAULT_MODEL)
    seen = []
    pm = PassManager(["dce", "fuse_norm"], after_each=lambda name, g: seen.append(name))
    pm.run(model.graph(n_ctx=32))
    assert seen == ["dce", "fuse_norm"] and len(pm.records) == 2

    def breaks_graph(graph):
        graph.nodes[-1].shape = (1, 2, 3)
        return graph
    with pytest.raises(MoeGraphError, match="left an invalid graph"):
        run_passes(model.graph(n_ctx=32), [breaks_graph])
    with pytest.raises(MoeGraphError, match="unknown pass 'nope'"):
        get_pass("nope")
    assert {"dce", "cse", "fuse_qkv", "fuse_up_gate", "slice_experts", "prune_experts"} <= set(pass_names())


def test_user_pass_registers_by_name():
    @register_pass("test_double_logits")
    def double(graph):
        graph.outputs["logits"] = graph.scale(graph.outputs["logits"], scale=2.0)
        return graph
    model = moegraph.load(DEFAULT_MODEL)
    ids = [5, 6, 7]
    a = model.compile(n_ctx=16).forward(ids)
    b = model.compile(n_ctx=16, passes=["test_double_logits"]).forward(ids)
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
