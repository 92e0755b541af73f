"""Driver-API runtime (cuda.bindings.driver): context, module load, device buffers (weights
uploaded once and shared between executables, the planned arena, inputs, the KV cache), launches.

Decode steps (T <= GRAPH_MAX_T) are captured once per T as a CUDA graph and replayed: every
kernel reads T and KV from the device array `syms`, and loops grid-stride, so one graph sized
for KV's maximum serves every context length. Only the rows of inputs and outputs that a call
uses cross the bus (symbolic dims are the leading ones, laid out at their maxima)."""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import time

import numpy as np

from moegraph.errors import MoeGraphError
from moegraph.ir import F16, F32, I32, Graph

from ..lower import SYMBOLS, bind_symbols, check_limits
from .codegen import generate_for_graph
from .nvrtc import compile_cubin

MAX_GRID = 1 << 20
GRID_CAP = os.environ.get("MOEGRAPH_CUDA_GRID_CAP", "1") != "0"
GRAPH_MAX_T = 8          # captured as CUDA graphs: decode and small batches (speculative, beams)
_contexts: dict[int, "DriverContext"] = {}


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver   # cuda-python < 12.6 layout
        except ImportError as e:
            raise MoeGraphError(f"no CUDA driver found: cuda-python is not installed ({e}); "
                                "`pip install 'moegraph[cuda]'`") from None
    return driver


def check_cuda(res, what: str):
    err = res[0] if isinstance(res, tuple) else res
    if int(err) != 0:
        raise MoeGraphError(f"CUDA {what} failed: {err!r}")
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else res[1:]
    return None


