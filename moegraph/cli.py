"""The `moegraph` command line, with llama.cpp's habits (-m model, -p prompt, -n n_predict,
-c ctx size, -s seed, ...).

    moegraph inspect model.gguf                     metadata, hyper-parameters, tensor table
    moegraph run -p "In the beginning" -n 32        generate (streams to stdout, timings to stderr)
    moegraph perplexity -m model.gguf -f text.txt   llama-perplexity's protocol
    moegraph dump --format dot -o graph.dot         the model graph (text, DOT/SVG, JSON)
    moegraph experts -f text.txt -o usage.json      how often each expert is chosen, per layer

run, perplexity and dump take the pass options (add_pass_options): `--passes a,b,c` (`--passes
help` lists them), `--n-expert-used K` (or one per layer) with `--slice-mode soft|hard`, and
`--prune-experts N --calib FILE`. perplexity compares lists of them in one table
(`--n-expert-used 4,3,2,1 --slice-mode soft,hard --prune-experts 12,8`); dump shows what the
passes change (`--after-each`, `--diff`).

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
import re
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


def int_at_least(lo: int, rule: str, not_int=lambda s: ""):
    """An argparse type: an integer >= lo, else an error that states `rule`; `not_int(text)`
    adds a hint to the error for text that is not an integer at all."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}{not_int(s)}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{rule}, got {s}")
        return v
    return parse


positive_int_arg = int_at_least(1, "must be a positive integer")
non_negative_int_arg = int_at_least(0, "must be >= 0")
_n_predict = int_at_least(-1, "must be >= 0, or -1 for until the end of text or a full context")
_ctx_size = int_at_least(0, "must be >= 0 (0 = the model's)", lambda s: (
    " (-cnv, llama.cpp's conversation mode, is `moegraph chat` here)" if s == "nv" else ""))
_chunk_size = int_at_least(2, "a chunk needs at least 2 tokens")


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _temperature(s: str) -> float:
    v = _float(s)
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number (0 or less = greedy), got {s}")
    return v


