"""LLVM CPU backend: every weight type's matrix products against the NumPy spec, op by op and on
whole random models (the llama.cpp oracle tests cover the fixture files' types)."""
from __future__ import annotations

import numpy as np
import pytest

import moegraph
from moegraph.backends import get_backend
from moegraph.ir import F32, I32, Graph
from moegraph.quants import GGMLType, quantize_weights

from conftest import WEIGHT_TYPES, kl_and_argmax, random_weight






def _op_graph(dtype: str, K: int, N: int, E: int = 5):
    """x[T,K] through MUL_MAT, MUL_MAT_ID (E experts, 3 used per token) and GET_ROWS."""
    rng = np.random.default_rng(3)
    g = Graph()
    x = g.input("x", ("T", K), F32)
    ids = g.input("ids", ("T", 3), I32)
    w, we = g.weight(random_weight(rng, "w", (N, K), dtype)), g.weight(random_weight(rng, "we", (E, N, K), dtype))
    g.outputs["mm"] = g.mul_mat(w, x)
    g.outputs["mmid"] = g.mul_mat_id(we, g.reshape(x, shape=("T", 1, K)), ids)
    g.outputs["rows"] = g.get_rows(w, g.input("rid", ("T",), I32))
    g.meta["n_ctx"] = 128
    return g


@pytest.mark.parametrize("T", [1, 3, 70])      # decode, a few rows, a prompt (tiles + remainders)
@pytest.mark.parametrize("dtype", WEIGHT_TYPES)
def test_single_ops_match_numpy(dtype, T):
    K = 512                                     # two K-quant super-blocks, 16 legacy blocks
    g = _op_graph(dtype, K, N=38)               # 38 rows: not a multiple of any row tile
    rng = np.random.default_rng(4)
    inputs = {"x": rng.standard_normal((T, K)).astype(np.float32),
              "ids": np.stack([rng.permutation(5)[:3] for _ in range(T)]).astype(np.int32),
              "rid": rng.integers(0, 38, T).astype(np.int32)}
    ref = get_backend("numpy").compile(g).run(inputs)
    # 3 threads: uneven shares of rows and of each expert's rows
    got = get_backend("llvm", n_threads=3, max_tokens=80, use_cache=False).compile(g).run(inputs)
    errs = {k: float(np.abs(got[k] - ref[k]).max() / (np.abs(ref[k]).max() + 1e-30)) for k in ref}
    # identical integer sums and activation rounding: only float summation order differs
    assert all(e < 1e-5 for e in errs.values()), (dtype, T, errs)


@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_K", "Q5_K", "Q4_1", "Q5_0", "Q3_K", "Q6_K", "BF16", "MXFP4"])
def test_portable_ir_without_avx2(dtype, monkeypatch):
    """CPUs without AVX2 get the same sums from portable IR (checked here on this CPU; 40 rows,
    so Q8_0 and Q4_K expert weights take the x8 layout)."""
    import moegraph.backends.llvm as llvm_backend
    real = llvm_backend.host_features()
    monkeypatch.setattr(llvm_backend, "host_features", lambda: {**real, "avx2": False})
    g = _op_graph(dtype, 512, N=40)
    rng = np.random.default_rng(5)
    inputs = {"x": rng.standard_normal((9, 512)).astype(np.float32),
              "ids": np.stack([rng.permutation(5)[:3] for _ in range(9)]).astype(np.int32),
              "rid": rng.integers(0, 40, 9).astype(np.int32)}
    ref = get_backend("numpy").compile(g).run(inputs)
    ex = get_backend("llvm", n_threads=2, max_tokens=16, use_cache=False).compile(g)
    assert "call <8 x i32> @llvm.x86.avx2" not in ex.ir_text and "call <16 x i16> @llvm.x86" not in ex.ir_text \
        and "call <32 x i8> @llvm.x86" not in ex.ir_text
    got = ex.run(inputs)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() <= 1e-5 * np.abs(ref[k]).max(), (dtype, k)


