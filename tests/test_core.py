"""Core behaviour: the op table's validation, GGUF loading (memory-mapped, clear errors), the
KV cache, generation and the perplexity protocol on the bundled model."""
import shutil
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

import moegraph
from moegraph.data import DEFAULT_MODEL
from moegraph.errors import GGUFError, InputError, IRError, ModelError
from moegraph.gguf_file import GGUFFile, WeightData, write_gguf
from moegraph.ir import F16, F32, I32, OPS, Graph
from moegraph.quants import GGMLType


@pytest.fixture(scope="module")
def model():
    return moegraph.load(DEFAULT_MODEL)


# ----------------------------------------------------------------------------- IR
def test_op_table_rejects_misuse():
    g = Graph()
    x = g.input("x", ("T", 8), F32)
    w = g.input("w", (4, 6), F32)
    with pytest.raises(IRError, match="inner dims differ"):
        g.mul_mat(w, x)
    with pytest.raises(IRError, match="unknown op"):
        g.node("NOPE", x)
    with pytest.raises(IRError, match="missing required attribute 'eps'"):
        g.rms_norm(x)
    with pytest.raises(IRError, match="unknown attribute"):
        g.silu(x, alpha=1)
    with pytest.raises(IRError, match="cannot reshape"):
        g.reshape(x, shape=("T", 3, 3))
    with pytest.raises(IRError, match="I32"):
        g.get_rows(w, x)
    with pytest.raises(IRError, match="k=9"):
        g.top_k(x, k=9)
    ids = g.input("ids", ("T",), I32)
    assert g.get_rows(g.input("emb", (100, 8), F32), ids).shape == ("T", 8)
    assert g.reshape(x, shape=("T", 2, 4)).shape == ("T", 2, 4)


def test_mul_mat_broadcasts_batches_like_ggml():
    g = Graph()
    k = g.input("k", (2, 5, 8), F16)         # 2 KV heads
    q = g.input("q", (4, "T", 8), F32)        # 4 query heads
    assert g.mul_mat(k, q).shape == (4, "T", 5)
    with pytest.raises(IRError, match="do not divide"):
        g.mul_mat(g.input("k3", (3, 5, 8), F16), q)


def test_every_op_has_semantics_documented():
    for name, d in OPS.items():
        assert d.doc, f"op {name} has no docstring in the op table"


def test_graph_verifies_and_is_topologically_ordered(model):
    g = model.graph(n_ctx=64)
    g.verify()
    order = g.toposort()
    seen = set()
    for n in order:
        assert all(i is None or i.id in seen for i in n.inputs)
        seen.add(n.id)
    assert sum(n.op == "MUL_MAT_ID" for n in order) == 3 * model.config.n_layer


# ----------------------------------------------------------------------------- GGUF
def test_tensors_are_memory_mapped_not_copied(model):
    w = model.file.tensors["blk.0.ffn_up_exps.weight"]
    base = w.raw
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap), "weights must be views of the memory-mapped file"
    assert w.shape == (16, 256, 256) and w.dtype == GGMLType.Q8_0   # NumPy order


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        moegraph.load(tmp_path / "nope.gguf")
    p = tmp_path / "text.gguf"
    p.write_text("hello, I am not a model")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        moegraph.load(p)


@pytest.mark.parametrize("keep", [10, 1000, 0.5, 0.999])
def test_truncated_gguf(tmp_path, keep):
    data = DEFAULT_MODEL.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(GGUFError, match="truncated"):
        moegraph.load(p)


def _rewrite(src: GGUFFile, path, metadata=None, tensors=None):
    meta = dict(src.metadata, **(metadata or {}))
    ts = tensors if tensors is not None else list(src.tensors.values())
    return write_gguf(path, meta, ts, src.metadata_types)


def test_unknown_architecture_lists_supported(tmp_path, model):
    p = _rewrite(model.file, tmp_path / "foo.gguf", {"general.architecture": "foo"})
    with pytest.raises(ModelError, match=r"'foo' is not supported; supported: .*qwen3moe"):
        moegraph.load(p)


def test_missing_tensor(tmp_path, model):
    ts = [t for t in model.file.tensors.values() if t.name != "blk.1.attn_k.weight"]
    p = _rewrite(model.file, tmp_path / "missing.gguf", tensors=ts)
    with pytest.raises(ModelError, match="missing tensor blk.1.attn_k.weight"):
        moegraph.load(p).compile()


