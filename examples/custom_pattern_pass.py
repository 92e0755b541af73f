"""Write a graph pass with the pattern language, register it by name, run it, check it.

The pass is the tutorial version of the built-in `fuse_norm` (passes/basic.py). The model graphs
compute every norm as MUL(RMS_NORM(x), w): normalize, then scale by the norm weight. RMS_NORM has
an optional weight input, so one node can do both and the normalized x is never stored.

    python examples/custom_pattern_pass.py
    moegraph run --plugin examples/custom_pattern_pass.py --passes tutorial_fuse_norm   # as a plug-in
"""
import contextlib
import io

import numpy as np

import moegraph
from moegraph.cli import main as moegraph_cli
from moegraph.data import DEFAULT_MODEL
from moegraph.dump import diff_text, to_text
from moegraph.ir import F32
from moegraph.passes import register_pass, run_passes
from moegraph.passes.pattern import Pat, find, rewrite

# 1. The pattern: a MUL whose first input is an RMS_NORM without a weight (`None` matches the empty
#    optional slot) that nothing else reads (users=1), and whose second input is a 1-D F32 weight.
NORM_THEN_SCALE = Pat(
    "MUL",
    Pat("RMS_NORM", Pat.any("x"), None, name="norm", users=1),
    Pat.weight("w", dtype=F32, where=lambda w: w.rank == 1),
)


# 2. The replacement: build the new node in the graph from the captures and return it; rewrite()
#    points every user of the matched MUL (m.root) at it. Returning None would decline the match.
def fold_norm_weight(g, m):
    return g.rms_norm(m.x, m.w, eps=m.norm.attrs["eps"], name=m.root.name)


# 3. The pass: a plain function Graph -> Graph, registered by name.
@register_pass("tutorial_fuse_norm")
def tutorial_fuse_norm(graph):
    n = rewrite(graph, [(NORM_THEN_SCALE, fold_norm_weight)])   # also removes the dead nodes
    graph.meta["tutorial_fuse_norm.rewrites"] = n
    return graph


def main():
    model = moegraph.load(DEFAULT_MODEL)

    # Where does the pattern match? find() returns the captures of every match, in graph order.
    graph = model.graph(n_ctx=64)
    matches = find(graph, NORM_THEN_SCALE)
    print(f"pattern matches {len(matches)} norms: "
          + ", ".join(m.w.name.removesuffix(".weight") for m in matches[:5]) + ", ...")

    # Run it the way the PassManager does (the IR is verified after the pass) and diff the dumps.
    before, n_before = to_text(graph), len(graph.toposort())
    graph = run_passes(graph, ["tutorial_fuse_norm"])
    after = to_text(graph)
    print(f"rewrote {graph.meta['tutorial_fuse_norm.rewrites']} MULs: "
          f"{n_before} -> {len(graph.toposort())} live nodes")
    # The full diff also shows the node lines that moved; keep the rewritten norms of layer 0.
    diff = diff_text(before, after, "model", "tutorial_fuse_norm").splitlines()
    changed = [line for line in diff
               if line[:2] in ("-%", "+%") and ("RMS_NORM(" in line or "= MUL(" in line)]
    print("diff excerpt (the four norms of layer 0: 2 nodes each become 1):")
    print("\n".join("    " + line for line in changed[:12]))

    # The hand-written pass gives exactly the graph the built-in fuse_norm gives...
    builtin = to_text(run_passes(model.graph(n_ctx=64), ["fuse_norm"]))
    print("same graph as the built-in fuse_norm:", builtin == after)

    # ... and leaves the logits unchanged: run the model with and without it on the reference backend
    # (the check every pass gets, see tests/test_passes.py). Passes are given by name, as functions,
    # or as (name, options) pairs.
    ids = model.tokenizer.encode("And God said, Let there be light: and there was light.")
    base = model.compile(backend="numpy", n_ctx=64).forward(ids)
    fused = model.compile(backend="numpy", n_ctx=64, passes=["tutorial_fuse_norm"]).forward(ids)
    also = model.compile(backend="numpy", n_ctx=64, passes=[tutorial_fuse_norm, "cse"]).forward(ids)
    print(f"logits with vs without the pass over {len(ids)} tokens: max |diff| = "
          f"{np.abs(fused - base).max():.1e}; bit-identical: {np.array_equal(fused, base)}, "
          f"{np.array_equal(also, base)}")

    # The CLI finds the pass by name too, once the module that registers it is imported (here: this
    # script; from a shell, `moegraph dump --plugin examples/custom_pattern_pass.py --passes ...`).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = moegraph_cli(["dump", "-c", "64", "--passes", "tutorial_fuse_norm,dce", "--diff", "unified"])
    lines = out.getvalue().splitlines()
    muls = sum(line.startswith("-%") and "= MUL(" in line for line in lines) - \
        sum(line.startswith("+%") and "= MUL(" in line for line in lines)
    print(f"`moegraph dump --passes tutorial_fuse_norm,dce --diff unified`: exit {rc}, a {len(lines)}-line "
          f"diff with {muls} fewer MUL nodes")


if __name__ == "__main__":      # imported as a --plugin, it only registers the pass
    main()
