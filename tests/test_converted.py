"""Models built with Hugging Face transformers' own classes and converted by llama.cpp's
converter (tests/converted/make_fixtures.py; the files are committed, a few hundred KiB each),
against transformers' float64 logits on the same tokens, and against llama.cpp on the same file
where the llama_cpp package is importable.

These are the files users have: real converter output differs from moegraph.testing's writer (a
[1, n_embd] shared-expert gate in qwen2moe, rope_freqs.weight for Llama 3.1's rope scaling, YaRN
metadata). Before this test, qwen2moe files were refused and the Llama 3.1/YaRN files ran with a
relative logit error of 0.8-1.0 (arg-max agreement 0.37) without a word.

Metric: max |centred logit difference| / max |centred reference logit| <= 1e-4 (F32 files;
measured 4e-7 .. 1.5e-6, and 1.2e-5 / 3e-5 for the two DeepSeek models, whose llama.cpp logits
differ from transformers' by the same amount while ours differ from llama.cpp's by 1e-6), for the
whole prompt at once and token by token through the KV cache; the same arg-max everywhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moegraph
from conftest import HAVE_LLAMA_CPP, NO_LLAMA_CPP, kl_and_argmax, llama_cpp_logits

HERE = Path(__file__).resolve().parent / "converted"
MODELS = sorted(p.stem for p in HERE.glob("*.gguf"))


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    c = lambda z: z - z.mean(-1, keepdims=True)      # noqa: E731 (logits are shift-invariant)
    return float(np.abs(c(ours) - c(ref)).max() / np.abs(c(ref)).max())


def test_fixtures_present():
    assert {"llama3-ropefreqs", "llama-yarn", "llama-linear", "qwen2moe", "qwen3moe", "mixtral", "olmoe",
            "granitemoe", "granitemoeshared", "glm4moe", "glm4moe-qknorm", "deepseek2-lite", "deepseek3", "deepseek3-groups", "glm4moe-lite", "gpt-oss", "dots1", "ernie4_5-moe"} <= set(MODELS)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_transformers(name, backend):
    d = np.load(HERE / f"{name}.npz")
    tokens, ref = d["tokens"], d["logits"].astype(np.float64)
    s = moegraph.load(HERE / f"{name}.gguf").compile(backend=backend, n_ctx=128, kv_type="f32", n_threads=2)
    whole = s.forward(tokens).astype(np.float64)
    assert _rel(whole, ref) <= 1e-4, f"{name} on {backend}: {_rel(whole, ref):.2e}"
    assert np.array_equal(whole.argmax(-1), ref.argmax(-1))
    s.reset()                                      # token by token: decode through the KV cache
    first = s.forward(tokens[:60])
    steps = np.concatenate([first] + [s.forward([t]) for t in tokens[60:]]).astype(np.float64)
    assert _rel(steps, ref) <= 1e-4, f"{name} on {backend}, decoding: {_rel(steps, ref):.2e}"


@pytest.mark.oracle
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
@pytest.mark.parametrize("name", MODELS)
def test_matches_llama_cpp(name, tmp_path):
    tokens = np.load(HERE / f"{name}.npz")["tokens"].tolist()
    path = HERE / f"{name}.gguf"
    if name == "deepseek2-lite":   # llama.cpp takes a file without q_lora_rank for a Lite model only
        path = _rewrite(tmp_path, name, {"deepseek2.attention.q_lora_rank": 0})   # at 26/27 layers
    ref = llama_cpp_logits(path, tokens)
    ours = moegraph.load(HERE / f"{name}.gguf").compile(backend="numpy", n_ctx=128, kv_type="f32") \
        .forward(tokens).astype(np.float64)
    assert _rel(ours, ref) <= 1e-4, f"{name}: {_rel(ours, ref):.2e} from llama.cpp"
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def _rewrite(tmp_path, name, meta_edit=None, extra_tensors=()):
    from moegraph.gguf_file import GGUFFile, write_gguf
    f = GGUFFile(HERE / f"{name}.gguf")
    meta = dict(f.metadata)
    meta.update(meta_edit or {})
    types = {k: v for k, v in f.metadata_types.items() if k not in (meta_edit or {})}
    return write_gguf(tmp_path / "edited.gguf", meta, list(f.tensors.values()) + list(extra_tensors),
                      metadata_types=types)


def test_unknown_metadata_and_tensors_are_refused(tmp_path):
    """A key or a tensor the builder does not read used to be ignored (Llama 3.1's rope_freqs
    and YaRN ran silently wrong that way); now each is an error naming it."""
    from moegraph.gguf_file import WeightData
    p = _rewrite(tmp_path, "llama-linear", {"llama.attention.sliding_window": 4096})
    with pytest.raises(moegraph.ModelError, match=r"metadata key\(s\) llama.attention.sliding_window not understood"):
        moegraph.load(p)
    p = _rewrite(tmp_path, "llama-linear", {"llama.rope.scaling.type": "longrope"})
    with pytest.raises(moegraph.ModelError, match=r"rope.scaling.type 'longrope' is not supported"):
        moegraph.load(p)
    p = _rewrite(tmp_path, "llama-yarn", {"llama.rope.scaling.yarn_beta_fast": 16.0})
    with pytest.raises(moegraph.ModelError, match=r"yarn_beta_fast = 16.0: llama.cpp does not read this key"):
        moegraph.load(p)
    extra = WeightData.from_array("blk.0.attn_sinks.weight", np.zeros(4, np.float32))
    p = _rewrite(tmp_path, "qwen3moe", extra_tensors=[extra])
    with pytest.raises(moegraph.ModelError, match=r"tensor\(s\) blk.0.attn_sinks.weight not used by moegraph's qwen3moe builder"):
        moegraph.load(p).compile(backend="numpy", n_ctx=16)
    ff = WeightData.from_array("rope_freqs.weight", np.ones(8, np.float32))   # llama only, as in llama.cpp
    p = _rewrite(tmp_path, "qwen3moe", extra_tensors=[ff])
    with pytest.raises(moegraph.ModelError, match=r"rope_freqs.weight not used"):
        moegraph.load(p).compile(backend="numpy", n_ctx=16)


@pytest.mark.parametrize("name", ["glm4moe", "deepseek3", "gpt-oss"])
def test_pruning_keeps_the_biases_aligned(name):
    """With sigmoid routing (and gpt-oss's softmax over the chosen logits) each expert's score is
    its own, so pruning the experts no token chose must leave the logits unchanged, if the
    selection bias (exp_probs_b), the router bias and the per-expert biases are pruned with the
    router and the experts (a bias left unpruned shifts to another expert)."""
    from moegraph.passes.experts import expert_usage, moe_blocks
    m = moegraph.load(HERE / f"{name}.gguf")
    tokens = np.load(HERE / f"{name}.npz")["tokens"][:3].tolist()
    blocks = moe_blocks(m.graph(n_ctx=8))
    assert all(b.router is not None and len(b.router_biases) == 1 for b in blocks)
    assert all(len(b.expert_tables) == (3 if name == "gpt-oss" else 0) for b in blocks)
    used = expert_usage(m, tokens, ctx=3, backend="numpy").counts
    keep = {layer: np.flatnonzero(c).tolist() for layer, c in used.items()}
    assert all(len(k) < 8 for k in keep.values())          # something is pruned
    base = m.compile(backend="numpy", n_ctx=8, kv_type="f32").forward(tokens)
    pruned = m.compile(backend="numpy", n_ctx=8, kv_type="f32",
                       passes=[("prune_experts", {"keep": keep})]).forward(tokens)
    np.testing.assert_allclose(pruned, base, rtol=0, atol=1e-5 * np.abs(base).max())


@pytest.mark.parametrize("name", ["glm4moe", "deepseek3", "gpt-oss", "qwen2moe"])
def test_expert_slicing_on_every_gating(name):
    """slice_experts soft and hard with sigmoid + selection bias, softmax over the chosen logits
    (with expert biases) and softmax: the model's own k changes nothing, k = 1 changes the
    logits, and the LLVM backend agrees with the reference on the sliced graphs."""
    m = moegraph.load(HERE / f"{name}.gguf")
    tokens = np.load(HERE / f"{name}.npz")["tokens"][:16]
    k = m.config.n_expert_used
    run = lambda backend, *passes: m.compile(backend=backend, n_ctx=16, kv_type="f32", passes=list(passes),   # noqa: E731
                                             **({"n_threads": 2} if backend == "llvm" else {})).forward(tokens)
    base = run("numpy")
    for mode in ("soft", "hard"):
        assert np.array_equal(run("numpy", ("slice_experts", {"n_expert_used": k, "mode": mode})), base)
        one = run("numpy", ("slice_experts", {"n_expert_used": 1, "mode": mode}))
        assert np.abs(one - base).max() > 1e-3 * np.abs(base).max()
        got = run("llvm", ("slice_experts", {"n_expert_used": 1, "mode": mode}), "fuse_up_gate")
        assert _rel(got, one) <= 1e-5, (mode, _rel(got, one))


def test_group_limited_routing():
    """DeepSeek-V3's groups (8 experts in 4 groups, the best 2 compete): without them the logits
    are another model's (relative error 1.0; with them 2.8e-5 from transformers, 1.7e-6 from
    llama.cpp); pruning is refused (groups are defined over all experts), slicing works."""
    from moegraph.passes.experts import moe_blocks
    m = moegraph.load(HERE / "deepseek3-groups.gguf")
    assert (m.config.n_expert_groups, m.config.n_group_used) == (4, 2)
    assert all(b.grouped and b.router is not None for b in moe_blocks(m.graph(n_ctx=8)))
    with pytest.raises(moegraph.MoeGraphError, match="routes within expert groups"):
        m.compile(backend="numpy", n_ctx=8, passes=[("prune_experts", {"keep": {1: [0, 1, 2, 3]}})])
    tokens = np.load(HERE / "deepseek3-groups.npz")["tokens"][:8]
    m.compile(backend="llvm", n_ctx=8, n_threads=2, passes=[("slice_experts", {"n_expert_used": 1})]).forward(tokens)


def test_mla_caches_the_compressed_kv_once():
    """MLA's cache is one [n_ctx, 1, kv_lora_rank + rope dims] tensor per layer; the values are
    a view of its first kv_lora_rank columns (llama.cpp's layout), not a second cache."""
    g = moegraph.load(HERE / "deepseek3.gguf").graph(n_ctx=32)
    assert {n: s.shape for n, s in g.states().items()} == {f"cache_k.{i}": (32, 1, 40) for i in range(3)}


def test_deepseek_family_keys(tmp_path):
    """Multi-token-prediction layers are skipped (as llama.cpp does without MTP); a tensor of a
    layer past n_layer is refused where the file declares no such layers; a grouping llama.cpp
    would assert on and unknown gating functions are refused by name."""
    from moegraph.gguf_file import WeightData
    mtp = WeightData.from_array("blk.3.nextn.eh_proj.weight", np.zeros((64, 128), np.float32))
    tokens = np.load(HERE / "glm4moe.npz")["tokens"][:8]
    want = moegraph.load(HERE / "glm4moe.gguf").compile(backend="numpy", n_ctx=16).forward(tokens)
    p = _rewrite(tmp_path, "glm4moe", extra_tensors=[mtp])
    assert np.array_equal(moegraph.load(p).compile(backend="numpy", n_ctx=16).forward(tokens), want)
    p = _rewrite(tmp_path, "deepseek3", extra_tensors=[mtp])
    with pytest.raises(moegraph.ModelError, match=r"blk.3.nextn.eh_proj.weight not used"):
        moegraph.load(p).compile(backend="numpy", n_ctx=16)
    p = _rewrite(tmp_path, "deepseek3", {"deepseek2.expert_group_count": 4, "deepseek2.expert_group_used_count": 4})
    with pytest.raises(moegraph.ModelError, match=r"expert_group_count 4 / expert_group_used_count 4 do not group"):
        moegraph.load(p)
    p = _rewrite(tmp_path, "glm4moe", {"glm4moe.expert_gating_func": 4})
    with pytest.raises(moegraph.ModelError, match=r"expert_gating_func 4 is not supported"):
        moegraph.load(p)


@pytest.mark.parametrize("name", ["glm4moe", "deepseek3", "gpt-oss"])
def test_quantized_files_agree_across_backends(name, tmp_path):
    """The converter's file quantized as llama-quantize does (byte-identical; MLA's k_b rows of 16
    fall back to F16): LLVM's products on the raw blocks, the batched per-head k_b/v_b ones
    included, give the reference's logits: most rows to float rounding; a row where an activation
    lands on the other side of a Q8 rounding step differs more (measured: 1 row of 40, 6e-3),
    so the whole is held to llama.cpp-style mean KL and arg-max agreement."""
    from moegraph.quantize import quantize
    tokens = np.load(HERE / f"{name}.npz")["tokens"][:40]
    for ftype in ["Q8_0", "Q4_K_M"]:
        quantize(HERE / f"{name}.gguf", tmp_path / f"{ftype}.gguf", ftype, threads=2)
        m = moegraph.load(tmp_path / f"{ftype}.gguf")
        ref = m.compile(backend="numpy", n_ctx=48).forward(tokens).astype(np.float64)
        got = m.compile(backend="llvm", n_ctx=48, n_threads=2).forward(tokens).astype(np.float64)
        rows = [_rel(got[i], ref[i]) for i in range(len(tokens))]
        kl, agree = kl_and_argmax(ref, got)
        assert np.median(rows) <= 1e-5 and kl < 1e-4 and agree >= len(tokens) - 1, (ftype, max(rows), kl, agree)


def test_mxfp4_moe_gpt_oss(tmp_path):
    """gpt-oss's own expert format: the converter file quantized to MXFP4_MOE (experts MXFP4,
    the rest Q8_0, as llama-quantize writes it); LLVM's MXFP4 products (nibbles through the E2M1
    table, E8M0 scales) against the reference (KL and arg-max as for the other quantized files:
    an activation on the other side of a Q8_0 rounding step moves one row and its successors)."""
    from moegraph.quantize import quantize
    quantize(HERE / "gpt-oss.gguf", tmp_path / "mx.gguf", "MXFP4_MOE", threads=2)
    m = moegraph.load(tmp_path / "mx.gguf")
    assert {t.dtype.name for n, t in m.file.tensors.items() if n.endswith("_exps.weight")} == {"MXFP4"}
    tokens = np.load(HERE / "gpt-oss.npz")["tokens"]
    ref = m.compile(backend="numpy", n_ctx=128).forward(tokens).astype(np.float64)
    s = m.compile(backend="llvm", n_ctx=128, n_threads=2)
    got = s.forward(tokens).astype(np.float64)
    s.reset()
    steps = np.concatenate([s.forward(tokens[:60])] + [s.forward([t]) for t in tokens[60:]]).astype(np.float64)
    for out in (got, steps):
        kl, agree = kl_and_argmax(ref, out)
        assert kl < 1e-4 and agree >= len(tokens) - 1, (kl, agree)


@pytest.mark.oracle
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_mxfp4_moe_is_llama_quantize_and_llama_cpp_logits(tmp_path):
    """MXFP4_MOE files byte-identical to llama-quantize's; their logits as llama.cpp computes them
    (measured: relative error 1.2e-7, KL 3e-15)."""
    import ctypes
    import filecmp

    import llama_cpp

    from moegraph.quantize import quantize
    for name in ("gpt-oss", "deepseek3"):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE, 2
        assert llama_cpp.llama_model_quantize(str(HERE / f"{name}.gguf").encode(),
                                              str(tmp_path / "lc.gguf").encode(), ctypes.byref(p)) == 0
        quantize(HERE / f"{name}.gguf", tmp_path / "mg.gguf", "MXFP4_MOE", threads=2)
        assert filecmp.cmp(tmp_path / "lc.gguf", tmp_path / "mg.gguf", shallow=False), name
    tokens = np.load(HERE / "gpt-oss.npz")["tokens"].tolist()
    quantize(HERE / "gpt-oss.gguf", tmp_path / "mx.gguf", "MXFP4_MOE", threads=2)
    ref = llama_cpp_logits(tmp_path / "mx.gguf", tokens)
    ours = moegraph.load(tmp_path / "mx.gguf").compile(backend="numpy", n_ctx=128, kv_type="f32") \
        .forward(tokens).astype(np.float64)
    assert _rel(ours, ref) <= 1e-5 and np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", MODELS)
def test_passes_keep_the_logits(name):
    """fuse_qkv, fuse_up_gate, fuse_norm and cse on the converter's files (biases, shared experts,
    Q/K norms over the whole projection, rope factors): the same logits on the reference."""
    tokens = np.load(HERE / f"{name}.npz")["tokens"][:24]
    m = moegraph.load(HERE / f"{name}.gguf")
    base = m.compile(backend="numpy", n_ctx=32, kv_type="f32").forward(tokens)
    fused = m.compile(backend="numpy", n_ctx=32, kv_type="f32",
                      passes=["fuse_qkv", "fuse_up_gate", "fuse_norm", "cse"]).forward(tokens)
    assert np.abs(fused - base).max() <= 1e-5 * np.abs(base).max()


# --------------------------------------------------------------------------- split files
def write_split(src: Path, folder: Path, n: int, prefix: str = "model") -> list[Path]:
    """src as llama.cpp's gguf-split writes it: n shards PREFIX-0000i-of-0000n.gguf, the
    metadata in the first, split.no / split.count (uint16) and split.tensors.count (int32) in each."""
    import gguf

    from moegraph.gguf_file import GGUFFile, write_gguf
    f = GGUFFile(src)
    tensors = list(f.tensors.values())
    parts = [tensors[i::n] for i in range(n)]
    U16, I32 = gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT32
    out = []
    for i, part in enumerate(parts):
        split = {"split.no": i, "split.count": n, "split.tensors.count": len(tensors)}
        meta = {**(f.metadata if i == 0 else {"general.architecture": f.architecture}), **split}
        types = {**(f.metadata_types if i == 0 else {}),
                 "split.no": (U16, None), "split.count": (U16, None), "split.tensors.count": (I32, None)}
        out.append(write_gguf(folder / f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf", meta, part, metadata_types=types))
    return out


def test_split_files_load_as_one(tmp_path):
    """A model split by gguf-split loads from its first shard, every shard memory-mapped, with the
    same logits; a missing or mismatched shard is named."""
    src = HERE / "qwen3moe.gguf"
    shards = write_split(src, tmp_path, 3)
    tokens = np.load(HERE / "qwen3moe.npz")["tokens"][:16]
    want = moegraph.load(src).compile(backend="numpy", n_ctx=32).forward(tokens)
    m = moegraph.load(shards[0])
    assert sorted(m.file.tensors) == sorted(moegraph.load(src).file.tensors)
    assert {t.shard for t in m.file.infos.values()} == {0, 1, 2}
    assert np.array_equal(m.compile(backend="numpy", n_ctx=32).forward(tokens), want)
    assert np.array_equal(m.compile(backend="llvm", n_ctx=32, n_threads=2).forward(tokens),
                          moegraph.load(src).compile(backend="llvm", n_ctx=32, n_threads=2).forward(tokens))
    with pytest.raises(moegraph.GGUFError, match=r"this is shard 2 of 3; open the first one"):
        moegraph.load(shards[1])
    shards[2].rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(moegraph.GGUFError, match=r"shard 3 of 3 is missing: .*model-00003-of-00003.gguf"):
        moegraph.load(shards[0])
    (tmp_path / "elsewhere.gguf").rename(shards[2])
    (tmp_path / "o").mkdir()
    other = write_split(src, tmp_path / "o", 3)
    shards[2].write_bytes(other[1].read_bytes())          # shard 2's bytes under shard 3's name
    with pytest.raises(moegraph.GGUFError, match=r"says it is shard 2 of 3, expected shard 3 of 3"):
        moegraph.load(shards[0])
    lone = tmp_path / "renamed.gguf"
    lone.write_bytes(shards[0].read_bytes())
    with pytest.raises(moegraph.GGUFError, match=r"shard 1 of 3 \(split.count\) but its name is not"):
        moegraph.load(lone)


@pytest.mark.oracle
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_split_files_are_what_llama_cpp_reads(tmp_path):
    """The shards written above are gguf-split's format: llama.cpp loads them from the first."""
    shards = write_split(HERE / "mixtral.gguf", tmp_path, 2)
    tokens = np.load(HERE / "mixtral.npz")["tokens"][:16].tolist()
    ref = llama_cpp_logits(shards[0], tokens, n_ctx=32, f32_kv=False)
    ours = moegraph.load(shards[0]).compile(backend="numpy", n_ctx=32).forward(tokens).astype(np.float64)
    assert _rel(ours, ref) <= 1e-3
