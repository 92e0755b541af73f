"""`moegraph bench`: prompt-processing (pp) and generation (tg) speed, llama-bench style.

pp N: one forward of N tokens from an empty KV cache. tg N: N single-token forwards from an empty
cache (teacher-forced, no sampling), the protocol of ../shared/fixtures/oracle/llamacpp_speed.json.
Each test is repeated; the median is reported. With --compare llama.cpp the same file runs in
llama.cpp (the optional `llama_cpp` package) with the same threads, side by side in this process.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import MoeGraphError


@dataclass
class BenchResult:
    engine: str
    test: str
    n_tokens: int
    seconds: list[float] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.n_tokens / statistics.median(self.seconds)

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tps, 2)}


def _tokens(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, n_vocab, size=n).tolist()


def _timed_runs(engine: str, reset, evaluate, n_vocab: int, n_prompt: int, n_gen: int,
                repeats: int) -> list[BenchResult]:
    """pp: one evaluate() of n_prompt tokens; tg: n_gen single-token evaluates; each from an
    empty cache (reset) after a warm-up, `repeats` times."""
    out = []
    for test, n, one_by_one, seed in (("pp", n_prompt, False, 0), ("tg", n_gen, True, 1)):
        if not n:
            continue
        r = BenchResult(engine, f"{test}{n}", n)
        toks = _tokens(n_vocab, n, seed)
        reset()
        evaluate(toks[: min(8, n)])
        for _ in range(repeats):
            reset()
            t0 = time.perf_counter()
            if one_by_one:
                for t in toks:
                    evaluate([t])
            else:
                evaluate(toks)
            r.seconds.append(time.perf_counter() - t0)
        out.append(r)
    reset()
    return out


def bench_moegraph(session, n_prompt: int, n_gen: int, repeats: int) -> list[BenchResult]:
    # logits of the last position only, as llama.cpp computes them (llm.eval below)
    return _timed_runs("moegraph", session.reset, lambda t: session.forward(t, last_only=True),
                       session.model.config.n_vocab,
                       n_prompt, n_gen, repeats)


def bench_llama_cpp(path: str, n_threads: int, n_ctx: int, n_prompt: int, n_gen: int, repeats: int,
                    n_expert_used: int | None = None, arch: str | None = None) -> list[BenchResult]:
    try:
        import llama_cpp
    except ImportError:
        raise MoeGraphError("--compare llama.cpp needs the optional llama_cpp package "
                            "(pip install llama-cpp-python)") from None
    kw = {}
    if n_expert_used and arch:
        kw["kv_overrides"] = {f"{arch}.expert_used_count": int(n_expert_used)}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                          n_threads=n_threads, n_threads_batch=n_threads, verbose=False, **kw)
    return _timed_runs("llama.cpp", llm.reset, llm.eval, llm.n_vocab(), n_prompt, n_gen, repeats)


def add_parser(sub, parents) -> None:
    from .cli import add_backend_options, non_negative_int_arg, positive_int_arg   # the CLI's checks
    sp = sub.add_parser("bench", parents=parents, help="prompt and generation tokens/s (llama-bench style)",
                        description=__doc__)
    sp.add_argument("-m", "--model", default=None, help="GGUF file (default: the bundled model)")
    sp.add_argument("-p", "--n-prompt", type=non_negative_int_arg, default=128, help="prompt tokens (0 = skip)")
    sp.add_argument("-n", "--n-gen", type=non_negative_int_arg, default=64, help="generated tokens (0 = skip)")
    sp.add_argument("-r", "--repetitions", type=positive_int_arg, default=3, help="repeats; the median is reported")
    add_backend_options(sp, threads_help="threads (default: all cores)")
    sp.add_argument("-c", "--ctx-size", type=int, default=0, help="context size (default: p + n, at least 512)")
    sp.add_argument("--passes", default="", help="comma-separated passes to run before compiling")
    sp.add_argument("--n-expert-used", default=None, help="active experts (one k or one per layer)")
    sp.add_argument("--slice-mode", default="soft", choices=["soft", "hard"])
    sp.add_argument("--kv-type", default="f16", choices=["f16", "f32"])
    sp.add_argument("--compare", default=None, choices=["llama.cpp"], help="also run llama.cpp on the same file")
    sp.add_argument("-o", "--output", default="table", choices=["table", "md", "json"],
                    help="output format, as llama-bench's -o (table = md)")
    sp.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import os

    from . import load
    from .cli import backend_choice
    from .data import DEFAULT_MODEL
    path = args.model or str(DEFAULT_MODEL)
    model = load(path)
    threads = args.threads or os.cpu_count() or 1
    n_ctx = args.ctx_size or max(512, args.n_prompt + args.n_gen + 8)
    k = None
    if args.n_expert_used:
        k = [int(x) for x in str(args.n_expert_used).split(",")]
        k = k[0] if len(k) == 1 else k
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    t0 = time.perf_counter()
    backend, options = backend_choice(model, args)
    options.setdefault("n_threads", threads)
    session = model.compile(backend=backend, passes=passes, n_ctx=n_ctx, kv_type=args.kv_type,
                            n_expert_used=k, slice_mode=args.slice_mode, **options)
    compile_s = time.perf_counter() - t0
    results = bench_moegraph(session, args.n_prompt, args.n_gen, args.repetitions)
    if args.compare:
        results += bench_llama_cpp(path, threads, n_ctx, args.n_prompt, args.n_gen, args.repetitions,
                                   k if isinstance(k, int) else None, model.config.arch)
    info = getattr(session.executable, "compile_info", {})
    report = {
        "model": os.path.basename(path), "arch": model.config.arch, "backend": session.backend,
        "threads": threads, "passes": passes, "n_expert_used": k, "slice_mode": args.slice_mode,
        "kv_type": args.kv_type, "compile_s": round(compile_s, 3), "compile_cache": info.get("cache"),
        "cpu": info.get("cpu"), "results": [r.to_json() for r in results],
    }
    ratios = {}
    for r in results:
        if r.engine == "moegraph":
            peer = next((q for q in results if q.engine == "llama.cpp" and q.test == r.test), None)
            if peer:
                ratios[r.test] = round(r.tps / peer.tps, 3)
    report["ratio_vs_llama_cpp"] = ratios
    if args.output == "json":
        print(json.dumps(report, indent=1))
        return 0
    print(f"model {report['model']} ({report['arch']}), backend {report['backend']}, {threads} threads, "
          f"compile {compile_s:.2f} s (cache {report['compile_cache']})", file=sys.stderr)
    print("| engine | test | t/s | median s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in results:
        ratio = ratios.get(r.test, "") if r.engine == "moegraph" else ""
        print(f"| {r.engine} | {r.test} | {r.tps:.1f} | {statistics.median(r.seconds):.4f} | {ratio} |")
    return 0
