"""The LLVM CPU backend: the whole graph lowered to LLVM IR (llvmlite), JIT-compiled for the
host CPU and its features, run from one native entry point per forward step.

    graph(ptrs, syms, ith, nth, tls, tls_stride, barrier)
calls every kernel in order; each of the nth threads (ith = 0..nth-1) does its share of each
kernel and meets the others at a barrier (atomics in native code) between dependent steps. The
Python threads that enter it release the GIL inside the ctypes call. Buffers are planned once by
liveness (plan.py); compiled objects are cached on disk keyed by IR, CPU and llvmlite version.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moegraph import cache as moegraph_cache
from moegraph.errors import MoeGraphError, SessionBusyError
from moegraph.ir import F16, F32, I32, Graph
from moegraph.quants import is_quantized

from ..lower import (SYMBOLS, Plan, Target, bind_symbols, check_limits, elem_size, graph_n_ctx, lower,
                     lowered_steps, require_memory)
from .gemm import FLOAT, KQUANT, LEGACY, X8, repack_x8, tiles_text
from .kernels import GENERATORS, emit, vexp_fn
from .quantk import act_row_bytes, module_text

ENTRY = "moegraph_graph"
_REPACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # WeightData -> its x8 copy
PARALLEL_WORK = 4096   # estimated element operations above which a kernel is split among threads
_llvm_lock = threading.Lock()
_initialized = False


def _llvm():
    global _initialized
    import llvmlite.binding as llvm
    with _llvm_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _initialized = True
    return llvm


def host_features() -> dict:
    llvm = _llvm()
    feats = llvm.get_host_cpu_features()
    return {"cpu": llvm.get_host_cpu_name(), "features": feats.flatten(),
            "avx2": bool(feats.get("avx2")), "fma": bool(feats.get("fma")), "f16c": bool(feats.get("f16c"))}


def available() -> bool:
    try:
        _llvm()
        return True
    except Exception:
        return False


def cache_dir() -> Path:
    return moegraph_cache.cache_dir("llvm")


# Threads meet at a barrier after every kernel group: the last to arrive bumps the generation at
# bar+64. Waiters spin briefly (kernels are microseconds apart when the machine is idle), then
# yield, then sleep on the generation word (Linux futex; a short usleep elsewhere), counted at
# bar+128 so the releaser makes the wake-up syscall only when someone sleeps. Without the sleep a
# descheduled thread stalled the others for whole time slices on a busy machine (48x slower
# decoding beside two background processes). The sleep has a 1 ms timeout as a safety net.
BARRIER_SPINS, BARRIER_YIELDS = 4000, 64
_FUTEX = sys.platform.startswith("linux")
_WAKE = "%w = call i64 (i64, ...) @syscall(i64 202, ptr %genp, i64 129, i64 2147483647)"   # FUTEX_WAKE_PRIVATE
_SLEEP = ("""%g64 = zext i32 %g to i64
  store i64 0, ptr %ts, align 8
  %nsp = getelementptr i64, ptr %ts, i64 1
  store i64 1000000, ptr %nsp, align 8
  %r = call i64 (i64, ...) @syscall(i64 202, ptr %genp, i64 128, i64 %g64, ptr %ts)""" if _FUTEX
          else "%r = call i32 @usleep(i32 20)")             # FUTEX_WAIT_PRIVATE while *genp == g
BARRIER = f"""
declare i32 @sched_yield()
declare i32 @usleep(i32)
declare i64 @syscall(i64, ...)
define internal void @barrier(ptr %bar, i64 %nth) noinline {{
entry:
  %ts = alloca [2 x i64], align 8
  %one = icmp ule i64 %nth, 1
  br i1 %one, label %done, label %sync
sync:
  %genp = getelementptr i8, ptr %bar, i64 64
  %sleepp = getelementptr i8, ptr %bar, i64 128
  %g = load atomic i32, ptr %genp acquire, align 4
  %n = atomicrmw add ptr %bar, i32 1 acq_rel
  %n1 = add i32 %n, 1
  %nth32 = trunc i64 %nth to i32
  %last = icmp eq i32 %n1, %nth32
  br i1 %last, label %release, label %wait
release:
  store atomic i32 0, ptr %bar monotonic, align 4
  %old = atomicrmw add ptr %genp, i32 1 seq_cst
  %sleepers = load atomic i32, ptr %sleepp seq_cst, align 4
  %any = icmp ne i32 %sleepers, 0
  br i1 %any, label %wake, label %done
wake:
  {_WAKE if _FUTEX else ""}
  br label %done
wait:
  %spins = phi i32 [0, %sync], [%s1, %again], [%s1, %yield], [%s1, %sleep]
  %cur = load atomic i32, ptr %genp acquire, align 4
  %same = icmp eq i32 %cur, %g
  br i1 %same, label %again, label %done
again:
  %s1 = add i32 %spins, 1
  %long = icmp ugt i32 %spins, {BARRIER_SPINS}
  br i1 %long, label %backoff, label %wait
backoff:
  %verylong = icmp ugt i32 %spins, {BARRIER_SPINS + BARRIER_YIELDS}
  br i1 %verylong, label %sleep, label %yield
yield:
  %y = call i32 @sched_yield()
  br label %wait
sleep:
  %in = atomicrmw add ptr %sleepp, i32 1 seq_cst
  {_SLEEP}
  %out = atomicrmw sub ptr %sleepp, i32 1 seq_cst
  br label %wait
done:
  ret void
}}
"""


# A waiting worker sleeps on ctl[0] (futex, 10 ms timeout), counted at ctl+192; moegraph_kick
# (called for every step) publishes the step's thread count, bumps the generation and wakes
# sleepers. Idle workers used to poll with usleep(50): 20000 wake-ups a second beside a step that
# runs on fewer threads (ThreadPolicy) on a busy machine.
_NAP = ("""%sleepp = getelementptr i8, ptr %ctl, i64 192
  %in = atomicrmw add ptr %sleepp, i32 1 seq_cst
  %seen64 = zext i32 %seen to i64
  store i64 0, ptr %ts, align 8
  %nsp = getelementptr i64, ptr %ts, i64 1
  store i64 10000000, ptr %nsp, align 8
  %z = call i64 (i64, ...) @syscall(i64 202, ptr %ctl, i64 128, i64 %seen64, ptr %ts)
  %out = atomicrmw sub ptr %sleepp, i32 1 seq_cst""" if _FUTEX else "%z = call i32 @usleep(i32 50)")
KICK = """
define i32 @moegraph_kick(ptr %ctl, i32 %active) {
entry:
  %activep = getelementptr i8, ptr %ctl, i64 128
  store atomic i32 %active, ptr %activep release, align 4
  %g = atomicrmw add ptr %ctl, i32 1 seq_cst
  %sleepp = getelementptr i8, ptr %ctl, i64 192
  %s = load atomic i32, ptr %sleepp seq_cst, align 4
  %any = icmp ne i32 %s, 0
  br i1 %any, label %wake, label %done
wake:
  WAKE
  ret i32 1
done:
  ret i32 0
}
""".replace("WAKE", "%w = call i64 (i64, ...) @syscall(i64 202, ptr %ctl, i64 129, i64 2147483647)" if _FUTEX else "")
WORKER = """
; A worker thread's life: wait for a new generation number in ctl[0] (spinning, then yielding,
; then sleeping when idle long), run the graph as thread ith of the ctl[32] threads this run uses
; (or sit it out), repeat until ctl[16] (quit) is set.
define void @moegraph_worker(ptr %ptrs, ptr %syms, i64 %ith, i64 %nth, ptr %tls0, i64 %tls_stride, ptr %bar, ptr %ctl) {
entry:
  %ts = alloca [2 x i64], align 8
  %quitp = getelementptr i8, ptr %ctl, i64 64
  br label %wait
wait:
  ; generation 0 = no run yet (the thread may start after the first run was requested)
  %seen = phi i32 [0, %entry], [%g, %ran]
  br label %spin
spin:
  %n = phi i32 [0, %wait], [%n1, %yield], [%n1, %nap], [%n1, %spin2]
  %cur = load atomic i32, ptr %ctl acquire, align 4
  %q = load atomic i32, ptr %quitp acquire, align 4
  %stop = icmp ne i32 %q, 0
  br i1 %stop, label %exit, label %check
check:
  %same = icmp eq i32 %cur, %seen
  %n1 = add i32 %n, 1
  br i1 %same, label %spin2, label %run
spin2:
  %busy = icmp ult i32 %n, 200000
  br i1 %busy, label %spin, label %idle
idle:
  %short = icmp ult i32 %n, 400000
  br i1 %short, label %yield, label %nap
yield:
  %y = call i32 @sched_yield()
  br label %spin
nap:
  NAP
  br label %spin
run:
  %activep = getelementptr i8, ptr %ctl, i64 128
  %active32 = load atomic i32, ptr %activep acquire, align 4
  %active = zext i32 %active32 to i64
  %mine = icmp ult i64 %ith, %active
  br i1 %mine, label %work, label %ran
work:
  call void @moegraph_graph(ptr %ptrs, ptr %syms, i64 %ith, i64 %active, ptr %tls0, i64 %tls_stride, ptr %bar)
  br label %ran
ran:
  %g = add i32 %cur, 0
  br label %wait
exit:
  ret void
}
""".replace("NAP", _NAP) + KICK


def _repacked(graph: Graph) -> set[int]:
    """Weights of a type with an x8 layout (gemm.py) whose only readers are products (as the
    weight) and whose rows come in eights get it; embeddings (GET_ROWS) keep the GGUF one, and so
    does a merged [gate; up] expert tensor whose halves are not whole groups of 8 rows (the fused
    SwiGLU reads the up half from row F)."""
    out = set()
    for w, readers in graph.users().items():
        if (w.op == "WEIGHT" and w.dtype in X8 and readers and w.rank >= 2
                and w.shape[-2] % 8 == 0 and w.shape[-1] % X8[w.dtype][0] == 0
                and all(_reads_as_weight(r, w) for r in readers)
                and not any(r.op == "MOE_SWIGLU" and r.inputs[1] is None and (w.shape[-2] // 2) % 8
                            for r in readers)):
            out.add(w.id)
    return out


def _reads_as_weight(r, w) -> bool:
    k = 2 if r.op == "MOE_SWIGLU" else 1     # the weight inputs come first
    return r.op in ("MUL_MAT", "MUL_MAT_ID", "MOE_SWIGLU") and w in r.inputs[:k] and w not in r.inputs[k:]


TARGET = Target("llvm", GENERATORS, weight_types=frozenset((*FLOAT, *LEGACY, *KQUANT)), repacked=_repacked,
                act_row_bytes=act_row_bytes)


@dataclass
class Module:
    """The LLVM IR of a plan: every kernel, and the entry that calls them in order."""
    ir: str
    tls_bytes: int                                   # per-thread scratch
    kernel_steps: list[tuple[list[int], str, tuple | None]]   # (plan steps, kernel, token range) per call
    n_kernels: int
    n_unique: int


def build_module(plan: Plan) -> "Module":
    """Kernels of all steps; identical kernels (same code up to their name: the same op on the
    same shapes in another layer) are emitted once. The entry computes each call's operand
    pointers (base of a slot + byte offset) and puts a barrier after every kernel."""
    quant_types = {n.dtype for n in plan.graph.toposort() if n.op == "WEIGHT" and is_quantized(n.dtype)}
    parts = [module_text(quant_types), vexp_fn(), BARRIER, WORKER]
    body, tls, seen = [], 64, {}
    kernel_steps: list[tuple[list[int], str, tuple | None]] = []
    bases, calls = {}, []

    def define(text: str, name: str) -> str:
        """Emits a function once per distinct code; returns the name it is called by."""
        key = text.replace(f"@{name}(", "@KERNEL(", 1)
        if key not in seen:
            seen[key] = name
            parts.append(text)
        return seen[key]

    def call(fname: str, operands: list, work, si) -> None:
        args = []
        for slot, off in operands:
            if slot not in bases:
                bases[slot] = f"%base{slot}"
                body.insert(0, f"  %base{slot} = load ptr, ptr {_slot_ptr(slot)}, align 8")
                body.insert(0, f"  {_slot_ptr(slot)} = getelementptr inbounds ptr, ptr %ptrs, i64 {slot}")
            p = f"%a{len(body)}"
            body.append(f"  {p} = getelementptr i8, ptr %base{slot}, i64 {off}")
            args.append(f"ptr {p}")
        calls.append((fname, "".join(", " + a for a in args), work))
        kernel_steps.append(([si], fname, None))   # every kernel runs for any T

    emitted: dict[int, list] = {}

    def kernels_of(i: int, part: str) -> list:
        """A step's kernels (emitted once): all of them, its prelude (the first) or the rest."""
        nonlocal tls
        if i not in emitted:
            emitted[i], scratch = emit(plan, plan.steps[i], i)
            tls = max(tls, scratch)
        ks = emitted[i]
        return {"all": ks, "prelude": ks[:1], "rest": ks[1:]}[part]

    for group, kind in zip(plan.groups, plan.group_kind):
        if len(group) == 1:
            for k in kernels_of(*group[0]):
                call(define(k.text(), k.f.name), _operands(k), k.work, group[0])
            continue
        members = []
        for i, part in group:
            ks = kernels_of(i, part)
            assert len(ks) == 1, f"a grouped step has one kernel, {plan.steps[i].node!r} has {len(ks)}"
            members.append((define(ks[0].text(), ks[0].f.name), ks[0]))
        name = f"g{group[0][0]}"
        fname = define(group_text(name, [(f, len(k.operands)) for f, k in members], kind == "rows"), name)
        work = max((k.work for _, k in members), key=lambda w: math.prod(plan.max_shape(w)))
        call(fname, [o for _, k in members for o in _operands(k)], work, group[0][0])
        kernel_steps[-1] = (group, fname, None)
    # Small kernels run on thread 0 alone (decided at run time from T and KV): a barrier is
    # needed only around kernels that all threads share.
    c = len(calls)
    body.append("  %is0 = icmp eq i64 %ith, 0")
    for j, (_, _, work) in enumerate(calls):
        prod = "1"
        for d in work:
            v = str(d) if isinstance(d, int) else f"%sym{SYMBOLS.index(d)}"
            body.append(f"  %w{j}_{len(body)} = mul i64 {prod}, {v}")
            prod = f"%w{j}_{len(body) - 1}"
        body.append(f"  %par{j} = icmp ugt i64 {prod}, {PARALLEL_WORK}")
    for j, (fname, args, _) in enumerate(calls):
        body.append(f"  %run{j} = or i1 %par{j}, %is0")
        body.append(f"  %n{j} = select i1 %par{j}, i64 %nth, i64 1")
        body.append(f"  br i1 %run{j}, label %do{j}, label %skip{j}")
        body.append(f"do{j}:")
        body.append(f"  call void @{fname}(ptr %ptrs, ptr %syms, i64 %ith, i64 %n{j}, ptr %tls{args})")
        body.append(f"  br label %skip{j}")
        body.append(f"skip{j}:")
        nxt = f"%par{j + 1}" if j + 1 < c else "true"
        body.append(f"  %sync{j} = or i1 %par{j}, {nxt}")
        body.append(f"  br i1 %sync{j}, label %bar{j}, label %next{j}")
        body.append(f"bar{j}:")
        body.append("  call void @barrier(ptr %bar, i64 %nth)")
        body.append(f"  br label %next{j}")
        body.append(f"next{j}:")
    parts.append(tiles_text(plan.codegen.get("tiles", set()), host_features()["avx2"]))
    syms = "\n".join(f"  %symp{i} = getelementptr inbounds i64, ptr %syms, i64 {i}\n"
                      f"  %sym{i} = load i64, ptr %symp{i}, align 8" for i in range(len(SYMBOLS)))
    body.insert(0, syms)
    tls = (tls + 63) // 64 * 64
    parts.append(f"""
define void @{ENTRY}(ptr %ptrs, ptr %syms, i64 %ith, i64 %nth, ptr %tls0, i64 %tls_stride, ptr %bar) {{
entry:
  %off = mul i64 %ith, %tls_stride
  %tls = getelementptr i8, ptr %tls0, i64 %off
{chr(10).join(body)}
  ret void
}}""")
    return Module("\n".join(parts), tls, kernel_steps, len(calls), len(seen))


