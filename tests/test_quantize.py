"""`moegraph quantize`: byte identity with llama.cpp, the type rules, the scheduler, streaming.

Default tier: identity with the llama.cpp-made fixtures (Q8_0, Q4_0, Q4_K_M from the F32 file),
kernels (LLVM JIT and NumPy agree on hard data), scheduler coverage and balance, thread-count
independence, interrupted writes, --dry-run, requantize warning, errors, and a moegraph forward
on the output. `slow`: llama.cpp itself (the optional `llama_cpp` package) for every file type, on
other architectures/shapes and on adversarial values.
"""
from __future__ import annotations

import ctypes
import filecmp
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ORACLE, kl_and_argmax, need_fixtures, tiny_path

import moegraph.quants as q
from moegraph.errors import MoeGraphError
from moegraph.gguf_file import GGUFFile, WeightData, write_gguf
from moegraph.quantize import (
    FTYPES,
    RequantizeWarning,
    TensorPlan,
    assign_units,
    make_work_units,
    plan_tensors,
    quantize,
)

ORACLE_TYPES = ["Q8_0", "Q4_0", "Q4_K_M"]


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tensor_bytes(f: GGUFFile, name: str) -> np.ndarray:
    for t in f._reader.tensors:
        if t.name == name:
            return np.asarray(f._reader.data[int(t.data_offset):int(t.data_offset) + int(t.n_bytes)])
    raise KeyError(name)


def _assert_same_tensors(a: Path, b: Path) -> None:
    fa, fb = GGUFFile(a), GGUFFile(b)
    assert list(fa.tensor_types) == list(fb.tensor_types), "tensor order differs"
    for name, ta in fa.tensor_types.items():
        assert fb.tensor_types[name] == ta, f"{name}: type {fb.tensor_types[name]} != llama.cpp's {ta}"
        ra, rb = _tensor_bytes(fa, name), _tensor_bytes(fb, name)
        if not np.array_equal(ra, rb):
            raise AssertionError(f"{name} ({ta}): {int((ra != rb).sum())} of {ra.size} bytes differ "
                                 "from llama.cpp's")


@pytest.fixture(scope="module")
def small_moe(tmp_path_factory) -> Path:
    from moegraph.testing import write_random_model
    p = tmp_path_factory.mktemp("q") / "small-F32.gguf"
    write_random_model(p, "qwen3moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_expert=16,
                       n_expert_used=2, n_ff_exp=256, n_vocab=300, dtype="F32")
    return p


# ---------------------------------------------------------------------------------------------
# identity with llama.cpp's own files


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ORACLE_TYPES)
def test_byte_identical_to_llama_cpp_fixture(tmp_path, ftype):
    """moegraph's output from the F32 fixture equals llama.cpp's llama_model_quantize output
    (default params, no imatrix): every tensor's type and bytes, and in fact the whole file."""
    out = tmp_path / f"mg-{ftype}.gguf"
    res = quantize(tiny_path("F32"), out, ftype, threads=2)
    assert res.written and out.exists()
    _assert_same_tensors(tiny_path(ftype), out)
    types = json.loads((ORACLE / "tensor_types.json").read_text())[f"tiny-qwen3moe-kjv-{ftype}.gguf"]
    assert GGUFFile(out).get("general.file_type") == types["general.file_type"]
    assert filecmp.cmp(out, tiny_path(ftype), shallow=False), "tensors equal, but not the whole file"


@pytest.mark.oracle
def test_plan_matches_fixture_types():
    need_fixtures(ORACLE / "tensor_types.json")
    types = json.loads((ORACLE / "tensor_types.json").read_text())
    for ftype in ORACLE_TYPES:
        want = GGUFFile(tiny_path(ftype)).tensor_types
        got = {t.name: t.dst_type for t in plan_tensors(tiny_path("F32"), ftype)}
        assert got == want, ftype
        for kind, t in types[f"tiny-qwen3moe-kjv-{ftype}.gguf"]["tensor_types"].items():
            if t in FTYPES or t in ("Q4_K", "Q6_K"):       # (mixed kinds are spelled out per layer)
                assert all(v == t for n, v in got.items() if n.split(".", 2)[-1] == kind or n == kind), kind