def test_wrong_shape(tmp_path, model):
    ts = [t if t.name != "blk.0.attn_q.weight" else t.rows(0, 128) for t in model.file.tensors.values()]
    p = _rewrite(model.file, tmp_path / "shape.gguf", tensors=ts)
    with pytest.raises(ModelError, match=r"blk.0.attn_q.weight has shape \[128, 256\].*need \[256, 256\]"):
        moegraph.load(p).compile()


def test_unsupported_tensor_type(tmp_path, model):
    iq = gguf.GGMLQuantizationType.IQ4_NL       # 32 values in 18 bytes
    fake = SimpleNamespace(name="blk.0.attn_q.weight", dtype=iq, shape=(256, 256),
                           raw=np.zeros(256 * 8 * 18, np.uint8), nbytes=256 * 8 * 18)
    ts = [fake if t.name == fake.name else t for t in model.file.tensors.values()]
    p = _rewrite(model.file, tmp_path / "iq.gguf", tensors=ts)
    m = moegraph.load(p)   # loading and inspecting still work
    assert m.file.unsupported == {"blk.0.attn_q.weight": "IQ4_NL"}
    with pytest.raises(GGUFError, match="blk.0.attn_q.weight has type IQ4_NL, which moegraph does not support"):
        m.compile()


def test_rewritten_file_is_identical(tmp_path, model):
    p = _rewrite(model.file, tmp_path / "copy.gguf")
    assert p.read_bytes() == DEFAULT_MODEL.read_bytes()


def test_weight_rows_and_concat_keep_blocks(model):
    from moegraph.gguf_file import concat_weights
    w = model.file.tensors["blk.0.attn_q.weight"]
    a, b = w.rows(0, 100), w.rows(100, 256)
    joined = concat_weights("j", [a, b])
    assert np.array_equal(joined.dequantize(), w.dequantize())
    assert np.array_equal(a.dequantize(), w.dequantize()[:100])


# ----------------------------------------------------------------------------- sessions
@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_kv_cache_incremental_equals_full(model, kv_type):
    ids = model.tokenizer.encode("And God said, Let there be light: and there was light.")
    s = model.compile(n_ctx=64, kv_type=kv_type)
    full = s.forward(ids)
    s.reset()
    parts = [s.forward(ids[:5])] + [s.forward([t]) for t in ids[5:9]] + [s.forward(ids[9:])]
    assert s.n_past == len(ids)
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-4)


def test_token_id_out_of_range(model):
    s = model.compile(n_ctx=32)
    with pytest.raises(InputError, match="token id 4096 is out of range"):
        s.forward([1, 2, 4096])
    with pytest.raises(InputError, match="out of range"):
        s.forward([-1])


def test_prompt_longer_than_context(model):
    s = model.compile(n_ctx=16)
    long = "In the beginning God created the heaven and the earth. " * 4
    with pytest.raises(InputError, match="more than the context size n_ctx=16"):
        list(s.generate(long, max_tokens=4))
    s.forward(list(range(10)))
    with pytest.raises(InputError, match="exceed the context size"):
        s.forward(list(range(10)))


def test_generate_is_deterministic_and_greedy_matches_argmax(model):
    s = model.compile(n_ctx=128)
    a = "".join(s.generate("And God said", max_tokens=12, temperature=0.9, seed=7))
    b = "".join(s.generate("And God said", max_tokens=12, temperature=0.9, seed=7))
    assert a == b and a
    greedy = "".join(s.generate("And God said", max_tokens=6, temperature=0))
    ids = model.tokenizer.encode("And God said")
    s.reset()
    out = []
    logits = s.forward(ids)[-1]
    for _ in range(6):
        out.append(int(np.argmax(logits)))
        logits = s.forward([out[-1]])[-1]
    assert greedy == model.tokenizer.decode(out)


def test_perplexity_protocol_scores_second_half(model):
    s = model.compile(n_ctx=64)
    ids = model.tokenizer.encode("In the beginning God created the heaven and the earth. " * 20)
    res = s.perplexity(ids, ctx=32, n_chunks=3)
    assert res.n_predictions == 3 * 15 and len(res.chunk_nll) == 3
    logits = s.forward(ids[32:64]).astype(np.float64)[16:31]
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    nll = np.mean(lse - logits[np.arange(15), ids[49:64]])
    assert abs(nll - res.chunk_nll[1]) < 1e-6
    with pytest.raises(InputError):
        s.perplexity(ids, ctx=1)
