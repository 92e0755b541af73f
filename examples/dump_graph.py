"""Dump the model graph before and after the fusion passes: text, Graphviz DOT (SVG too when
Graphviz is installed) and JSON files in a temporary directory, plus one dump per pass.

The same from the command line:
    moegraph dump --passes fuse_qkv,fuse_up_gate --format dot -o graph.dot
    moegraph dump --passes fuse_qkv,fuse_up_gate --diff

    python examples/dump_graph.py [OUT_DIR]
"""
import sys
import tempfile
from collections import Counter
from pathlib import Path

import moegraph
from moegraph.data import DEFAULT_MODEL
from moegraph.dump import node_layers, node_line, render_svg, to_dot, to_json_text, to_text
from moegraph.passes import PassManager

out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="moegraph-dump-"))
out.mkdir(parents=True, exist_ok=True)

model = moegraph.load(DEFAULT_MODEL)
graph = model.graph(n_ctx=128)
(out / "00-model.txt").write_text(to_text(graph))


# The PassManager calls after_each(name, graph) after every pass (once the IR is verified).
def after_each(name, g):
    step = len(g.meta["passes"])
    (out / f"{step:02d}-{name}.txt").write_text(to_text(g))


pm = PassManager(["fuse_qkv", "fuse_up_gate"], after_each=after_each)
fused = pm.run(model.graph(n_ctx=128))
for r in pm.records:
    print(f"{r.name:<13} {r.nodes_before} -> {r.nodes_after} live nodes ({r.seconds * 1e3:.0f} ms)")

(out / "fused.dot").write_text(to_dot(fused))
(out / "fused.json").write_text(to_json_text(fused))
svg = render_svg(to_dot(fused), out / "fused.svg")     # False when Graphviz is not installed

before = Counter(n.op for n in graph.toposort())
after = Counter(n.op for n in fused.toposort())
print("op counts that changed: " + ", ".join(f"{op} {before[op]} -> {after[op]}"
                                            for op in sorted(before | after) if before[op] != after[op]))
merged = [n for n in fused.toposort() if n.op == "WEIGHT" and n.name.startswith("blk.0.")
          and ("qkv" in n.name or "gate_up" in n.name)]
print("merged weights: " + ", ".join(f"{n.name} {n.dtype.name} {list(n.shape)}" for n in merged))

print(f"\nwrote to {out}:")
for p in sorted(out.iterdir()):
    print(f"  {p.name:<22} {p.stat().st_size:>8,} bytes")
if not svg:
    print("  (no SVG: Graphviz `dot` is not installed)")

print("\nlayer 0's experts after the passes (lines of 02-fuse_up_gate.txt):")
layer = node_layers(fused)                              # node id -> layer (None = outside)
for n in fused.toposort():
    if layer[n.id] == 0 and (n.op in ("MUL_MAT_ID", "SWIGLU") or "_exps" in n.name):
        print("  " + node_line(n))