def test_last_only_logits_equal_the_last_row():
    """Generation computes the LM head for the last position only (as llama.cpp does)."""
    import importlib.resources
    m = moegraph.load(str(importlib.resources.files("moegraph.data") / "tiny-qwen3moe-kjv-Q8_0.gguf"))
    ids = list(range(3, 40))
    for backend in ("numpy", "llvm"):
        s = m.compile(backend=backend, n_ctx=64)
        full = s.forward(ids)
        s.reset()
        last = s.forward(ids, last_only=True)
        assert last.shape == (1, full.shape[1])
        np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)
        nxt = s.forward([7], last_only=True)          # the cache advanced by all 37 tokens
        s.reset()
        np.testing.assert_allclose(nxt[0], s.forward(ids + [7])[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3moe", "llama"])
@pytest.mark.parametrize("dtype", ["BF16", "Q5_0", "Q5_1", "Q4_1", "Q5_K"])
def test_weight_types_whole_model(dtype, arch, tmp_path):
    """The types the fixture files do not carry, MoE and dense, prompt then decode steps."""
    from moegraph.testing import write_random_model
    shape = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_vocab=512, n_ctx=256, scale=0.05)
    shape.update(dict(n_expert=0, n_ff=512) if arch == "llama" else
                 dict(n_expert=8, n_expert_used=3, n_ff_exp=256, n_ff=512))
    m = moegraph.load(write_random_model(tmp_path / "m.gguf", arch, dtype=dtype, seed=7, **shape))
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 512, 24)]
    ref = m.compile(backend="numpy", n_ctx=64).forward(ids)
    s = m.compile(backend="llvm", n_ctx=64, n_threads=2)
    got = np.concatenate([s.forward(ids[:20])] + [s.forward([t]) for t in ids[20:]])
    kl, agree = kl_and_argmax(ref, got)
    assert np.isfinite(got).all()
    assert kl < 1e-3 and agree >= len(ids) - 2, (dtype, arch, kl, agree)


