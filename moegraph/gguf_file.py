"""Reading GGUF files with the `gguf` package: metadata as plain Python values, tensors as
memory-mapped views (nothing is copied on load). This is the one place where ggml's dimension
order (ne0 = innermost first) is turned into NumPy order (last axis contiguous)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GGUFError
from .quants import GGMLType, dequantize, row_bytes, SUPPORTED_DEQUANT

GGUF_MAGIC = b"GGUF"


@dataclass(eq=False)
class WeightData:
    """A tensor's bytes in its GGML type and its NumPy-order shape. `raw` is a uint8 view of the
    memory-mapped file (or an in-memory array for tensors a pass made)."""
    name: str
    dtype: GGMLType
    shape: tuple[int, ...]
    raw: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def dequantize(self) -> np.ndarray:
        return dequantize(self.raw, self.dtype, self.shape)

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> "WeightData":
        kinds = {np.dtype(np.float32): GGMLType.F32, np.dtype(np.float16): GGMLType.F16}
        array = np.ascontiguousarray(array)
        return cls(name, kinds[array.dtype], tuple(array.shape), array.reshape(-1).view(np.uint8))

    def rows(self, start: int, stop: int, axis: int = -2) -> "WeightData":
        """Rows [start, stop) along a non-innermost axis, still in the GGML type: block bytes are
        never touched, so this works for quantized tensors."""
        ax = axis % len(self.shape)
        assert ax < len(self.shape) - 1, "cannot slice within rows"
        per_row = row_bytes(self.dtype, self.shape[-1])
        as_rows = self.raw.reshape(*self.shape[:-1], per_row)
        sl = [slice(None)] * len(self.shape)
        sl[ax] = slice(start, stop)
        part = as_rows[tuple(sl)]
        shape = tuple(stop - start if i == ax else d for i, d in enumerate(self.shape))
        return WeightData(self.name, self.dtype, shape, np.ascontiguousarray(part).reshape(-1))


def concat_weights(name: str, parts: list[WeightData], axis: int = -2) -> WeightData:
    """Joins tensors of one GGML type along a non-innermost axis (fused Q/K/V, merged gate/up)."""
    t = parts[0].dtype
    if any(p.dtype != t for p in parts):
        raise ValueError(f"{name}: cannot concatenate tensors of types {[p.dtype.name for p in parts]}")
    ax = axis % len(parts[0].shape)
    per_row = row_bytes(t, parts[0].shape[-1])
    arrays = [p.raw.reshape(*p.shape[:-1], per_row) for p in parts]
    joined = np.concatenate(arrays, axis=ax)
    shape = list(parts[0].shape)
    shape[ax] = sum(p.shape[ax] for p in parts)
    return WeightData(name, t, tuple(shape), joined.reshape(-1))


class GGUFFile:
    """An opened GGUF: `metadata` (key -> Python value), `tensors` (name -> WeightData) and
    `tensor_types` (name -> the GGML type's name, also for types moegraph cannot compute with)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_file(self.path)
        import gguf  # imported here so that `moegraph --help` stays fast
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises many kinds of errors on corrupt files
            raise GGUFError(f"{self.path}: cannot parse the GGUF header or tensor table "
                            f"(truncated or corrupt file?): {type(e).__name__}: {e}") from None
        self.version = int(reader.fields["GGUF.version"].contents()) if "GGUF.version" in reader.fields else None
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items()
                                         if not k.startswith("GGUF.")}
        self.file_size = self.path.stat().st_size
        self.tensors: dict[str, WeightData] = {}
        self.tensor_types: dict[str, str] = {}
        self.unsupported: dict[str, str] = {}
        for t in reader.tensors:
            type_name = t.tensor_type.name
            self.tensor_types[t.name] = type_name
            end = int(t.data_offset) + int(t.n_bytes)
            if end > self.file_size:
                raise GGUFError(f"{self.path}: tensor {t.name} ends at byte {end} but the file has "
                                f"{self.file_size} bytes (truncated file)")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne0 first -> NumPy order
            if type_name not in GGMLType.__members__ or GGMLType[type_name] not in SUPPORTED_DEQUANT:
                self.unsupported[t.name] = type_name
                continue
            raw = reader.data[int(t.data_offset):end]
            self.tensors[t.name] = WeightData(t.name, GGMLType[type_name], shape, raw)
        self._reader = reader  # keeps the memory map alive

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> WeightData:
        if name in self.tensors:
            return self.tensors[name]
        if name in self.unsupported:
            supported = ", ".join(t.name for t in SUPPORTED_DEQUANT)
            raise GGUFError(f"{self.path}: tensor {name} has type {self.unsupported[name]}, which "
                            f"moegraph does not support (supported: {supported})")
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.unsupported


def _check_file(path: Path) -> None:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise GGUFError(f"{path}: truncated GGUF (only {len(head)} bytes)")
