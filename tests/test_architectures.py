"""Every supported architecture against an independent float64 forward pass.

For llama (dense and Mixtral-style experts), qwen2moe and qwen3moe we write a small random F32
model with ``moegraph.testing.write_random_model`` and compare moegraph's logits (NumPy reference
backend, F32 KV cache) with a forward pass written here from scratch: weights read with
``gguf.GGUFReader`` (GGUF dims reversed by hand), float64, per-token loops, following llama.cpp's
graphs (src/models/llama.cpp, qwen2moe.cpp, qwen3moe.cpp; build_moe_ffn / build_qkv in
src/llama-graph.cpp):

* gating: softmax over all experts, top-k; the k weights renormalized (``norm_w``) for llama and
  qwen3moe, *not* for qwen2moe; expert outputs summed;
* qwen2moe: shared expert added, scaled by sigmoid(ffn_gate_inp_shexp . x); Q/K/V biases;
* qwen3moe: RMS norm of each q and k head (attn_q_norm / attn_k_norm) before RoPE;
* RoPE: NORM (adjacent pairs) for llama, NEOX (halves) for the Qwen models;
* output = token_embd when output.weight is absent (tied).

Metric: max |logit difference| / max |reference logit| <= 1e-4. Then: tied output, merged
``ffn_gate_up_exps`` / fused ``attn_qkv`` files against the same weights unmerged (<= 1e-5),
incremental decoding against one full forward, quantized files that load and run, and -- when the
``llama_cpp`` package is importable -- llama.cpp itself as the oracle (mean KL <= 1e-5, same
arg-max), the only oracle for qwen2moe and Mixtral-style llama, which have no fixture files.
"""
from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest

import moegraph
from moegraph.testing import (
    gpt2_byte_vocab,
    plan_random_model,
    quantize_rows,
    write_random_model,
)

# arch id -> write_random_model arguments. scale=0.2 gives peaked attention, distinct router
# probabilities and logits of std ~1.5 on these tiny widths (0.02 would make everything uniform).
ARCHS = {
    "llama-dense": dict(arch="llama", n_expert=0, n_ff=96),
    "llama-moe": dict(arch="llama", n_expert=8, n_expert_used=2, n_ff_exp=32),
    "qwen2moe": dict(arch="qwen2moe", n_expert=8, n_expert_used=2, n_ff_exp=32, n_ff_shexp=48),
    "qwen3moe": dict(arch="qwen3moe", n_expert=8, n_expert_used=2, n_ff_exp=32, head_dim=24),
}
COMMON = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_vocab=320, n_ctx=128, scale=0.2,
              seed=1234)
TOKENS = [5, 300, 17, 42, 42, 199, 3, 257, 88, 140, 11, 270, 64]

# llama.cpp's per-architecture constants (src/models/<arch>.cpp): RoPE type, build_moe_ffn's norm_w
ROPE_NEOX = {"llama": False, "qwen2moe": True, "qwen3moe": True}
NORM_W = {"llama": True, "qwen2moe": False, "qwen3moe": True}


def write(path, arch_id: str, **kw):
    args = {**COMMON, **ARCHS[arch_id], **kw}
    return write_random_model(path, args.pop("arch"), **args)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("random-models")
    return {a: write(d / f"{a}.gguf", a) for a in ARCHS}


def moegraph_logits(path, tokens=TOKENS) -> np.ndarray:
    return moegraph.load(path).compile(backend="numpy", kv_type="f32").forward(tokens)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - ref)) / np.max(np.abs(ref)))


# --------------------------------------------------------------------------------------------
# the independent reference: GGUFReader + float64 NumPy