# ---------------------------------------------------------------------------------------------
# kernels


def _hard_rows(n_rows: int = 96, n: int = 512, seed: int = 0) -> np.ndarray:
    """Normal weights with blocks that exercise ties and signed zeros, constants, denormals,
    outliers, offsets and wide dynamic range."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n)) * 0.02).astype(np.float32)
    blocks = x.reshape(-1, 32)
    specials = [lambda b: b.fill(0.0), lambda b: b.fill(-0.0),
                lambda b: b.__setitem__(slice(None), np.where(rng.random(32) < .5, 0.0, -0.0)),
                lambda b: b.fill(np.float32(rng.standard_normal())),
                lambda b: b.__setitem__(slice(None), rng.standard_normal(32) * 1e-39),
                lambda b: b.__setitem__(int(rng.integers(32)), 50.0),
                lambda b: b.__setitem__(slice(None), np.abs(b) + 3),
                lambda b: b.__setitem__(slice(None), -np.abs(b) - 100),
                lambda b: b.__setitem__(slice(None), np.round(b * 200) / 200),
                lambda b: b.__setitem__(slice(None), rng.standard_normal(32) * np.exp(2 * rng.standard_normal(32)))]
    for i in range(0, len(blocks), 3):
        specials[int(rng.integers(len(specials)))](blocks[i])
    return x


@pytest.fixture(scope="module")
def search_only_jit():
    """The kernels a CPU without F16C gets: JIT searches, the rest of each block in NumPy."""
    saved = dict(q._jit_state)
    os.environ["MOEGRAPH_QUANT_JIT"] = "search"
    q._jit_state.clear()
    try:
        yield q.jit_functions()
    finally:
        del os.environ["MOEGRAPH_QUANT_JIT"]
        q._jit_state.clear()
        q._jit_state.update(saved)


@pytest.mark.parametrize("t", [t.name for t in q.WEIGHT_TYPES])
def test_jit_and_numpy_kernels_agree(t, search_only_jit):
    x = _hard_rows()
    saved = dict(q._jit_state)
    old = q._USE_JIT
    try:
        q._USE_JIT = False
        ref = q.quantize_weights(x, t)
        q._USE_JIT = True
        q._jit_state.clear()
        q._jit_state["fns"] = search_only_jit
        b = q.quantize_weights(x, t)           # search-only JIT
        q._jit_state.clear()
        q._jit_state.update(saved)
        a = q.quantize_weights(x, t)           # whole blocks native (with F16C)
    finally:
        q._USE_JIT = old
        q._jit_state.clear()
        q._jit_state.update(saved)
    np.testing.assert_array_equal(a, ref)
    np.testing.assert_array_equal(b, ref)
    # and the bytes decode to something close to x (a sanity check of the layout)
    y = q.dequantize(a, t, x.shape)
    normal = np.abs(x).max(axis=1) < 1
    assert np.abs(y[normal] - x[normal]).max() < 0.2


def test_quantize_weights_out_and_errors():
    x = _hard_rows(4, 256)
    out = np.empty((4, q.row_bytes("Q4_K", 256)), np.uint8)
    assert q.quantize_weights(x, "Q4_K", out=out) is out
    np.testing.assert_array_equal(out, q.quantize_weights(x, "Q4_K"))
    with pytest.raises(ValueError, match="multiple of the block size"):
        q.quantize_weights(np.zeros((2, 100), np.float32), "Q4_K")
    with pytest.raises(NotImplementedError, match="Q8_K"):
        q.quantize_weights(x, "Q8_K")


# ---------------------------------------------------------------------------------------------
# the scheduler


def _plans(n_expert: int, rows: int = 64, cols: int = 512) -> list[TensorPlan]:
    shape3 = (n_expert, rows, cols) if n_expert > 1 else (rows, cols)
    return [TensorPlan("a.weight", (rows * 3, cols), "F32", "Q8_0", rows * 3 * cols * 4, rows * 3 * (cols // 32) * 34),
            TensorPlan("norm.weight", (cols,), "F32", "F32", cols * 4, cols * 4),
            TensorPlan("blk.0.ffn_up_exps.weight", shape3, "F32", "Q4_K",
                       n_expert * rows * cols * 4, n_expert * rows * (cols // 256) * 144),
            TensorPlan("blk.0.ffn_down_exps.weight", (n_expert, cols, rows * 4) if n_expert > 1 else (cols, rows * 4),
                       "F16", "Q6_K", n_expert * cols * rows * 4 * 2, n_expert * cols * (rows * 4 // 256) * 210)]


@pytest.mark.parametrize("n_expert", [1, 3, 16, 128])
@pytest.mark.parametrize("n_threads", [1, 2, 3, 13, 47])
def test_work_units_cover_every_row_once_and_balance(n_expert, n_threads):
    tensors = _plans(n_expert)
    units = make_work_units(tensors, n_threads)
    for ti, t in enumerate(tensors):
        mine = [u for u in units if u.tensor == ti]
        if not t.quantize:
            assert not mine
            continue
        covered = np.zeros((t.n_expert, t.rows_per_expert), np.int32)
        offset = 0
        for u in mine:           # in order, contiguous in the output, whole experts or one expert's rows
            assert u.n_experts == 1 or (u.row0 == 0 and u.row1 == t.rows_per_expert)
            covered[u.expert:u.expert + u.n_experts, u.row0:u.row1] += 1
            assert u.dst_offset == offset
            offset += u.dst_bytes
        assert (covered == 1).all(), "a row is missing or done twice"
        assert offset == t.dst_bytes
        assert sum(u.src_bytes for u in mine) == t.src_bytes
    assignment = assign_units(units, n_threads)
    assert sorted(k for a in assignment for k in a) == list(range(len(units)))
    loads = [sum(units[k].src_bytes for k in a) for a in assignment]
    mean = sum(loads) / n_threads
    biggest = max(u.src_bytes for u in units)
    assert max(loads) <= mean + biggest, (loads, mean, biggest)
    # every thread's units are in file order
    assert all(a == sorted(a) for a in assignment)


def test_work_units_whole_experts_when_many():
    t = _plans(128)[2]                          # 128 experts of 64 x 512 floats (128 KiB each)
    units = make_work_units([t], 13, unit_bytes=1 << 20)
    assert all(u.row0 == 0 and u.row1 == t.rows_per_expert for u in units)   # never split
    assert {u.n_experts for u in units} <= {8, 9}                             # grouped, even
    units = make_work_units([t], 2, unit_bytes=1 << 15)                      # smaller than an expert
    assert all(u.n_experts == 1 for u in units) and len(units) == 128 * 4


# ---------------------------------------------------------------------------------------------
# running


def test_same_output_for_any_thread_count(tmp_path, small_moe):
    hashes = set()
    for n in (1, 2, 3, 13):
        out = tmp_path / f"t{n}.gguf"
        res = quantize(small_moe, out, "Q4_K_M", threads=n, unit_bytes=1 << 18)
        assert res.threads == n and res.n_units > 13
        hashes.add(_sha(out))
    assert len(hashes) == 1


def test_streaming_holds_only_a_few_units(tmp_path, small_moe):
    res = quantize(small_moe, tmp_path / "o.gguf", "Q8_0", threads=3, unit_bytes=1 << 18, max_ahead=4)
    biggest = max(u.dst_bytes for u in make_work_units(res.tensors, 3, 1 << 18))
    assert res.n_units > 20
    assert 0 < res.peak_buffered_bytes <= 4 * biggest < res.dst_bytes / 3


def test_interrupted_run_leaves_no_file(tmp_path, small_moe):
    out = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        quantize(small_moe, out, "Q4_K_M", threads=3, unit_bytes=1 << 18, _interrupt_after=1 << 20)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "a temporary file was left behind"
    # an existing file under OUT's name is left as it was
    out.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        quantize(small_moe, out, "Q8_0", threads=2, unit_bytes=1 << 18, _interrupt_after=1 << 20)
    assert out.read_bytes() == b"previous"


def test_worker_error_propagates_and_leaves_no_file(tmp_path, small_moe, monkeypatch):
    calls = {"n": 0}
    real = q.quantize_weights

    def flaky(x, t, out=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(x, t, out=out)
    monkeypatch.setattr(q, "quantize_weights", flaky)
    out = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize(small_moe, out, "Q8_0", threads=3, unit_bytes=1 << 18)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_writes_nothing(tmp_path, small_moe, capsys):
    from moegraph.cli import main
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(small_moe), str(out), "Q4_K_M", "--dry-run", "-t", "3"]) == 0
    assert main(["quantize", str(small_moe), "Q6_K", "--dry-run"]) == 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    text = capsys.readouterr().out
    assert "blk.1.ffn_down_exps.weight" in text and "F32 -> Q6_K" in text and "dry run" in text
    res = quantize(small_moe, None, "Q4_K_M", dry_run=True, threads=3)
    assert not res.written and res.dst_bytes < res.src_bytes / 5


def test_cli_quantize(tmp_path, small_moe, capsys):
    from moegraph.cli import main
    out = tmp_path / "q8.gguf"
    js = tmp_path / "r.json"
    assert main(["quantize", str(small_moe), str(out), "q8_0", "-t", "2", "--no-progress", "--json", str(js)]) == 0
    f = GGUFFile(out)
    assert f.get("general.file_type") == FTYPES["Q8_0"][0] and f.get("general.quantization_version") == 2
    assert f.tensor_types["blk.0.ffn_up_exps.weight"] == "Q8_0"
    assert f.tensor_types["blk.0.ffn_gate_inp.weight"] == "F32"
    src = GGUFFile(small_moe)
    for k, v in src.metadata.items():          # all metadata copied
        if k != "general.file_type":
            assert f.metadata[k] == v, k
    r = json.loads(js.read_text())
    assert r["written"] and r["threads"] == 2 and len(r["tensors"]) == len(f.tensor_types)
    assert main(["quantize", str(small_moe), str(tmp_path / "x.gguf"), "IQ2_XS"]) == 1
    assert "not supported" in capsys.readouterr().err
    assert main(["quantize", str(small_moe), "Q4_0"]) == 1      # output missing without --dry-run


def test_requantize_warns(tmp_path):
    out = tmp_path / "rq.gguf"
    with pytest.warns(RequantizeWarning, match="already Q8_0"):
        res = quantize(tiny_path("Q8_0"), out, "Q4_0", threads=2)
    assert res.warnings and GGUFFile(out).tensor_types["blk.0.ffn_up_exps.weight"] == "Q4_0"
    with warnings.catch_warnings():            # same type: copied, nothing requantized
        warnings.simplefilter("error")
        quantize(tiny_path("Q8_0"), tmp_path / "same.gguf", "Q8_0", threads=2)
    assert filecmp.cmp(tmp_path / "same.gguf", tiny_path("Q8_0"), shallow=False)


@pytest.mark.parametrize("bad", ["IQ2_XS", "Q2_K_S", "Q7_K", "q4_k_xl", ""])
def test_unsupported_type_is_a_clear_error(tmp_path, small_moe, bad):
    with pytest.raises(MoeGraphError, match="not supported|unknown type") as e:
        quantize(small_moe, tmp_path / "x.gguf", bad)
    assert "Q4_K_M" in str(e.value)       # the message lists the supported types
    assert not (tmp_path / "x.gguf").exists()


def test_aliases_and_pure(small_moe):
    a = {t.name: t.dst_type for t in plan_tensors(small_moe, "Q4_K")}
    assert a == {t.name: t.dst_type for t in plan_tensors(small_moe, "Q4_K_M")}
    pure = {t.name: t.dst_type for t in plan_tensors(small_moe, "Q4_K_M", pure=True)}
    assert pure["output.weight"] == "Q4_K" and a["output.weight"] == "Q6_K"
    assert pure["blk.1.ffn_down_exps.weight"] == "Q4_K" and a["blk.1.ffn_down_exps.weight"] == "Q6_K"
    assert pure["blk.0.ffn_norm.weight"] == "F32" and pure["blk.0.ffn_gate_inp.weight"] == "F32"


def test_non_finite_input_fails_like_llama_cpp(tmp_path, small_moe):
    f = GGUFFile(small_moe)
    tensors = [WeightData.from_array(n, np.full(w.shape, np.inf, np.float32)) if n == "blk.0.attn_q.weight" else w
               for n, w in f.tensors.items()]
    bad = tmp_path / "inf.gguf"
    write_gguf(bad, f.metadata, tensors, metadata_types=f.metadata_types)
    with pytest.raises(MoeGraphError, match="validation failed"):
        quantize(bad, tmp_path / "out.gguf", "Q8_0", threads=2)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.oracle
@pytest.mark.parametrize("ftype,max_kl,min_agree", [("Q8_0", 0.005, 0.9), ("Q4_K_M", 0.05, 0.85)])
def test_output_runs_in_moegraph(tmp_path, ftype, max_kl, min_agree):
    """The quantized file loads in moegraph and its next-token distributions stay close to the F32
    model's (mean KL over 32 positions of held-out text; llama.cpp's own Q8_0/Q4_K_M differ from F32
    by similar amounts)."""
    import moegraph
    out = tmp_path / f"{ftype}.gguf"
    quantize(tiny_path("F32"), out, ftype, threads=2)
    tokens = json.loads((ORACLE / "tokens.json").read_text())["tiny_qwen3moe_seq64"]
    ids = (tokens["ids"] if isinstance(tokens, dict) else tokens)[:32]
    ref = moegraph.load(tiny_path("F32")).compile(backend="numpy").forward(ids)
    got = moegraph.load(out).compile(backend="numpy").forward(ids)
    kl, agree = kl_and_argmax(ref, got)
    assert kl < max_kl and agree >= min_agree * len(ids), (kl, agree)


# ---------------------------------------------------------------------------------------------
# llama.cpp itself (optional extra `llama_cpp`): every file type, other shapes, hard values


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama.cpp comparison needs the optional `llama_cpp` package "
                    "(pip install llama-cpp-python); skipped")
    return llama_cpp


def _llama_quantize(llama_cpp, src: Path, dst: Path, ftype: str, threads: int = 2,
                    allow_requantize: bool = False) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = threads
    p.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize({ftype}) failed"


ALL_FTYPES = [f for f in FTYPES if f != "F32"]


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ALL_FTYPES)
def test_every_type_identical_to_llama_cpp(tmp_path, ftype):
    llama_cpp = _llama_cpp()
    ref, out = tmp_path / "lc.gguf", tmp_path / "mg.gguf"
    _llama_quantize(llama_cpp, tiny_path("F32"), ref, ftype)
    quantize(tiny_path("F32"), out, ftype, threads=3)
    _assert_same_tensors(ref, out)
    assert filecmp.cmp(ref, out, shallow=False)


ARCHS = {
    "mixtral-8-experts": {"arch": "llama", "n_layer": 3, "n_embd": 256, "n_head": 8, "n_head_kv": 2, "n_expert": 8,
                              "n_expert_used": 2, "n_ff_exp": 512},
    "dense-llama": {"arch": "llama", "n_layer": 9, "n_embd": 256, "n_head": 4, "n_head_kv": 4, "n_expert": 0, "n_ff": 512},
    "qwen2moe-shared": {"arch": "qwen2moe", "n_layer": 2, "n_embd": 256, "n_head": 4, "n_head_kv": 1, "n_expert": 4,
                            "n_expert_used": 2, "n_ff_exp": 256, "n_ff_shexp": 512},
    "rows-not-256": {"arch": "qwen3moe", "n_layer": 2, "n_embd": 96, "n_head": 4, "n_head_kv": 2, "n_expert": 6, "n_ff_exp": 160},
    "tied-output": {"arch": "qwen3moe", "n_layer": 2, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_expert": 4,
                        "n_ff_exp": 256, "tied_output": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_type_rules_identical_to_llama_cpp(tmp_path, arch):
    """llama.cpp's mix rules on other shapes: 8 experts (attn_v/attn_k -> Q8_0, attn_output ->
    Q5_K), dense FFN (layer counters), shared experts, rows not a multiple of 256 (fallbacks),
    tied output."""
    llama_cpp = _llama_cpp()
    from moegraph.testing import write_random_model
    src = tmp_path / "src.gguf"
    write_random_model(src, dtype="F32", n_vocab=300, **ARCHS[arch])
    for ftype in ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "Q5_1"]:
        _llama_quantize(llama_cpp, src, tmp_path / "lc.gguf", ftype)
        quantize(src, tmp_path / "mg.gguf", ftype, threads=3)
        _assert_same_tensors(tmp_path / "lc.gguf", tmp_path / "mg.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False])
def test_hard_values_identical_to_llama_cpp(tmp_path, small_moe, jit, monkeypatch):
    llama_cpp = _llama_cpp()
    monkeypatch.setattr(q, "_USE_JIT", jit)
    f = GGUFFile(small_moe)
    tensors = [WeightData.from_array(n, _hard_rows(int(np.prod(w.shape[:-1])), w.shape[-1], seed=i).reshape(w.shape))
               if len(w.shape) >= 2 and "norm" not in n else w for i, (n, w) in enumerate(f.tensors.items())]
    src = tmp_path / "hard.gguf"
    write_gguf(src, f.metadata, tensors, metadata_types=f.metadata_types)
    for ftype in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "BF16"]:
        _llama_quantize(llama_cpp, src, tmp_path / "lc.gguf", ftype)
        quantize(src, tmp_path / "mg.gguf", ftype, threads=2)
        _assert_same_tensors(tmp_path / "lc.gguf", tmp_path / "mg.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("src_type,ftype", [("F16", "Q4_K_M"), ("Q8_0", "Q4_K_M"), ("Q4_K_M", "Q8_0")])
def test_requantize_identical_to_llama_cpp(tmp_path, src_type, ftype):
    llama_cpp = _llama_cpp()
    _llama_quantize(llama_cpp, tiny_path(src_type), tmp_path / "lc.gguf", ftype, allow_requantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizeWarning)
        quantize(tiny_path(src_type), tmp_path / "mg.gguf", ftype, threads=2)
    assert filecmp.cmp(tmp_path / "lc.gguf", tmp_path / "mg.gguf", shallow=False)


@pytest.mark.slow
def test_many_experts_thread_counts(tmp_path):
    """A many-expert model (128 experts): identical output for 1, 2, 3, 13 and 47 threads."""
    from moegraph.testing import write_random_model
    src = tmp_path / "many.gguf"
    write_random_model(src, "qwen3moe", n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_expert=128,
                       n_expert_used=8, n_ff_exp=256, dtype="F16")
    hashes = {_sha(quantize(src, tmp_path / f"{n}.gguf", "Q4_K_M", threads=n).output) for n in (1, 2, 3, 13, 47)}
    assert len(hashes) == 1
