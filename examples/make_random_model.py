#!/usr/bin/env python3
"""Write a random GGUF model (llama dense / Mixtral-style, qwen2moe, qwen3moe) for tests and
benchmarks. The file loads in moegraph and in llama.cpp.

Examples:
    # the tiny default (qwen3moe, 2 layers, 8 experts, F32) and check that it runs
    python examples/make_random_model.py /tmp/tiny.gguf --check

    # Mixtral-style llama with fused QKV and merged expert gate/up, Q8_0
    python examples/make_random_model.py /tmp/mix.gguf --arch llama --n-expert 8 --n-ff-exp 64 \\
        --fused-qkv --merged-gate-up --dtype Q8_0

    # a benchmark-sized qwen3moe layer stack: 512 experts of 2048x512, Q4_K_M, fast uniform init
    python examples/make_random_model.py /tmp/big.gguf --preset qwen3moe-30b-a3b --n-layer 4 \\
        --n-expert 512 --n-expert-used 10 --n-ff-exp 512 --dtype Q4_K_M --dist uniform

    # only print what would be written
    python examples/make_random_model.py /tmp/x.gguf --preset mixtral-8x7b --dtype Q4_K_M --dry-run
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from moegraph.testing import ARCHS, DTYPES, PRESETS, plan_random_model, write_plan

HPARAMS = ["n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_expert",
           "n_expert_used", "n_ff_exp", "n_ff_shexp", "n_vocab", "n_ctx"]
DEFAULTS = dict(arch="qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=None,
                n_ff=128, n_expert=8, n_expert_used=2, n_ff_exp=32, n_ff_shexp=0, n_vocab=300,
                n_ctx=256, rope_freq_base=10000.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("path", help="output .gguf file")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="start from a real model's hyper-parameters (flags below override them)")
    ap.add_argument("--arch", choices=ARCHS)
    for hp in HPARAMS:
        ap.add_argument("--" + hp.replace("_", "-"), type=int, dest=hp,
                        help=f"(default {DEFAULTS[hp]})" if DEFAULTS[hp] is not None else
                        "(default n_embd / n_head)")
    ap.add_argument("--rope-freq-base", type=float)
    ap.add_argument("--rms-eps", type=float, help="(default 1e-5 for llama, 1e-6 for qwen)")
    ap.add_argument("--dtype", default="F32", type=str.upper, choices=DTYPES,
                    help="tensor type of the file (default F32)")
    ap.add_argument("--type-override", action="append", default=[], metavar="PATTERN=TYPE",
                    help="tensor type for names matching a glob, e.g. '*.ffn_down_exps.weight=Q8_0' "
                         "(repeatable)")
    ap.add_argument("--tied-output", action="store_true", help="no output.weight (use token_embd)")
    bias = ap.add_mutually_exclusive_group()
    bias.add_argument("--qkv-bias", dest="qkv_bias", action="store_true", default=None,
                      help="write attn_q/k/v biases (default: only for qwen2moe)")
    bias.add_argument("--no-qkv-bias", dest="qkv_bias", action="store_false")
    ap.add_argument("--merged-gate-up", action="store_true",
                    help="write blk.N.ffn_gate_up_exps (gate rows, then up rows, per expert)")
    ap.add_argument("--fused-qkv", action="store_true", help="write blk.N.attn_qkv (rows Q, K, V)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=0.02,
                    help="standard deviation of matrices, biases and routers (default 0.02)")
    ap.add_argument("--dist", choices=["normal", "uniform"], default="normal",
                    help="weight distribution; uniform is ~4x faster for big files")
    ap.add_argument("--name", help="general.name")
    ap.add_argument("--threads", type=int, help="generator threads (default: up to 8 CPUs)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    ap.add_argument("--check", action="store_true",
                    help="afterwards load the file with moegraph and run a short prompt")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)

    cfg = dict(DEFAULTS)
    if a.preset:
        cfg.update(PRESETS[a.preset])
    for k in ["arch", *HPARAMS, "rope_freq_base"]:
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    overrides = {}
    for item in a.type_override:
        pat, sep, typ = item.rpartition("=")
        if not sep or not pat:
            ap.error(f"--type-override wants PATTERN=TYPE, got {item!r}")
        overrides[pat] = typ.upper()
    arch = cfg.pop("arch")
    try:
        plan = plan_random_model(arch, **cfg, dtype=a.dtype, tied_output=a.tied_output,
                                 qkv_bias=a.qkv_bias, merged_gate_up=a.merged_gate_up,
                                 fused_qkv=a.fused_qkv, rms_eps=a.rms_eps, name=a.name,
                                 type_overrides=overrides or None)
    except ValueError as e:
        ap.error(str(e))

    hp = plan.hparams
    print(f"{arch}: {hp['n_layer']} layers, n_embd {hp['n_embd']}, heads {hp['n_head']}/"
          f"{hp['n_head_kv']} x {hp['head_dim']}, "
          + (f"{hp['n_expert']} experts (top-{hp['n_expert_used']}) of {hp['n_ff_exp']}"
             + (f" + shared {hp['n_ff_shexp']}" if hp["n_ff_shexp"] else "")
             if hp["n_expert"] else f"dense FFN {hp['n_ff']}")
          + f", vocab {hp['n_vocab']}")
    types = Counter()
    for t in plan.tensors:
        types[t.qtype] += t.n_elements
    print(f"{len(plan.tensors)} tensors, {plan.n_params / 1e6:.2f} M parameters, "
          f"{plan.nbytes / 2**20:.1f} MiB of tensor data ("
          + ", ".join(f"{k}: {v / 1e6:.2f} M" for k, v in types.most_common()) + ")")
    if a.dry_run:
        return 0

    t0 = time.perf_counter()
    path = write_plan(a.path, plan, seed=a.seed, scale=a.scale, dist=a.dist, threads=a.threads,
                      progress=not a.quiet)
    dt = time.perf_counter() - t0
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {dt:.1f} s")

    if a.check:
        import numpy as np

        import moegraph
        model = moegraph.load(path)
        ids = model.tokenizer.encode("hello world")
        logits = model.compile(backend="numpy").forward(ids)
        ok = bool(np.isfinite(logits).all())
        print(f"check: tokens {ids} -> logits {list(logits.shape)}, finite: {ok}, "
              f"next token {int(logits[-1].argmax())}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