class DriverContext:
    def __init__(self, device: int):
        drv = self.drv = _driver()
        try:
            err = drv.cuInit(0)
        except Exception as e:   # the library itself is missing (pathfinder / dlopen errors)
            raise MoeGraphError(f"no CUDA driver found: {e}") from None
        if int(err[0] if isinstance(err, tuple) else err) != 0:
            raise MoeGraphError(f"no CUDA driver found: cuInit returned {err!r} "
                                "(no NVIDIA GPU, or the driver is not loaded)")
        n = check_cuda(drv.cuDeviceGetCount(), "cuDeviceGetCount")
        if device >= n:
            raise MoeGraphError(f"CUDA device {device} requested, {n} present")
        self.dev = check_cuda(drv.cuDeviceGet(device), "cuDeviceGet")
        A = drv.CUdevice_attribute
        self.cc = (check_cuda(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev), "attr"),
                   check_cuda(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev), "attr"))
        self.n_sm = check_cuda(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.dev), "attr")
        self.ctx = check_cuda(drv.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self.make_current()
        self.stream = check_cuda(drv.cuStreamCreate(0), "cuStreamCreate")
        self.weights: dict[int, tuple[int, object]] = {}   # id(WeightData) -> (devptr, owner)

    def make_current(self):
        check_cuda(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        p = check_cuda(self.drv.cuMemAlloc(max(int(nbytes), 64)), "cuMemAlloc")
        check_cuda(self.drv.cuMemsetD8(p, 0, max(int(nbytes), 64)), "cuMemsetD8")
        return int(p)

    def upload(self, dptr: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes:
            check_cuda(self.drv.cuMemcpyHtoD(dptr, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")

    def download(self, dptr: int, arr: np.ndarray) -> None:
        if arr.nbytes:
            check_cuda(self.drv.cuMemcpyDtoH(arr.ctypes.data, dptr, arr.nbytes), "cuMemcpyDtoH")

    def weight(self, node) -> int:
        """Device copy of a weight, uploaded once per WeightData (shared by executables)."""
        key = id(node.data)
        if key not in self.weights:
            raw = np.ascontiguousarray(node.data.raw)
            d = self.alloc(raw.nbytes)
            self.upload(d, raw.view(np.uint8).reshape(-1))
            self.weights[key] = (d, node.data)
        return self.weights[key][0]


def driver_context(device: int = 0) -> DriverContext:
    if device not in _contexts:
        _contexts[device] = DriverContext(device)
    return _contexts[device]


class CUDAExecutable:
    def __init__(self, graph: Graph, ctx: DriverContext, max_tokens: int, use_cache: bool = True,
                 cuda_graphs: bool = True, arch: str | None = None):
        t0 = time.perf_counter()
        self.graph, self.ctx = graph, ctx
        ctx.make_current()
        self.plan, self.program = generate_for_graph(graph, max_tokens)
        self.graph = self.plan.graph            # the lowered copy (fused ops)
        self.max_tokens = self.plan.maxes["T"]
        arch = arch or f"sm_{ctx.cc[0]}{ctx.cc[1]}"
        cubin, self.compile_info = compile_cubin(self.program.source, arch, use_cache=use_cache)
        drv = ctx.drv
        self._cubin = cubin
        self.module = check_cuda(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
        cc = 10 * ctx.cc[0] + ctx.cc[1]
        launches = []
        for L in self.program.launches:     # tensor-core launches, or their fallbacks for all T
            if L.min_cc > cc:
                continue
            if L.min_cc < 0 and cc < -L.min_cc:
                L = dataclasses.replace(L, t_range=(0, 1 << 62))
            launches.append(L)
        self.program.launches = launches
        self.functions = {}
        for L in self.program.launches:
            if L.name not in self.functions:
                f = check_cuda(drv.cuModuleGetFunction(self.module, L.name.encode()), "cuModuleGetFunction")
                if L.smem > 48 * 1024:
                    check_cuda(drv.cuFuncSetAttribute(
                        f, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, L.smem),
                        "cuFuncSetAttribute (attention scores in shared memory: n_ctx too large?)")
                self.functions[L.name] = f
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, tuple] = {}
        self._allocate()
        self.compile_info["seconds"] = time.perf_counter() - t0

    def _allocate(self) -> None:
        p, ctx = self.plan, self.ctx
        self.arena = ctx.alloc(p.arena_size + 64)
        self.syms_dev = ctx.alloc(8 * len(SYMBOLS))
        self.syms = np.zeros(len(SYMBOLS), np.int64)
        bases = [self.arena]
        self.inputs, self.states = {}, {}
        for kind, node in p.slots[1:]:
            if kind == "weight":
                bases.append(ctx.weight(node))
            elif kind == "input":
                shape = p.max_shape(node.shape)
                dt = {I32: np.int32, F32: np.float32}[node.dtype]
                d = ctx.alloc(math.prod(shape) * 4)
                self.inputs[node.name] = (d, shape, dt)
                bases.append(d)
            elif kind == "state":
                nbytes = math.prod(node.shape) * (2 if node.dtype == F16 else 4)
                d = ctx.alloc(nbytes)
                self.states[node.name] = (d, nbytes)
                bases.append(d)
        self.bases = bases
        # kernel parameter blocks, built once: (syms, operand pointers...)
        self._params = []
        for L in self.program.launches:
            vals = [ctypes.c_uint64(self.syms_dev)] + [ctypes.c_uint64(bases[s] + off) for s, off in L.operands]
            arr = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
            self._params.append((vals, arr))
        self.outputs = {}
        for name, o in self.graph.outputs.items():
            v = p.views[o.id]
            self.outputs[name] = (o, v)

    def reset_state(self) -> None:
        for d, nbytes in self.states.values():
            check_cuda(self.ctx.drv.cuMemsetD8(d, 0, nbytes), "cuMemsetD8")

    @staticmethod
    def _extent(d, bind: dict) -> int:
        if isinstance(d, int):
            return d
        if isinstance(d, tuple) and d[0] == "active_experts":   # ("active_experts", E, k): <= min(E, T*k)
            return min(d[1], bind.get("T", 0) * d[2])
        if isinstance(d, tuple) and d[0] == "ceil":             # ("ceil", dims, tile): tiles over dims
            n = math.prod(CUDAExecutable._extent(x, bind) for x in d[1])
            return -(-n // d[2])
        return bind.get(d, 0)

    def _grid(self, L, bind: dict) -> tuple[int, int]:
        items = math.prod(self._extent(d, bind) for d in L.items)
        if L.mode == "thread":
            g = -(-items // L.block)
        elif L.mode == "warp":
            g = -(-items // (L.block // 32))
        elif L.mode == "block":
            g = items
        else:
            g = 1
        # every kernel loops grid-stride: one full wave of resident blocks, not one block per item
        # (thousands of short blocks cost more in block scheduling than they compute)
        cap = self.ctx.n_sm * max(1, 2048 // L.block) if GRID_CAP else MAX_GRID
        return min(g, cap, MAX_GRID), L.block

    def _launch_all(self, bind: dict, events=None) -> None:
        drv, stream = self.ctx.drv, self.ctx.stream
        T = bind.get("T", 0)
        for i, (L, (_, params)) in enumerate(zip(self.program.launches, self._params)):
            grid, block = self._grid(L, bind)
            if grid == 0 or not L.t_range[0] <= T <= L.t_range[1]:
                continue
            if events is not None:
                check_cuda(drv.cuEventRecord(events[i][0], stream), "cuEventRecord")
            check_cuda(drv.cuLaunchKernel(self.functions[L.name], grid, 1, 1, block, 1, 1, L.smem, stream,
                                      ctypes.addressof(params), 0), f"cuLaunchKernel {L.name} ({L.step})")
            if events is not None:
                check_cuda(drv.cuEventRecord(events[i][1], stream), "cuEventRecord")

    def _graph_for(self, T: int):
        """The instantiated CUDA graph of all launches for T tokens (grids sized at KV's maximum)."""
        g = self._graphs.get(T)
        if g is None:
            drv, stream = self.ctx.drv, self.ctx.stream
            check_cuda(drv.cuStreamBeginCapture(stream, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED),
                   "cuStreamBeginCapture")
            try:
                self._launch_all({**self.plan.maxes, "T": T, "O": T})
            finally:
                graph = check_cuda(drv.cuStreamEndCapture(stream), "cuStreamEndCapture")
            g = self._graphs[T] = (graph, check_cuda(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate"))
        return g[1]

    def _upload_inputs(self, inputs: dict[str, np.ndarray], bindings: dict) -> None:
        ctx = self.ctx
        for name, arr in inputs.items():
            if name in self.inputs:
                d, shape, dt = self.inputs[name]
                arr = np.asarray(arr)
                # rows [0, n) of the max-shaped layout are contiguous: send only those
                part = np.zeros((arr.shape[0], *shape[1:]) if arr.ndim else shape, dt)
                part[tuple(slice(0, s) for s in arr.shape)] = arr
                ctx.upload(d, part)
        for i, s in enumerate(SYMBOLS):
            self.syms[i] = bindings.get(s, 0)
        ctx.upload(self.syms_dev, self.syms)

    def _bind(self, inputs: dict[str, np.ndarray]) -> dict:
        bindings = bind_symbols(self.graph, inputs)
        check_limits(bindings, self.plan.maxes)
        return bindings

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx, drv = self.ctx, self.ctx.drv
        ctx.make_current()
        bindings = self._bind(inputs)
        self._upload_inputs(inputs, bindings)
        T = bindings.get("T", 0)
        if self.cuda_graphs and 0 < T <= GRAPH_MAX_T:
            check_cuda(drv.cuGraphLaunch(self._graph_for(T), ctx.stream), "cuGraphLaunch")
        else:
            self._launch_all(bindings)
        check_cuda(drv.cuStreamSynchronize(ctx.stream), "kernel execution (cuStreamSynchronize)")
        return self._download_outputs(bindings)

    def _download_outputs(self, bindings: dict) -> dict[str, np.ndarray]:
        from moegraph.ir import static_shape
        out = {}
        for name, (o, v) in self.outputs.items():
            full = self.plan.max_shape(o.shape)
            shape = static_shape(o.shape, bindings)
            dt = np.int32 if o.dtype == I32 else np.float32
            if tuple(shape[1:]) == tuple(full[1:]) and v.strides == _dense(full):
                arr = np.empty(shape, dt)          # the leading rows only
            else:
                arr = np.empty(full, dt)
            self.ctx.download(self.arena + v.offset * 4, arr)
            out[name] = arr[tuple(slice(0, s) for s in shape)].copy() if arr.shape != tuple(shape) else arr
        return out

    def profile(self, inputs: dict[str, np.ndarray], repeats: int = 3) -> list[dict]:
        """Runs the graph launch by launch with events around each (no CUDA graph) and returns
        [{step, kernel, ms}] (the median over `repeats` runs; the state is advanced each time)."""
        ctx, drv = self.ctx, self.ctx.drv
        ctx.make_current()
        bindings = self._bind(inputs)
        n = len(self.program.launches)
        events = [tuple(check_cuda(drv.cuEventCreate(0), "cuEventCreate") for _ in range(2)) for _ in range(n)]
        times = np.zeros((repeats, n))
        for r in range(repeats):
            self._upload_inputs(inputs, bindings)
            self._launch_all(bindings, events)
            check_cuda(drv.cuStreamSynchronize(ctx.stream), "cuStreamSynchronize")
            T = bindings.get("T", 0)
            for i, (a, b) in enumerate(events):
                L = self.program.launches[i]
                if self._grid(L, bindings)[0] and L.t_range[0] <= T <= L.t_range[1]:
                    times[r, i] = check_cuda(drv.cuEventElapsedTime(a, b), "cuEventElapsedTime")
        for a, b in events:
            drv.cuEventDestroy(a), drv.cuEventDestroy(b)
        med = np.median(times, axis=0)
        return [{"step": L.step, "kernel": L.name, "ms": float(t)} for L, t in zip(self.program.launches, med)]


def _dense(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))