@pytest.mark.parametrize("T", [1, 6, 70])
@pytest.mark.parametrize("dtype", ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1"])
def test_repacked_products_match_numpy(dtype, T):
    """Products in the row-interleaved (x8) layouts: 64 rows (whole groups of 8), two
    super-blocks, dense and expert weights."""
    g = _op_graph(dtype, 512, N=64)
    rng = np.random.default_rng(6)
    inputs = {"x": rng.standard_normal((T, 512)).astype(np.float32),
              "ids": np.stack([rng.permutation(5)[:3] for _ in range(T)]).astype(np.int32),
              "rid": rng.integers(0, 64, T).astype(np.int32)}
    ref = get_backend("numpy").compile(g).run(inputs)
    ex = get_backend("llvm", n_threads=3, max_tokens=80, use_cache=False).compile(g)
    repacked = {n.name for n in g.toposort() if n.id in ex.plan.repacked}
    assert repacked == {"we"}, repacked            # "w" is also read by GET_ROWS: kept as stored
    got = ex.run(inputs)
    for k in ref:
        assert np.abs(got[k] - ref[k]).max() <= 1e-5 * np.abs(ref[k]).max(), (k, T)
    plain = get_backend("llvm", n_threads=2, max_tokens=80, repack=False).compile(g)
    assert not plain.plan.repacked
    np.testing.assert_allclose(plain.run(inputs)["mmid"], got["mmid"], rtol=1e-5, atol=1e-5 * np.abs(got["mmid"]).max())


def test_repack_x8_layouts():
    from moegraph.backends.llvm.gemm import repack_x8
    rng = np.random.default_rng(2)
    raw = quantize_weights(rng.standard_normal((16, 512)).astype(np.float32), GGMLType.Q4_K)
    x8 = repack_x8(GGMLType.Q4_K, raw, 16, 512)
    assert x8.shape == (2, 2, 1184) and x8.nbytes == raw.nbytes * 1184 // 1152
    # group 1, super-block 1, row 3: its d, and quant byte 5 of group 2 (piece 1, byte 1)
    blk = raw[8 + 3, 144:288]
    assert x8[1, 1, 6:8].tobytes() == blk[0:2].tobytes()
    assert x8[1, 1, 160 + 256 * 2 + 32 * 1 + 4 * 3 + 1] == blk[16 + 32 * 2 + 5]

    q8 = quantize_weights(rng.standard_normal((3, 16, 64)).astype(np.float32), GGMLType.Q8_0)   # 3 experts
    x8 = repack_x8(GGMLType.Q8_0, q8, 16, 64)
    assert x8.shape == (3, 2, 2, 272) and x8.nbytes == q8.nbytes
    # expert 2, rows 8..15, block 1, row 5: its d, and its value 13 (piece 3, byte 1)
    blk = q8[2, 8 + 5, 34:68]
    assert x8[2, 1, 1, 10:12].tobytes() == blk[0:2].tobytes()
    assert x8[2, 1, 1, 16 + 32 * 3 + 4 * 5 + 1] == blk[2 + 13]
    q6 = quantize_weights(rng.standard_normal((8, 256)).astype(np.float32), GGMLType.Q6_K)
    x8 = repack_x8(GGMLType.Q6_K, q6, 8, 256)
    assert x8.shape == (1, 1, 1680) and x8.nbytes == q6.nbytes
    # row 6: its d, scale of group 11, ql byte 77 (piece 19, byte 1), qh byte 42 (piece 10, byte 2)
    assert x8[0, 0, 12:14].tobytes() == q6[6, 208:210].tobytes()
    assert x8[0, 0, 16 + 8 * 11 + 6] == q6[6, 192 + 11]
    assert x8[0, 0, 144 + 32 * 19 + 4 * 6 + 1] == q6[6, 77]
    assert x8[0, 0, 1168 + 32 * 10 + 4 * 6 + 2] == q6[6, 128 + 42]


def test_merged_gate_up_with_odd_half_is_not_repacked(tmp_path):
    """A merged [gate; up] expert tensor whose halves are not whole groups of 8 rows (F = 12)
    keeps the file's layout, and the fused SwiGLU still matches the spec."""
    from moegraph.testing import write_random_model
    path = write_random_model(tmp_path / "m.gguf", "qwen3moe", dtype="Q8_0", n_embd=64, n_ff_exp=12,
                              n_expert=4, n_expert_used=2, merged_gate_up=True, seed=3)
    m = moegraph.load(path)
    s = m.compile(backend="llvm", n_ctx=64, n_threads=2)
    merged = [n for n in s.graph.toposort() if n.name.endswith("ffn_gate_up_exps.weight")]
    assert merged and not any(n.id in s.executable.plan.repacked for n in merged)
    ids = list(range(1, 20))
    ref = m.compile(backend="numpy", n_ctx=64).forward(ids)
    kl, agree = kl_and_argmax(ref, s.forward(ids))
    assert kl < 1e-3 and agree >= len(ids) - 1, (kl, agree)


def test_thread_policy_follows_the_load():
    """ThreadPolicy (simulated step times): all threads while they are faster, half of them soon
    after the full count gets slow (a busy machine: measured 2-15 ms against 0.5-1 ms), back to
    all when the load goes; prompt-sized steps always use every thread; a step that had to wake
    sleeping workers is not a measurement."""
    from moegraph.backends.llvm import ThreadPolicy
    p = ThreadPolicy(2)
    cost = {2: 0.4e-3, 1: 0.7e-3}

    def steps(n):
        used = []
        for _ in range(n):
            t = p.choose(1)
            p.record(1, t, cost[t])
            used.append(t)
        return used
    assert steps(400)[-100:].count(2) >= 90            # idle: 2 threads (tries of 1 are rare)
    cost[2] = 8e-3                                    # load comes
    used = steps(200)
    assert used[-150:].count(1) >= 140                # switched within tens of steps
    cost[2] = 0.4e-3                                  # load goes
    assert steps(3000)[-200:].count(2) >= 180
    assert p.choose(128) == 2                         # prompts: every thread
    q = ThreadPolicy(2)
    for _ in range(100):                              # wake-up steps are not measurements
        t = q.choose(1)
        q.record(1, t, 1.0 if t == 2 else 1e-3, valid=t != 2)
    assert q.classes[1].best == 2 and q.classes[1].cost is None
    assert ThreadPolicy(1).choose(1) == 1


def test_more_threads_than_cores_warns():
    import warnings

    from moegraph.backends.llvm import LLVMBackend, available_cores
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        LLVMBackend(n_threads=available_cores() + 1)
    assert any("available cores" in str(x.message) for x in w)
