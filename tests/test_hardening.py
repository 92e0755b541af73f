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


@pytest.mark.parametrize("damage", ["truncate", pytest.param("garbage", marks=pytest.mark.slow),
                                    pytest.param("empty", marks=pytest.mark.slow)])   # 13 s each
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


# --------------------------------------------------------------------------- tokens and memory
@pytest.mark.parametrize("tokens,msg", [
    ([2**64], r"token id 18446744073709551616 is out of range"),
    (["abc"], r"token ids must be integers, got 'abc'"),
    ([1.7], r"token ids must be integers, got 1.7"),
    ([True], r"token ids must be integers, got True"),
    ([[1, 2], [3, 4]], r"token ids must be integers, got \[1, 2\]"),
    ("hello", r"got a string 'hello'"),
    ([], r"no tokens given"),
    ([4096], r"token id 4096 is out of range: the vocabulary has 4096 tokens")])
def test_forward_refuses_bad_tokens(tokens, msg):
    """2**64 raised OverflowError, 'abc' a ValueError; a float was truncated and a 2-D array
    flattened without a word. Each is an InputError naming the problem, on both entry points."""
    import numpy as np

    import moegraph
    from moegraph.data import DEFAULT_MODEL
    s = moegraph.load(str(DEFAULT_MODEL)).compile(backend="numpy", n_ctx=16)
    with pytest.raises(moegraph.InputError, match=msg):
        s.forward(tokens)
    assert s.n_past == 0
    with pytest.raises(moegraph.InputError, match="token ids must be integers, got an array of float64"):
        s.forward(np.array([1.0, 2.0]))
    with pytest.raises(moegraph.InputError, match=r"one sequence \(a 1-D array\), got shape \(2, 2\)"):
        s.forward(np.array([[1, 2], [3, 4]]))
    if tokens and not isinstance(tokens, str):     # generate() takes text too
        with pytest.raises(moegraph.InputError, match=msg):
            next(s.generate(tokens, max_tokens=1))


def test_huge_n_ctx_is_refused_before_allocating():
    """n_ctx=10**9 tried to allocate 238 GiB and died with MemoryError (or met the OOM killer):
    the KV cache's size is checked against the memory available first, in milliseconds."""
    import time

    import moegraph
    from moegraph.data import DEFAULT_MODEL
    m = moegraph.load(str(DEFAULT_MODEL))
    for backend in ("numpy", "llvm"):
        t0 = time.perf_counter()
        with pytest.raises(moegraph.InputError, match=r"the KV cache for n_ctx=1000000000 \(f16\) needs 1907.3 GiB, "
                                                      r"but this machine has [\d.]+ GiB available"):
            m.compile(backend=backend, n_ctx=10**9)
        assert time.perf_counter() - t0 < 5


# --------------------------------------------------------------------------- NaN and Inf
def _poisoned(tmp_path, name: str, value: float, n_blocks: int | None = None):
    """The bundled model with `value` in the first n_blocks scales (quantized) or values of
    `name` (all of them by default: then every expert is hit, whichever the router picks)."""
    import numpy as np

    from moegraph.data import DEFAULT_MODEL
    from moegraph.gguf_file import GGUFFile
    f = GGUFFile(DEFAULT_MODEL)
    w = f.tensors[name]
    off = int(w.raw.ctypes.data - f._reader.data.ctypes.data)
    blob = bytearray(DEFAULT_MODEL.read_bytes())
    part = np.frombuffer(blob, np.uint8, w.nbytes, off).copy()
    if w.dtype.name == "Q8_0":
        part.view([("d", "<f2"), ("qs", "i1", 32)])["d"][:n_blocks] = value
    else:
        part.view(np.float32)[:n_blocks] = value
    blob[off:off + w.nbytes] = part.tobytes()
    p = tmp_path / "poisoned.gguf"
    p.write_bytes(bytes(blob))
    return p


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_gate_inp.weight",
                                  "blk.1.ffn_down_exps.weight", "output_norm.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_an_error_on_every_backend(tmp_path, monkeypatch, name, value):
    """NaN/Inf in weights or scales: numpy gave NaN logits where llvm gave finite ones (its exp,
    max and activation quantization dropped NaN). Now the small tensors are scanned at load, every
    tensor with check_tensors, and what gets through reaches the output on both backends, where
    non-finite logits raise NumericalError."""
    import moegraph
    import moegraph.runtime as rt
    p = _poisoned(tmp_path, name, value)
    with pytest.raises(moegraph.ModelError, match=rf"tensor {name} \(\w+\) holds NaN or Inf at (block|element) 0"):
        moegraph.load(str(p), check_tensors=True)
    monkeypatch.setattr(rt, "ALWAYS_CHECKED_ELEMENTS", 0)     # let it through to the backends
    for backend in ("numpy", "llvm"):
        s = moegraph.load(str(p)).compile(backend=backend, n_ctx=16, n_threads=2)
        with pytest.raises(moegraph.NumericalError, match=r"the logits at position \d are NaN or Inf"):
            s.forward([1, 2, 3])


