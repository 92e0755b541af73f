"""`moegraph bench`: runs both tests, reports tokens/s in a table or JSON, compares with llama.cpp
when the optional llama_cpp package is importable."""
import importlib.util
import json

import pytest

from moegraph.cli import main


def test_bench_json(capsys):
    assert main(["bench", "-p", "16", "-n", "4", "-r", "2", "-t", "1", "-o", "json",
                 "--passes", "fuse_qkv,fuse_up_gate", "--n-expert-used", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    tests = {r["test"]: r for r in report["results"]}
    assert set(tests) == {"pp16", "tg4"}
    assert all(r["tokens_per_s"] > 0 and len(r["seconds"]) == 2 for r in tests.values())
    assert report["passes"] == ["fuse_qkv", "fuse_up_gate"] and report["n_expert_used"] == 2


def test_bench_table(capsys):
    assert main(["bench", "-p", "8", "-n", "2", "-r", "1", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "| moegraph | pp8 |" in out and "| moegraph | tg2 |" in out


@pytest.mark.slow
def test_bench_compare_llama_cpp(capsys):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the optional llama_cpp package is not installed (pip install llama-cpp-python)")
    assert main(["bench", "-p", "16", "-n", "4", "-r", "1", "--compare", "llama.cpp", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"pp16", "tg4"} == set(report["ratio_vs_llama_cpp"])
