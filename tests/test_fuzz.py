"""The GGUF fuzz harness (bench/fuzz_gguf.py): mutated files through load (and compile + forward
on the numpy and llvm backends) must end in a MoeGraphError or a run, never in another exception,
a crash or a hang, and the two backends must agree. A short run in the default tier; the
acceptance run (10,000 loads, 1,000 forwards) in the slow tier."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "bench" / "fuzz_gguf.py"


def _fuzz(tmp_path, *args, timeout):
    out = tmp_path / "fuzz.json"
    r = subprocess.run([sys.executable, str(FUZZ), *args, "-o", str(out), "--keep", str(tmp_path / "kept")],
                       capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text())
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    for c in report["campaigns"]:
        o = c["outcomes"]
        assert o.get("unclean", 0) == o.get("crash", 0) == o.get("hang", 0) == c["disagreements"] == 0, c["problems"][:5]
        assert o.get("ok", 0) and (c["mode"] == "forward" or o.get("error", 0))
    return report


def test_fuzz_load_short(tmp_path):
    _fuzz(tmp_path, "--load", "200", "--forward", "0", "--seed", "1", timeout=600)


@pytest.mark.slow
def test_fuzz_acceptance(tmp_path):
    report = _fuzz(tmp_path, "--load", "10000", "--forward", "1000", "--seed", "2", timeout=4 * 3600)
    assert [c["files"] for c in report["campaigns"]] == [10000, 1000]