def lowered_program(graph: Graph, max_tokens: int = 512) -> tuple[Plan, list[dict]]:
    """The lowered program without compiling it (dump --lowered)."""
    graph = lower(graph, TARGET)
    n_ctx = graph_n_ctx(graph)
    plan = Plan(graph, TARGET, min(max_tokens, n_ctx), n_ctx)
    return plan, lowered_steps(plan, build_module(plan).kernel_steps)


class LLVMBackend:
    name = "llvm"
    target = TARGET

    def __init__(self, n_threads: int | None = None, max_tokens: int = 512, use_cache: bool = True,
                 repack: bool = True, **_ignored):
        """repack: give product weights of the types in gemm.X8 the row-interleaved x8 layout, a
        copy in memory beside the memory-mapped file; False keeps only the file's blocks."""
        self.n_threads = n_threads or available_cores()
        if self.n_threads > available_cores():
            import warnings
            warnings.warn(f"llvm backend: {self.n_threads} threads on {available_cores()} available cores: "
                          "threads will wait for each other (steps then use half of them when that is faster)",
                          stacklevel=3)
        self.max_tokens = max_tokens
        self.use_cache = use_cache
        self.repack = repack

    def compile(self, graph: Graph) -> "LLVMExecutable":
        return LLVMExecutable(graph, self.n_threads, self.max_tokens, self.use_cache, self.repack)


