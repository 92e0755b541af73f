"""Every op of the op table on every backend against the reference (ggml's test-backend-ops idea).

A case builds a small graph around one op (fused ops included) at several token counts (T = 1,
an odd size, a larger one); the LLVM backend runs it, the CUDA backend generates and
NVRTC-compiles it (and runs it in the gpu tier), and both are compared with the NumPy reference,
which runs fused ops as their decomposition. An op of the table without a case here fails
`test_every_op_has_a_case`; an op a backend has no kernel for fails there with the backend's
message naming the op."""
from __future__ import annotations

import numpy as np
import pytest

from moegraph.backends import get_backend
from moegraph.backends.lower import UnsupportedOpError
from moegraph.gguf_file import WeightData
from moegraph.ir import F16, F32, I32, OPS, Graph, Kind
from moegraph.quants import GGMLType

from conftest import WEIGHT_TYPES, random_weight

TOKENS = [1, 7, 70]
N_CTX = 96
C = 48                     # a row length that is not a multiple of 8 or 32 lanes




def _f32_weight(rng, name, shape):
    return WeightData.from_array(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))


# --------------------------------------------------------------------------- cases
# name -> (ops covered, build(graph, rng) filling graph.outputs, inputs(rng, T) -> dict)
CASES: dict = {}


def case(name, ops):
    def deco(fn):
        CASES[name] = (tuple(ops), fn)
        return fn
    return deco


def x_input(rng, T, *shape):
    return rng.standard_normal((T, *shape)).astype(np.float32)


@case("unary", ["SILU", "GELU", "SIGMOID", "SCALE", "CLAMP", "CONT", "CAST"])
def _unary(g, rng):
    x = g.input("x", ("T", C), F32)
    g.outputs.update(silu=g.silu(x), gelu=g.gelu(x), sigmoid=g.sigmoid(x),
                     scale=g.scale(x, scale=0.37, bias=-1.5), clamp=g.clamp(x, min=-0.5, max=0.75),
                     f16=g.cast(g.cast(x, dtype=F16), dtype=F32), bf16=g.cast(g.cast(x, dtype=GGMLType.BF16), dtype=F32))
    return lambda rng, T: {"x": x_input(rng, T, C) * 3}


@case("binary", ["ADD", "MUL", "DIV"])
def _binary(g, rng):
    x, y = g.input("x", ("T", 3, C), F32), g.input("y", ("T", 3, C), F32)
    row, col = g.input("row", (C,), F32), g.input("col", ("T", 3, 1), F32)
    g.outputs.update(add=g.add(x, y), mul=g.mul(x, row), div=g.div(x, col), add_col=g.add(x, col))
    return lambda rng, T: {"x": x_input(rng, T, 3, C), "y": x_input(rng, T, 3, C),
                           "row": rng.standard_normal(C).astype(np.float32),
                           "col": (2 + rng.random((T, 3, 1))).astype(np.float32)}


@case("swiglu", ["SWIGLU"])
def _swiglu(g, rng):
    a, b = g.input("a", ("T", C), F32), g.input("b", ("T", C), F32)
    g.outputs.update(two=g.swiglu(a, b), merged=g.swiglu(g.concat(a, b, axis=1)))
    return lambda rng, T: {"a": x_input(rng, T, C), "b": x_input(rng, T, C)}


@case("norms", ["RMS_NORM", "NORM"])
def _norms(g, rng):
    x = g.input("x", ("T", 2, C), F32)
    w = g.weight(_f32_weight(rng, "w", (C,)))
    g.outputs.update(rms=g.rms_norm(x, eps=1e-6), rms_w=g.rms_norm(x, w, eps=1e-5), norm=g.norm(x, eps=1e-5))
    return lambda rng, T: {"x": x_input(rng, T, 2, C) + 0.5}


