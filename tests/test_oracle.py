"""moegraph against llama.cpp's own outputs (../shared/fixtures/oracle, protocols in its README).

Metric: mean over positions of KL(llama.cpp || moegraph) of the next-token distributions, and
arg-max agreement. Tolerances are the core issue's: KL <= 1e-5 and >= 63/64 for F32/F16,
KL <= 1e-2 and >= 60/64 for quantized files (MoE routing turns tiny rounding differences into
different expert choices at a few positions)."""
import json

import numpy as np
import pytest

import moegraph
from conftest import (ORACLE, TINY_TYPES, kl_and_argmax, oracle_logits, oracle_tokens,
                      smollm2_path, tiny_path)

pytestmark = pytest.mark.oracle

TOL = {"F32": (1e-5, 63), "F16": (1e-5, 63), "Q8_0": (1e-2, 60), "Q4_0": (1e-2, 60),
       "Q4_K_M": (1e-2, 60)}


@pytest.fixture(scope="module")
def seq64():
    return oracle_tokens()["tiny_qwen3moe_seq64"]


BACKENDS = ["numpy", "llvm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("qtype", TINY_TYPES)
def test_tiny_logits_match_llama_cpp(qtype, kv, backend, seq64):
    ref = oracle_logits(f"tiny-qwen3moe-kjv-{qtype}" + ("-kvf32" if kv == "f32" else ""))
    session = moegraph.load(tiny_path(qtype)).compile(backend=backend, n_ctx=512, kv_type=kv)
    logits = session.forward(seq64)
    kl, agree = kl_and_argmax(ref, logits)
    max_kl, min_agree = TOL[qtype]
    print(f"{backend} {qtype} kv={kv}: mean KL {kl:.3e}, argmax {agree}/64")
    assert kl <= max_kl and agree >= min_agree, (qtype, kv, kl, agree)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_logits_match_llama_cpp(backend):
    path = smollm2_path()
    ids = oracle_tokens()["smollm2_seq32"]
    ref = oracle_logits("smollm2-135m-Q4_1")
    session = moegraph.load(path).compile(backend=backend, n_ctx=512)
    kl, agree = kl_and_argmax(ref, session.forward(ids))
    print(f"{backend} SmolLM2 Q4_1: mean KL {kl:.3e}, argmax {agree}/32")
    assert kl <= 1e-2 and agree >= 30, (kl, agree)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_perplexity_matches_llama_cpp(qtype, backend, fixtures_dir):
    ref = json.loads((ORACLE / "perplexity.json").read_text())["results"][qtype]["k4"]
    text = (fixtures_dir / "models" / "heldout.txt").read_text(encoding="utf-8")
    session = moegraph.load(tiny_path(qtype)).compile(backend=backend, n_ctx=512)
    res = session.perplexity(text, ctx=128, n_chunks=40)
    print(f"{backend} {qtype}: ppl {res.ppl:.4f} vs llama.cpp {ref['ppl']:.4f}")
    assert res.n_predictions == ref["n_predictions"] == 2520
    assert abs(res.ppl / ref["ppl"] - 1) <= 0.01
