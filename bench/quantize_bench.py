"""Thread scaling of `moegraph quantize` on a many-expert model, beside llama.cpp's quantizer.

    python bench/quantize_bench.py                       # 2 layers x 128 experts of 768x512, Q4_K_M
    python bench/quantize_bench.py --type Q8_0 --threads 1,2,3,13 --json out.json

Writes a random qwen3moe model in F32 (moegraph.testing.write_random_model), quantizes it with
moegraph at each thread count and, when the optional `llama_cpp` package (llama-cpp-python) is
installed, with llama.cpp's llama_model_quantize at the same thread count, alternating the two in
one run (so both see the same machine load). Reports seconds (wall time of the whole call, file
opening included, as for llama.cpp; and process CPU), MB/s of F32
input, whether every output is byte-identical to moegraph's 1-thread output and to llama.cpp's,
and the speed ratio llama.cpp time / moegraph time (> 1: moegraph is faster). Prints a table and
JSON. The default model is the issue's "512 experts of 2048x512" scaled to a few minutes on a
small machine.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def llama_cpp_quantize(inp: Path, out: Path, ftype: str, threads: int) -> float:
    """llama.cpp's llama_model_quantize (default params, no imatrix); returns wall seconds."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(p))
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return dt


def quiet_llama_logs():
    """llama.cpp logs every tensor to stderr; silence it (the log callback must stay referenced)."""
    import llama_cpp
    cb = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p())
    return cb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_K_M", help="file type (default Q4_K_M)")
    ap.add_argument("--threads", default="1,2,3,13", help="thread counts (default 1,2,3,13)")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-expert", type=int, default=128)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-ff-exp", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the best is kept)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    ap.add_argument("--model", help="use this F32 GGUF instead of writing a random one")
    ap.add_argument("--workdir", help="where to put the files (default: a temporary folder)")
    ap.add_argument("--json", help="write the results as JSON to this file")
    args = ap.parse_args(argv)

    from moegraph.quantize import quantize, resolve_ftype
    from moegraph.testing import write_random_model
    ftype = resolve_ftype(args.type)
    threads = [int(t) for t in args.threads.split(",")]
    have_llama = False
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            have_llama = True
            _keep = quiet_llama_logs()
        except ImportError:
            print("llama_cpp (llama-cpp-python) is not installed: no llama.cpp comparison", file=sys.stderr)

    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    if args.model:
        src = Path(args.model)
    else:
        src = work / "bench-F32.gguf"
        t0 = time.perf_counter()
        write_random_model(src, "qwen3moe", n_layer=args.n_layer, n_embd=args.n_embd, n_head=8,
                           n_head_kv=2, n_expert=args.n_expert, n_expert_used=8,
                           n_ff_exp=args.n_ff_exp, n_vocab=2048, dtype="F32")
        print(f"wrote {src.stat().st_size / 1e6:.0f} MB random model in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    size_mb = src.stat().st_size / 1e6
    # warm-up: page cache and the JIT (compiled or loaded once per process)
    quantize(src, work / "warm.gguf", ftype, threads=max(threads))
    ref_hash = None
    rows = []
    for n in threads:
        row = {"threads": n}
        best = None
        for _ in range(args.repeat):
            out = work / f"mg-{n}.gguf"
            c0, t0 = time.process_time(), time.perf_counter()
            res = quantize(src, out, ftype, threads=n)     # the whole call: open, plan, write
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if best is None or wall < best[0]:
                best = (wall, cpu, res)
        row.update(seconds=round(best[0], 3), cpu_seconds=round(best[1], 3),
                   mb_per_s=round(size_mb / best[0], 1), n_units=best[2].n_units,
                   unit_mb=round(best[2].unit_bytes / 1e6, 2), jit=best[2].jit)
        h = sha256(work / f"mg-{n}.gguf")
        ref_hash = ref_hash or h
        row["identical_to_1_thread"] = h == ref_hash
        if have_llama:
            lbest = min(llama_cpp_quantize(src, work / f"lc-{n}.gguf", ftype, n) for _ in range(args.repeat))
            row["llama_cpp_seconds"] = round(lbest, 3)
            row["llama_cpp_mb_per_s"] = round(size_mb / lbest, 1)
            row["identical_to_llama_cpp"] = sha256(work / f"lc-{n}.gguf") == h
            row["speed_ratio_vs_llama_cpp"] = round(lbest / best[0], 2)
            (work / f"lc-{n}.gguf").unlink()
        if n != threads[0]:
            (work / f"mg-{n}.gguf").unlink()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    result = {"type": ftype, "model_mb": round(size_mb, 1), "cpu_count": os.cpu_count(),
              "model": {"n_layer": args.n_layer, "n_expert": args.n_expert, "n_embd": args.n_embd,
                        "n_ff_exp": args.n_ff_exp} if not args.model else str(args.model),
              "llama_cpp": have_llama, "runs": rows}
    print(f"\nmoegraph quantize {ftype}, {size_mb:.0f} MB F32 model, {os.cpu_count()} CPUs")
    hdr = f"{'threads':>7} {'seconds':>8} {'cpu s':>7} {'MB/s':>7} {'same':>5}"
    if have_llama:
        hdr += f" {'llama.cpp s':>11} {'MB/s':>7} {'same':>5} {'ratio':>6}"
    print(hdr)
    for r in rows:
        line = (f"{r['threads']:>7} {r['seconds']:>8.2f} {r['cpu_seconds']:>7.2f} {r['mb_per_s']:>7.1f} "
                f"{'yes' if r['identical_to_1_thread'] else 'NO':>5}")
        if have_llama:
            line += (f" {r['llama_cpp_seconds']:>11.2f} {r['llama_cpp_mb_per_s']:>7.1f} "
                     f"{'yes' if r['identical_to_llama_cpp'] else 'NO':>5} {r['speed_ratio_vs_llama_cpp']:>6.2f}")
        print(line)
    if have_llama:
        print("ratio = llama.cpp seconds / moegraph seconds (> 1: moegraph faster); same = byte-identical files")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