def test_small_tensors_are_always_checked(tmp_path):
    import moegraph
    p = _poisoned(tmp_path, "blk.0.attn_norm.weight", float("nan"))
    with pytest.raises(moegraph.ModelError, match=r"tensor blk.0.attn_norm.weight \(F32\) holds NaN or Inf at element 0"):
        moegraph.load(str(p))


# --------------------------------------------------------------------------- threads
def test_thread_start_failure_stops_the_started_workers(monkeypatch):
    """`-t 1000` under a memory cap: starting a thread failed with RuntimeError after others had
    started, and those went on running native code over freed buffers (SIGSEGV). They are now
    stopped and the error names the thread count."""
    import threading

    import moegraph
    from moegraph.data import DEFAULT_MODEL
    real_start = threading.Thread.start

    def start(self):
        if self.name == "moegraph-llvm-3":
            raise RuntimeError("can't start new thread")
        real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    m = moegraph.load(str(DEFAULT_MODEL))
    with pytest.raises(moegraph.MoeGraphError, match=r"could not start worker thread 3 of 5 .*use fewer threads"):
        m.compile(backend="llvm", n_ctx=16, n_threads=6)
    assert not [t for t in threading.enumerate() if t.name.startswith("moegraph-llvm-") and t.is_alive()]


# --------------------------------------------------------------------------- writing files
def test_quantize_into_a_directory_is_a_clear_error(tmp_path, capsys):
    from moegraph.cli import main
    from moegraph.data import DEFAULT_MODEL
    assert main(["quantize", str(DEFAULT_MODEL), str(tmp_path), "Q8_0"]) == 1
    assert "is a directory; give the output file's name" in capsys.readouterr().err


