"""CUDA backend. Default tier (no GPU needed): NVRTC compiles the generated CUDA C of every fixture
model's graph for sm_80 and sm_90; `backend="cuda"` without a driver is a clear MoeGraphError.
Tier `gpu`: logits against the llama.cpp oracle, incremental decode == full forward."""
from __future__ import annotations

import importlib.resources

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


MODELS = list(_models())


@need_nvrtc
@pytest.mark.parametrize("name,path", MODELS, ids=[m[0] for m in MODELS])
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
    np.testing.assert_allclose(inc, full, rtol=2e-3, atol=2e-3)
