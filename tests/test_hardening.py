"""Hardening (issue 15). The compiled-code cache is verified before it is trusted: a truncated,
empty, foreign or corrupt entry is recompiled and replaced, never loaded (loading a bad object
file used to kill the process with SIGABRT on every later run, and an empty entry counted as a
hit). A session refuses a second thread while a call runs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from moegraph.cache import HEADER, read_entry, write_entry


def test_entry_round_trip_and_rejection(tmp_path):
    p = tmp_path / "k.o"
    write_entry(p, b"\x7fELF object bytes")
    assert read_entry(p) == b"\x7fELF object bytes"
    good = p.read_bytes()
    for bad in (b"", good[:HEADER.size - 1], good[:-3], good[:-1] + b"X", b"\x7fELF" + good[4:],
                b"garbage" * 100):
        p.write_bytes(bad)
        assert read_entry(p) is None, bad[:12]
        assert not p.exists()             # removed: the next compile writes a good one
    assert read_entry(tmp_path / "missing.o") is None


CHILD = textwrap.dedent("""
    import sys, numpy as np, moegraph
    from moegraph.data import DEFAULT_MODEL
    m = moegraph.load(str(DEFAULT_MODEL))
    s = m.compile(backend="llvm", n_ctx=32, n_threads=2)
    logits = s.forward([1, 2, 3], last_only=True)
    np.save(sys.argv[1], logits)
    print(s.executable.compile_info["cache"])