def test_a_failed_write_leaves_no_temp_and_stale_temps_are_removed(tmp_path):
    """A full disk (here: a file-size limit) raised a bare OSError and could leave the hidden
    temp file behind; a killed run always leaves it. The error now names the file, nothing is
    left, and the next write removes the temp files of runs that are gone."""
    out = tmp_path / "out.gguf"
    stale = tmp_path / ".out.gguf.tmp-999999999"      # no such process
    stale.write_bytes(b"half")
    live = tmp_path / f".out.gguf.tmp-{os.getpid()}x"  # not a pid: left alone
    live.write_bytes(b"other")
    code = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from moegraph.cli import main
        from moegraph.data import DEFAULT_MODEL
        sys.exit(main(["quantize", "--no-progress", str(DEFAULT_MODEL), sys.argv[1], "F32"]))
    """)
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"{out}: cannot write: File too large" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


# --------------------------------------------------------------------------- llama.cpp habits
@pytest.mark.parametrize("argv,msg", [
    (["run", "-b", "numpy"], "-b is the batch size, as in llama.cpp; choose the backend with --backend numpy"),
    (["run", "-cnv"], "(-cnv, llama.cpp's conversation mode, is `moegraph chat` here"),
    (["bench", "-b", "llvm"], "choose the backend with --backend llvm"),
    (["run", "-c", "abc"], "-c/--ctx-size: expected an integer, got 'abc'")])
def test_llama_cpp_flags_are_understood(capsys, argv, msg):
    from moegraph.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "_ctx_size" not in err


def test_llama_cpp_flags_work(capsys):
    """-ngl 99 used to read as `-n gl`; -ub as nothing; --override-kv did not exist; inspect
    needed a positional file; -n 100 -c 16 stopped after 11 tokens without saying why."""
    from moegraph.cli import main
    from moegraph.data import DEFAULT_MODEL
    base = ["run", "--backend", "numpy", "-c", "24", "-n", "4", "--temp", "0", "--prompt-tokens", "1,2,3"]
    assert main(base) == 0
    want = capsys.readouterr().out
    assert main(base + ["-b", "2", "-ub", "1", "-ngl", "0"]) == 0
    assert capsys.readouterr().out == want
    assert main(base + ["-ngl", "2"]) == 1
    assert "moegraph runs all 4 layers on the GPU or none" in capsys.readouterr().err
    assert main(base + ["--override-kv", "qwen3moe.expert_used_count=int:1"]) == 0
    one = capsys.readouterr()
    assert main(base + ["--n-expert-used", "1"]) == 0
    assert capsys.readouterr().out == one.out and "slice_experts" in one.err
    assert main(base + ["--override-kv", "qwen3moe.context_length=int:8"]) == 1
    assert "can override only qwen3moe.expert_used_count" in capsys.readouterr().err
    assert main(["run", "--backend", "numpy", "-c", "16", "-n", "100", "--prompt-tokens", "1,2,3,4,5"]) == 0
    assert "stopped after 12 of 100 tokens: the context (n_ctx=16) is full; use a larger -c" in capsys.readouterr().err
    assert main(["inspect", "-m", str(DEFAULT_MODEL)]) == 0
    by_flag = capsys.readouterr().out
    assert main(["inspect"]) == 0 and capsys.readouterr().out == by_flag


def test_quantize_accepts_allow_requantize(tmp_path, capsys):
    from moegraph.cli import main
    from moegraph.data import DEFAULT_MODEL
    assert main(["quantize", "--no-progress", str(DEFAULT_MODEL), str(tmp_path / "a.gguf"), "Q4_0"]) == 0
    assert "requantizing tensors that are already Q8_0" in capsys.readouterr().err
    assert main(["quantize", "--no-progress", "--allow-requantize", str(DEFAULT_MODEL),
                 str(tmp_path / "b.gguf"), "Q4_0"]) == 0
    assert "requantizing" not in capsys.readouterr().err


# --------------------------------------------------------------------------- plug-ins
def test_cli_loads_a_users_pass_module(tmp_path, monkeypatch, capsys):
    """The CLI could not load a user's pass module (only a python -c wrapper could); --plugin
    takes a .py file or a module name, $MOEGRAPH_PLUGINS too, and an import failure is a clear
    error."""
    from moegraph.cli import main
    from moegraph.passes import PASSES
    (tmp_path / "my_plugin_passes.py").write_text(textwrap.dedent("""
        from moegraph.passes import register_pass

        @register_pass("plugin_tags_graph")
        def plugin_tags_graph(graph):
            graph.meta["tagged_by_plugin"] = True
            return graph
    """))
    try:
        assert main(["dump", "-c", "16", "--passes", "plugin_tags_graph", "--format", "json"]) == 1
        assert "unknown pass 'plugin_tags_graph'" in capsys.readouterr().err
        assert main(["dump", "-c", "16", "--plugin", str(tmp_path / "my_plugin_passes.py"),
                     "--passes", "plugin_tags_graph", "--format", "json"]) == 0
        assert '"tagged_by_plugin": true' in capsys.readouterr().out
        PASSES.pop("plugin_tags_graph")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MOEGRAPH_PLUGINS", "my_plugin_passes")
        assert main(["dump", "-c", "16", "--passes", "plugin_tags_graph", "--format", "json"]) == 0
        assert '"tagged_by_plugin": true' in capsys.readouterr().out
        monkeypatch.delenv("MOEGRAPH_PLUGINS")
        (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('plugin bug')\n")
        assert main(["dump", "--plugin", "broken_plugin"]) == 1
        assert "--plugin broken_plugin: could not import it: RuntimeError: plugin bug" in capsys.readouterr().err
    finally:
        PASSES.pop("plugin_tags_graph", None)


def test_ctrl_c_while_the_compiled_code_is_cached_is_not_swallowed(tmp_path, monkeypatch):
    """A KeyboardInterrupt inside llvmlite's object-cache callback (a ctypes callback) was
    printed as "Exception ignored" and compilation went on; it now stops compile()."""
    import moegraph
    from moegraph import cache
    from moegraph.data import DEFAULT_MODEL
    monkeypatch.setenv("MOEGRAPH_CACHE", str(tmp_path))

    def interrupted(path, data):
        raise KeyboardInterrupt
    monkeypatch.setattr(cache, "write_entry", interrupted)
    m = moegraph.load(str(DEFAULT_MODEL))
    with pytest.raises(KeyboardInterrupt):
        m.compile(backend="llvm", n_ctx=16, n_threads=1, max_tokens=3)


def test_cli_prompt_tokens_out_of_range(capsys):
    """--prompt-tokens 2**70 ended in an OverflowError traceback."""
    from moegraph.cli import main
    assert main(["run", "--backend", "numpy", "-c", "16", "--prompt-tokens", str(2**70)]) == 1
    assert f"token id {2**70} is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,msg", [
    ("attention.head_count", 0, r"llama.attention.head_count = 0 is not an integer >= 1"),
    ("block_count", "four", r"llama.block_count = 'four' is not an integer >= 1"),
    ("attention.head_count", [4, 4], r"llama.attention.head_count holds 2 values \(one per layer\?\)"),
    ("attention.head_count_kv", 3, r"head_count 4 is not a multiple of attention.head_count_kv 3"),
    ("expert_used_count", 9, r"expert_used_count 9 must be in 1..expert_count \(8\)"),
    ("rope.freq_base", float("nan"), r"rope.freq_base = nan is not a finite number"),
    ("rope.dimension_count", 7, r"rope.dimension_count 7 must be even")])
def test_bad_hyper_parameters_are_named(tmp_path, key, value, msg):
    """The fuzzer's one unclean failure in 10,000 files: attention.head_count 0 raised a bare
    ZeroDivisionError. Every hyper-parameter is checked for type and range, naming the key."""
    import moegraph
    from moegraph.gguf_file import GGUFFile, write_gguf
    from moegraph.testing import write_random_model
    src = write_random_model(tmp_path / "m.gguf", "llama", n_layer=1, n_expert=8, dtype="F32")
    f = GGUFFile(src)
    meta = dict(f.metadata)
    meta[f"llama.{key}"] = value
    types = {k: v for k, v in f.metadata_types.items() if k != f"llama.{key}"}
    p = write_gguf(tmp_path / "bad.gguf", meta, list(f.tensors.values()), metadata_types=types)
    with pytest.raises(moegraph.ModelError, match=msg):
        moegraph.load(str(p))
