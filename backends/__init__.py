"""Backends compile a Graph into an Executable: `run(inputs) -> outputs` on NumPy arrays, with the
graph's STATE buffers (the KV cache) kept inside the Executable between runs.

Each backend is looked up by name and imported lazily, so a missing optional dependency (e.g.
cuda-python) only matters to whoever asks for that backend."""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from moegraph.errors import MoeGraphError

_REGISTRY = {
    "numpy": "moegraph.backends.reference:NumpyBackend",
    "llvm": "moegraph.backends.llvm:LLVMBackend",
    "cuda": "moegraph.backends.cuda:CUDABackend",
}


class Executable(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def reset_state(self) -> None: ...


def register_backend(name: str, target: str) -> None:
    """`target` is 'module:Class'; the class is built with keyword options and has
    `compile(graph) -> Executable`."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str, **options):
    if name not in _REGISTRY:
        raise MoeGraphError(f"unknown backend {name!r}; available: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)


def default_backend() -> str:
    """llvm where llvmlite works on this machine, else the NumPy reference."""
    global _default
    if _default is None:
        try:
            from .llvm import available
            _default = "llvm" if available() else "numpy"
        except ImportError:
            _default = "numpy"
    return _default


_default: str | None = None