""")


def _compile(tmp_path, out):
    env = {**os.environ, "MOEGRAPH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stderr[-2000:]}"
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_llvm_recompiles_a_bad_cache_entry(tmp_path, damage):
    import numpy as np
    assert _compile(tmp_path, tmp_path / "a.npy") == "miss"
    entries = list((tmp_path / "cache" / "llvm").glob("*.o"))
    assert entries
    for e in entries:
        blob = e.read_bytes()
        e.write_bytes({"truncate": blob[:len(blob) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    assert _compile(tmp_path, tmp_path / "b.npy") == "miss"     # not loaded: compiled again
    assert _compile(tmp_path, tmp_path / "c.npy") == "hit"      # and replaced by a good entry
    a, b, c = (np.load(tmp_path / f"{x}.npy") for x in "abc")
    assert np.array_equal(a, b) and np.array_equal(a, c)


# --------------------------------------------------------------------------- one caller at a time
@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_a_session_refuses_a_second_thread(backend):
    """While one thread is inside forward(), another thread's forward() or reset() is refused
    with a clear error (it used to interleave over the shared KV cache and native threads: wrong
    logits, NaN, hangs or SIGSEGV); the running call finishes right and n_past stays consistent."""
    import threading

    import numpy as np

    import moegraph
    from moegraph.data import DEFAULT_MODEL
    m = moegraph.load(str(DEFAULT_MODEL))
    s = m.compile(backend=backend, n_ctx=32, n_threads=2)
    want = s.forward([5, 6, 7])
    s.reset()
    inside, release = threading.Event(), threading.Event()
    real = s.executable.run

    def slow_run(inputs):
        inside.set()
        release.wait(30)
        return real(inputs)
    s.executable.run = slow_run
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("logits", s.forward([5, 6, 7])))
    t.start()
    assert inside.wait(30)
    with pytest.raises(moegraph.SessionBusyError, match="another call is running on this session"):
        s.forward([1])
    with pytest.raises(moegraph.SessionBusyError):
        s.reset()
    release.set()
    t.join(30)
    s.executable.run = real
    assert np.array_equal(got["logits"], want) and s.n_past == 3
    if backend == "llvm":    # the executable itself refuses a second caller too
        s.executable._running.acquire()
        try:
            with pytest.raises(moegraph.SessionBusyError, match="already running a step"):
                real({})
        finally:
            s.executable._running.release()


# --------------------------------------------------------------------------- untrusted files
def test_a_fifo_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO without a writer blocked forever; it is not a regular file: refused."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code = ("import sys, moegraph\n"
            "try:\n    moegraph.load(sys.argv[1])\nexcept moegraph.MoeGraphError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "not a regular file" in r.stdout, r.stderr[-1000:]


def test_invalid_utf8_in_metadata_is_a_clear_error(tmp_path):
    """A metadata string that is not UTF-8 raised a bare UnicodeDecodeError; now a GGUFError
    naming the key."""
    import moegraph
    from moegraph.gguf_file import write_gguf
    p = tmp_path / "bad.gguf"
    write_gguf(p, {"general.architecture": "llama", "general.name": "QQQQQQQQQQQQ"}, [])
    blob = p.read_bytes()
    assert blob.count(b"QQQQQQQQQQQQ") == 1
    p.write_bytes(blob.replace(b"QQQQQQQQQQQQ", b"\xff\xfe" * 6))
    with pytest.raises(moegraph.GGUFError, match=r"metadata key 'general.name' holds a string that is not valid UTF-8"):
        moegraph.load(str(p))


# --------------------------------------------------------------------------- sampling
def test_top_p_is_applied_before_temperature():
    """llama.cpp's chain: top-k, top-p on the untempered distribution, then temperature. With
    probabilities 0.6/0.3/0.1 and top_p 0.85, the candidates are the first two whatever the
    temperature (applied first, a high temperature let the third one in)."""
    import numpy as np

    from moegraph.errors import InputError
    from moegraph.sampling import Sampler
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    s = Sampler(temperature=5.0, top_k=0, top_p=0.85, seed=0)
    picks = {s(logits) for _ in range(400)}
    assert picks == {0, 1}
    with pytest.raises(InputError, match="temperature"):
        Sampler(temperature=float("nan"))


# --------------------------------------------------------------------------- passes
def test_verify_checks_weight_bytes():
    """A pass that gives a weight fewer bytes than its shape needs was accepted by verify(), and
    the LLVM row lookup then read past the buffer."""
    import numpy as np

    from moegraph.errors import IRError
    from moegraph.gguf_file import WeightData
    from moegraph.ir import F32, Graph
    from moegraph.quants import GGMLType
    g = Graph()
    w = g.weight(WeightData("w", GGMLType.F32, (4, 8), np.zeros(4 * 8 * 4, np.uint8)))
    g.outputs["y"] = g.mul_mat(w, g.input("x", ("T", 8), F32))
    g.verify()
    w.data = WeightData("w", GGMLType.F32, (4, 8), np.zeros(3 * 8 * 4, np.uint8))
    with pytest.raises(IRError, match=r"weight w holds 96 bytes, its shape and type need 128"):
        g.verify()


def test_pass_failures_name_the_pass():
    """Failures inside passes were bare KeyError/AttributeError/TypeError, or accepted and then
    failing at forward(); each is now a MoeGraphError naming the pass."""
    import moegraph
    from moegraph.data import DEFAULT_MODEL
    from moegraph.passes import run_passes
    g = moegraph.load(str(DEFAULT_MODEL)).graph(n_ctx=16)

    def bad_op(graph):
        graph.toposort()[-1].op = "NO_SUCH_OP"

    def returns_junk(graph):
        return 42

    def drops_outputs(graph):
        graph.outputs.clear()

    def crashes(graph):
        raise ValueError("boom")

    cases = [(bad_op, r"pass 'bad_op' left an invalid graph: .*unknown op 'NO_SUCH_OP'"),
             (returns_junk, r"pass 'returns_junk' returned int, not a Graph"),
             (drops_outputs, r"pass 'drops_outputs' removed the graph output\(s\) \['logits'\]"),
             (crashes, r"pass 'crashes' failed: ValueError: boom"),
             (("cse", {"threshold": 1}), r"pass 'cse' failed: TypeError: .*threshold")]
    for spec, msg in cases:
        with pytest.raises(moegraph.MoeGraphError, match=msg):
            run_passes(g.copy(), [spec])


def test_compile_refuses_bad_options():
    """compile() ignored unknown options (n_thread=2 did nothing) and accepted n_ctx 0,
    n_threads 0, n_expert_used 2.5 and a bogus slice mode."""
    import moegraph
    from moegraph.data import DEFAULT_MODEL
    m = moegraph.load(str(DEFAULT_MODEL))
    bad = [({"n_thread": 2}, r"unknown option\(s\) \['n_thread'\]"),
           ({"n_gpu_layers": 10}, r"unknown option\(s\) \['n_gpu_layers'\]"),
           ({"n_ctx": 0}, r"n_ctx must be a positive integer, got 0"),
           ({"n_threads": 0}, r"n_threads must be a positive integer"),
           ({"n_threads": "2"}, r"n_threads must be a positive integer, got '2'"),
           ({"n_expert_used": 2.5}, r"n_expert_used must be a positive integer, got 2.5"),
           ({"n_expert_used": 2, "slice_mode": "bogus"}, r"slice_mode must be 'soft' or 'hard'")]
    for kw, msg in bad:
        with pytest.raises(moegraph.InputError, match=msg):
            m.compile(backend="numpy", **kw)


@pytest.mark.parametrize("argv,msg", [
    (["run", "-n", "-5"], "-n/--n-predict: must be >= 0, or -1"),
    (["run", "--temp", "nan"], "--temp: must be a finite number"),
    (["run", "--top-k", "-3"], "--top-k: must be >= 0"),
    (["bench", "-r", "0"], "-r/--repetitions: must be a positive integer"),
    (["bench", "-p", "-1"], "-p/--n-prompt: must be >= 0"),
    (["bench", "-t", "0"], "-t/--threads: must be a positive integer")])
def test_cli_refuses_bad_numbers(capsys, argv, msg):
    """-n -5 ran unlimited, --temp nan / --top-k -3 were accepted, bench -r 0 died with a
    StatisticsError traceback: now argparse errors naming the flag (exit 2)."""
    from moegraph.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("count", [2**31 - 1, 2**64 - 2])
def test_array_length_past_the_file_fails_fast(tmp_path, count):
    """A metadata array declaring more elements than the file holds made load() and inspect hang
    while memory grew without bound; the header is now checked against the file size first."""
    import struct
    import time

    import moegraph
    from moegraph.gguf_file import write_gguf
    p = tmp_path / "bad.gguf"
    write_gguf(p, {"general.architecture": "llama", "tokenizer.ggml.token_type": [1, 2, 3]}, [])
    blob = bytearray(p.read_bytes())
    key = b"tokenizer.ggml.token_type"
    at = blob.index(key) + len(key)
    assert struct.unpack_from("<IIQ", blob, at) == (9, 4, 3)      # array of 3 uint32
    struct.pack_into("<Q", blob, at + 8, count)
    p.write_bytes(bytes(blob))
    t0 = time.perf_counter()
    with pytest.raises(moegraph.GGUFError, match=r"metadata key 'tokenizer.ggml.token_type'.*past the end of the file"):
        moegraph.load(str(p))
    assert time.perf_counter() - t0 < 10


def test_truncated_tensor_data_names_the_tensor(tmp_path):
    """A file cut inside the tensor data reported gguf-py's internals ("cannot reshape array of
    size ... into shape ..."); the header walk now names the tensor that runs past the end."""
    import moegraph
    from moegraph.data import DEFAULT_MODEL
    data = DEFAULT_MODEL.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:int(len(data) * 0.7)])
    with pytest.raises(moegraph.GGUFError, match=r"tensor blk\.\d+\.\S+ ends at byte \d+ but the file has \d+ bytes \(truncated file\)"):
        moegraph.load(str(p))
