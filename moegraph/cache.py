"""The on-disk cache of compiled code (LLVM objects, CUBINs, quantize kernels): one root,
$MOEGRAPH_CACHE or ~/.cache/moegraph, and writes that never leave a half-written entry.

An entry is verified before it is trusted (loading a truncated or foreign object file can kill
the process): `write_entry` stores a header (magic, payload length, SHA-256) before the payload,
and `read_entry` returns the payload only when all three match, deleting a bad entry so that it
is compiled and written again."""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

MAGIC = b"MGCACHE1"
HEADER = struct.Struct("<8sQ32s")     # magic, payload bytes, sha256(payload)


def cache_dir(kind: str) -> Path:
    root = os.environ.get("MOEGRAPH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moegraph")
    return Path(root) / kind


def write_atomic(path: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written only costs a recompile."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as e:    # a full disk or Ctrl-C: no half-written file left behind
        try:
            tmp.unlink()
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise


def write_entry(path: Path, data: bytes) -> None:
    """A verified cache entry (header + payload), written atomically; best effort."""
    write_atomic(path, HEADER.pack(MAGIC, len(data), hashlib.sha256(data).digest()) + bytes(data))


def read_entry(path: Path) -> bytes | None:
    """The payload of a verified entry, or None (missing, empty, truncated, foreign or corrupt;
    a bad entry is removed)."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    if len(blob) >= HEADER.size:
        magic, n, digest = HEADER.unpack_from(blob)
        data = blob[HEADER.size:]
        if magic == MAGIC and n == len(data) and hashlib.sha256(data).digest() == digest:
            return data
    try:
        path.unlink()
    except OSError:
        pass
    return None