class LLVMExecutable:
    def __init__(self, graph: Graph, n_threads: int, max_tokens: int, use_cache: bool = True,
                 repack: bool = True):
        t0 = time.perf_counter()
        self.graph = graph = lower(graph, TARGET)
        self.n_threads = n_threads
        self.threads = ThreadPolicy(n_threads)      # how many of them each step uses
        n_ctx = graph_n_ctx(graph)
        self.max_tokens = min(max_tokens, n_ctx)
        self.plan = plan = Plan(graph, TARGET, self.max_tokens, n_ctx, repack=repack)
        ir, self.tls_bytes = self._module(plan)
        self.ir_text = ir
        self.compile_info = self._jit(ir, use_cache)
        self.compile_info["seconds"] = time.perf_counter() - t0
        self._allocate()
        self._running = threading.Lock()
        self._start_workers()

    # -- code
    def _module(self, plan: Plan) -> tuple[str, int]:
        m = build_module(plan)
        self.kernel_steps, self.n_kernels, self.n_unique_kernels = m.kernel_steps, m.n_kernels, m.n_unique
        return m.ir, m.tls_bytes

    def _jit(self, ir: str, use_cache: bool) -> dict:
        llvm = _llvm()
        feats = host_features()
        key = hashlib.sha256("\n".join([ir, feats["cpu"], feats["features"],
                                        str(llvm.llvm_version_info), "v1"]).encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.o"
        obj = moegraph_cache.read_entry(path) if use_cache else None   # verified, or None
        cached = obj is not None
        if os.environ.get("MOEGRAPH_PERF_MAP"):
            ir = ir.replace("define internal ", "define ")
        mod = llvm.parse_assembly(ir)
        mod.verify()
        target = llvm.Target.from_triple(llvm.get_process_triple())
        tm = target.create_target_machine(cpu=feats["cpu"], features=feats["features"], opt=3, jit=True)
        if not cached:
            pto = llvm.create_pipeline_tuning_options(speed_level=3)
            pto.loop_vectorization = True
            pto.slp_vectorization = True
            pb = llvm.create_pass_builder(tm, pto)
            pb.getModulePassManager().run(mod, pb)
        ee = llvm.create_mcjit_compiler(mod, tm)

        pending: list[BaseException] = []   # raised inside llvmlite's ctypes callbacks, where
                                            # Python only prints "Exception ignored" (Ctrl-C too)

        def notify(module, buffer):
            try:
                if use_cache:
                    moegraph_cache.write_entry(path, buffer)
            except BaseException as e:
                pending.append(e)

        def getbuffer(module):
            return obj
        ee.set_object_cache(notify, getbuffer)
        ee.finalize_object()
        if pending:
            raise pending[0]
        self._ee, self._mod, self._tm = ee, mod, tm
        addr = ee.get_function_address(ENTRY)
        self._worker = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)(
            ee.get_function_address("moegraph_worker"))
        if os.environ.get("MOEGRAPH_PERF_MAP"):   # symbols for `perf report` (external linkage)
            _write_perf_map(ee, ir)
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)(addr)
        self._kick = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32)(ee.get_function_address("moegraph_kick"))
        return {"cache": "hit" if cached else "miss", "key": key, **{k: feats[k] for k in ("cpu", "avx2", "fma", "f16c")}}

    # -- memory
    def _allocate(self) -> None:
        p = self.plan
        inputs = sum(int(np.prod(p.max_shape(n.shape))) * elem_size(n.dtype) for kind, n in p.slots[1:] if kind == "input")
        require_memory(p.arena_size + self.tls_bytes * self.n_threads + inputs,
                       f"the llvm backend's activation buffers (max_tokens={p.maxes['T']}, n_ctx={p.maxes['KV']})",
                       "use a smaller n_ctx (-c) or max_tokens")
        self.arena = np.zeros(p.arena_size + 64, np.uint8)
        self.tls = np.zeros(self.tls_bytes * self.n_threads + 64, np.uint8)
        self.barrier = np.zeros(64, np.int32)     # count at 0, generation at +64, sleepers at +128 (bytes)
        self.syms = np.zeros(len(SYMBOLS), np.int64)
        self.buffers: dict[str, np.ndarray] = {}
        self.states: dict[str, np.ndarray] = {}
        keep = []
        addrs = [self.arena.ctypes.data]
        # gemm.py's row-interleaved layouts (copies), tensors in parallel (NumPy releases the GIL),
        # made once per tensor: sessions of one model share them
        todo = [n for kind, n in p.slots[1:] if kind == "weight" and n.id in p.repacked
                and _REPACKED.get(n.data) is None]
        with ThreadPoolExecutor(self.n_threads) as pool:
            done = pool.map(lambda n: repack_x8(n.dtype, n.data.raw.reshape(*n.shape[:-1], -1), n.shape[-2],
                                                n.shape[-1]), todo)
            for n, arr in zip(todo, done):
                _REPACKED[n.data] = arr
        repacked = {n.id: _REPACKED[n.data] for kind, n in p.slots[1:] if kind == "weight" and n.id in p.repacked}
        for kind, node in p.slots[1:]:
            if kind == "weight":
                raw = repacked.get(node.id, node.data.raw)
                if not raw.flags.c_contiguous:
                    raw = np.ascontiguousarray(raw)
                keep.append(raw)
                addrs.append(raw.ctypes.data)
            elif kind == "input":
                shape = p.max_shape(node.shape)
                buf = np.zeros(shape, {I32: np.int32, F32: np.float32}[node.dtype])
                self.buffers[node.name] = buf
                addrs.append(buf.ctypes.data)
            elif kind == "state":
                buf = np.zeros(node.shape, np.float16 if node.dtype == F16 else np.float32)
                self.states[node.name] = buf
                addrs.append(buf.ctypes.data)
            elif kind == "counters":      # MoE claim counters (kernels.claim_counter), zeroed
                buf = np.zeros(128 * p.codegen["counters"] // 4 + 16, np.int32)
                keep.append(buf)
                addrs.append(buf.ctypes.data)
        self._keep = keep
        self.ptrs = np.array(addrs, np.uint64)
        self.outputs = {}
        for name, o in self.graph.outputs.items():
            v = p.views[o.id]
            if v.slot != 0 or v.strides != tuple(_dense(p.max_shape(o.shape))):
                raise MoeGraphError(f"llvm backend: output {name} is not a dense arena buffer")
            dt = np.int32 if o.dtype == I32 else np.float32
            n = int(np.prod(p.max_shape(o.shape)))
            self.outputs[name] = (o, self.arena[v.offset * 4:(v.offset + n) * 4].view(dt).reshape(p.max_shape(o.shape)))

    def _start_workers(self) -> None:
        """n_threads - 1 Python threads that enter native code once and stay there (ctypes
        releases the GIL), waiting on a generation counter; stopped when the executable dies."""
        self.ctl = np.zeros(64, np.int32)     # (bytes) generation 0, quit +64, threads +128, sleepers +192
        self._threads = []
        for i in range(1, self.n_threads):
            args = (self.ptrs.ctypes.data, self.syms.ctypes.data, i, self.n_threads, self.tls.ctypes.data,
                    self.tls_bytes, self.barrier.ctypes.data, self.ctl.ctypes.data)
            t = threading.Thread(target=self._worker, args=args, daemon=True, name=f"moegraph-llvm-{i}")
            try:
                t.start()
            except BaseException as e:
                # the threads already running would go on reading this executable's buffers
                # after they are freed (a SIGSEGV later): stop them before reporting
                _stop_workers(self.ctl, self._threads, None)
                if not isinstance(e, RuntimeError):
                    raise
                raise MoeGraphError(f"llvm backend: could not start worker thread {i} of {self.n_threads - 1} "
                                    f"({e}); use fewer threads (-t / n_threads)") from None
            self._threads.append(t)
        weakref.finalize(self, _stop_workers, self.ctl, self._threads, None)

    def lowered(self) -> list[dict]:
        """The program: each kernel call with the graph nodes it computes (dump --lowered)."""
        return lowered_steps(self.plan, self.kernel_steps)

    def close(self) -> None:
        _stop_workers(self.ctl, self._threads, None)

    def reset_state(self) -> None:
        for s in self.states.values():
            s[...] = 0

    # -- running
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward step. The native threads, the arena and the states are this executable's:
        a second caller while one runs is refused (it would corrupt both)."""
        if not self._running.acquire(blocking=False):
            raise SessionBusyError("this llvm executable is already running a step (called from another "
                                   "thread): use one session per thread, or serialize the calls")
        try:
            return self._run(inputs)
        finally:
            self._running.release()

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from moegraph.ir import static_shape
        bindings = bind_symbols(self.graph, inputs)
        check_limits(bindings, self.plan.maxes)
        for name, arr in inputs.items():
            buf = self.buffers.get(name)
            if buf is not None:
                buf[tuple(slice(0, s) for s in np.shape(arr))] = arr
        for i, sym in enumerate(SYMBOLS):
            self.syms[i] = bindings.get(sym, 0)
        nth = self.threads.choose(bindings.get("T", 1))
        woke = False
        if nth > 1:                   # wake the workers (they run the graph as threads 1..nth-1)
            woke = bool(self._kick(self.ctl.ctypes.data, nth))
        t0 = time.perf_counter()
        self._fn(self.ptrs.ctypes.data, self.syms.ctypes.data, 0, nth, self.tls.ctypes.data,
                 self.tls_bytes, self.barrier.ctypes.data)
        # (a step that had to wake sleeping workers says nothing about the steady state)
        self.threads.record(bindings.get("T", 1), nth, time.perf_counter() - t0, valid=not woke)
        return {name: arr[tuple(slice(0, s) for s in static_shape(o.shape, bindings))].copy()
                for name, (o, arr) in self.outputs.items()}


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask), not every CPU of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class _SizeClass:
    best: int
    alt: int
    cost: float | None = None          # seconds per token of `best` (moving average)
    floor: float | None = None         # its lowest since the last decision
    interval: int = 0
    countdown: int = 8                 # steps until the next try of `alt`
    trying: int = 0                    # steps of the try left
    samples: list = None


class ThreadPolicy:
    """How many of the executable's threads a step uses: all of them or half, whichever is faster
    per token for steps of that size (T rounded to a power of two). The other count is tried for
    a burst of steps (the first half of it not measured: the other cores' caches are cold after a
    stretch without them) after an interval that doubles, up to 16x `explore`, while the choice
    holds, and at once when the chosen count gets twice slower (load came or went). On this
    2-core VM beside two busy processes a 2-thread decoding step took 2-15 ms against 0.5-1 ms
    for 1 thread (a thread waits at every barrier for a descheduled partner); idle, 2 win.
    Prompt-sized steps (T > MAX_T) are too few for tries to pay: they use every thread."""
    BURST = 8
    MAX_T = 16                         # larger steps (prompts) always use every thread

    def __init__(self, n_threads: int, explore: int = 64, decay: float = 0.25):
        self.options = sorted({n_threads, max(1, n_threads // 2)}, reverse=True)
        self.explore, self.decay = explore, decay
        self.classes: dict[int, _SizeClass] = {}

    def _class(self, T: int) -> _SizeClass:
        c = max(1, int(T)).bit_length()
        if c not in self.classes:
            self.classes[c] = _SizeClass(self.options[0], self.options[-1], interval=self.explore)
        return self.classes[c]

    def choose(self, T: int) -> int:
        if len(self.options) == 1 or T > self.MAX_T:
            return self.options[0]
        st = self._class(T)
        if not st.trying:
            st.countdown -= 1
            if st.countdown > 0:
                return st.best
            st.trying, st.samples = self.BURST, []
        return st.alt

    def record(self, T: int, threads: int, seconds: float, valid: bool = True) -> None:
        """The step's time; not valid: not a measurement (sleeping workers were woken)."""
        if len(self.options) == 1 or T > self.MAX_T:
            return
        st, per_token = self._class(T), seconds / max(1, int(T))
        if st.trying and threads == st.alt:
            st.trying -= 1
            if valid and st.trying < self.BURST // 2:
                st.samples.append(per_token)
            if st.trying == 0:
                alt_cost = sorted(st.samples)[len(st.samples) // 2] if st.samples else math.inf
                if st.cost is not None and alt_cost < 0.95 * st.cost:       # switch
                    st.best, st.alt, st.cost, st.interval = st.alt, st.best, alt_cost, self.explore
                else:
                    st.interval = min(16 * self.explore, 2 * st.interval)
                st.countdown, st.floor = st.interval, st.cost
        elif threads == st.best and valid:
            st.cost = per_token if st.cost is None else st.cost + self.decay * (per_token - st.cost)
            st.floor = st.cost if st.floor is None else min(st.floor, st.cost)
            if st.cost > 2 * st.floor:                  # the machine changed: look again now
                st.countdown, st.floor = 0, st.cost


def _stop_workers(ctl: np.ndarray, threads: list, _keepalive) -> None:
    ctl[16] = 1
    for t in threads:
        t.join(timeout=5)


def _write_perf_map(ee, ir: str) -> None:
    import re
    names = re.findall(r"^define (?:internal )?(?:<[^>]*>|\S+) @([\w.]+)\(", ir, flags=re.M)
    addrs = sorted((ee.get_function_address(n), n) for n in names if ee.get_function_address(n))
    with open(f"/tmp/perf-{os.getpid()}.map", "a") as fh:
        for (a, n), (b, _) in zip(addrs, addrs[1:] + [(addrs[-1][0] + 4096, "")]):
            fh.write(f"{a:x} {b - a:x} {n}\n")


def _operands(k) -> list[tuple[int, int]]:
    """A kernel's (slot, byte offset) operands in the order of its pointer parameters."""
    return [key for key, _ in sorted(k.operands.items(), key=lambda kv: int(kv[1][3:]))]


def group_text(name: str, members: list[tuple[str, int]], per_token: bool) -> str:
    """A kernel group (plan.groups). Row-wise (per_token): this thread's share of the tokens,
    and for each of its tokens t every member in turn, called as thread t of T (a row-wise
    kernel's share is then exactly token t's rows). Otherwise (independent products) every
    member in turn with this thread's ith/nth. members: (function, number of pointer operands)."""
    params, calls = "", []
    who = "i64 %t, i64 %T" if per_token else "i64 %ith, i64 %nth"
    for j, (fname, n_ops) in enumerate(members):
        ps = "".join(f", ptr %m{j}_{q}" for q in range(n_ops))
        params += ps
        calls.append(f"  call void @{fname}(ptr %ptrs, ptr %syms, {who}, ptr %tls{ps})")
    head = f"define internal void @{name}(ptr %ptrs, ptr %syms, i64 %ith, i64 %nth, ptr %tls{params}) noinline {{"
    if not per_token:
        return "\n" + "\n".join([head, "entry:", *calls, "  ret void", "}"])
    assert SYMBOLS[0] == "T"
    lines = [head,
             "entry:",
             "  %T = load i64, ptr %syms, align 8",
             "  %a = mul i64 %T, %ith",
             "  %lo = udiv i64 %a, %nth",
             "  %i1 = add i64 %ith, 1",
             "  %b = mul i64 %T, %i1",
             "  %hi = udiv i64 %b, %nth",
             "  %none = icmp uge i64 %lo, %hi",
             "  br i1 %none, label %done, label %loop",
             "loop:",
             "  %t = phi i64 [%lo, %entry], [%t1, %loop]",
             *calls,
             "  %t1 = add i64 %t, 1",
             "  %more = icmp ult i64 %t1, %hi",
             "  br i1 %more, label %loop, label %done",
             "done:",
             "  ret void",
             "}"]
    return "\n" + "\n".join(lines)


def _slot_ptr(slot: int) -> str:
    return f"%slotp{slot}"


def _dense(shape):
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))
