"""The on-disk cache of compiled code (LLVM objects, CUBINs, quantize kernels): one root,
$MOEGRAPH_CACHE or ~/.cache/moegraph, and writes that never leave a half-written entry."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    root = os.environ.get("MOEGRAPH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moegraph")
    return Path(root) / kind


def write_atomic(path: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written only costs a recompile."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass
