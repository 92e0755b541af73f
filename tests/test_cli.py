"""The `moegraph` command line, on the bundled tiny MoE (tiny-qwen3moe-kjv Q8_0).

Most tests call `main(argv)` in-process (fast); two run the real entry point in a subprocess."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moegraph.cli import DEFAULT_PROMPT, main
from moegraph.data import DEFAULT_MODEL

from conftest import MODELS

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = MODELS / "heldout.txt"     # (conftest: ../shared/fixtures or MOEGRAPH_FIXTURES)
MODEL = str(DEFAULT_MODEL)


def cli(capsys, *argv):
    """Runs `moegraph argv...` in-process; returns (exit code, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:           # argparse's own exits (usage errors, --version)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def sample_text() -> str:
    if HELDOUT.exists():
        return HELDOUT.read_text(encoding="utf-8")[:3000]
    verses = ["And God said, Let there be light: and there was light.",
              "And God saw the light, that it was good: and God divided the light from the darkness.",
              "And God called the light Day, and the darkness he called Night."]
    return "\n".join(verses[i % 3] for i in range(40))


# --------------------------------------------------------------------------- inspect
def test_inspect_text(capsys):
    rc, out, err = cli(capsys, "inspect", MODEL)
    assert rc == 0, err
    assert "architecture: qwen3moe" in out
    assert re.search(r"n_expert\s+16", out) and re.search(r"n_expert_used\s+4", out)
    assert re.search(r"tokenizer\.ggml\.tokens\s+\[4096 items\]", out)
    assert re.search(r"blk\.0\.ffn_up_exps\.weight\s+Q8_0\s+\[16, 256, 256\]\s+1,114,112", out)
    assert "total: 51 tensors" in out
    assert "unsupported tensors: none" in out


def test_inspect_json(capsys):
    rc, out, err = cli(capsys, "inspect", MODEL, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["architecture"] == "qwen3moe" and d["config"]["n_layer"] == 4
    assert d["metadata"]["tokenizer.ggml.tokens"] == "[4096 items]"
    assert len(d["tensors"]) == d["totals"]["n_tensors"] == 51
    assert d["totals"]["nbytes"] == sum(t["nbytes"] for t in d["tensors"])
    emb = next(t for t in d["tensors"] if t["name"] == "token_embd.weight")
    assert emb["type"] == "Q8_0" and emb["shape"] == [4096, 256]
    assert d["unsupported"] == {}


# --------------------------------------------------------------------------- run
def test_run_greedy(capsys):
    rc, out, err = cli(capsys, "run", "-m", MODEL, "--temp", "0", "-n", "8")
    assert rc == 0, err
    assert out.startswith(DEFAULT_PROMPT) and len(out.strip()) > len(DEFAULT_PROMPT)
    for word in ("load time", "compile time", "prompt eval time", "eval time", "tokens per second"):
        assert word in err
    assert re.search(r"eval time = .* /\s+8 runs", err)
    # greedy is deterministic whatever the seed
    rc2, out2, _ = cli(capsys, "generate", "--temp", "0", "-n", "8", "-s", "7")
    assert rc2 == 0 and out2 == out


def test_run_seed_is_deterministic(capsys):
    args = ("run", "-p", "And the LORD said", "-n", "8", "--temp", "1.0", "-s", "1234",
            "--no-display-prompt")
    rc1, out1, err1 = cli(capsys, *args)
    rc2, out2, _ = cli(capsys, *args)
    assert rc1 == rc2 == 0, err1
    assert out1 == out2 and out1.strip()
    assert "seed 1234" in err1


def test_run_prompt_tokens(capsys):
    rc, _, err = cli(capsys, "run", "--prompt-tokens", "10,20,30", "-n", "4", "--temp", "0")
    assert rc == 0, err
    assert re.search(r"prompt eval time = .* /\s+3 tokens", err)


# --------------------------------------------------------------------------- perplexity
def test_perplexity(capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(), encoding="utf-8")
    out_json = tmp_path / "ppl.json"
    rc, out, err = cli(capsys, "perplexity", "-m", MODEL, "-f", text, "-c", "128",
                       "--chunks", "2", "-o", out_json)
    assert rc == 0, err
    m = re.search(r"PPL = (\d+\.\d{4}) \+/- (\d+\.\d{4})", out)
    assert m, out
    ppl = float(m.group(1))
    assert 1.0 < ppl < 4096
    assert "126 predictions in 2 chunks" in out and "tokens/s" in out
    assert "perplexity" in err                      # the progress bar went to stderr
    r = json.loads(out_json.read_text())
    assert r["n_predictions"] == 126 and len(r["chunk_nll"]) == 2
    assert math.isclose(r["ppl"], math.exp(np.mean(r["chunk_nll"])), rel_tol=1e-12)
    assert abs(r["ppl"] - ppl) < 1e-4
    assert r["settings"]["ctx"] == 128 and r["settings"]["kv_type"] == "f16"
    assert r["model"] == MODEL and r["seconds"] > 0


# --------------------------------------------------------------------------- dump
def test_dump_formats(capsys, tmp_path):
    rc, text, err = cli(capsys, "dump", "-m", MODEL, "-c", "64")
    assert rc == 0, err
    assert text.startswith("# graph ") and "= MUL_MAT_ID(" in text
    assert "cache_k.0 = STATE [64, 2, 64] F16" in text

    rc, out, err = cli(capsys, "dump", "--format", "json", "--kv-type", "f32")
    assert rc == 0, err
    d = json.loads(out)
    assert d["meta"]["kv_dtype"] == "F32" and d["outputs"]["logits"] in {n["id"] for n in d["nodes"]}

    rc, out, err = cli(capsys, "dump", "--format", "dot")
    assert rc == 0, err
    assert out.startswith("digraph") and "cluster_blk_3" in out

    dot = tmp_path / "g.dot"
    rc, out, err = cli(capsys, "dump", "--format", "dot", "-o", dot)
    assert rc == 0, err
    assert dot.read_text().startswith("digraph") and out == ""
    assert (tmp_path / "g.svg").exists() or "Graphviz `dot` is not on PATH" in err


@pytest.mark.parametrize("backend,most", [("llvm", 12), ("cuda", 14), ("numpy", None)])
def test_dump_lowered(capsys, backend, most):
    """The lowered program as JSON: every kernel call with its graph nodes and token range; the
    bundled model's decode step fits the fusion budget (LLVM: 12 calls per layer; CUDA: 14 until
    the MoE bucketing and product groups are single launches there)."""
    rc, out, err = cli(capsys, "dump", "--lowered", backend, "--format", "json", "--passes", "fuse_qkv,fuse_up_gate")
    assert rc == 0, err
    report = json.loads(out)
    assert report["backend"] == backend and report["steps"]
    for s in report["steps"]:
        assert isinstance(s["kernel"], str) and s["nodes"] and all(isinstance(i, int) for i in s["nodes"])
        assert s["tokens"] is None or (len(s["tokens"]) == 2 and s["tokens"][0] <= s["tokens"][1])
    decode = report["summary"]["decode"]
    assert decode["layers"] == 4 and decode["outside_layers"] <= 6
    if most is not None:
        assert decode["max_per_layer"] <= most, report["summary"]
    rc, out, _ = cli(capsys, "dump", "--lowered", backend, "-c", "64")
    assert rc == 0 and out.startswith(f"# lowered for {backend}:") and "# decode:" in out


def test_dump_ops(capsys):
    rc, out, _ = cli(capsys, "dump", "--ops")
    assert rc == 0 and out.startswith("| op | kind | inputs | attrs | semantics |") and "| MUL_MAT_ID | product |" in out
    assert "| ATTENTION | fused |" in out


def test_dump_passes(capsys):
    # more in test_cli_passes.py (--after-each, --diff, expert slicing, the perplexity sweep)
    rc, out, err = cli(capsys, "dump", "-c", "32", "--passes", "fuse_qkv")
    assert rc == 0, err
    assert "blk.0.attn_qkv = MUL_MAT(" in out and "blk.0.attn_q.weight" not in out
    rc, _, err = cli(capsys, "dump", "--passes", "fuse_qkv,nope")
    assert rc == 1 and "moegraph: error: unknown pass 'nope'" in err and "fuse_up_gate" in err


# --------------------------------------------------------------------------- errors
def _unknown_arch_gguf(path: Path) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), "foo")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bad_file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.gguf"
    data = Path(MODEL).read_bytes()
    if kind == "text":
        p.write_text("this is not a model\n")
    elif kind == "trunc1000":
        p.write_bytes(data[:1000])
    elif kind == "trunchalf":
        p.write_bytes(data[:len(data) // 2])
    elif kind == "foo":
        _unknown_arch_gguf(p)
    return p


@pytest.mark.parametrize("kind, pattern", [
    ("missing", r"no such file"),
    ("text", r"not a GGUF file"),
    ("trunc1000", r"truncated or corrupt"),
    ("trunchalf", r"truncated"),
    ("foo", r"architecture 'foo' is not supported"),
])
def test_bad_model_files(capsys, tmp_path, kind, pattern):
    path = _bad_file(tmp_path, kind)
    rc, _, err = cli(capsys, "run", "-m", path, "-n", "1")
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("moegraph: error: ")
    assert re.search(pattern, err), err
    assert str(path) in err and "Traceback" not in err


def test_inspect_unknown_architecture(capsys, tmp_path):
    rc, out, err = cli(capsys, "inspect", _bad_file(tmp_path, "foo"))
    assert rc == 0, err
    assert "architecture: foo" in out and "unavailable: " in out and "'foo' is not supported" in out


@pytest.mark.parametrize("argv, pattern", [
    (["--prompt-tokens", "5,99999"], r"token id 99999 is out of range.*4096 tokens"),
    (["-c", "16", "-p", "In the beginning God created the heaven and the earth. " * 4],
     r"the prompt has \d+ tokens, more than the context size n_ctx=16"),
])
def test_bad_requests(capsys, argv, pattern):
    rc, out, err = cli(capsys, "run", "-n", "2", *argv)
    assert rc == 1
    assert re.search(r"moegraph: error: " + pattern, err), err
    assert "Traceback" not in err and out == ""


def test_perplexity_text_too_short(capsys, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("In the beginning")
    rc, _, err = cli(capsys, "perplexity", "-f", p)
    assert rc == 1 and re.search(r"moegraph: error: the text has \d+ tokens, fewer than one chunk", err)


def test_debug_shows_traceback(capsys, tmp_path):
    rc, _, err = cli(capsys, "--debug", "inspect", tmp_path / "nope.gguf")
    assert rc == 1 and "Traceback" in err and "moegraph: error:" in err


# --------------------------------------------------------------------------- the real entry point
def _python_m(*argv, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "moegraph.cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_entry_point_version_and_run():
    r = _python_m("--version")
    assert r.returncode == 0 and r.stdout.strip() == "moegraph 0.1.0"
    r = _python_m("run", "--temp", "0", "-n", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(DEFAULT_PROMPT) and "prompt eval time" in r.stderr


def test_entry_point_error_exit_code(tmp_path):
    r = _python_m("inspect", tmp_path / "missing.gguf")
    assert r.returncode == 1
    assert r.stderr.strip() == f"moegraph: error: {tmp_path / 'missing.gguf'}: no such file"
