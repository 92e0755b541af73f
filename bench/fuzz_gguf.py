"""Fuzzing moegraph with mutated GGUF files: does every bad file end in a clear error?

    python bench/fuzz_gguf.py --load 10000 --forward 1000 -o bench/results/fuzz.json

Seeds are small random models written by moegraph.testing (several architectures and types).
Each mutant is one of: bit flips (mostly in the header), a header field (a count, a length, a
type, a dimension, an offset) set to a boundary value, a truncation, a chunk of the header
deleted or duplicated, or non-finite / extreme numbers written into the tensor data.

Mutants go to worker processes (a memory cap through RLIMIT_AS) one at a time; a worker that
does not answer within the timeout is a hang and is killed, one that dies is a crash. Outcomes:
  ok         loaded (and, with --forward, compiled and run on numpy and llvm)
  error      a MoeGraphError (the message is kept: it must name the problem)
  unclean    any other exception: a bug (the traceback's last line is kept)
  crash      the worker died (signal or exit code)
  hang       no answer within --timeout seconds
With --forward, loadable mutants are compiled and run on the numpy and llvm backends; the two
must agree (both raise the same error class, or both return logits with the same arg-max and
KL below 1e-2 where the numbers are finite). Prints a table; -o writes the JSON (every
non-clean case with its mutation); --keep DIR keeps those mutants' files."""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BOUNDARY = [0, 1, 2, 3, 7, 8, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
            2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
NONFINITE = [float("nan"), float("inf"), float("-inf"), 65504.0, -65504.0, 1e-8, 3e38]


# --------------------------------------------------------------------------- seeds
def make_seeds(folder: Path) -> list[Path]:
    from moegraph.testing import write_random_model
    specs = [("qwen3moe", "Q8_0", {}), ("qwen3moe", "Q4_K_M", {"n_embd": 256, "n_ff_exp": 256}),
             ("qwen2moe", "F16", {"n_ff_shexp": 64}), ("llama", "Q4_0", {"n_expert": 4}),
             ("llama", "F32", {"n_expert": 0}), ("qwen3moe", "Q6_K", {"n_embd": 256, "n_ff_exp": 256,
                                                                      "tied_output": True})]
    out = []
    for i, (arch, dtype, kw) in enumerate(specs):
        p = folder / f"seed-{i}-{arch}-{dtype}.gguf"
        write_random_model(p, arch, dtype=dtype, n_layer=2, n_vocab=300, seed=i, **kw)
        out.append(p)
    return out


# --------------------------------------------------------------------------- header layout
def header_fields(blob: bytes) -> tuple[list[tuple[int, int, str]], int]:
    """(offset, size, what) of every field of the header, and where the tensor data starts.
    A plain walk of the format (GGUF v3), independent of moegraph's reader."""
    fields: list[tuple[int, int, str]] = []
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        fields.append((pos, size, what))
        v = struct.unpack_from("<" + fmt, blob, pos)[0]
        pos += size
        return v

    def string(what: str) -> None:
        nonlocal pos
        n = take("Q", what + ".len")
        fields.append((pos, n, what + ".bytes"))
        pos += n
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t: int, what: str) -> None:
        nonlocal pos
        if t in scalar:
            take(scalar[t], what)
        elif t == 8:
            string(what)
        elif t == 9:
            et = take("I", what + ".elem_type")
            n = take("Q", what + ".count")
            for j in range(min(n, 64)):
                value(et, f"{what}[{j}]")
            if n > 64:                         # skip the rest without recording fields
                if et == 8:
                    for _ in range(n - 64):
                        (ln,) = struct.unpack_from("<Q", blob, pos)
                        pos += 8 + ln
                else:
                    pos += (n - 64) * struct.calcsize(scalar[et])
        else:
            raise ValueError(f"type {t}")
    take("I", "magic")
    take("I", "version")
    n_tensors = take("Q", "n_tensors")
    n_kv = take("Q", "n_kv")
    for i in range(n_kv):
        string(f"kv{i}.key")
        value(take("I", f"kv{i}.type"), f"kv{i}.value")
    for i in range(n_tensors):
        string(f"t{i}.name")
        nd = take("I", f"t{i}.n_dims")
        for d in range(nd):
            take("Q", f"t{i}.dim{d}")
        take("I", f"t{i}.type")
        take("Q", f"t{i}.offset")
    align = 32
    data = pos + (-pos % align)
    return fields, data


