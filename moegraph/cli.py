"""The `moegraph` command line, with llama.cpp's habits (-m model, -p prompt, -n n_predict,
-c ctx size, -s seed, ...).

    moegraph inspect model.gguf                     metadata, hyper-parameters, tensor table
    moegraph run -p "In the beginning" -n 32        generate (streams to stdout, timings to stderr)
    moegraph perplexity -m model.gguf -f text.txt   llama-perplexity's protocol
    moegraph dump --format dot -o graph.dot         the model graph (text, DOT/SVG, JSON)

Errors that are the user's (a missing or corrupt file, a prompt longer than the context, ...) are
printed as `moegraph: error: <message>` with exit status 1; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .errors import MoeGraphError

DEFAULT_PROMPT = "In the beginning God created"


# --------------------------------------------------------------------------- helpers
def _default_model() -> Path:
    from .data import DEFAULT_MODEL
    return DEFAULT_MODEL


def _default_backend() -> str:
    try:
        from moegraph.backends import default_backend
        return default_backend()
    except ImportError:
        return "numpy"


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoeGraphError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MoeGraphError(f"{path}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise MoeGraphError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise MoeGraphError(f"{path}: cannot read: {e.strerror or e}") from None


def _write_text(path: str | Path, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise MoeGraphError(f"{path}: cannot write: {e.strerror or e}") from None


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _ctx_size(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = the model's), got {s}")
    return v


def _chunk_size(s: str) -> int:
    v = int(s)
    if v < 2:
        raise argparse.ArgumentTypeError(f"a chunk needs at least 2 tokens, got {s}")
    return v


def _top_p(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _token_list(s: str) -> list[int]:
    try:
        return [int(t) for t in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {s!r}") from None


def _load(path):
    from .runtime import load
    return load(path)


def _compile(model, args, n_ctx: int | None):
    if n_ctx and n_ctx > model.config.n_ctx_train:
        _err(f"moegraph: warning: n_ctx {n_ctx} is larger than the {model.config.n_ctx_train} "
             "tokens the model was trained with")
    options = {"n_threads": args.threads} if getattr(args, "threads", None) else {}
    return model.compile(backend=args.backend or _default_backend(), n_ctx=n_ctx,
                         kv_type=args.kv_type, **options)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_value(v, limit: int = 8, width: int = 96) -> str:
    """A metadata value on one line: long arrays (the vocabulary) summarized by their length."""
    if isinstance(v, (list, tuple)):
        if len(v) > limit:
            return f"[{len(v)} items]"
        return "[" + ", ".join(_fmt_value(x, limit, width) for x in v) + "]"
    if isinstance(v, str):
        s = repr(v) if len(v) <= width else repr(v[:width]) + f"... ({len(v)} chars)"
        return s
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _json_value(v, limit: int = 64):
    from .dump import json_safe
    if isinstance(v, (list, tuple)) and len(v) > limit:
        return f"[{len(v)} items]"
    return json_safe(v)


# --------------------------------------------------------------------------- inspect
def _tensor_infos(path: Path) -> list[dict]:
    """All tensors of the file, including the types moegraph cannot compute with."""
    import gguf
    reader = gguf.GGUFReader(path, "r")
    return [{"name": t.name, "type": t.tensor_type.name,
             "shape": [int(d) for d in reversed(t.shape.tolist())],
             "n_elements": int(t.n_elements), "nbytes": int(t.n_bytes)} for t in reader.tensors]


def cmd_inspect(args) -> int:
    from .dump import fmt_bytes, json_safe
    from .gguf_file import GGUFFile
    from .models import config_from_gguf
    f = GGUFFile(args.file)
    try:
        cfg, cfg_error = config_from_gguf(f).summary(), None
    except MoeGraphError as e:
        cfg, cfg_error = None, str(e)
    tensors = _tensor_infos(f.path)
    total_bytes = sum(t["nbytes"] for t in tensors)
    total_params = sum(t["n_elements"] for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t["type"]] = by_type.get(t["type"], 0) + 1
    if args.json:
        out = {"file": str(f.path), "file_size": f.file_size, "gguf_version": f.version,
               "architecture": f.architecture, "config": json_safe(cfg), "config_error": cfg_error,
               "metadata": {k: _json_value(v) for k, v in f.metadata.items()},
               "tensors": tensors,
               "totals": {"n_tensors": len(tensors), "n_elements": total_params,
                          "nbytes": total_bytes, "types": by_type},
               "unsupported": dict(f.unsupported)}
        print(json.dumps(out, indent=1))
        return 0
    p = print
    p(f"file:         {f.path} ({fmt_bytes(f.file_size)}, GGUF v{f.version})")
    p(f"architecture: {f.architecture}")
    p(f"name:         {f.get('general.name', '')}")
    p("")
    p("hyper-parameters:")
    if cfg is None:
        p(f"  unavailable: {cfg_error}")
    else:
        w = max(len(k) for k in cfg)
        for k, v in cfg.items():
            p(f"  {k:<{w}}  {_fmt_value(v)}")
    p("")
    p(f"metadata ({len(f.metadata)} keys):")
    w = max((len(k) for k in f.metadata), default=0)
    for k, v in f.metadata.items():
        p(f"  {k:<{w}}  {_fmt_value(v)}")
    p("")
    p(f"tensors ({len(tensors)}):")
    wn = max((len(t["name"]) for t in tensors), default=4)
    p(f"  {'name':<{wn}}  {'type':<6}  {'shape':<20}  {'bytes':>12}")
    for t in tensors:
        mark = "  (unsupported)" if t["name"] in f.unsupported else ""
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        p(f"  {t['name']:<{wn}}  {t['type']:<6}  {shape:<20}  {t['nbytes']:>12,}{mark}")
    types = ", ".join(f"{k} {v}" for k, v in sorted(by_type.items()))
    p(f"  total: {len(tensors)} tensors, {total_params:,} parameters, {total_bytes:,} bytes "
      f"({fmt_bytes(total_bytes)}); types: {types}")
    p("")
    if f.unsupported:
        p(f"unsupported tensors ({len(f.unsupported)}): moegraph cannot compute with their types")
        for name, t in f.unsupported.items():
            p(f"  {name}: {t}")
    else:
        p("unsupported tensors: none (moegraph can compute with every tensor type in this file)")
    return 0


# --------------------------------------------------------------------------- run
def _chain(first: str, rest):
    yield first
    yield from rest


def cmd_run(args) -> int:
    t0 = time.perf_counter()
    model = _load(args.model)
    load_s = time.perf_counter() - t0
    n_ctx = args.ctx_size or None
    t0 = time.perf_counter()
    session = _compile(model, args, n_ctx)
    compile_s = time.perf_counter() - t0
    if args.prompt_tokens is not None:
        prompt = args.prompt_tokens
    elif args.file:
        prompt = _read_text(args.file)
    else:
        prompt = args.prompt
    seed = args.seed if args.seed is not None and args.seed >= 0 else random.randrange(2**32)
    n_predict = args.n_predict if args.n_predict >= 0 else session.n_ctx
    _err(f"moegraph: model {model.path.name} ({model.config.arch}), backend {session.backend}, "
         f"n_ctx {session.n_ctx}, kv {args.kv_type}, seed {seed}, temp {args.temp:g}, "
         f"top_k {args.top_k}, top_p {args.top_p:g}")
    out = sys.stdout
    pieces = session.generate(prompt, max_tokens=n_predict, temperature=args.temp,
                              top_k=args.top_k, top_p=args.top_p, seed=seed)
    first = next(pieces, "")   # the prompt is checked and evaluated here: echo it only after
    if isinstance(prompt, str) and args.display_prompt:
        out.write(prompt)
    for piece in _chain(first, pieces):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    st = session.stats

    def line(label, n, s, unit):
        ms = s * 1e3
        per = ms / n if n else 0.0
        tps = n / s if s else 0.0
        return (f"moegraph: {label:>16} = {ms:10.2f} ms / {n:5d} {unit} "
                f"({per:8.2f} ms per token, {tps:8.2f} tokens per second)")
    _err("")
    _err(f"moegraph: {'load time':>16} = {load_s * 1e3:10.2f} ms")
    _err(f"moegraph: {'compile time':>16} = {compile_s * 1e3:10.2f} ms")
    _err(line("prompt eval time", st.n_prompt, st.prompt_s, "tokens"))
    _err(line("eval time", st.n_generated, st.generate_s, "runs  "))
    _err(f"moegraph: {'total time':>16} = {(load_s + compile_s + st.prompt_s + st.generate_s) * 1e3:10.2f} ms"
         f" / {st.n_prompt + st.n_generated:5d} tokens")
    return 0


# --------------------------------------------------------------------------- perplexity
def cmd_perplexity(args) -> int:
    from tqdm import tqdm
    text = _read_text(args.file)
    model = _load(args.model)
    ctx = args.ctx_size
    t0 = time.perf_counter()
    session = _compile(model, args, ctx)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = model.tokenizer.encode(text)
    tokenize_s = time.perf_counter() - t0
    total = len(ids) // ctx
    n_chunks = total if args.chunks is None else min(args.chunks, total)
    _err(f"moegraph: tokenized {len(ids)} tokens in {tokenize_s * 1e3:.0f} ms; "
         f"{n_chunks} of {total} chunks of {ctx} tokens; backend {session.backend} "
         f"(compiled in {compile_s * 1e3:.0f} ms)")
    if total == 0:   # the library says what is wrong (too few tokens for one chunk)
        session.perplexity(ids, ctx=ctx)
    bar = tqdm(total=n_chunks, desc="perplexity", unit="chunk", file=sys.stderr, dynamic_ncols=True)

    seen: list[float] = []

    def progress(done, n, *extra):
        # Session.perplexity calls progress(done, total); when it also passes the chunk NLLs so
        # far (a list) or the last chunk's NLL (a float), the bar shows the running PPL.
        if extra and extra[0] is not None:
            v = extra[0]
            seen[:] = seen + [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]
            if seen:
                bar.set_postfix_str(f"PPL {math.exp(sum(seen) / len(seen)):.4f}", refresh=False)
        bar.update(done - bar.n)

    try:
        res = session.perplexity(ids, ctx=ctx, n_chunks=n_chunks,
                                 progress=progress)
    finally:
        bar.close()
    nll = res.chunk_nll
    if len(nll) > 1:
        mean = sum(nll) / len(nll)
        sd = math.sqrt(sum((x - mean) ** 2 for x in nll) / (len(nll) - 1))
        ppl_se = res.ppl * sd / math.sqrt(len(nll))    # delta method: d exp(m) = exp(m) dm
    else:
        ppl_se = float("nan")
    n_eval = len(nll) * ctx
    tps = n_eval / res.seconds if res.seconds else 0.0
    se = f"{ppl_se:.4f}" if math.isfinite(ppl_se) else "n/a (one chunk)"
    print(f"PPL = {res.ppl:.4f} +/- {se}")
    print(f"{res.n_predictions} predictions in {len(nll)} chunks of {ctx} tokens, "
          f"{res.seconds:.2f} s ({tps:.1f} tokens/s)")
    if args.output:
        result = {"ppl": res.ppl, "ppl_stderr": ppl_se if math.isfinite(ppl_se) else None,
                  "mean_nll": res.mean_nll, "chunk_nll": list(nll),
                  "n_predictions": res.n_predictions, "n_chunks": len(nll),
                  "seconds": res.seconds, "tokens_per_s": tps, "model": str(model.path),
                  "settings": {"text": str(args.file), "n_tokens": len(ids), "ctx": ctx,
                               "chunks": args.chunks, "kv_type": args.kv_type,
                               "backend": session.backend}}
        _write_text(args.output, json.dumps(result, indent=1) + "\n")
        _err(f"moegraph: wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- dump
def _run_passes(graph, names: list[str], dump_each=None):
    import importlib
    try:
        passes = importlib.import_module("moegraph.passes")
    except ImportError:
        passes = None
    run = getattr(passes, "run_passes", None)
    if run is None:
        raise MoeGraphError("graph passes are not available yet (moegraph.passes has no "
                            "run_passes); dump the graph without --passes")
    return run(graph, names, dump_each=dump_each)


def _render(graph, fmt: str) -> str:
    from .dump import to_dot, to_json_text, to_text
    return {"text": to_text, "dot": to_dot, "json": to_json_text}[fmt](graph)


def _emit(text: str, out: str | None, fmt: str) -> None:
    from .dump import render_svg
    if not out:
        sys.stdout.write(text)
        return
    _write_text(out, text)
    _err(f"moegraph: wrote {out}")
    if fmt == "dot":
        p = Path(out)
        svg = p.with_suffix(".svg") if p.suffix == ".dot" else Path(out + ".svg")
        if render_svg(text, svg):
            _err(f"moegraph: wrote {svg}")
        else:
            _err("moegraph: Graphviz `dot` is not on PATH: no SVG rendered "
                 f"(install graphviz, then `dot -Tsvg {out} -o {svg}`)")


def cmd_dump(args) -> int:
    from .ir import op_table_markdown
    if args.ops:
        print(op_table_markdown())
        return 0
    if (args.after_each or args.diff) and not args.passes:
        raise MoeGraphError("--after-each and --diff need --passes")
    model = _load(args.model)
    graph = model.graph(args.ctx_size or None, args.kv_type)
    if args.passes:
        from .dump import diff_text, to_text
        names = [s.strip() for s in args.passes.split(",") if s.strip()]
        prev = {"text": to_text(graph), "name": "input"}
        step = [0]

        def dump_each(name, g):
            step[0] += 1
            if args.after_each:
                base = f"{args.output}.{step[0]:02d}.{name}" if args.output else None
                if base is None:
                    print(f"### after {name}")
                _emit(_render(g, args.format), base and f"{base}.{args.format}", args.format)
            if args.diff:
                cur = to_text(g)
                sys.stdout.write(diff_text(prev["text"], cur, prev["name"], name)
                                 or f"### {name}: no change\n")
                prev.update(text=cur, name=name)

        graph = _run_passes(graph, names, dump_each if (args.after_each or args.diff) else None)
        if args.diff:
            return 0
    _emit(_render(graph, args.format), args.output, args.format)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show Python tracebacks of errors")
    p = argparse.ArgumentParser(
        prog="moegraph", parents=[debug],
        description="A graph compiler for Mixture-of-Experts LLM inference from GGUF files.",
        epilog="Run `moegraph COMMAND -h` for the options of a command.")
    p.add_argument("--version", action="version", version=f"moegraph {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_opts(sp, ctx_default=0, ctx_help="context size (0 = the model's, at most 4096)",
                   ctx_type=_ctx_size):
        sp.add_argument("-m", "--model", default=str(_default_model()), metavar="FILE",
                        help="GGUF model (default: the bundled tiny-qwen3moe-kjv Q8_0)")
        sp.add_argument("-c", "--ctx-size", type=ctx_type, default=ctx_default, metavar="N", help=ctx_help)
        sp.add_argument("--kv-type", choices=["f16", "f32"], default="f16",
                        help="KV cache type (default: f16)")

    def backend_opts(sp):
        sp.add_argument("-b", "--backend", default=None,
                        help=f"backend: numpy, llvm, cuda (default: {_default_backend()})")
        sp.add_argument("-t", "--threads", type=_positive_int, default=None, metavar="N",
                        help="threads (backends that use them)")

    sp = sub.add_parser("inspect", parents=[debug], help="GGUF metadata, hyper-parameters and tensors",
                        description="Print a GGUF file's architecture, hyper-parameters, metadata "
                                    "and tensor table.")
    sp.add_argument("file", metavar="FILE", help="GGUF file")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_inspect)

    for name in ("run", "generate"):
        sp = sub.add_parser(name, parents=[debug], help="generate text from a prompt"
                            + (" (alias of run)" if name == "generate" else ""),
                            description="Generate text; streams to stdout, timings to stderr.")
        model_opts(sp)
        sp.add_argument("-p", "--prompt", default=DEFAULT_PROMPT,
                        help=f"prompt (default: {DEFAULT_PROMPT!r})")
        sp.add_argument("-f", "--file", metavar="FILE", help="read the prompt from a file")
        sp.add_argument("--prompt-tokens", type=_token_list, default=None, metavar="IDS",
                        help="the prompt as token ids (comma-separated) instead of text")
        sp.add_argument("-n", "--n-predict", type=int, default=128, metavar="N",
                        help="tokens to generate (-1 = until end of text or a full context)")
        sp.add_argument("--temp", type=float, default=0.8, help="temperature (0 = greedy)")
        sp.add_argument("--top-k", type=int, default=40, help="top-k sampling (0 = off)")
        sp.add_argument("--top-p", type=_top_p, default=0.95, help="top-p sampling (1 = off)")
        sp.add_argument("-s", "--seed", type=int, default=None,
                        help="random seed (default / -1: a random one, printed)")
        sp.add_argument("--no-display-prompt", dest="display_prompt", action="store_false",
                        help="do not echo the prompt")
        backend_opts(sp)
        sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("perplexity", parents=[debug], help="perplexity of a text file",
                        description="llama-perplexity's protocol: non-overlapping chunks of -c "
                                    "tokens, the second half of each chunk scored.")
    model_opts(sp, ctx_default=128, ctx_help="chunk size in tokens (default: 128)",
               ctx_type=_chunk_size)
    sp.add_argument("-f", "--file", required=True, metavar="FILE", help="text file")
    sp.add_argument("--chunks", type=_positive_int, default=None, metavar="N",
                    help="evaluate at most N chunks")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the result as JSON")
    backend_opts(sp)
    sp.set_defaults(func=cmd_perplexity)

    sp = sub.add_parser("dump", parents=[debug], help="dump the model graph (text, DOT/SVG, JSON)",
                        description="Dump the model's graph. With -o and --format dot, also "
                                    "renders OUT.svg when Graphviz is installed.")
    model_opts(sp)
    sp.add_argument("--format", choices=["text", "dot", "json"], default="text")
    sp.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    sp.add_argument("--ops", action="store_true", help="print the op table (markdown) and exit")
    g = sp.add_argument_group("passes")
    g.add_argument("--passes", metavar="A,B,C", help="run these graph passes before dumping")
    g.add_argument("--after-each", action="store_true",
                   help="dump the graph after each pass (to OUT.NN.PASS.FMT with -o)")
    g.add_argument("--diff", action="store_true",
                   help="print a unified diff of the text dump across each pass")
    sp.set_defaults(func=cmd_dump)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except MoeGraphError as e:
        if debug:
            traceback.print_exc()
        sys.stdout.flush()
        print(f"moegraph: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        return 130
    except BrokenPipeError:
        # `moegraph dump | head`: the reader went away; stop quietly like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
