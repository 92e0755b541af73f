"""CUDA backend. Default tier (no GPU needed): NVRTC compiles the generated CUDA C of every fixture
model's graph for sm_80 and sm_90; `backend="cuda"` without a driver is a clear MoeGraphError.
Tier `gpu`: logits against the llama.cpp oracle, incremental decode == full forward."""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest

import moegraph
from moegraph.errors import MoeGraphError

from conftest import TINY_TYPES, kl_and_argmax, oracle_logits, oracle_tokens, smollm2_path, tiny_path

nvrtc = pytest.importorskip("moegraph.backends.cuda.nvrtc")
OK, WHY = nvrtc.available()
need_nvrtc = pytest.mark.skipif(not OK, reason=f"NVRTC unavailable: {WHY}")


def bundled():
    return importlib.resources.files("moegraph.data") / "tiny-qwen3moe-kjv-Q8_0.gguf"


def has_driver() -> tuple[bool, str]:
    try:
        from moegraph.backends.cuda.runtime import driver_context
        driver_context(0)
        return True, ""
    except MoeGraphError as e:
        return False, str(e)


def _models():
    yield "bundled-Q8_0", lambda: str(bundled())
    for t in TINY_TYPES:
        yield f"tiny-{t}", (lambda t=t: str(tiny_path(t)))
    yield "smollm2", lambda: str(smollm2_path())
    for name in ("deepseek3", "glm4moe", "gpt-oss"):    # MLA, selection bias, sinks and windows
        yield f"converted-{name}", (lambda name=name: str(Path(__file__).parent / "converted" / f"{name}.gguf"))


MODELS = list(_models())
# the whole-model compile of the bundled model in the default tier (every op and weight type is
# compiled by test_backend_ops); the other models, 10-30 s each on 2 cores, in the slow tier
MODEL_PARAMS = [pytest.param(*m, id=m[0], marks=() if i == 0 else pytest.mark.slow) for i, m in enumerate(MODELS)]


@need_nvrtc
@pytest.mark.parametrize("name,path", MODEL_PARAMS)
def test_nvrtc_compiles_model_graph(name, path, tmp_path, monkeypatch):
    from moegraph.backends.cuda import CUDABackend
    monkeypatch.setenv("MOEGRAPH_CACHE", str(tmp_path))
    g = moegraph.load(path()).graph(n_ctx=256)
    be = CUDABackend(max_tokens=64)
    prog = be.program(g)
    assert prog.launches and prog.n_unique <= len(prog.launches)
    for arch in ("sm_80", "sm_90"):
        cubin, info = be.cubin(g, arch)
        assert cubin[:4] == b"\x7fELF" and info["arch"] == arch and info["cache"] == "miss"
    cubin2, info = be.cubin(g, "sm_90")
    assert info["cache"] == "hit" and cubin2 == cubin


@need_nvrtc
def test_nvrtc_error_has_log():
    with pytest.raises(MoeGraphError, match="error"):
        nvrtc.compile_cubin("this is not C", "sm_90", use_cache=False)


def test_no_driver_is_a_clear_error():
    ok, why = has_driver()
    if ok:
        pytest.skip("a CUDA driver is present")
    m = moegraph.load(str(bundled()))
    with pytest.raises(MoeGraphError, match="no CUDA driver found"):
        m.compile(backend="cuda", n_ctx=64)


# ------------------------------------------------------------------ gpu tier
def need_gpu():
    ok, why = has_driver()
    if not ok:
        pytest.skip(f"no usable CUDA GPU: {why}")


TOL = {"F32": (1e-5, 63), "F16": (1e-5, 63), "Q8_0": (1e-2, 60), "Q4_0": (1e-2, 60),
       "Q4_K_M": (1e-2, 60)}   # the core tolerances (tests/test_oracle.py)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("qtype", TINY_TYPES)
def test_gpu_logits_vs_oracle(qtype, kv):
    need_gpu()
    ids = oracle_tokens()["tiny_qwen3moe_seq64"]
    ref = oracle_logits(f"tiny-qwen3moe-kjv-{qtype}" + ("-kvf32" if kv == "f32" else ""))
    s = moegraph.load(tiny_path(qtype)).compile(backend="cuda", n_ctx=512, kv_type=kv)
    kl, agree = kl_and_argmax(ref, s.forward(ids))
    max_kl, min_agree = TOL[qtype]
    assert kl <= max_kl and agree >= min_agree, (qtype, kv, kl, agree)


@pytest.mark.gpu
def test_gpu_matches_numpy_reference_bundled():
    need_gpu()
    m = moegraph.load(str(bundled()))
    ids = list(range(1, 40))
    a = m.compile(backend="numpy", n_ctx=128).forward(ids)
    b = m.compile(backend="cuda", n_ctx=128).forward(ids)
    kl, agree = kl_and_argmax(a, b)
    assert kl < 1e-3 and agree >= len(ids) - 1, (kl, agree)


@pytest.mark.gpu
def test_gpu_incremental_decode_equals_full_forward():
    need_gpu()
    m = moegraph.load(str(bundled()))
    ids = list(range(5, 30))
    full = m.compile(backend="cuda", n_ctx=128).forward(ids)
    s = m.compile(backend="cuda", n_ctx=128)
    parts = [s.forward(ids[:10])] + [s.forward([t]) for t in ids[10:]]
    inc = np.concatenate(parts)
    # 25 tokens at once run the tiled tensor-core products, single tokens the per-row kernels:
    # the same integer sums, float-summed in another order (8-bit activation rounding can flip)
    kl, agree = kl_and_argmax(full, inc)
    assert kl < 1e-3 and agree >= len(ids) - 3, (kl, agree)


WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _random_model(tmp_path_factory, arch: str, dtype: str, **kw):
    from moegraph.testing import write_random_model
    d = tmp_path_factory.mktemp(f"{arch}-{dtype}")
    shape = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_vocab=512, n_ctx=256, scale=0.05)
    if arch == "llama":
        shape.update(n_expert=0, n_ff=512)
    else:
        shape.update(n_expert=8, n_expert_used=3, n_ff_exp=256, n_ff=512)
    shape.update(kw)
    return str(write_random_model(d / "m.gguf", arch, dtype=dtype, seed=7, **shape))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
@pytest.mark.parametrize("dtype", WEIGHT_TYPES)
def test_gpu_weight_types_match_numpy(dtype, arch, tmp_path_factory):
    """Every supported weight type, MoE and dense, on random weights: CUDA == the NumPy spec
    (both quantize activations as ggml does, so the agreement is close to float rounding)."""
    need_gpu()
    m = moegraph.load(_random_model(tmp_path_factory, arch, dtype))
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 512, 24)]
    ref = m.compile(backend="numpy", n_ctx=64).forward(ids)
    s = m.compile(backend="cuda", n_ctx=64)
    got = np.concatenate([s.forward(ids[:20]), s.forward(ids[20:21]), s.forward(ids[21:])])
    kl, agree = kl_and_argmax(ref, got)
    assert np.isfinite(got).all()
    # random weights give near-tied logits; 8-bit activation rounding flips at different places
    # when float sums are ordered differently, hence KL < 1e-3 rather than equality
    assert kl < 1e-3 and agree >= len(ids) - 2, (dtype, arch, kl, agree)


@pytest.mark.gpu
def test_gpu_passes_and_cuda_graphs_are_exact():
    """fuse_qkv + fuse_up_gate and CUDA-graph replay change nothing: same logits as the plain
    graph launched kernel by kernel."""
    need_gpu()
    m = moegraph.load(str(bundled()))
    ids = list(range(3, 23))
    outs = []
    fused = ("fuse_norm", "fuse_qkv", "fuse_up_gate")
    for passes, graphs in (((), False), (fused, False), (fused, True)):
        s = m.compile(backend="cuda", n_ctx=64, passes=passes, cuda_graphs=graphs)
        outs.append(np.concatenate([s.forward(ids[:8])] + [s.forward([t]) for t in ids[8:]]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(outs[2], outs[1])


@pytest.mark.gpu
def test_gpu_soft_slicing_vs_oracle():
    need_gpu()
    ids = oracle_tokens()["tiny_qwen3moe_seq64"]
    ref = oracle_logits("tiny-qwen3moe-kjv-Q8_0-k2")
    s = moegraph.load(str(bundled())).compile(backend="cuda", n_ctx=512, n_expert_used=2)
    kl, agree = kl_and_argmax(ref, s.forward(ids))
    assert kl <= 1e-2 and agree >= 60, (kl, agree)


@pytest.mark.gpu
def test_gpu_profile_names_every_step():
    need_gpu()
    s = moegraph.load(str(bundled())).compile(backend="cuda", n_ctx=64)
    prof = s.executable.profile({"tokens": np.array([1, 2, 3], np.int32), "pos": np.arange(3, dtype=np.int32),
                                 "kq_mask": np.triu(np.full((3, 3), -np.inf, np.float32), 1),
                                 "out_rows": np.arange(3, dtype=np.int32)})
    assert len(prof) == len(s.executable.program.launches)
    assert any(p["step"].startswith("MUL_MAT") for p in prof) and all(p["ms"] >= 0 for p in prof)


def _op_graph(dtype: str, K: int = 256, N: int = 64, E: int = 4):
    """x[T,K] through MUL_MAT, MUL_MAT_ID (E experts, 2 used) and GET_ROWS of `dtype` weights."""
    from moegraph.gguf_file import WeightData
    from moegraph.ir import F32, I32, Graph
    from moegraph.quants import GGMLType
    from moegraph.testing import quantize_rows
    rng = np.random.default_rng(3)
    def weight(name, shape):
        raw = quantize_rows(rng.standard_normal(shape).astype(np.float32) * 0.1, dtype)
        return WeightData(name, GGMLType[dtype], shape, raw.reshape(-1))
    g = Graph()
    x = g.input("x", ("T", K), F32)
    ids = g.input("ids", ("T", 2), I32)
    w, we = g.weight(weight("w", (N, K))), g.weight(weight("we", (E, N, K)))
    g.outputs["mm"] = g.mul_mat(w, x)
    g.outputs["mmid"] = g.mul_mat_id(we, g.reshape(x, shape=("T", 1, K)), ids)
    g.outputs["rows"] = g.get_rows(w, g.input("rid", ("T",), I32))
    g.meta["n_ctx"] = 128
    return g


@pytest.mark.gpu
@pytest.mark.parametrize("T", [5, 70])     # per-row dot kernels / tiled tensor-core kernels
@pytest.mark.parametrize("dtype", WEIGHT_TYPES)
def test_gpu_single_ops_match_numpy(dtype, T):
    need_gpu()
    from moegraph.backends import get_backend
    g = _op_graph(dtype)
    rng = np.random.default_rng(4)
    inputs = {"x": rng.standard_normal((T, 256)).astype(np.float32),
              "ids": rng.integers(0, 4, (T, 2)).astype(np.int32), "rid": rng.integers(0, 64, T).astype(np.int32)}
    ref = get_backend("numpy").compile(g).run(inputs)
    got = get_backend("cuda", max_tokens=80).compile(g).run(inputs)
    errs = {k: float(np.abs(got[k] - ref[k]).max() / (np.abs(ref[k]).max() + 1e-30)) for k in ref}
    print(dtype, T, errs)
    assert all(e < 1e-5 for e in errs.values()), (dtype, errs)
