"""Speed idle and under load: moegraph (and llama.cpp beside it) on the same file and threads,
first on an idle machine, then with busy background processes (the "other work" users run beside
inference), then with more threads than cores. Prints JSON (-o json) or a table.

    python bench/under_load.py [-m FILE] [-t 2] [--busy 2] [--nice 10] [--compare llama.cpp]

Conditions: idle; --busy N processes spinning at nice --nice (a background build); and -t twice the
cores (oversubscribed), idle. The busy processes start before and stop after each condition's runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import moegraph
from moegraph.bench import bench_llama_cpp, bench_moegraph
from moegraph.data import DEFAULT_MODEL

BUSY = "import os, sys; os.nice(int(sys.argv[1]))\nwhile True: pass"


def busy_processes(n: int, nice: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY, str(nice)]) for _ in range(n)]
    time.sleep(0.5)                       # let them reach their loops
    return procs


def stop(procs) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run(args, threads: int, busy: int) -> list[dict]:
    model = moegraph.load(args.model)
    n_ctx = max(512, args.n_prompt + args.n_gen + 8)
    session = model.compile(backend="llvm", n_ctx=n_ctx, n_threads=threads)
    procs = busy_processes(busy, args.nice) if busy else []
    try:
        results = bench_moegraph(session, args.n_prompt, args.n_gen, args.repetitions)
        if args.compare:
            results += bench_llama_cpp(args.model, threads, n_ctx, args.n_prompt, args.n_gen,
                                       args.repetitions)
    finally:
        stop(procs)
    return [r.to_json() for r in results]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=str(DEFAULT_MODEL))
    ap.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--busy", type=int, default=2, help="background processes in the loaded condition")
    ap.add_argument("--nice", type=int, default=10, help="their niceness")
    ap.add_argument("--compare", choices=["llama.cpp"])
    ap.add_argument("-o", "--output", choices=["table", "json"], default="table")
    args = ap.parse_args(argv)
    conditions = [("idle", args.threads, 0), (f"{args.busy} busy (nice {args.nice})", args.threads, args.busy),
                  (f"-t {2 * args.threads} (oversubscribed)", 2 * args.threads, 0)]
    report = {"model": os.path.basename(args.model), "cores": len(os.sched_getaffinity(0)), "conditions": []}
    for name, threads, busy in conditions:
        report["conditions"].append({"condition": name, "threads": threads, "busy": busy,
                                     "results": run(args, threads, busy)})
    idle = {(r["engine"], r["test"]): r["tokens_per_s"] for r in report["conditions"][0]["results"]}
    for c in report["conditions"]:
        for r in c["results"]:
            r["of_idle"] = round(r["tokens_per_s"] / idle[(r["engine"], r["test"])], 3)
    if args.output == "json":
        print(json.dumps(report, indent=1))
        return 0
    print(f"model {report['model']}, {report['cores']} cores")
    print("| condition | engine | test | t/s | of idle |")
    print("| --- | --- | --- | ---: | ---: |")
    for c in report["conditions"]:
        for r in c["results"]:
            print(f"| {c['condition']} | {r['engine']} | {r['test']} | {r['tokens_per_s']:.1f} | {r['of_idle']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
