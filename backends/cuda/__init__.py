"""The CUDA backend: CUDA C per op / fused group (codegen.py), compiled by NVRTC to a CUBIN for
the device's compute capability (nvrtc.py), loaded and launched through the cuda.bindings driver
API (runtime.py). Weights are uploaded once, the KV cache lives on the device.

Without a GPU the code generation and NVRTC compilation still work (`CUDABackend.source(graph)`,
`CUDABackend.cubin(graph, arch)`); `compile()` then raises MoeGraphError("no CUDA driver found: ...").
"""
from __future__ import annotations

from moegraph.ir import Graph

from .codegen import Program, generate, generate_for_graph
from .nvrtc import compile_cubin


class CUDABackend:
    name = "cuda"

    def __init__(self, max_tokens: int = 512, device: int = 0, use_cache: bool = True,
                 cuda_graphs: bool = True, arch: str | None = None, **_ignored):
        self.max_tokens, self.device, self.use_cache = max_tokens, device, use_cache
        self.cuda_graphs, self.arch = cuda_graphs, arch

    def compile(self, graph: Graph):
        from .runtime import CUDAExecutable, driver_context
        ctx = driver_context(self.device)          # raises MoeGraphError without a driver
        return CUDAExecutable(graph, ctx, self.max_tokens, self.use_cache, self.cuda_graphs, self.arch)

    # -- driver-free entry points (tests, inspection)
    def program(self, graph: Graph) -> Program:
        return generate_for_graph(graph, self.max_tokens)[1]

    def cubin(self, graph: Graph, arch: str | None = None) -> tuple[bytes, dict]:
        return compile_cubin(self.program(graph).source, arch or self.arch, use_cache=self.use_cache)


def available(device: int = 0) -> bool:
    """Whether a CUDA driver and device are usable here."""
    from moegraph.errors import MoeGraphError
    try:
        from .runtime import driver_context
        driver_context(device)
        return True
    except (MoeGraphError, ImportError, OSError):
        return False


__all__ = ["CUDABackend", "available", "generate", "generate_for_graph", "compile_cubin"]
