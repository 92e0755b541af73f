"""Graph dumps (moegraph.dump): text, DOT, JSON, diff, SVG rendering."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moegraph import dump
from moegraph.data import DEFAULT_MODEL
from moegraph.gguf_file import WeightData
from moegraph.ir import F16, F32, Graph


def small_graph() -> Graph:
    """x [T, 4] -> MUL_MAT with blk.0.w [3, 4] -> SILU -> CAST F16 -> CAST F32 -> out;
    plus a dead node that no output uses."""
    g = Graph("small")
    x = g.input("x", ("T", 4), F32)
    w = g.weight(WeightData.from_array("blk.0.w", np.ones((3, 4), np.float32)))
    y = g.mul_mat(w, x)
    s = g.silu(y)
    g.scale(y, scale=2.0)                                   # dead
    h = g.cast(g.cast(s, dtype=F16), dtype=F32, name="blk.0.out")
    g.outputs["y"] = h
    return g


def test_to_text_small():
    g = small_graph()
    text = dump.to_text(g)
    lines = text.splitlines()
    assert lines[0].startswith("# graph small: 6 live nodes (1 dead)")
    assert lines[1] == "# ops: CAST 2, INPUT 1, MUL_MAT 1, SILU 1, WEIGHT 1"
    assert "%0 x = INPUT [T, 4] F32" in lines
    assert "%1 blk.0.w = WEIGHT F32 [3, 4] (48 B)" in lines
    assert "%2 = MUL_MAT(%1 blk.0.w, %0) [T, 3] F32" in lines
    assert any(line.startswith("%5 = CAST(%3) [T, 3] F16 {dtype=F16}") for line in lines)
    assert "SCALE" not in text                              # dead nodes are not shown
    assert lines[-1] == "outputs: y = %6"
    assert str(g) == text                                   # Graph.__str__ uses to_text


def test_to_json_small_is_plain_json():
    g = small_graph()
    d = dump.to_json(g)
    s = json.dumps(d, allow_nan=False)                      # strict JSON: no enums, tuples, NaN
    back = json.loads(s)
    ops = {n["id"]: n for n in back["nodes"]}
    assert back["outputs"] == {"y": 6}
    assert ops[2]["op"] == "MUL_MAT" and ops[2]["inputs"] == [1, 0] and ops[2]["shape"] == ["T", 3]
    assert ops[5]["attrs"] == {"dtype": "F16"} and ops[5]["dtype"] == "F16"
    assert ops[1]["nbytes"] == 48 and ops[1]["layer"] == 0 and ops[0]["layer"] is None
    assert back["op_counts"]["CAST"] == 2 and "SCALE" not in back["op_counts"]


def test_json_safe():
    import enum

    class E(enum.Enum):
        A = 1
    v = dump.json_safe({"e": E.A, "t": (1, (2, "T")), "f": float("inf"), "n": np.float32(0.5),
                        "a": np.arange(3), 1: None})
    assert v == {"e": "A", "t": [1, [2, "T"]], "f": "inf", "n": 0.5, "a": [0, 1, 2], "1": None}


def test_to_dot_small():
    dot = dump.to_dot(small_graph())
    assert dot.startswith('digraph "small" {') and dot.rstrip().endswith("}")
    assert "subgraph cluster_blk_0" in dot
    assert "shape=invhouse" in dot and "shape=doubleoctagon" in dot
    assert 'n1 -> n2 [label="[3, 4]"]' in dot
    assert "SCALE" not in dot


def test_diff_text():
    g = small_graph()
    before = dump.to_text(g)
    assert dump.diff_text(before, before) == ""
    g.outputs["y"] = g.nodes[3]                             # drop the casts
    d = dump.diff_text(before, dump.to_text(g), "input", "no_casts")
    assert d.startswith("--- input\n+++ no_casts\n")
    assert "-%5 = CAST(%3)" in d and "+outputs: y = %3" in d


def test_render_svg_without_dot(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert dump.render_svg("digraph g { a -> b }", tmp_path / "g.svg") is False
    assert not (tmp_path / "g.svg").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg_with_dot(tmp_path):
    assert dump.render_svg(dump.to_dot(small_graph()), tmp_path / "g.svg") is True
    assert "<svg" in (tmp_path / "g.svg").read_text()


@pytest.fixture(scope="module")
def model_graph():
    import moegraph
    return moegraph.load(DEFAULT_MODEL).graph()


def test_model_graph_dumps(model_graph):
    g = model_graph
    text = dump.to_text(g)
    assert text.count("= MUL_MAT_ID(") == 3 * 4             # gate, up, down x 4 layers
    assert "blk.0.ffn_up_exps.weight = WEIGHT Q8_0 [16, 256, 256]" in text
    assert "cache_k.0 = STATE [" in text
    d = json.loads(json.dumps(dump.to_json(g), allow_nan=False))
    assert d["meta"]["arch"] == "qwen3moe" and d["meta"]["config"]["n_expert"] == 16
    assert len(d["nodes"]) == len(g.toposort())
    layers = dump.node_layers(g)
    named = {n.name: layers[n.id] for n in g.nodes if n.name}
    assert named["blk.2.out"] == 2 and named["cache_v.3"] == 3 and named["token_embd.weight"] is None
    # the norm that opens layer 1 reads layer 0's output but belongs to layer 1
    out0 = next(n for n in g.nodes if n.name == "blk.0.out")
    users = [n for n in g.nodes if out0 in n.inputs and n.op == "RMS_NORM"]
    assert users and all(layers[u.id] == 1 for u in users)
    dot = dump.to_dot(g)
    for i in range(4):
        assert f"subgraph cluster_blk_{i} {{" in dot