def _top_p(s: str) -> float:
    v = _float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _unit_float(s: str) -> float:
    v = _float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def _token_list(s: str) -> list[int]:
    try:
        return [int(t) for t in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {s!r}") from None


def _load(path, args=None):
    from .runtime import load
    return load(path, check_tensors=bool(getattr(args, "check_tensors", False)))


def _compile(model, args, n_ctx: int | None, passes=None):
    """Compiles with the backend options of `args`; `passes` defaults to the pipeline that the
    pass options of `args` ask for (--passes, --n-expert-used/--slice-mode, --prune-experts)."""
    if n_ctx and n_ctx > model.config.n_ctx_train:
        _err(f"moegraph: warning: n_ctx {n_ctx} is larger than the {model.config.n_ctx_train} "
             "tokens the model was trained with")
    backend, options = backend_choice(model, args)
    if passes is None:
        passes = _pipeline(model, args)
    return model.compile(backend=backend, n_ctx=n_ctx, kv_type=args.kv_type, passes=passes, **options)


# --------------------------------------------------------------------------- backend options
# llama.cpp's habits: -b/-ub are batch sizes (the backend is --backend), -ngl the layers on the GPU.
_batch_size = int_at_least(1, "must be a positive integer", lambda s: (
    f": -b is the batch size, as in llama.cpp; choose the backend with --backend {s}"))


def add_backend_options(sp, threads_help: str = "threads (backends that use them)") -> None:
    sp.add_argument("--backend", default=None,
                    help=f"backend: numpy, llvm, cuda (default: {_default_backend()})")
    sp.add_argument("-t", "--threads", type=positive_int_arg, default=None, metavar="N", help=threads_help)
    sp.add_argument("-b", "--batch-size", type=_batch_size, default=None, metavar="N",
                    help="tokens evaluated per step at most (llama.cpp's logical batch; default 512)")
    sp.add_argument("-ub", "--ubatch-size", type=_batch_size, default=None, metavar="N",
                    help="tokens per kernel launch at most (llama.cpp's physical batch; the smaller of "
                         "-b and -ub is used)")
    sp.add_argument("-ngl", "--n-gpu-layers", type=int_at_least(0, "must be >= 0"), default=None,
                    metavar="N", help="layers on the GPU: 0 = none (a CPU backend), all of them "
                                      "(e.g. 99) = the cuda backend; a split is not supported")


def backend_choice(model, args) -> tuple[str, dict]:
    """The backend name and compile options that --backend, -t, -b/-ub and -ngl ask for."""
    backend = getattr(args, "backend", None)
    ngl = getattr(args, "n_gpu_layers", None)
    if ngl is not None:
        n_layer = model.config.n_layer
        if 0 < ngl < n_layer:
            raise MoeGraphError(f"-ngl {ngl}: moegraph runs all {n_layer} layers on the GPU or none; "
                                f"offloading only some is not supported (use -ngl 0 or -ngl {n_layer})")
        on_gpu = ngl >= n_layer
        if backend is not None and (backend == "cuda") != on_gpu:
            raise MoeGraphError(f"-ngl {ngl} contradicts --backend {backend}")
        if backend is None and on_gpu:
            from moegraph.backends.cuda import available as cuda_available
            if cuda_available():
                backend = "cuda"
            else:
                _err(f"moegraph: warning: -ngl {ngl}: no usable CUDA GPU here; running on the CPU")
    options = {"n_threads": args.threads} if getattr(args, "threads", None) else {}
    sizes = [v for v in (getattr(args, "batch_size", None), getattr(args, "ubatch_size", None)) if v]
    if sizes:
        options["max_tokens"] = min(sizes)
    return backend or _default_backend(), options


# --------------------------------------------------------------------------- passes and experts
# The pass options of run, perplexity and dump (and bench): `add_pass_options(sp)` adds them,
# `_pipeline(model, args)` turns them into the pass list that `model.compile(passes=...)` takes:
# the --passes in order, then slice_experts (--n-expert-used, --slice-mode), then prune_experts
# (--prune-experts N with the experts most used on --calib). `sweep=True` (perplexity) lets
# --n-expert-used, --slice-mode and --prune-experts take comma lists of configurations to compare.
SLICE_MODES = ("soft", "hard")


def add_pass_options(sp, sweep: bool = False, calib_default: str | None = None) -> None:
    g = sp.add_argument_group("passes and experts")
    g.add_argument("--passes", metavar="A,B,C",
                   help="graph passes to run, in order (`--passes help` lists them)")
    if sweep:
        g.add_argument("--n-expert-used", metavar="K,K,...",
                       help="experts per token: one value, or a list of values to compare (a "
                            "table of PPL vs the model's own count); a per-layer setting is "
                            "written with colons, e.g. 4:4:2:2")
        g.add_argument("--slice-mode", metavar="MODE[,MODE]",
                       help="soft (top-k of all router probabilities, as llama.cpp's "
                            "expert_used_count override) or hard (the first k of the model's "
                            "own top-k, original weights); a list compares both (default: soft)")
        g.add_argument("--prune-experts", metavar="N[,N...]",
                       help="keep only the N experts per layer most used on the calibration "
                            "text; a list adds one row per N to the table")
        g.add_argument("--calib", metavar="FILE",
                       help=f"calibration text for --prune-experts (default: {calib_default})")
    else:
        g.add_argument("--n-expert-used", metavar="K",
                       help="run K experts per token (an int), or one per layer (4,4,2,2)")
        g.add_argument("--slice-mode", choices=SLICE_MODES, default=None,
                       help="soft (default): top-k of all router probabilities, as llama.cpp's "
                            "expert_used_count override; hard: the first k of the model's own "
                            "top-k with their original weights")
        g.add_argument("--prune-experts", type=positive_int_arg, metavar="N",
                       help="keep only the N experts per layer most used on --calib")
        g.add_argument("--calib", metavar="FILE", help="calibration text for --prune-experts")
    g.add_argument("--override-kv", action="append", default=[], metavar="KEY=TYPE:VALUE",
                   help="as llama.cpp's: ARCH.expert_used_count=int:K runs K experts per token "
                        "(the soft slice_experts pass); other keys are refused")
    g.add_argument("--calib-chunks", type=positive_int_arg, default=None, metavar="N",
                   help="use at most N chunks of -c tokens of the calibration text (default: all)")


def _pass_names(text: str | None) -> list[str]:
    """--passes a,b,c -> ['a', 'b', 'c'], each checked against the registry (before any model is
    loaded, so a typo costs nothing)."""
    if not text:
        return []
    from moegraph.passes import parse_pass_list, pass_names
    names = parse_pass_list(text)
    known = pass_names()
    bad = [n for n in names if n not in known]
    if bad:
        raise MoeGraphError(f"unknown pass{'es' if len(bad) > 1 else ''} "
                            f"{', '.join(map(repr, bad))}; available passes: {', '.join(known)} "
                            "(`--passes help` describes them)")
    for name, flags in (("slice_experts", "--n-expert-used K [--slice-mode soft|hard]"),
                        ("prune_experts", "--prune-experts N --calib FILE")):
        if name in names:
            raise MoeGraphError(f"--passes {name}: this pass needs options; use {flags}")
    return names


def _print_pass_help() -> int:
    from moegraph.passes import get_pass, pass_names
    hints = {"slice_experts": "Runs fewer experts per token than the model's expert_used_count "
                              "(use --n-expert-used K [--slice-mode soft|hard])",
             "prune_experts": "Keeps only the listed experts of each layer, slicing the expert "
                              "tensors and the router (use --prune-experts N --calib FILE)"}
    names = pass_names()
    w = max(len(n) for n in names)
    print("available passes (--passes a,b,c runs them in that order):")
    for name in names:
        doc = " ".join((get_pass(name).__doc__ or "").split())
        doc = hints.get(name) or re.split(r"(?<=\.)\s+(?=[A-Z])", doc)[0]   # first sentence
        print(f"  {name:<{w}}  {doc}")
    return 0


def _expert_counts(model) -> tuple[int, int]:
    cfg = model.config
    n_expert, k = int(getattr(cfg, "n_expert", 0) or 0), int(getattr(cfg, "n_expert_used", 0) or 0)
    if n_expert <= 0 or k <= 0:
        raise MoeGraphError(f"{model.path}: the model has no experts "
                            "(--n-expert-used and --prune-experts need a Mixture-of-Experts model)")
    return n_expert, k


def _parse_k(text: str, sep: str) -> int | list[int]:
    """'3' -> 3; '4<sep>4<sep>2<sep>2' -> [4, 4, 2, 2] (one per layer)."""
    try:
        ks = [int(t) for t in text.replace(":", sep).split(sep) if t.strip()]
    except ValueError:
        raise MoeGraphError(f"--n-expert-used: expected integers, got {text!r}") from None
    if not ks:
        raise MoeGraphError("--n-expert-used: no value given")
    if any(k <= 0 for k in ks):
        raise MoeGraphError(f"--n-expert-used: values must be positive, got {text!r}")
    return ks[0] if len(ks) == 1 else ks


def _fmt_k(k) -> str:
    return str(k) if isinstance(k, int) else ":".join(map(str, k))


def _check_k(model, k, mode: str) -> None:
    """The checks slice_experts makes, made before anything is evaluated."""
    n_expert, k_model = _expert_counts(model)
    ks = [k] if isinstance(k, int) else list(k)
    if not isinstance(k, int):
        n_moe = _n_moe_layers(model)
        if len(ks) != n_moe:
            raise MoeGraphError(f"--n-expert-used {_fmt_k(k)}: {len(ks)} values, but the model "
                                f"has {n_moe} MoE layers (give one k, or one per MoE layer)")
    for v in ks:
        if mode == "hard" and v > k_model:
            raise MoeGraphError(f"--n-expert-used {_fmt_k(k)} --slice-mode hard: hard slicing "
                                f"keeps 1..{k_model} of the model's top-{k_model} experts")
        if v > n_expert:
            raise MoeGraphError(f"--n-expert-used {_fmt_k(k)}: the model has {n_expert} experts")


def _n_moe_layers(model) -> int:
    from moegraph.passes.experts import moe_blocks
    return len(moe_blocks(model.graph(32)))


def _slice_modes(text: str | None) -> list[str]:
    modes = [m.strip() for m in (text or "soft").split(",") if m.strip()]
    bad = [m for m in modes if m not in SLICE_MODES]
    if bad or not modes:
        raise MoeGraphError(f"--slice-mode: expected soft, hard or soft,hard, got {text!r}")
    return list(dict.fromkeys(modes))


def _prune_counts(text: str) -> list[int]:
    try:
        ns = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise MoeGraphError(f"--prune-experts: expected integers, got {text!r}") from None
    if not ns or any(n <= 0 for n in ns):
        raise MoeGraphError(f"--prune-experts: expected positive integers, got {text!r}")
    return list(dict.fromkeys(ns))


def _check_prune(model, n: int, k_used, mode: str = "soft") -> None:
    n_expert, k_model = _expert_counts(model)
    if k_used is None or mode == "hard":   # hard slicing picks from the model's own top-k
        k_max = k_model
    else:
        k_max = max([k_used] if isinstance(k_used, int) else k_used)
    if not k_max <= n <= n_expert:
        raise MoeGraphError(f"--prune-experts {n}: keep between {k_max} (the experts used per "
                            f"token) and {n_expert} (all of them) experts per layer")


def _expert_usage(model, args, text: str, label: str):
    """expert_usage over the calibration text in chunks of -c tokens, with a progress bar."""
    from tqdm import tqdm

    from moegraph.passes.experts import expert_usage
    ctx = args.ctx_size or 128
    n_tokens = len(model.tokenizer.encode(text))
    total = max(1, n_tokens // ctx)
    n_chunks = total if getattr(args, "calib_chunks", None) is None else min(args.calib_chunks, total)
    _err(f"moegraph: {label}: {n_tokens} tokens; {n_chunks} of {total} chunk"
         f"{'s' if total != 1 else ''} of {ctx} tokens")
    bar = tqdm(total=n_chunks, desc=label, unit="chunk", file=sys.stderr, dynamic_ncols=True)
    try:
        return expert_usage(model, text, ctx=ctx, n_chunks=n_chunks,
                            backend=backend_choice(model, args)[0],
                            progress=lambda done, n: bar.update(done - bar.n))
    finally:
        bar.close()


def _pipeline(model, args, usage=None) -> list:
    """The pass list that the pass options of `args` ask for (see add_pass_options)."""
    passes: list = list(_pass_names(getattr(args, "passes", None)))
    k_text = getattr(args, "n_expert_used", None)
    mode = getattr(args, "slice_mode", None)
    prune = getattr(args, "prune_experts", None)
    for spec in getattr(args, "override_kv", None) or []:
        k = _override_expert_count(model, spec)
        if k_text is not None and str(k_text) != str(k):
            raise MoeGraphError(f"--override-kv {spec} contradicts --n-expert-used {k_text}")
        k_text, mode = k, mode or "soft"
    if mode is not None and k_text is None:
        raise MoeGraphError("--slice-mode needs --n-expert-used")
    return passes + _expert_passes(model, args, k_text, mode, prune, usage)


def _override_expert_count(model, spec: str) -> int:
    """llama.cpp's --override-kv KEY=TYPE:VALUE, for the one key whose override moegraph maps
    to a pass: ARCH.expert_used_count (soft slice_experts: top-k of all router probabilities,
    exactly what the override does in llama.cpp). Anything else is refused, not ignored."""
    key, eq, rest = spec.partition("=")
    vtype, colon, value = rest.partition(":")
    if not eq or not colon or vtype not in ("int", "float", "bool", "str"):
        raise MoeGraphError(f"--override-kv {spec!r}: expected KEY=TYPE:VALUE with TYPE one of "
                            "int, float, bool, str (e.g. qwen3moe.expert_used_count=int:4)")
    want = f"{model.config.arch}.expert_used_count"
    if key != want:
        raise MoeGraphError(f"--override-kv: moegraph can override only {want} (mapped to the "
                            f"slice_experts pass), not {key!r}")
    if vtype != "int" or not value.strip().lstrip("-").isdigit():
        raise MoeGraphError(f"--override-kv {spec!r}: {key} takes int:K")
    return int(value)


def _expert_passes(model, args, k_text, mode, prune, usage=None) -> list:
    """slice_experts and prune_experts as asked. Soft slicing only changes the router's k, so it
    goes first (then pruning may keep as few experts as the new k); pruning goes before hard
    slicing, which picks from the model's own top-k."""
    mode = mode or "soft"
    slice_, prune_ = [], []
    k = None
    if k_text is not None:
        k = _parse_k(str(k_text), ",") if isinstance(k_text, str) else k_text
        _check_k(model, k, mode)
        slice_ = [("slice_experts", {"n_expert_used": k, "mode": mode})]
    if prune is not None:
        n = int(prune)
        _check_prune(model, n, k, mode)
        if usage is None:
            calib = getattr(args, "calib", None)
            if not calib:
                raise MoeGraphError("--prune-experts needs a calibration text: --calib FILE")
            usage = _expert_usage(model, args, _read_text(calib), "calibration")
        prune_ = [("prune_experts", {"keep": usage.most_used(n)})]
    return prune_ + slice_ if mode == "hard" else slice_ + prune_


def _pass_label(spec) -> str:
    return spec[0] if isinstance(spec, tuple) else getattr(spec, "pass_name", str(spec))


def _describe_passes(passes) -> str:
    out = []
    for spec in passes:
        name, opts = (spec if isinstance(spec, tuple) else (_pass_label(spec), {}))
        if name == "slice_experts":
            out.append(f"slice_experts(k={_fmt_k(opts['n_expert_used'])}, {opts['mode']})")
        elif name == "prune_experts":
            out.append(f"prune_experts(keep {len(next(iter(opts['keep'].values())))} per layer)")
        else:
            out.append(name)
    return ", ".join(out)


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
def _tensor_infos(f) -> list[dict]:
    """All tensors of the file (every shard), including the types moegraph cannot compute with."""
    return [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "n_elements": t.n_elements,
             "nbytes": t.nbytes} | ({"shard": t.shard + 1} if t.shard else {}) for t in f.infos.values()]


def cmd_inspect(args) -> int:
    from .dump import fmt_bytes, json_safe
    from .gguf_file import GGUFFile
    from .models import config_from_gguf
    if args.file and args.model and args.file != args.model:
        raise MoeGraphError(f"inspect: two files given ({args.file} and -m {args.model}); give one")
    f = GGUFFile(args.file or args.model or _default_model())
    try:
        cfg, cfg_error = config_from_gguf(f).summary(), None
    except MoeGraphError as e:
        cfg, cfg_error = None, str(e)
    tensors = _tensor_infos(f)
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
    model = _load(args.model, args)
    load_s = time.perf_counter() - t0
    n_ctx = args.ctx_size or None
    passes = _pipeline(model, args)
    t0 = time.perf_counter()
    session = _compile(model, args, n_ctx, passes)
    compile_s = time.perf_counter() - t0
    if passes:
        _err(f"moegraph: passes: {_describe_passes(passes)}")
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
    pieces = session.generate(prompt, max_tokens=n_predict, **_sampling(args, seed))
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
    if st.stop_reason == "context" and args.n_predict >= 0:
        _err(f"moegraph: stopped after {st.n_generated} of {n_predict} tokens: the context "
             f"(n_ctx={session.n_ctx}) is full; use a larger -c")
    _err("")
    _err(f"moegraph: {'load time':>16} = {load_s * 1e3:10.2f} ms")
    _err(f"moegraph: {'compile time':>16} = {compile_s * 1e3:10.2f} ms")
    _err(line("prompt eval time", st.n_prompt, st.prompt_s, "tokens"))
    _err(line("eval time", st.n_generated, st.generate_s, "runs  "))
    _err(f"moegraph: {'total time':>16} = {(load_s + compile_s + st.prompt_s + st.generate_s) * 1e3:10.2f} ms"
         f" / {st.n_prompt + st.n_generated:5d} tokens")
    return 0


def _sampling(args, seed: int) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, penalty_last_n=args.repeat_last_n,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty, seed=seed)


