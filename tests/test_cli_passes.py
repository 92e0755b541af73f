"""The CLI's pass and expert options: `--passes`, `dump --after-each/--diff`, `--n-expert-used`,
`--slice-mode`, `--prune-experts --calib`, `moegraph experts`, and perplexity's sweep table; on the
bundled tiny MoE (4 layers, 16 experts, 4 per token), small chunks so that it all runs in seconds."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from moegraph.cli import main
from moegraph.data import DEFAULT_MODEL

from conftest import MODELS

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = MODELS / "heldout.txt"     # (conftest's MODELS: ../shared or MOEGRAPH_FIXTURES)
MODEL = str(DEFAULT_MODEL)
LAYERS = range(4)


def cli(capsys, *argv):
    """Runs `moegraph argv...` in-process; returns (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    if HELDOUT.exists():
        body = HELDOUT.read_text(encoding="utf-8")[:4000]
    else:
        verses = ["And God said, Let there be light: and there was light.",
                  "And God saw the light, that it was good: and God divided the light from the darkness.",
                  "And God called the light Day, and the darkness he called Night.",
                  "And the evening and the morning were the first day."]
        body = "\n".join(verses[i % 4] for i in range(60))
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(body, encoding="utf-8")
    return p


def table_rows(out: str) -> dict[tuple[str, str, str], list[str]]:
    """The perplexity sweep table: (k, mode, experts) -> the row's cells."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 7 and re.fullmatch(r"[\d:]+", cells[0]) and cells[6].endswith("%"):
            rows[tuple(cells[:3])] = cells
    return rows


# --------------------------------------------------------------------------- --passes
def test_dump_passes_shows_merged_nodes(capsys):
    rc, out, err = cli(capsys, "dump", "-m", MODEL, "-c", "32", "--passes", "fuse_qkv,fuse_up_gate")
    assert rc == 0, err
    for i in LAYERS:
        assert re.search(rf"blk\.{i}\.attn_qkv = MUL_MAT\(", out)
        assert re.search(rf"blk\.{i}\.ffn_gate_up_exps\S* = MUL_MAT_ID\(", out)
        assert f"blk.{i}.attn_q.weight" not in out and f"blk.{i}.ffn_up_exps.weight" not in out
    assert "MUL_MAT_ID 8" in out                    # gate_up + down per layer, was 3 per layer
    assert "passes: fuse_qkv, fuse_up_gate" in err


def test_dump_after_each_writes_one_file_per_pass(capsys, tmp_path):
    out_file = tmp_path / "g.txt"
    rc, out, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv,fuse_up_gate,dce",
                       "--after-each", "-o", out_file)
    assert rc == 0, err
    assert out == ""
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["g.after-1-fuse_qkv.txt", "g.after-2-fuse_up_gate.txt", "g.after-3-dce.txt",
                     "g.txt"]
    first = (tmp_path / "g.after-1-fuse_qkv.txt").read_text()
    second = (tmp_path / "g.after-2-fuse_up_gate.txt").read_text()
    assert "blk.0.attn_qkv" in first and "ffn_gate_up_exps" not in first
    assert "blk.0.attn_qkv" in second and "blk.0.ffn_gate_up_exps" in second
    assert (tmp_path / "g.txt").read_text() == (tmp_path / "g.after-3-dce.txt").read_text()

    # JSON and DOT too (DOT also rendered to SVG where Graphviz is installed)
    rc, _, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv,fuse_up_gate", "--after-each",
                     "--format", "json", "-o", tmp_path / "j.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "j.after-2-fuse_up_gate.json").read_text())
    assert any(n.get("name") == "blk.0.ffn_gate_up_exps.weight" for n in d["nodes"])
    rc, _, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv", "--after-each",
                     "--format", "dot", "-o", tmp_path / "d.dot")
    assert rc == 0, err
    assert (tmp_path / "d.after-1-fuse_qkv.dot").read_text().startswith("digraph")
    assert (tmp_path / "d.after-1-fuse_qkv.svg").exists() or "Graphviz `dot` is not on PATH" in err

    # without -o: each graph on stdout under a header
    rc, out, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv,dce", "--after-each")
    assert rc == 0, err
    assert "### after pass 1/2: fuse_qkv" in out and "### after pass 2/2: dce" in out


def test_dump_diff(capsys):
    """--diff lists the nodes only before / only after, whatever their order and ids, a change
    made in every layer written once with its layers; --diff unified is the text diff."""
    rc, out, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv,fuse_up_gate", "--diff")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "--- input" and lines[1] == "+++ after fuse_qkv + fuse_up_gate"
    minus = [x for x in lines if x.startswith("-") and not x.startswith("---")]
    plus = [x for x in lines if x.startswith("+") and not x.startswith("+++")]
    assert "- blk.N.attn_q.weight = WEIGHT Q8_0 [256, 256] (68.0 KiB)  [N = 0-3]" in minus
    assert any("blk.N.ffn_up_exps.weight" in x and x.endswith("[N = 0-3]") for x in minus)
    assert any(x.startswith("+ blk.N.attn_qkv = MUL_MAT(blk.N.attn_qkv.weight") for x in plus)
    assert any("blk.N.ffn_gate_up_exps" in x for x in plus)
    assert len(lines) < 40
    rc, out, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv,fuse_up_gate", "--diff", "unified")
    assert rc == 0, err
    assert any(x.startswith("-%") and "blk.0.attn_q.weight" in x for x in out.splitlines())

    # with --after-each: one diff per pass, each against the graph before it
    rc, out, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv,fuse_up_gate",
                       "--after-each", "--diff")
    assert rc == 0, err
    heads = [x for x in out.splitlines() if x.startswith(("---", "+++"))]
    assert heads == ["--- input", "+++ after 1: fuse_qkv",
                     "--- after 1: fuse_qkv", "+++ after 2: fuse_up_gate"]
    first, second = out.split("+++ after 2: fuse_up_gate")
    assert any(x.startswith("+") and "blk.N.attn_qkv" in x for x in first.splitlines())
    assert not any(x.startswith("+") and "ffn_gate_up_exps" in x for x in first.splitlines())
    assert any(x.startswith("+") and "blk.N.ffn_gate_up_exps" in x for x in second.splitlines())


def test_dump_expert_slicing(capsys):
    rc, out, err = cli(capsys, "dump", "-c", "32", "--n-expert-used", "2", "--slice-mode", "hard",
                       "--diff")
    assert rc == 0, err
    assert any(x.startswith("+") and "blk.N.expert_ids_hard" in x for x in out.splitlines())
    rc, out, err = cli(capsys, "dump", "-c", "32", "--n-expert-used", "4,3,2,1")
    assert rc == 0, err
    ks = [int(k) for k in re.findall(r"= TOP_K\(.*\{k=(\d+)\}", out)]
    assert ks == [4, 3, 2, 1], ks


def test_unknown_pass_lists_the_passes(capsys):
    for cmd in (["dump"], ["run", "-n", "1"], ["perplexity", "-f", "nowhere.txt"]):
        rc, out, err = cli(capsys, *cmd, "--passes", "fuse_qkv,fuse_everything")
        assert rc == 1, (cmd, err)
        assert "moegraph: error: unknown pass 'fuse_everything'" in err
        for name in ("dce", "cse", "fuse_qkv", "fuse_up_gate", "slice_experts", "prune_experts"):
            assert name in err
        assert "Traceback" not in err and out == ""
    rc, out, err = cli(capsys, "dump", "--passes", "help")
    assert rc == 0, err
    assert out.startswith("available passes")
    assert re.search(r"^\s+fuse_qkv\s+\S", out, re.MULTILINE) and "--n-expert-used" in out


def test_pass_option_errors(capsys, text):
    cases = [
        (["run", "--n-expert-used", "5", "--slice-mode", "hard"], r"hard slicing keeps 1\.\.4"),
        (["run", "--n-expert-used", "4,4,2"], r"3 values, but the model has 4 MoE layers"),
        (["run", "--n-expert-used", "17"], r"the model has 16 experts"),
        (["run", "--slice-mode", "hard"], r"--slice-mode needs --n-expert-used"),
        (["run", "--prune-experts", "8"], r"--prune-experts needs a calibration text: --calib FILE"),
        (["run", "--prune-experts", "2", "--calib", text], r"keep between 4 .* and 16"),
        (["dump", "--diff"], r"--after-each and --diff need passes"),
        (["perplexity", "-f", text, "--slice-mode", "soft,medium"], r"--slice-mode: expected soft"),
    ]
    for argv, pattern in cases:
        rc, _, err = cli(capsys, *argv)
        assert rc == 1, (argv, err)
        assert re.search("moegraph: error: .*" + pattern, err), (argv, err)


# --------------------------------------------------------------------------- run
def test_run_with_fewer_experts(capsys, text):
    run = ("run", "--backend", "numpy", "-c", "64", "-n", "4", "--temp", "0")
    rc, out, err = cli(capsys, *run, "--n-expert-used", "2", "--slice-mode", "hard")
    assert rc == 0, err
    assert "passes: slice_experts(k=2, hard)" in err and "eval time" in err and out.strip()
    rc, out, err = cli(capsys, *run, "--passes", "fuse_qkv,fuse_up_gate",
                       "--n-expert-used", "4,4,2,2", "--prune-experts", "12", "--calib", text,
                       "--calib-chunks", "1")
    assert rc == 0, err
    assert ("passes: fuse_qkv, fuse_up_gate, slice_experts(k=4:4:2:2, soft), "
            "prune_experts(keep 12 per layer)") in err


# --------------------------------------------------------------------------- experts
def test_experts_table_and_json(capsys, text, tmp_path):
    out_json = tmp_path / "usage.json"
    rc, out, err = cli(capsys, "experts", "-m", MODEL, "-f", text, "-c", "32", "--backend", "numpy",
                       "--chunks", "2", "-o", out_json)
    assert rc == 0, err
    lines = out.splitlines()
    head = next(x for x in lines if x.split()[:1] == ["layer"])
    assert head.split() == ["layer"] + [f"e{e}" for e in range(16)] + ["min", "max", "balance"]
    rows = [x.split() for x in lines if re.match(r"\s+\d+\s", x)]
    assert [int(r[0]) for r in rows] == list(LAYERS)
    for r in rows:
        shares = [float(v) for v in r[1:17]]
        assert abs(sum(shares) - 100) <= 16 * 0.05 + 1e-9    # each share printed to 0.1%
        assert float(r[17]) == min(shares) and float(r[18]) == max(shares)
        assert 0 < float(r[19]) <= 1
    d = json.loads(out_json.read_text())
    assert d["n_tokens"] == 64 and d["n_expert"] == 16 and d["n_expert_used"] == 4
    assert sorted(d["layers"], key=int) == [str(i) for i in LAYERS]
    for layer in d["layers"].values():
        assert len(layer["counts"]) == 16 and sum(layer["counts"]) == 64 * 4
        assert math.isclose(sum(layer["fractions"]), 1, abs_tol=1e-4)
        assert 0 < layer["balance"] <= 1
    assert d["model"] == MODEL and d["settings"]["ctx"] == 32 and d["settings"]["n_chunks"] == 2


# --------------------------------------------------------------------------- perplexity
def test_perplexity_single_value_keeps_the_old_output(capsys, text, tmp_path):
    rc, out, err = cli(capsys, "perplexity", "-f", text, "-c", "32", "--backend", "numpy", "--chunks", "2",
                       "--n-expert-used", "2", "--slice-mode", "hard", "-o", tmp_path / "r.json")
    assert rc == 0, err
    assert re.search(r"^PPL = \d+\.\d{4} \+/- \d+\.\d{4}$", out, re.MULTILINE) and "30 predictions" in out
    assert "slice_experts(k=2, hard)" in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["settings"]["passes"] == ["slice_experts"] and r["settings"]["slice_mode"] == "hard"


def test_perplexity_sweep_table(capsys, text, tmp_path):
    rc, out, err = cli(capsys, "perplexity", "-f", text, "-c", "32", "--backend", "numpy", "--chunks", "2",
                       "--n-expert-used", "4,2,1", "--slice-mode", "soft,hard",
                       "-o", tmp_path / "sweep.json")
    assert rc == 0, err
    rows = table_rows(out)
    assert list(rows) == [("4", "full", "16"), ("2", "soft", "16"), ("2", "hard", "16"),
                          ("1", "soft", "16"), ("1", "hard", "16")]   # k=4 is the baseline, once
    assert rows[("4", "full", "16")][5:] == ["+0.0000", "+0.00%"]
    assert "[5/5] k=1 hard" in err                  # one progress bar per configuration
    d = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["k"], r["mode"]) for r in d["rows"]] == [(4, "full"), (2, "soft"), (2, "hard"),
                                                         (1, "soft"), (1, "hard")]
    base = d["rows"][0]["ppl"]
    for r in d["rows"]:
        assert math.isclose(r["delta"], r["ppl"] - base, abs_tol=1e-9)
        assert math.isclose(r["delta_pct"], 100 * (r["ppl"] / base - 1), abs_tol=1e-9)
        assert f"{r['ppl']:.4f}" == rows[(str(r["k"]), r["mode"], "16")][3]
        assert r["n_predictions"] == 30 and len(r["chunk_nll"]) == 2
    assert d["settings"]["n_expert_used"] == "4,2,1" and d["settings"]["ctx"] == 32
    # the baseline is what a plain run gives
    rc, out, err = cli(capsys, "perplexity", "-f", text, "-c", "32", "--backend", "numpy", "--chunks", "2")
    assert rc == 0, err
    assert f"PPL = {base:.4f}" in out


def test_perplexity_prune_rows(capsys, text, tmp_path):
    rc, out, err = cli(capsys, "perplexity", "-f", text, "-c", "32", "--backend", "numpy", "--chunks", "2",
                       "--n-expert-used", "3", "--prune-experts", "16,12", "--calib-chunks", "2",
                       "-o", tmp_path / "p.json")
    assert rc == 0, err
    assert "no --calib given" in err and "calibration" in err
    rows = table_rows(out)
    assert list(rows) == [("4", "full", "16"), ("3", "soft", "16"), ("4", "prune", "16"),
                          ("4", "prune", "12")]
    d = json.loads((tmp_path / "p.json").read_text())
    full, _, keep_all, keep12 = d["rows"]
    assert math.isclose(keep_all["ppl"], full["ppl"], rel_tol=1e-6)   # keeping all 16 = no-op
    assert keep12["ppl"] != full["ppl"]
    assert d["settings"]["calib"] == str(text)


def test_perplexity_plot(capsys, text, tmp_path):
    png = tmp_path / "ppl.png"
    argv = ["perplexity", "-f", text, "-c", "32", "--backend", "numpy", "--chunks", "1",
            "--n-expert-used", "2", "--slice-mode", "soft,hard", "--plot", png]
    rc, _, err = cli(capsys, *argv)
    if importlib.util.find_spec("matplotlib") is None:
        assert rc == 1 and "pip install matplotlib" in err and not png.exists()
    else:
        assert rc == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dump_big_models(capsys, tmp_path):
    """A 48-layer dump was 3,000 lines and its SVG timed out: identical layers are folded (auto
    above 8 layers), --layers picks some, and the DOT follows the same view."""
    from moegraph.testing import write_random_model
    p = str(write_random_model(tmp_path / "l12.gguf", "qwen3moe", n_layer=12, dtype="Q8_0"))
    rc, out, err = cli(capsys, "dump", "-m", p)
    assert rc == 0, err
    assert "# layers 1-11: the same as layer 0 (not shown)" in out
    assert "blk.0.attn_q.weight" in out and "blk.5." not in out and "output.weight" in out
    rc, full, err = cli(capsys, "dump", "-m", p, "--collapse", "off")
    assert len(full.splitlines()) > 8 * len(out.splitlines()) // 2
    rc, out, err = cli(capsys, "dump", "-m", p, "--layers", "3,-1")
    assert rc == 0, err
    assert "# layers 3, 11 of 12 (--layers)" in out
    names = set(re.findall(r"blk\.(\d+)\.", out))
    assert names == {"3", "11"} and " output.weight" not in out
    rc, dot, err = cli(capsys, "dump", "-m", p, "--format", "dot")
    assert rc == 0 and "cluster_blk_0" in dot and "cluster_blk_1 " not in dot and "the same as layer 0" in dot
    rc, out, err = cli(capsys, "dump", "-m", p, "--layers", "12")
    assert rc == 1 and "--layers 12: the model has layers 0-11" in err