@case("softmax", ["SOFT_MAX", "TOP_K", "SUM", "GROUP_MASK"])
def _softmax(g, rng):
    x, mask = g.input("x", ("T", C), F32), g.input("mask", ("T", C), F32)
    p = g.soft_max(x, mask, scale=0.7)
    # attention sinks: per head (axis -3) of [H, T, C] scores, one of them larger than any score
    sinks = g.weight(WeightData.from_array("sinks", np.array([0.5, -1.0, 9.0], np.float32)))
    xh = g.permute(g.reshape(x, shape=("T", 3, C // 3)), axes=(1, 0, 2))
    g.outputs.update(p=p, plain=g.soft_max(x), top=g.top_k(x, k=5),
                     sum=g.sum(g.reshape(p, shape=("T", 4, C // 4)), axis=1),
                     sinks=g.cont(g.soft_max(g.cont(xh), None, sinks, scale=0.7)),
                     groups=g.group_mask(x, n_groups=6, n_used=2), group_top=g.top_k(g.group_mask(x, n_groups=4, n_used=3), k=5))

    def inputs(rng, T):
        mask = np.where(rng.random((T, C)) < 0.2, -np.inf, 0).astype(np.float32)
        mask[:, 0] = 0
        return {"x": x_input(rng, T, C) * 2, "mask": mask}
    return inputs


@case("movement", ["CONCAT", "RESHAPE", "PERMUTE", "SLICE"])
def _movement(g, rng):
    x = g.input("x", ("T", 4, 8), F32)
    y = g.input("y", ("T", 4, 3), F32)
    g.outputs.update(cat=g.concat(x, y, axis=2),
                     perm=g.cont(g.permute(x, axes=(1, 0, 2))),
                     sliced=g.cont(g.slice(x, axis=2, start=2, stop=7)),
                     reshaped=g.reshape(g.permute(x, axes=(0, 2, 1)), shape=("T", 32)))
    return lambda rng, T: {"x": x_input(rng, T, 4, 8), "y": x_input(rng, T, 4, 3)}


@case("rope", ["ROPE"])
def _rope(g, rng):
    x, pos = g.input("x", ("T", 3, 16), F32), g.input("pos", ("T",), I32)
    ff = g.weight(WeightData.from_array("rope_freqs", rng.uniform(1, 8, 8).astype(np.float32)))
    yarn = dict(freq_scale=0.25, ext_factor=1.0, attn_factor=0.9, n_ctx_orig=64)
    g.outputs.update(norm=g.rope(x, pos, n_dims=16, mode=0, freq_base=10000.0),
                     neox=g.rope(x, pos, n_dims=12, mode=2, freq_base=5e5, freq_scale=0.25),
                     factors=g.rope(x, pos, ff, n_dims=16, mode=0, freq_base=5e5),     # Llama 3
                     yarn=g.rope(x, pos, n_dims=16, mode=2, freq_base=1e4, **yarn),
                     yarn_factors=g.rope(x, pos, ff, n_dims=16, mode=0, freq_base=1e4, **yarn))
    return lambda rng, T: {"x": x_input(rng, T, 3, 16), "pos": rng.integers(0, 4000, T).astype(np.int32)}


@case("kv_cache", ["SET_ROWS"])
def _set_rows(g, rng):
    src, idx = g.input("src", ("T", 2, 8), F32), g.input("idx", ("T",), I32)
    for dt in (F32, F16):
        cache = g.state(f"cache_{dt.name}", (N_CTX, 2, 8), dt)
        g.outputs[f"cache_{dt.name}"] = g.cont(g.cast(g.set_rows(cache, src, idx), dtype=F32)) if dt != F32 \
            else g.cont(g.set_rows(cache, src, idx))
    return lambda rng, T: {"src": x_input(rng, T, 2, 8),
                           "idx": rng.permutation(N_CTX)[:T].astype(np.int32)}


@case("attention", ["ATTENTION"])
def _attention(g, rng):
    H, Hkv, D = 4, 2, 16
    q, kin, vin = g.input("q", ("T", H, D), F32), g.input("k", ("T", Hkv, D), F32), g.input("v", ("T", Hkv, D), F32)
    pos, mask = g.input("pos", ("T",), I32), g.input("mask", ("T", "KV"), F32)
    for dt in (F16, F32):
        kc = g.set_rows(g.state(f"k_{dt.name}", (N_CTX, Hkv, D), dt), kin, pos)
        vc = g.set_rows(g.state(f"v_{dt.name}", (N_CTX, Hkv, D), dt), vin, pos)
        kv = [g.slice(c, axis=0, start=0, stop="KV") for c in (kc, vc)]
        g.outputs[f"att_{dt.name}"] = g.cont(g.attention(q, *kv, mask, scale=D ** -0.5))
        sinks = g.weight(WeightData.from_array(f"sinks_{dt.name}", np.array([0.3, -2.0, 4.0, 1.0], np.float32)))
        g.outputs[f"att_sinks_{dt.name}"] = g.cont(g.attention(q, *kv, mask, sinks, scale=D ** -0.5))

    def inputs(rng, T):
        pos = np.arange(T, dtype=np.int32) + 3
        mask = np.where(np.arange(T + 3)[None, :] <= pos[:, None], 0, -np.inf).astype(np.float32)
        return {"q": x_input(rng, T, H, D), "k": x_input(rng, T, Hkv, D), "v": x_input(rng, T, Hkv, D),
                "pos": pos, "mask": mask}
    return inputs


def _products(dtype):
    def build(g, rng):
        K, N, E = 512, 40, 5               # 2 K-quant super-blocks; 40 rows: x8 layouts + a remainder
        x, ids, rid = g.input("x", ("T", K), F32), g.input("ids", ("T", 3), I32), g.input("rid", ("T",), I32)
        w = g.weight(random_weight(rng, "w", (N, K), dtype))
        gate, up = (g.weight(random_weight(rng, n, (E, N, K), dtype)) for n in ("gate", "up"))
        merged = g.weight(random_weight(rng, "gate_up", (E, 2 * N, K), dtype))
        xe = g.reshape(x, shape=("T", 1, K))
        # batched: one matrix per head on a strided view (MLA's k_b/v_b)
        wb, xh = g.weight(random_weight(rng, "wb", (3, N, K), dtype)), g.input("xh", ("T", 3, K), F32)
        g.outputs.update(mm=g.mul_mat(w, x), mmid=g.mul_mat_id(gate, xe, ids), rows=g.get_rows(w, rid), rows_bcast=g.get_rows(w, ids),
                         batched=g.mul_mat(wb, g.permute(xh, axes=(1, 0, 2))),
                         swiglu=g.moe_swiglu(gate, up, xe, ids), swiglu_merged=g.moe_swiglu(merged, None, xe, ids))
        return lambda rng, T: {"x": x_input(rng, T, K), "xh": x_input(rng, T, 3, K),
                               "rid": rng.integers(0, N, T).astype(np.int32),
                               "ids": np.stack([rng.permutation(E)[:3] for _ in range(T)]).astype(np.int32)}
    return build


for _t in WEIGHT_TYPES:
    CASES[f"products-{_t}"] = (("MUL_MAT", "MUL_MAT_ID", "GET_ROWS", "MOE_SWIGLU"), _products(_t))


def build_case(name: str):
    g = Graph(name)
    inputs = CASES[name][1](g, np.random.default_rng(7))
    g.meta["n_ctx"] = N_CTX
    return g, inputs


def compare(ref: dict, got: dict) -> dict:
    errs = {}
    for k, r in ref.items():
        if r.dtype == np.int32:
            errs[k] = float(np.any(got[k] != r))
        else:   # (equal infinities, e.g. GROUP_MASK's -inf, are no difference)
            diff = np.where(got[k] == r, 0, np.abs(got[k] - r))
            errs[k] = float(diff.max() / (np.abs(r[np.isfinite(r)]).max() + 1e-30))
    return errs


# --------------------------------------------------------------------------- tests
def test_every_op_has_a_case():
    covered = {op for ops, _ in CASES.values() for op in ops}
    missing = sorted(op for op, d in OPS.items() if d.kind != Kind.LEAF and op not in covered)
    assert not missing, f"ops without a backend test case: {missing} (add them to CASES)"


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(CASES))
def test_llvm_matches_reference(name, T):
    g, make_inputs = build_case(name)
    inputs = make_inputs(np.random.default_rng(T), T)
    ref = get_backend("numpy").compile(g).run(inputs)
    # 3 threads: uneven shares of rows and tokens; products on 2, so that 5 experts are enough
    # for whole experts claimed by the threads (run twice: the claim counters reset themselves)
    try:
        ex = get_backend("llvm", n_threads=2 if name.startswith("products") else 3, max_tokens=80).compile(g)
    except UnsupportedOpError as e:
        pytest.fail(str(e))
    ex.run(inputs)
    got = ex.run(inputs)
    errs = compare(ref, got)
    # same roundings as the reference; only float summation order (and exp/tanh polynomials) differ
    assert all(e < 2e-5 for e in errs.values()), (name, T, errs)


def _cuda_codegen():
    from moegraph.backends.cuda import nvrtc     # ours, imports nothing optional: must import
    ok, why = nvrtc.available()
    if not ok:
        pytest.skip(f"NVRTC unavailable: {why}")
    from moegraph.backends.cuda import codegen
    return nvrtc, codegen


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_generates_and_compiles(name, tmp_path, monkeypatch):
    nvrtc, codegen = _cuda_codegen()
    monkeypatch.setenv("MOEGRAPH_CACHE", str(tmp_path))
    g, _ = build_case(name)
    unsupported = {GGMLType.Q2_K, GGMLType.Q3_K}
    if name.startswith("products-") and GGMLType[name.split("-")[1]] in unsupported:
        with pytest.raises(UnsupportedOpError, match=r"(?s)the cuda backend cannot run this graph.*MUL_MAT.*Q[23]_K"):
            codegen.generate_for_graph(g, max_tokens=80)
        return
    _, program = codegen.generate_for_graph(g, max_tokens=80)
    cubin, info = nvrtc.compile_cubin(program.source, "sm_90", use_cache=False)
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.gpu
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference(name, T):
    from test_cuda import need_gpu
    need_gpu()
    if name in ("products-Q2_K", "products-Q3_K"):
        pytest.skip("no CUDA kernels for Q2_K/Q3_K products (a clear error, tested above)")
    g, make_inputs = build_case(name)
    inputs = make_inputs(np.random.default_rng(T), T)
    ref = get_backend("numpy").compile(g).run(inputs)
    got = get_backend("cuda", max_tokens=80).compile(g).run(inputs)
    errs = compare(ref, got)
    assert all(e < 1e-4 for e in errs.values()), (name, T, errs)


def test_custom_op_without_kernels_is_a_clear_error():
    from moegraph.ir import defop
    from moegraph.backends import reference

    @defop("TEST_SQUARE", "x", kind=Kind.ELEMENTWISE)
    def _square(x):
        """x * x (a user's op)."""
        return x.shape, F32
    try:
        g = Graph()
        g.outputs["y"] = g.test_square(g.input("x", ("T", 8), F32))
        with pytest.raises(UnsupportedOpError, match=r"numpy backend has no implementation for .*TEST_SQUARE"):
            get_backend("numpy").compile(g)
        with pytest.raises(UnsupportedOpError, match=r"(?s)llvm backend cannot run this graph.*TEST_SQUARE.*no kernel"):
            get_backend("llvm", n_threads=1).compile(g)
        reference.register_impl("TEST_SQUARE", lambda ex, n, b, x: x * x)
        x = np.arange(16, dtype=np.float32).reshape(2, 8)
        assert np.array_equal(get_backend("numpy").compile(g).run({"x": x})["y"], x * x)
    finally:
        OPS.pop("TEST_SQUARE", None)
        reference.IMPL.pop("TEST_SQUARE", None)


def test_fused_ops_are_their_decomposition():
    """The fusion rules turn the plain-op patterns into the fused ops, and the reference runs a
    fused op as its decomposition: the two graphs give the same values."""
    from moegraph.backends.llvm import TARGET
    from moegraph.backends.lower import lower
    g, make_inputs = build_case("attention")
    plain = g.copy()
    assert plain.expand_fused() == 4 and not any(n.op == "ATTENTION" for n in plain.nodes)
    refused = lower(plain, TARGET)
    assert sum(n.op == "ATTENTION" for n in refused.toposort()) == 4   # sinks or none
    inputs = make_inputs(np.random.default_rng(1), 5)
    a = get_backend("numpy").compile(g).run(inputs)
    b = get_backend("numpy").compile(plain).run(inputs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