# --------------------------------------------------------------------------- mutations
def mutate(blob: bytes, fields, data_start: int, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(blob)
    kind = rng.choices(["bitflip", "field", "truncate", "splice", "data"], [25, 35, 10, 10, 20])[0]
    if kind == "bitflip":
        n = rng.choice([1, 1, 2, 4, 8])
        hi = data_start if rng.random() < 0.8 else len(b)
        offs = [rng.randrange(hi) for _ in range(n)]
        for o in offs:
            b[o] ^= 1 << rng.randrange(8)
        return bytes(b), f"bitflip {offs}"
    if kind == "field":
        off, size, what = rng.choice([f for f in fields if f[1] in (1, 2, 4, 8)])
        v = rng.choice(BOUNDARY) if rng.random() < 0.7 else \
            int.from_bytes(b[off:off + size], "little") + rng.choice([-2, -1, 1, 2, 16, 1000])
        v %= 1 << (8 * size)
        b[off:off + size] = v.to_bytes(size, "little")
        return bytes(b), f"field {what}@{off} = {v}"
    if kind == "truncate":
        cut = rng.randrange(data_start + 64) if rng.random() < 0.7 else rng.randrange(len(b))
        return bytes(b[:cut]), f"truncate at {cut}"
    if kind == "splice":
        a = rng.randrange(data_start)
        n = rng.randrange(1, 64)
        if rng.random() < 0.5:
            return bytes(b[:a] + b[a + n:]), f"delete {n} bytes at {a}"
        return bytes(b[:a] + b[a:a + n] + b[a:]), f"duplicate {n} bytes at {a}"
    # data: numbers written into the tensor data (as f16 or f32), a few places or a run
    fmt = rng.choice(["<e", "<f"])
    v = rng.choice(NONFINITE)
    if fmt == "<e" and abs(v) > 65504:
        v = float("inf") if v > 0 else float("-inf")
    size = struct.calcsize(fmt)
    start = data_start + rng.randrange(max(1, (len(b) - data_start) // size)) * size
    n = rng.choice([1, 1, 8, 256])
    for k in range(n):
        o = start + k * size * rng.choice([1, 17])
        if o + size <= len(b):
            b[o:o + size] = struct.pack(fmt, v)
    return bytes(b), f"data {fmt} {v} x{n} at {start}"


# --------------------------------------------------------------------------- worker
def _summary(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def worker(mode: str, mem_gib: float) -> None:
    import resource
    lim = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import numpy as np

    import moegraph
    for line in sys.stdin:
        path = line.strip()
        out: dict = {}
        try:
            m = moegraph.load(path)
            out["status"] = "ok"
            if mode == "forward":
                results = {}
                for backend in ("numpy", "llvm"):
                    try:
                        s = m.compile(backend=backend, n_ctx=16, n_threads=2)
                        ids = [i % m.config.n_vocab for i in (1, 2, 3, 5)]
                        results[backend] = ("ok", s.forward(ids))
                    except moegraph.MoeGraphError as e:
                        results[backend] = ("error", type(e).__name__, _summary(e))
                a, b = results["numpy"], results["llvm"]
                if a[0] != b[0] or (a[0] == "error" and a[1] != b[1]):
                    out["disagree"] = f"numpy {a[0]} {a[1] if a[0] == 'error' else ''} vs llvm {b[0]} " \
                                      f"{b[1] if b[0] == 'error' else ''}"
                elif a[0] == "ok":
                    la, lb = a[1].astype(np.float64), b[1].astype(np.float64)
                    pa = np.exp(la - la.max(-1, keepdims=True))
                    pa /= pa.sum(-1, keepdims=True)
                    pb = np.exp(lb - lb.max(-1, keepdims=True))
                    pb /= pb.sum(-1, keepdims=True)
                    kl = float(np.mean(np.sum(pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30)), -1)))
                    out["kl"] = kl
                    if kl > 1e-2:
                        out["disagree"] = f"KL {kl:.3g}"
                out["forward"] = [r[0] if r[0] == "ok" else r[2] for r in (a, b)]
                out["forward_kind"] = "/".join(r[0] if r[0] == "ok" else r[1] for r in (a, b))
        except moegraph.MoeGraphError as e:
            out = {"status": "error", "msg": _summary(e)}
        except Exception as e:                     # noqa: BLE001 (that is what we look for)
            out = {"status": "unclean", "msg": _summary(e)}
        print(json.dumps(out), flush=True)


class Worker:
    def __init__(self, mode: str, mem_gib: float, env: dict):
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", mode, "--mem-gib", str(mem_gib)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=env)

    def ask(self, path: Path, timeout: float) -> dict:
        t0 = time.perf_counter()
        try:
            self.p.stdin.write(f"{path}\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            return {"status": "crash", "msg": f"worker gone (rc {self.p.poll()})"}
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            self.p.kill()
            self.p.wait()
            return {"status": "hang", "msg": f"no answer in {timeout} s"}
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait()
            return {"status": "crash", "msg": f"worker died: rc {rc}" + (f" (signal {-rc})" if rc < 0 else "")}
        out = json.loads(line)
        out["seconds"] = time.perf_counter() - t0
        return out

    def alive(self) -> bool:
        return self.p.poll() is None

    def close(self) -> None:
        if self.alive():
            self.p.stdin.close()
            self.p.wait(timeout=30)


def campaign(mode: str, n: int, seeds: list[Path], folder: Path, rng: random.Random, timeout: float,
             mem_gib: float, env: dict, want_loadable: bool = False, keep: Path | None = None) -> dict:
    """n mutants through a worker; with want_loadable, mutants that fail to load are not
    counted (the forward campaign runs n files that load)."""
    blobs = [(p.name, p.read_bytes()) for p in seeds]
    layouts = [header_fields(b) for _, b in blobs]
    stats: Counter = Counter()
    kinds: Counter = Counter()
    problems, messages, forward = [], Counter(), Counter()
    w = Worker(mode, mem_gib, env)
    done = tried = 0
    t0 = time.perf_counter()
    while done < n:
        k = rng.randrange(len(blobs))
        name, blob = blobs[k]
        mutant, how = mutate(blob, *layouts[k], rng)
        path = folder / "mutant.gguf"
        path.write_bytes(mutant)
        tried += 1
        if not w.alive():
            w = Worker(mode, mem_gib, env)
        res = w.ask(path, timeout)
        if want_loadable and res["status"] == "error":
            continue                              # not loadable: does not count for forward
        done += 1
        stats[res["status"]] += 1
        kinds[how.split()[0]] += 1
        if res["status"] == "error":
            messages[res["msg"].split(":")[0]] += 1
        if "forward_kind" in res:
            forward[res["forward_kind"]] += 1
        if res["status"] in ("unclean", "crash", "hang") or res.get("disagree"):
            problems.append({"seed": name, "mutation": how, **res})
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                kept = keep / f"{mode}-problem-{len(problems)}.gguf"
                kept.write_bytes(mutant)
                problems[-1]["file"] = str(kept)
        if done % 500 == 0:
            print(f"  {mode}: {done}/{n} ({dict(stats)}) {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    w.close()
    return {"mode": mode, "files": done, "generated": tried, "outcomes": dict(stats),
            "mutations": dict(kinds), "error_kinds": dict(messages.most_common()),
            "forward_numpy_llvm": dict(forward.most_common()),
            "disagreements": sum(1 for p in problems if p.get("disagree")),
            "problems": problems, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=10000, help="mutants through moegraph.load")
    ap.add_argument("--forward", type=int, default=1000, help="loadable mutants compiled and run on numpy and llvm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per file before it counts as a hang")
    ap.add_argument("--mem-gib", type=float, default=8.0, help="address-space cap of a worker")
    ap.add_argument("-o", "--output", help="write the JSON report here")
    ap.add_argument("--keep", type=Path, help="keep the mutants that found a problem in this folder")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.mem_gib)
        return 0
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="moegraph-fuzz-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MOEGRAPH_CACHE": str(folder / "cache"), "OPENBLAS_NUM_THREADS": "1"}
        seeds = make_seeds(folder)
        report = {"seeds": [p.name for p in seeds], "seed": args.seed, "timeout_s": args.timeout,
                  "mem_gib": args.mem_gib, "campaigns": []}
        if args.load:
            report["campaigns"].append(campaign("load", args.load, seeds, folder, rng, args.timeout,
                                                args.mem_gib, env, keep=args.keep))
        if args.forward:
            report["campaigns"].append(campaign("forward", args.forward, seeds, folder, rng, args.timeout,
                                                args.mem_gib, env, want_loadable=True, keep=args.keep))
        bad = 0
        print(f"{'campaign':<9} {'files':>6} {'ok':>6} {'error':>6} {'unclean':>7} {'crash':>5} "
              f"{'hang':>4} {'disagree':>8} {'seconds':>8}")
        for c in report["campaigns"]:
            o = c["outcomes"]
            print(f"{c['mode']:<9} {c['files']:>6} {o.get('ok', 0):>6} {o.get('error', 0):>6} "
                  f"{o.get('unclean', 0):>7} {o.get('crash', 0):>5} {o.get('hang', 0):>4} "
                  f"{c['disagreements']:>8} {c['seconds']:>8}")
            bad += o.get("unclean", 0) + o.get("crash", 0) + o.get("hang", 0) + c["disagreements"]
            if c["forward_numpy_llvm"]:
                print("  forward (numpy/llvm): " + ", ".join(f"{k} {v}" for k, v in c["forward_numpy_llvm"].items()))
            for p in c["problems"][:20]:
                print(f"  {p['status']}: {p['seed']}: {p['mutation']}: {p.get('msg') or p.get('disagree')}")
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