def read_gguf(path) -> tuple[dict, dict]:
    """Metadata and float64 tensors in NumPy order; quantized tensors decoded by gguf-py."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        dims = [int(d) for d in t.shape]                 # GGUF order: ne0 (innermost) first
        raw = np.ascontiguousarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            flat = np.frombuffer(raw.tobytes(), dtype="<f4")
        else:
            flat = gguf.quants.dequantize(raw.view(np.uint8).reshape(-1), t.tensor_type).reshape(-1)
        tensors[t.name] = flat.reshape(dims[::-1]).astype(np.float64)
    return meta, tensors


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, base, neox):
    """x [H, D] at position pos; ggml's rope: theta_i = pos * base^(-2i/D)."""
    D = x.shape[-1]
    theta = pos * base ** (-np.arange(D // 2) * 2.0 / D)
    c, s = np.cos(theta), np.sin(theta)
    out = x.copy()
    if neox:
        a, b = x[:, : D // 2], x[:, D // 2:]
        out[:, : D // 2], out[:, D // 2:] = a * c - b * s, a * s + b * c
    else:
        a, b = x[:, 0::2], x[:, 1::2]
        out[:, 0::2], out[:, 1::2] = a * c - b * s, a * s + b * c
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def reference_logits(path, tokens=TOKENS) -> np.ndarray:
    meta, W = read_gguf(path)
    arch = meta["general.architecture"]

    def hp(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_embd, n_head, n_kv = hp("embedding_length"), hp("attention.head_count"), hp("attention.head_count_kv")
    D = hp("attention.key_length", n_embd // n_head)
    eps, base = hp("attention.layer_norm_rms_epsilon"), hp("rope.freq_base")
    n_used = hp("expert_used_count", 0)
    T = len(tokens)
    x = W["token_embd.weight"][tokens]                   # [T, n_embd]
    for il in range(hp("block_count")):
        p = f"blk.{il}."
        h = rms_norm(x, W[p + "attn_norm.weight"], eps)
        if p + "attn_qkv.weight" in W:
            qkv = h @ W[p + "attn_qkv.weight"].T + W.get(p + "attn_qkv.bias", 0.0)
            q, k, v = np.split(qkv, [n_head * D, n_head * D + n_kv * D], axis=1)
        else:
            q, k, v = (h @ W[p + f"attn_{n}.weight"].T + W.get(p + f"attn_{n}.bias", 0.0) for n in "qkv")
        q, k, v = q.reshape(T, n_head, D), k.reshape(T, n_kv, D), v.reshape(T, n_kv, D)
        if p + "attn_q_norm.weight" in W:
            q = rms_norm(q, W[p + "attn_q_norm.weight"], eps)
            k = rms_norm(k, W[p + "attn_k_norm.weight"], eps)
        q = np.stack([rope(q[t], t, base, ROPE_NEOX[arch]) for t in range(T)])
        k = np.stack([rope(k[t], t, base, ROPE_NEOX[arch]) for t in range(T)])
        att = np.zeros((T, n_head, D))
        for t in range(T):
            for hd in range(n_head):
                g = hd // (n_head // n_kv)
                s = k[: t + 1, g] @ q[t, hd] / np.sqrt(D)
                a = np.exp(s - s.max())
                att[t, hd] = (a / a.sum()) @ v[: t + 1, g]
        x = x + att.reshape(T, n_head * D) @ W[p + "attn_output.weight"].T
        h = rms_norm(x, W[p + "ffn_norm.weight"], eps)
        if p + "ffn_gate_inp.weight" not in W:           # dense
            f = (silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
        else:
            f = np.zeros_like(h)
            for t in range(T):
                logits = W[p + "ffn_gate_inp.weight"] @ h[t]
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                top = np.argsort(-probs, kind="stable")[:n_used]
                w = probs[top] / (probs[top].sum() if NORM_W[arch] else 1.0)
                for e, we in zip(top, w):
                    if p + "ffn_gate_up_exps.weight" in W:
                        gu = W[p + "ffn_gate_up_exps.weight"][e] @ h[t]
                        gate, up = np.split(gu, 2)
                    else:
                        gate = W[p + "ffn_gate_exps.weight"][e] @ h[t]
                        up = W[p + "ffn_up_exps.weight"][e] @ h[t]
                    f[t] += we * (W[p + "ffn_down_exps.weight"][e] @ (silu(gate) * up))
            if p + "ffn_up_shexp.weight" in W:
                sh = (silu(h @ W[p + "ffn_gate_shexp.weight"].T) * (h @ W[p + "ffn_up_shexp.weight"].T)) \
                    @ W[p + "ffn_down_shexp.weight"].T
                gate = 1.0 / (1.0 + np.exp(-(h @ W[p + "ffn_gate_inp_shexp.weight"].reshape(-1))))
                f = f + sh * gate[:, None]
        x = x + f
    x = rms_norm(x, W["output_norm.weight"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T


# --------------------------------------------------------------------------------------------
# moegraph against the reference


@pytest.mark.parametrize("arch_id", list(ARCHS))
def test_matches_float64_reference(models, arch_id):
    ref = reference_logits(models[arch_id])
    ours = moegraph_logits(models[arch_id])
    assert ours.shape == ref.shape == (len(TOKENS), COMMON["n_vocab"])
    assert ref.std() > 0.5, "degenerate random model: logits nearly constant"
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"{arch_id}: max |dlogit| / max |logit| = {err:.2e} > 1e-4"
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("arch_id", ["llama-dense", "llama-moe", "qwen3moe", "qwen2moe"])
def test_tied_output(tmp_path, arch_id):
    path = write(tmp_path / "tied.gguf", arch_id, tied_output=True)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    err = rel_err(moegraph_logits(path), reference_logits(path))
    assert err <= 1e-4, f"{arch_id} tied: {err:.2e}"


@pytest.mark.parametrize("arch_id", list(ARCHS))
def test_merged_and_fused_equal_unmerged(models, tmp_path, arch_id):
    path = write(tmp_path / "merged.gguf", arch_id, merged_gate_up=True, fused_qkv=True)
    _, merged = read_gguf(path)
    _, plain = read_gguf(models[arch_id])
    # the file layout itself (independent of moegraph): Q, K, V rows; per expert gate then up rows
    for il in range(COMMON["n_layer"]):
        p = f"blk.{il}."
        assert p + "attn_q.weight" not in merged
        np.testing.assert_array_equal(
            merged[p + "attn_qkv.weight"],
            np.concatenate([plain[p + f"attn_{n}.weight"] for n in "qkv"]))
        if p + "attn_q.bias" in plain:
            np.testing.assert_array_equal(
                merged[p + "attn_qkv.bias"], np.concatenate([plain[p + f"attn_{n}.bias"] for n in "qkv"]))
        if p + "ffn_gate_exps.weight" in plain:
            assert p + "ffn_gate_exps.weight" not in merged
            np.testing.assert_array_equal(
                merged[p + "ffn_gate_up_exps.weight"],
                np.concatenate([plain[p + "ffn_gate_exps.weight"], plain[p + "ffn_up_exps.weight"]], axis=1))
    err = rel_err(moegraph_logits(path), moegraph_logits(models[arch_id]))
    assert err <= 1e-5, f"{arch_id}: merged/fused vs unmerged {err:.2e}"


@pytest.mark.parametrize("arch_id", list(ARCHS))
def test_incremental_decoding_equals_full_forward(models, arch_id):
    model = moegraph.load(models[arch_id])
    full = model.compile(backend="numpy", kv_type="f32").forward(TOKENS)
    sess = model.compile(backend="numpy", kv_type="f32")
    n0 = 5
    parts = [sess.forward(TOKENS[:n0])] + [sess.forward([t]) for t in TOKENS[n0:]]
    inc = np.concatenate(parts)
    assert sess.n_past == len(TOKENS)
    err = rel_err(inc, full.astype(np.float64))
    assert err <= 1e-5, f"{arch_id}: incremental vs full {err:.2e}"
    sess.reset()
    np.testing.assert_allclose(sess.forward(TOKENS[:n0]), parts[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K_M", "Q5_K", "Q6_K", "BF16", "F16"])
def test_quantized_random_model_runs(tmp_path, dtype):
    # rows of 256 so that the K-quants are used rather than their fallbacks
    path = write(tmp_path / f"q-{dtype}.gguf", "qwen3moe", dtype=dtype, n_embd=256, n_ff_exp=256)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    base = {"Q4_K_M": "Q4_K"}.get(dtype, dtype)
    assert types["blk.0.ffn_gate_exps.weight"] == base
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    if dtype == "Q4_K_M":
        assert types["output.weight"] == "Q6_K" and types["blk.1.ffn_down_exps.weight"] == "Q6_K"
    model = moegraph.load(path)
    logits = model.compile(backend="numpy", kv_type="f32").forward(TOKENS)   # ggml's rounding
    assert np.isfinite(logits).all()
    # Exact-arithmetic mode (no emulation of ggml's 8-bit activations) against the float64
    # reference on the weights as gguf-py decodes them: checks the quantized load path.
    exact = model.compile(backend="numpy", kv_type="f32", emulate_ggml_rounding=False).forward(TOKENS)
    err = rel_err(exact, reference_logits(path))
    assert err <= 1e-4, f"{dtype}: {err:.2e}"


def test_k_quant_blocks_decode_with_gguf():
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 0.05
    for qtype, tol in (("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03), ("Q8_0", 0.01)):
        raw = quantize_rows(x, qtype)
        back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
        rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
        assert rel < tol, f"{qtype}: relative RMS error {rel:.3f}"
    np.testing.assert_array_equal(quantize_rows(x, "Q8_0"),
                                  gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0))


def test_writer_metadata_dims_and_determinism(tmp_path):
    a = write(tmp_path / "a.gguf", "qwen2moe", threads=1)
    b = write(tmp_path / "b.gguf", "qwen2moe", threads=3)
    assert a.read_bytes() == b.read_bytes()             # any thread count, same file
    r = gguf.GGUFReader(a)
    dims = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    E, nf, n = 8, 32, 64
    assert dims["blk.0.ffn_gate_exps.weight"] == [n, nf, E]   # GGUF: ne0 (n_embd) first
    assert dims["blk.0.ffn_down_exps.weight"] == [nf, n, E]
    assert dims["blk.0.ffn_gate_inp.weight"] == [n, E]
    assert dims["blk.0.ffn_gate_inp_shexp.weight"] == [n, 1]    # as the converter writes it
    assert dims["blk.0.ffn_up_shexp.weight"] == [n, 48]
    assert dims["blk.0.attn_q.bias"] == [n]
    assert dims["token_embd.weight"] == [n, COMMON["n_vocab"]]
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "qwen2moe"
    assert meta["qwen2moe.expert_shared_feed_forward_length"] == 48
    assert meta["qwen2moe.expert_feed_forward_length"] == nf
    assert meta["qwen2moe.rope.dimension_count"] == 16
    cfg = moegraph.load(a).config
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp, cfg.n_ff_shexp) == (8, 2, 32, 48)
    assert cfg.expert_weights_norm is False
    # llama with experts: llama.cpp sizes them by feed_forward_length, not expert_feed_forward_length
    plan = plan_random_model("llama", n_expert=4, n_expert_used=2, n_ff_exp=40, n_ff=999, with_vocab=False)
    md = {k: v for k, v, _ in plan.metadata}
    assert md["llama.feed_forward_length"] == 40 and "llama.expert_feed_forward_length" not in md


def test_random_model_tokenizer(models):
    tok = moegraph.load(models["qwen3moe"]).tokenizer
    ids = tok.encode("hello world")
    assert ids and all(0 < i < COMMON["n_vocab"] for i in ids)
    assert tok.decode(ids) == "hello world"
    assert tok.decode(tok.encode("Grüße, 東京 \n\t!")) == "Grüße, 東京 \n\t!"   # byte fallback
    tokens, types, merges = gpt2_byte_vocab(5000)
    assert len(tokens) == len(set(tokens)) == 5000 and types[0] == 3
    vocab = set(tokens)
    assert all(m.replace(" ", "", 1) in vocab for m in merges)


# --------------------------------------------------------------------------------------------
# llama.cpp itself as the oracle (optional: needs the llama_cpp package)

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None

# variant -> (arch id, extra write arguments). llama.cpp cannot load two kinds of files that
# moegraph accepts, so they are not here: merged ffn_gate_up_exps for these three architectures
# (their loaders ask for ffn_gate_exps / ffn_up_exps: "tensor 'blk.0.ffn_gate_exps.weight' not
# found") and qwen2moe without output.weight (its loader requires output.weight).
ORACLE_VARIANTS = {
    "llama-dense": ("llama-dense", {}),
    "llama-moe": ("llama-moe", {}),
    "qwen2moe": ("qwen2moe", {}),
    "qwen3moe": ("qwen3moe", {}),
    "llama-dense-tied": ("llama-dense", dict(tied_output=True)),
    "qwen3moe-tied": ("qwen3moe", dict(tied_output=True)),
    "llama-moe-fused-qkv": ("llama-moe", dict(fused_qkv=True)),
    "qwen2moe-fused-qkv": ("qwen2moe", dict(fused_qkv=True)),
    # quantized blocks (rows of 256 so the K-quants are real K-quants)
    "qwen3moe-Q4_K_M": ("qwen3moe", dict(dtype="Q4_K_M", n_embd=256, n_ff_exp=256)),
    "llama-moe-Q6_K": ("llama-moe", dict(dtype="Q6_K", n_embd=256, n_ff_exp=256)),
    "qwen2moe-Q4_0": ("qwen2moe", dict(dtype="Q4_0", n_embd=256, n_ff_exp=256, n_ff_shexp=256)),
}


@pytest.mark.oracle
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="the llama_cpp package (llama-cpp-python) is not "
                    "installed: `pip install llama-cpp-python` to compare with llama.cpp itself")
@pytest.mark.parametrize("variant", list(ORACLE_VARIANTS))
def test_llama_cpp_oracle(tmp_path, variant):
    from conftest import llama_cpp_logits
    arch_id, kw = ORACLE_VARIANTS[variant]
    path = write(tmp_path / f"{variant}.gguf", arch_id, **kw)
    ref = llama_cpp_logits(path, TOKENS)
    ours = moegraph_logits(path)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(ours.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    assert kl <= 1e-5, f"{variant}: mean KL(llama.cpp || moegraph) = {kl:.2e} > 1e-5"
    assert np.array_equal(ref.argmax(-1), ours.argmax(-1)), f"{variant}: arg-max differs"


def test_qwen2moe_one_dimensional_shared_gate(tmp_path):
    """The shared-expert gate loads in both layouts: [1, n_embd] (llama.cpp's converter, the
    writer's default) and [n_embd] (older files), with the same logits."""
    from moegraph.gguf_file import GGUFFile, WeightData, write_gguf
    a = write(tmp_path / "a.gguf", "qwen2moe")
    f = GGUFFile(a)
    tensors = [WeightData(t.name, t.dtype, t.shape[1:], t.raw) if t.name.endswith("gate_inp_shexp.weight")
               else t for t in f.tensors.values()]
    assert any(len(t.shape) == 1 and "shexp" in t.name for t in tensors)
    b = write_gguf(tmp_path / "b.gguf", dict(f.metadata), tensors, metadata_types=f.metadata_types)
    la, lb = moegraph_logits(a), moegraph_logits(b)
    assert np.array_equal(la, lb)


# gpt-oss and deepseek2 layer stacks from the writer (the benchmark files' code path): tiny widths
NEW_ARCHS = {
    "gpt-oss-MXFP4": dict(arch="gpt-oss", n_head_kv=2, head_dim=16, n_ff=32, n_ff_exp=32, n_swa=4,
                          dtype="MXFP4_MOE", n_layer=3),
    "deepseek2-Q8_0": dict(arch="deepseek2", n_head_kv=1, n_ff=96, n_ff_exp=32, kv_lora_rank=32,
                           qk_rope_dim=8, qk_nope_dim=16, v_head_dim=16, dtype="Q8_0", n_layer=3),
}


def _write_new(path, variant):
    args = {**COMMON, "n_expert": 8, "n_expert_used": 2, "scale": 0.1, **NEW_ARCHS[variant]}
    return write_random_model(path, args.pop("arch"), **args)


@pytest.mark.parametrize("variant", list(NEW_ARCHS))
def test_new_arch_writers(tmp_path, variant):
    """The writer's gpt-oss (MXFP4 experts, sinks, window 4) and deepseek2 (MLA, a dense first
    layer, shared experts) files load, and both CPU backends agree on them."""
    path = _write_new(tmp_path / "m.gguf", variant)
    m = moegraph.load(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    if variant.startswith("gpt-oss"):
        assert types["blk.0.ffn_down_exps.weight"] == "MXFP4" and types["output.weight"] == "Q8_0"
    else:
        assert m.config.kv_lora_rank == 32 and m.config.n_layer_dense_lead == 1
    ref = m.compile(backend="numpy").forward(TOKENS)
    got = m.compile(backend="llvm", n_threads=2).forward(TOKENS)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.oracle
@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="the llama_cpp package (llama-cpp-python) is not "
                    "installed: `pip install llama-cpp-python` to compare with llama.cpp itself")
@pytest.mark.parametrize("variant", list(NEW_ARCHS))
def test_new_arch_writers_llama_cpp_oracle(tmp_path, variant):
    """llama.cpp loads the writer's files and computes the same logits (F32 KV cache; measured
    KL 2e-15)."""
    from conftest import kl_and_argmax, llama_cpp_logits
    path = _write_new(tmp_path / "m.gguf", variant)
    kl, agree = kl_and_argmax(llama_cpp_logits(path, TOKENS), moegraph_logits(path).astype(np.float64))
    assert kl <= 1e-5 and agree == len(TOKENS), (kl, agree)
