"""The examples and the docs run as written: every examples/*.py as a subprocess on the bundled
model (exit 0 and the output it exists to print), every Python snippet of docs/*.md in order, and
the op table pasted into docs/ir.md matches `op_table_markdown()`."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
NOT_RUN = {"make_random_model.py"}   # a tool with its own arguments, tested by its owner

# What each example must print (regular expressions, searched in stdout): facts of the bundled
# model and of the passes, not node counts or ids, which change whenever a builder does.
EXPECTED = {
    "generate.py": [r"model: tiny-qwen3moe-kjv-Q8_0\.gguf: qwen3moe", r"logits \(7, 4096\)",
                    r"greedy: And God said \S", r"sampled: And God said",
                    r"perplexity on Hebrews 11:1-6: \d+\.\d+ \(93 predictions"],
    "custom_pattern_pass.py": [r"pattern matches 17 norms", r"rewrote 17 MULs: \d+ -> \d+ live nodes",
                               r"\+%\d+ = RMS_NORM\(%\d+, %\d+ blk\.0\.attn_norm\.weight\)",
                               r"same graph as the built-in fuse_norm: True",
                               r"bit-identical: True, True", r"exit 0, .* 17 fewer MUL nodes"],
    "analysis_pass.py": [r"decode step \(T=1, KV=129\)", r"MUL_MAT_ID +8 +6\.29 +3264\.0",
                         r"prompt step \(T=128, KV=128\)",
                         r"weights read per generated token: 5\.12 MiB of 15\.75 MiB",
                         r"with slice_experts k=2: 3\.53 MiB"],
    "dump_graph.py": [r"fuse_qkv +\d+ -> \d+ live nodes", r"fuse_up_gate +\d+ -> \d+ live nodes",
                      r"MUL_MAT_ID 12 -> 8", r"blk\.0\.ffn_gate_up_exps\.weight Q8_0 \[16, 512, 256\]",
                      r"fused\.dot", r"fused\.json", r"02-fuse_up_gate\.txt"],
    "slice_experts.py": [r"soft k=2, layer 0: TOP_K k=2", r"hard k=2, layer 0: TOP_K k=4.*SLICE",
                         r"k=4 \(the model's\) +\d+\.\d+ +\+0\.0%", r"k=2, soft +\d+\.\d+",
                         r"k=2, hard +\d+\.\d+", r"k=\[4, 4, 2, 2\], soft"],
}


def example_scripts() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in NOT_RUN)


def test_every_example_has_expectations():
    missing = set(example_scripts()) - set(EXPECTED)
    assert not missing, f"add what {sorted(missing)} must print to EXPECTED"


@pytest.mark.parametrize("name", example_scripts())
def test_example_runs(name, tmp_path):
    args = [sys.executable, str(EXAMPLES / name)]
    if name == "dump_graph.py":
        args.append(str(tmp_path / "dumps"))          # keep its files inside pytest's tmp dir
    # The examples' matrices are tiny: multi-threaded OpenBLAS only spins on them, and on a busy
    # machine (a parallel test run) that made them 5-10x slower. One BLAS thread unless told.
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    for pattern in EXPECTED.get(name, []):
        assert re.search(pattern, proc.stdout), f"{name}: no match for {pattern!r} in:\n{proc.stdout}"


def python_blocks(md: Path) -> list[tuple[str, str | None]]:
    """(code, the output the page shows for it) for each python block; the output is the plain
    ``` block right after it, None where there is none."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", md.read_text(), re.DOTALL)
    out = []
    for i, (lang, code) in enumerate(blocks):
        if lang == "python":
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            out.append((code, nxt[1] if nxt is not None and nxt[0] == "" else None))
    return out


@pytest.mark.parametrize("doc", ["writing-a-pass.md", "ir.md"])
def test_doc_snippets_run(doc):
    """The Python blocks of a page run in order in one namespace (later blocks use earlier
    names), and what each prints is what the page shows after it (the plain block that follows;
    a block without one prints nothing); functions named test_* that they define are called."""
    from moegraph.passes import PASSES, pass_names
    pass_names()                                      # load the built-in passes first
    registered = dict(PASSES)
    ns: dict = {"__name__": f"docs.{doc}"}
    try:
        for i, (code, shown) in enumerate(python_blocks(DOCS / doc)):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(code, f"{doc}, python block {i + 1}", "exec"), ns)  # noqa: S102
            printed = buf.getvalue()
            assert printed.rstrip() == (shown or "").rstrip(), (
                f"{doc}, python block {i + 1} prints something other than the page shows:\n"
                f"--- page\n{shown}--- printed\n{printed}")
        with contextlib.redirect_stdout(io.StringIO()):
            for name, fn in list(ns.items()):
                if name.startswith("test_") and callable(fn):
                    fn()
    finally:                                          # the snippets' passes stay in the snippets
        PASSES.clear()
        PASSES.update(registered)


def test_ir_doc_op_table_is_current():
    from moegraph.ir import op_table_markdown
    text = (DOCS / "ir.md").read_text()
    m = re.search(r"(?ms)^<!-- op-table:begin -->\n(.*?)\n^<!-- op-table:end -->$", text)
    assert m, "docs/ir.md lost its op-table markers"
    assert m.group(1) == op_table_markdown(), (
        "docs/ir.md's op table is out of date: regenerate it with the snippet in docs/ir.md "
        "('The op table' section)")
