"""Driver-API runtime (cuda.bindings.driver): context, module load, device buffers (weights
uploaded once and shared between executables, the planned arena, inputs, the KV cache), launches.

UNVERIFIED ON A GPU at the time of writing: written against the cuda-python 12.x driver API and
tested only for its no-driver path; the `gpu` tests in tests/test_cuda.py exercise the rest."""
from __future__ import annotations

import ctypes
import math
import time

import numpy as np

from moegraph.errors import InputError, MoeGraphError
from moegraph.ir import F16, F32, I32, Graph

from ..llvm.plan import SYMBOLS
from .codegen import WARPS_PER_BLOCK, generate_for_graph
from .nvrtc import compile_cubin

MAX_GRID = 1 << 20
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


def _check(res, what: str):
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
        n = _check(drv.cuDeviceGetCount(), "cuDeviceGetCount")
        if device >= n:
            raise MoeGraphError(f"CUDA device {device} requested, {n} present")
        self.dev = _check(drv.cuDeviceGet(device), "cuDeviceGet")
        A = drv.CUdevice_attribute
        self.cc = (_check(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.dev), "attr"),
                   _check(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.dev), "attr"))
        self.ctx = _check(drv.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self.make_current()
        self.stream = _check(drv.cuStreamCreate(0), "cuStreamCreate")
        self.weights: dict[int, tuple[int, object]] = {}   # id(WeightData) -> (devptr, owner)

    def make_current(self):
        _check(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        p = _check(self.drv.cuMemAlloc(max(int(nbytes), 64)), "cuMemAlloc")
        _check(self.drv.cuMemsetD8(p, 0, max(int(nbytes), 64)), "cuMemsetD8")
        return int(p)

    def upload(self, dptr: int, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes:
            _check(self.drv.cuMemcpyHtoD(dptr, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")

    def download(self, dptr: int, arr: np.ndarray) -> None:
        if arr.nbytes:
            _check(self.drv.cuMemcpyDtoH(arr.ctypes.data, dptr, arr.nbytes), "cuMemcpyDtoH")

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
        self.max_tokens = self.plan.maxes["T"]
        arch = arch or f"sm_{ctx.cc[0]}{ctx.cc[1]}"
        cubin, self.compile_info = compile_cubin(self.program.source, arch, use_cache=use_cache)
        drv = ctx.drv
        self._cubin = cubin
        self.module = _check(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.functions = {}
        for L in self.program.launches:
            if L.name not in self.functions:
                f = _check(drv.cuModuleGetFunction(self.module, L.name.encode()), "cuModuleGetFunction")
                if L.smem > 48 * 1024:
                    _check(drv.cuFuncSetAttribute(
                        f, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, L.smem),
                        "cuFuncSetAttribute (attention scores in shared memory: n_ctx too large?)")
                self.functions[L.name] = f
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
            _check(self.ctx.drv.cuMemsetD8(d, 0, nbytes), "cuMemsetD8")

    def _grid(self, L, bind: dict) -> tuple[int, int]:
        items = math.prod(d if isinstance(d, int) else bind.get(d, 0) for d in L.items)
        if L.mode == "thread":
            g = -(-items // L.block)
        elif L.mode == "warp":
            g = -(-items // (L.block // 32))
        elif L.mode == "block":
            g = items
        else:
            g = 1
        return min(g, MAX_GRID), L.block

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from moegraph.backends.reference import bind_symbols
        from moegraph.ir import static_shape
        ctx, drv = self.ctx, self.ctx.drv
        ctx.make_current()
        bindings = bind_symbols(self.graph, inputs)
        for sym, limit in self.plan.maxes.items():
            if bindings.get(sym, 0) > limit:
                raise InputError(f"{sym}={bindings[sym]} exceeds what this compiled graph holds ({limit})")
        for name, arr in inputs.items():
            if name in self.inputs:
                d, shape, dt = self.inputs[name]
                full = np.zeros(shape, dt)
                full[tuple(slice(0, s) for s in np.shape(arr))] = arr
                ctx.upload(d, full)
        for i, s in enumerate(SYMBOLS):
            self.syms[i] = bindings.get(s, 0)
        ctx.upload(self.syms_dev, self.syms)
        for L, (_, params) in zip(self.program.launches, self._params):
            grid, block = self._grid(L, bindings)
            if grid == 0:
                continue
            _check(drv.cuLaunchKernel(self.functions[L.name], grid, 1, 1, block, 1, 1, L.smem, self.ctx.stream,
                                      ctypes.addressof(params), 0), f"cuLaunchKernel {L.name}")
        _check(drv.cuStreamSynchronize(self.ctx.stream), "kernel execution (cuStreamSynchronize)")
        out = {}
        for name, (o, v) in self.outputs.items():
            shape = self.plan.max_shape(o.shape)
            dt = np.int32 if o.dtype == I32 else np.float32
            full = np.empty(shape, dt)
            ctx.download(self.arena + v.offset * 4, full)
            out[name] = full[tuple(slice(0, s) for s in static_shape(o.shape, bindings))].copy()
        return out