def cmd_chat(args) -> int:
    model = _load(args.model, args)
    session = _compile(model, args, args.ctx_size or None, [])
    template = _read_text(args.chat_template_file) if args.chat_template_file else None
    seed = args.seed if args.seed is not None and args.seed >= 0 else random.randrange(2**32)
    history = [{"role": "system", "content": args.system}] if args.system else []
    _err(f"moegraph: chat with {model.path.name} ({model.config.arch}), n_ctx {session.n_ctx}, seed {seed}"
         + ("" if args.prompt is not None else "; one message per line, Ctrl-D to end"))
    turns = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for i, text in enumerate(turns):
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        n = args.n_predict if args.n_predict >= 0 else session.n_ctx
        reply = []
        for piece in session.chat(history, max_tokens=n, chat_template=template, stop=args.reverse_prompt,
                                  **_sampling(args, seed + i)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        if session.stats.stop_reason == "context":
            _err(f"moegraph: the context (n_ctx={session.n_ctx}) is full; use a larger -c")
            return 1
    return 0


# --------------------------------------------------------------------------- perplexity
def _ppl_stderr(res) -> float:
    nll = res.chunk_nll
    if len(nll) > 1:
        mean = sum(nll) / len(nll)
        sd = math.sqrt(sum((x - mean) ** 2 for x in nll) / (len(nll) - 1))
        return res.ppl * sd / math.sqrt(len(nll))    # delta method: d exp(m) = exp(m) dm
    return float("nan")


def _eval_ppl(session, ids, ctx: int, n_chunks: int, desc: str = "perplexity"):
    """Session.perplexity with a tqdm bar on stderr showing the running PPL."""
    from tqdm import tqdm
    bar = tqdm(total=n_chunks, desc=desc, unit="chunk", file=sys.stderr, dynamic_ncols=True)
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
        return session.perplexity(ids, ctx=ctx, n_chunks=n_chunks, progress=progress)
    finally:
        bar.close()


def _sweep_configs(model, args) -> list[dict] | None:
    """The configurations perplexity compares, or None for a single run (every option a single
    value, and no --plot). Row 0 is the model as it is (the baseline)."""
    k_items = [t for t in str(args.n_expert_used).split(",") if t.strip()] \
        if args.n_expert_used is not None else []
    ks = [_parse_k(t, ":") for t in k_items]
    modes = _slice_modes(args.slice_mode)
    if args.slice_mode is not None and not ks:
        raise MoeGraphError("--slice-mode needs --n-expert-used")
    prunes = _prune_counts(args.prune_experts) if args.prune_experts is not None else []
    if len(ks) <= 1 and len(modes) <= 1 and len(prunes) <= 1 and not args.plot:
        return None
    n_expert, k_model = _expert_counts(model)
    for k in ks:
        for mode in modes:
            _check_k(model, k, mode)
    for n in prunes:
        _check_prune(model, n, None)
    configs = [{"k": k_model, "mode": "full", "n_experts": n_expert, "passes": []}]
    seen = {(_fmt_k(k_model), "full")}
    for k in ks:
        for mode in modes:
            if k == k_model or (isinstance(k, list) and all(v == k_model for v in k)):
                continue                    # the model's own count: that is the baseline
            if (_fmt_k(k), mode) in seen:
                continue
            seen.add((_fmt_k(k), mode))
            configs.append({"k": k, "mode": mode, "n_experts": n_expert,
                            "passes": [("slice_experts", {"n_expert_used": k, "mode": mode})]})
    for n in prunes:
        configs.append({"k": k_model, "mode": "prune", "n_experts": n, "prune": n, "passes": None})
    return configs


def _plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoeGraphError("--plot needs matplotlib, which is not installed: "
                            "pip install matplotlib") from None


def _plot_sweep(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = rows[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("soft", "o"), ("hard", "s")):
        pts = [(r["k"], r["ppl"]) for r in rows if r["mode"] == mode and isinstance(r["k"], int)]
        if not pts:
            continue
        pts = sorted(pts + [(base["k"], base["ppl"])])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode)
    ax.axhline(base["ppl"], color="grey", linestyle=":", linewidth=1,
               label=f"full (k={base['k']}, {base['n_experts']} experts)")
    for j, r in enumerate(r for r in rows if r["mode"] == "prune"):
        ax.scatter([r["k"]], [r["ppl"]], marker="^", zorder=3, color=f"C{2 + j}",
                   label=f"pruned to {r['n_experts']} experts (k={r['k']})")
    ax.set_xlabel("experts used per token (k)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise MoeGraphError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def _perplexity_sweep(args, model, configs, ids, ctx, n_chunks, text) -> int:
    if args.plot:
        _plot_available()
    usage = None
    if any(c["mode"] == "prune" for c in configs):
        if args.calib:
            calib_text = _read_text(args.calib)
        else:
            calib_text = text
            _err(f"moegraph: no --calib given: the experts to keep are measured on the evaluated "
                 f"text {args.file} itself (an optimistic choice; pass --calib FILE to avoid it)")
        usage = _expert_usage(model, args, calib_text, "calibration")
    _err(f"moegraph: {len(configs)} configurations, {n_chunks} chunks of {ctx} tokens each")
    rows: list[dict] = []
    for i, c in enumerate(configs):
        passes = c["passes"] if c["mode"] != "prune" else \
            [("prune_experts", {"keep": usage.most_used(c["prune"])})]
        passes = _pass_names(args.passes) + passes
        session = _compile(model, args, ctx, passes)
        label = "full" if c["mode"] == "full" else \
            (f"prune {c['n_experts']}" if c["mode"] == "prune" else f"k={_fmt_k(c['k'])} {c['mode']}")
        res = _eval_ppl(session, ids, ctx, n_chunks, desc=f"[{i + 1}/{len(configs)}] {label}")
        se = _ppl_stderr(res)
        rows.append({"k": c["k"], "mode": c["mode"], "n_experts": c["n_experts"], "ppl": res.ppl,
                     "ppl_stderr": se if math.isfinite(se) else None, "mean_nll": res.mean_nll,
                     "chunk_nll": list(res.chunk_nll), "n_predictions": res.n_predictions,
                     "seconds": res.seconds})
    base = rows[0]["ppl"]
    for r in rows:
        r["delta"] = r["ppl"] - base
        r["delta_pct"] = 100.0 * (r["ppl"] / base - 1.0)
    # the table
    head = ["k", "mode", "experts", "PPL", "+/-", "delta", "delta %"]
    body = []
    for r in rows:
        se = f"{r['ppl_stderr']:.4f}" if r["ppl_stderr"] is not None else "n/a"
        body.append([_fmt_k(r["k"]), r["mode"], str(r["n_experts"]), f"{r['ppl']:.4f}", se,
                     f"{r['delta']:+.4f}", f"{r['delta_pct']:+.2f}%"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def fmt(cells):   # the mode column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if j == 1 else c.rjust(w)
                         for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(f"perplexity of {Path(args.file).name} with {model.path.name}: {n_chunks} chunks of "
          f"{ctx} tokens, {rows[0]['n_predictions']} predictions per row; delta vs full "
          f"(k={_fmt_k(rows[0]['k'])}, all {rows[0]['n_experts']} experts)")
    print(fmt(head))
    print(fmt(["-" * w for w in widths]))
    for cells in body:
        print(fmt(cells))
    total_s = sum(r["seconds"] for r in rows)
    print(f"{len(rows)} configurations in {total_s:.1f} s")
    settings = {"text": str(args.file), "n_tokens": len(ids), "ctx": ctx, "chunks": args.chunks,
                "n_chunks": n_chunks, "kv_type": args.kv_type, "backend": backend_choice(model, args)[0],
                "passes": _pass_names(args.passes), "n_expert_used": args.n_expert_used,
                "slice_mode": args.slice_mode, "prune_experts": args.prune_experts,
                "calib": (args.calib or str(args.file)) if usage is not None else None,
                "calib_chunks": args.calib_chunks}
    if args.output:
        out = {"model": str(model.path), "settings": settings, "baseline_ppl": base, "rows": rows}
        _write_text(args.output, json.dumps(out, indent=1) + "\n")
        _err(f"moegraph: wrote {args.output}")
    if args.plot:
        _plot_sweep(rows, args.plot, f"{model.path.name}, {Path(args.file).name}: "
                                     f"{n_chunks} x {ctx} tokens")
        _err(f"moegraph: wrote {args.plot}")
    return 0


def cmd_perplexity(args) -> int:
    text = _read_text(args.file)
    model = _load(args.model, args)
    ctx = args.ctx_size
    configs = _sweep_configs(model, args)
    t0 = time.perf_counter()
    ids = model.tokenizer.encode(text)
    tokenize_s = time.perf_counter() - t0
    total = len(ids) // ctx
    n_chunks = total if args.chunks is None else min(args.chunks, total)
    if configs is not None:
        _err(f"moegraph: tokenized {len(ids)} tokens in {tokenize_s * 1e3:.0f} ms; "
             f"{n_chunks} of {total} chunks of {ctx} tokens")
        if total == 0:   # the library says what is wrong (too few tokens for one chunk)
            _compile(model, args, ctx, []).perplexity(ids, ctx=ctx)
        return _perplexity_sweep(args, model, configs, ids, ctx, n_chunks, text)
    if args.prune_experts is not None and not args.calib:
        _err(f"moegraph: no --calib given: the experts to keep are measured on the evaluated "
             f"text {args.file} itself (an optimistic choice; pass --calib FILE to avoid it)")
        args.calib = args.file
    k = _parse_k(args.n_expert_used, ":") if args.n_expert_used is not None else None
    prune = _prune_counts(args.prune_experts)[0] if args.prune_experts is not None else None
    passes = _pass_names(args.passes) + _expert_passes(model, args, k, _slice_modes(args.slice_mode)[0],
                                                       prune)
    t0 = time.perf_counter()
    session = _compile(model, args, ctx, passes)
    compile_s = time.perf_counter() - t0
    _err(f"moegraph: tokenized {len(ids)} tokens in {tokenize_s * 1e3:.0f} ms; "
         f"{n_chunks} of {total} chunks of {ctx} tokens; backend {session.backend} "
         f"(compiled in {compile_s * 1e3:.0f} ms)" + (f"; passes: {_describe_passes(passes)}" if passes else ""))
    if total == 0:   # the library says what is wrong (too few tokens for one chunk)
        session.perplexity(ids, ctx=ctx)
    res = _eval_ppl(session, ids, ctx, n_chunks)
    nll = res.chunk_nll
    ppl_se = _ppl_stderr(res)
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
                               "backend": session.backend,
                               "passes": [_pass_label(p) for p in passes],
                               "n_expert_used": args.n_expert_used, "slice_mode": args.slice_mode,
                               "prune_experts": args.prune_experts,
                               "calib": args.calib if args.prune_experts is not None else None}}
        _write_text(args.output, json.dumps(result, indent=1) + "\n")
        _err(f"moegraph: wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- dump
_EXT = {"text": ".txt", "dot": ".dot", "json": ".json"}


def _render(graph, fmt: str, args=None) -> str:
    from .dump import to_dot, to_json_text, to_text
    view = _view(graph, args) if args is not None else None
    if fmt == "json":
        return to_json_text(graph, view=view)
    return {"text": to_text, "dot": to_dot}[fmt](graph, view)


COLLAPSE_ABOVE = 8     # --collapse auto: repeated layers are folded in models with more layers


def _view(graph, args):
    """The nodes a dump shows: --layers, and --collapse (auto: on above COLLAPSE_ABOVE layers)."""
    from .dump import parse_layers, select_view
    n_layer = graph.meta["config"].n_layer if "config" in graph.meta else 0
    layers = parse_layers(args.layers, n_layer) if getattr(args, "layers", None) else None
    mode = getattr(args, "collapse", "off")
    collapse = mode == "on" or (mode == "auto" and layers is None and n_layer > COLLAPSE_ABOVE)
    if layers is None and not collapse:
        return None
    return select_view(graph, layers, collapse)


def _diff(before, after, before_name: str, after_name: str, style: str) -> str:
    from .dump import diff_graphs, diff_text, to_text
    if style == "unified":
        return diff_text(to_text(before), to_text(after), before_name, after_name)
    return diff_graphs(before, after, before_name, after_name)


def _emit(text: str, out: str | None, fmt: str, warned: list | None = None) -> None:
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
        elif not warned:
            _err("moegraph: Graphviz `dot` is not on PATH: no SVG rendered "
                 f"(install graphviz, then `dot -Tsvg {out} -o {svg}`)")
            if warned is not None:
                warned.append(True)


def _after_each_path(out: str, i: int, n: int, name: str, fmt: str) -> str:
    """OUT = g.dot -> g.after-1-fuse_qkv.dot (the index padded to the width of n)."""
    p = Path(out)
    suffix = p.suffix or _EXT[fmt]
    return str(p.with_name(f"{p.stem if p.suffix else p.name}.after-{i:0{len(str(n))}d}-{name}{suffix}"))


def cmd_dump(args) -> int:
    from .ir import op_table_markdown
    if args.ops:
        print(op_table_markdown())
        return 0
    model = _load(args.model, args)
    passes = _pipeline(model, args)
    if (args.after_each or args.diff) and not passes:
        raise MoeGraphError("--after-each and --diff need passes to run: --passes A,B,C, "
                            "--n-expert-used or --prune-experts")
    graph = model.graph(args.ctx_size or None, args.kv_type)
    if args.lowered:
        return _dump_lowered(graph, passes, args)
    if not passes:
        _emit(_render(graph, args.format, args), args.output, args.format)
        return 0
    from moegraph.passes import run_passes
    before = graph.copy() if args.diff else None
    prev = {"graph": before, "name": "input"}
    n = len(passes)
    step = [0]
    warned: list = []

    def dump_each(name, g):
        # --after-each: the graph after each pass, to OUT.after-<i>-<pass>.<ext> with -o, else
        # to stdout (with --diff, stdout carries the diffs: the graphs go to files only)
        step[0] += 1
        i = step[0]
        if args.output:
            _emit(_render(g, args.format, args), _after_each_path(args.output, i, n, name, args.format),
                  args.format, warned)
        elif not args.diff:
            print(f"### after pass {i}/{n}: {name}", flush=True)
            _emit(_render(g, args.format, args), None, args.format)
        if args.diff:
            cur = g.copy()
            sys.stdout.write(_diff(prev["graph"], cur, prev["name"], f"after {i}: {name}", args.diff)
                             or f"### pass {i}/{n} {name}: no change\n")
            prev.update(graph=cur, name=f"after {i}: {name}")

    graph = run_passes(graph, passes, dump_each=dump_each if args.after_each else None)
    _err(f"moegraph: passes: {_describe_passes(passes)}")
    if args.diff and not args.after_each:
        after_name = "after " + " + ".join(_pass_label(p) for p in passes)
        sys.stdout.write(_diff(before, graph, "input", after_name, args.diff)
                         or "### the passes changed nothing\n")
    if args.output:
        _emit(_render(graph, args.format, args), args.output, args.format, warned)
    elif not (args.diff or args.after_each):
        _emit(_render(graph, args.format, args), None, args.format)
    return 0


def _dump_lowered(graph, passes, args) -> int:
    """--lowered BACKEND: the program the backend runs (kernels, their graph nodes and token
    ranges), after the passes; text or JSON."""
    import json

    from .dump import lowered_program, lowered_to_text
    if args.format == "dot":
        raise MoeGraphError("--lowered prints text or JSON (--format text|json)")
    if passes:
        from moegraph.passes import run_passes
        graph = run_passes(graph, passes)
    report = lowered_program(graph, args.lowered, max_tokens=args.ctx_size or 512)
    text = json.dumps(report, indent=1) + "\n" if args.format == "json" else lowered_to_text(report)
    _emit(text, args.output, args.format)
    return 0


# --------------------------------------------------------------------------- experts
def _usage_summary(counts) -> dict:
    """min/max share of the selections and the balance: the entropy of the shares over log(E)
    (1 = every expert equally used, 0 = one expert takes everything)."""
    import numpy as np
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    f = c / total if total else c
    nz = f[f > 0]
    ent = float(-(nz * np.log(nz)).sum()) if total else 0.0
    return {"min": float(f.min()), "max": float(f.max()),
            "balance": ent / math.log(len(c)) if len(c) > 1 else 1.0,
            "unused": int((c == 0).sum())}


def cmd_experts(args) -> int:
    text = _read_text(args.file)
    model = _load(args.model, args)
    n_expert, k = _expert_counts(model)
    args.calib_chunks = args.chunks
    usage = _expert_usage(model, args, text, "experts")
    fr = usage.fractions()
    summary = {layer: _usage_summary(c) for layer, c in usage.counts.items()}
    ctx = args.ctx_size
    n_chunks = max(1, -(-usage.n_tokens // ctx))
    print(f"expert usage of {model.path.name} ({n_expert} experts, {k} per token) on "
          f"{Path(args.file).name}: {usage.n_tokens} tokens in {n_chunks} chunk"
          f"{'s' if n_chunks != 1 else ''} of {ctx}; share of the selections in each layer, %")
    per_row = 16
    for start in range(0, n_expert, per_row):
        ids = range(start, min(start + per_row, n_expert))
        head = f"{'layer':>5} " + "".join(f"{'e' + str(e):>6}" for e in ids)
        last = start + per_row >= n_expert
        if last:
            head += f"  {'min':>6}{'max':>6}{'balance':>9}"
        print(head)
        for layer in sorted(fr):
            f = fr[layer]
            line = f"{layer:>5} " + "".join(f"{100 * f[e]:6.1f}" for e in ids)
            if last:
                s = summary[layer]
                line += f"  {100 * s['min']:6.1f}{100 * s['max']:6.1f}{s['balance']:9.3f}"
            print(line)
    print(f"balance = entropy / log({n_expert}): 1 = uniform; uniform share = {100 / n_expert:.3g}%")
    if args.output:
        out = usage.to_json()
        for layer, s in summary.items():
            out["layers"][str(layer)].update(s)
        out.update({"model": str(model.path), "n_expert": n_expert, "n_expert_used": k,
                    "settings": {"text": str(args.file), "ctx": ctx, "chunks": args.chunks,
                                 "n_chunks": n_chunks,
                                 "backend": backend_choice(model, args)[0]}})
        _write_text(args.output, json.dumps(out, indent=1) + "\n")
        _err(f"moegraph: wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show Python tracebacks of errors")
    debug.add_argument("--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE",
                       help="import MODULE (a module name, or a .py file) first: the passes it "
                            "registers can then be named in --passes (repeatable; also $MOEGRAPH_PLUGINS)")
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
        sp.add_argument("--check-tensors", action="store_true",
                        help="scan every tensor for NaN/Inf before running (the small ones always are)")

    backend_opts = add_backend_options

    sp = sub.add_parser("inspect", parents=[debug], help="GGUF metadata, hyper-parameters and tensors",
                        description="Print a GGUF file's architecture, hyper-parameters, metadata "
                                    "and tensor table.")
    sp.add_argument("file", metavar="FILE", nargs="?", default=None,
                    help="GGUF file (or -m FILE; default: the bundled model)")
    sp.add_argument("-m", "--model", default=None, metavar="FILE", help="GGUF file, as in the other commands")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_inspect)

    def sampling_opts(sp):   # llama.cpp's flags and defaults, applied in its order (moegraph.sampling)
        sp.add_argument("--temp", type=_temperature, default=0.8, help="temperature (0 = greedy)")
        sp.add_argument("--top-k", type=non_negative_int_arg, default=40, help="top-k sampling (0 = off)")
        sp.add_argument("--top-p", type=_top_p, default=0.95, help="top-p sampling (1 = off)")
        sp.add_argument("--min-p", type=_unit_float, default=0.05, help="min-p sampling (0 = off)")
        sp.add_argument("--repeat-penalty", type=_float, default=1.0, help="repetition penalty (1 = off)")
        sp.add_argument("--repeat-last-n", type=non_negative_int_arg, default=64,
                        help="tokens the penalties look back on (0 = none)")
        sp.add_argument("--frequency-penalty", type=_float, default=0.0, help="frequency penalty (0 = off)")
        sp.add_argument("--presence-penalty", type=_float, default=0.0, help="presence penalty (0 = off)")
        sp.add_argument("-s", "--seed", type=int, default=None,
                        help="random seed (default / -1: a random one, printed)")

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
        sp.add_argument("-n", "--n-predict", type=_n_predict, default=128, metavar="N",
                        help="tokens to generate (-1 = until end of text or a full context)")
        sampling_opts(sp)
        sp.add_argument("--no-display-prompt", dest="display_prompt", action="store_false",
                        help="do not echo the prompt")
        backend_opts(sp)
        add_pass_options(sp)
        sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("chat", parents=[debug], help="chat with an instruct model (its chat template)",
                        description="Conversation with the GGUF's chat template (llama.cpp's -cnv): each "
                                    "line on stdin is a user turn, the reply streams to stdout; the "
                                    "history is kept. With -p, one turn and exit. Needs jinja2 "
                                    "(pip install 'moegraph[chat]').")
    model_opts(sp)
    sp.add_argument("-p", "--prompt", default=None, help="one user message: answer it and exit")
    sp.add_argument("-sys", "--system", default=None, help="a system message first")
    sp.add_argument("-n", "--n-predict", type=_n_predict, default=512, metavar="N",
                    help="tokens per reply at most (-1 = until the end of the turn or a full context)")
    sp.add_argument("-r", "--reverse-prompt", action="append", default=[], metavar="TEXT",
                    help="stop a reply where it writes TEXT (repeatable; also the end-of-turn tokens)")
    sp.add_argument("--chat-template-file", metavar="FILE", help="a Jinja chat template instead of the GGUF's")
    sampling_opts(sp)
    backend_opts(sp)
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("perplexity", parents=[debug], help="perplexity of a text file",
                        description="llama-perplexity's protocol: non-overlapping chunks of -c "
                                    "tokens, the second half of each chunk scored.")
    model_opts(sp, ctx_default=128, ctx_help="chunk size in tokens (default: 128)",
               ctx_type=_chunk_size)
    sp.add_argument("-f", "--file", required=True, metavar="FILE", help="text file")
    sp.add_argument("--chunks", type=positive_int_arg, default=None, metavar="N",
                    help="evaluate at most N chunks")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the result (all rows) as JSON")
    sp.add_argument("--plot", metavar="PNG",
                    help="plot PPL vs experts per token, per slice mode (needs matplotlib)")
    backend_opts(sp)
    add_pass_options(sp, sweep=True, calib_default="the -f text")
    sp.set_defaults(func=cmd_perplexity)

    sp = sub.add_parser("experts", parents=[debug], help="how often each expert is chosen",
                        description="Runs a text through the model in chunks of -c tokens and "
                                    "prints, per layer, each expert's share of the router's "
                                    "selections, with min, max and balance (normalized entropy).")
    model_opts(sp, ctx_default=128, ctx_help="chunk size in tokens (default: 128)",
               ctx_type=_chunk_size)
    sp.add_argument("-f", "--file", required=True, metavar="FILE", help="text file")
    sp.add_argument("--chunks", type=positive_int_arg, default=None, metavar="N",
                    help="use at most N chunks (default: all)")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the usage as JSON")
    add_backend_options(sp)
    sp.set_defaults(func=cmd_experts)

    sp = sub.add_parser("dump", parents=[debug], help="dump the model graph (text, DOT/SVG, JSON)",
                        description="Dump the model's graph. With -o and --format dot, also "
                                    "renders OUT.svg when Graphviz is installed.")
    model_opts(sp)
    sp.add_argument("--format", choices=["text", "dot", "json"], default="text")
    sp.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    sp.add_argument("--ops", action="store_true", help="print the op table (markdown) and exit")
    sp.add_argument("--lowered", metavar="BACKEND", choices=["numpy", "llvm", "cuda"],
                    help="print the program BACKEND runs instead: each kernel, the graph nodes it "
                         "computes and the token range it runs for (no GPU needed for cuda)")
    add_pass_options(sp)
    g = sp.add_argument_group("what the passes change")
    g.add_argument("--after-each", action="store_true",
                   help="dump the graph after each pass: to OUT.after-<i>-<pass>.<ext> with -o, "
                        "else to stdout")
    g.add_argument("--diff", nargs="?", const="nodes", choices=["nodes", "unified"], default=None,
                   help="what the passes changed (with --after-each: each pass): 'nodes' (the "
                        "default) lists the nodes only before / only after, ignoring order and ids, "
                        "a change repeated in every layer written once; 'unified': a diff of the "
                        "text dumps")
    v = sp.add_argument_group("big graphs")
    v.add_argument("--layers", metavar="N[,A-B]",
                   help="dump only these layers (e.g. 0, 0-3, 0,47, -1 for the last)")
    v.add_argument("--collapse", choices=["auto", "on", "off"], default="auto",
                   help=f"show the first of identical layers only, noting the others (auto: with more "
                        f"than {COLLAPSE_ABOVE} layers and no --layers)")
    sp.set_defaults(func=cmd_dump)
    from .quantize import add_parser as add_quantize_parser
    add_quantize_parser(sub, [debug])
    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub, [debug])
    return p


def load_plugin(name: str) -> None:
    """Imports a user's module (by name, the current directory searched too, or a .py file) so
    that the passes it registers exist; any failure is a MoeGraphError naming the plugin."""
    import importlib
    import importlib.util
    try:
        if name.endswith(".py") or os.sep in name:
            path = Path(name)
            if not path.is_file():
                raise MoeGraphError(f"--plugin {name}: no such file")
            spec = importlib.util.spec_from_file_location(f"moegraph_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            importlib.import_module(name)
    except MoeGraphError:
        raise
    except Exception as e:                           # noqa: BLE001 (the user's code: any error)
        raise MoeGraphError(f"--plugin {name}: could not import it: {type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        plugins = [p for p in os.environ.get("MOEGRAPH_PLUGINS", "").split(",") if p.strip()]
        for plugin in plugins + list(getattr(args, "plugin", [])):
            load_plugin(plugin.strip())
        if getattr(args, "passes", None) is not None and args.passes.strip() == "help":
            return _print_pass_help()
        _pass_names(getattr(args, "passes", None))   # a typo fails before any model is loaded
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
