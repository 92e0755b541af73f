"""Reading GGUF files with the `gguf` package: metadata as plain Python values, tensors as
memory-mapped views (nothing is copied on load). This is the one place where ggml's dimension
order (ne0 = innermost first) is turned into NumPy order (last axis contiguous)."""
from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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


    def select(self, indices, axis: int = 0) -> "WeightData":
        """The given entries along a non-innermost axis (e.g. whole experts), blocks untouched."""
        ax = axis % len(self.shape)
        assert ax < len(self.shape) - 1, "cannot select within rows"
        as_rows = self.raw.reshape(*self.shape[:-1], row_bytes(self.dtype, self.shape[-1]))
        part = np.take(as_rows, np.asarray(indices, dtype=np.intp), axis=ax)
        shape = tuple(len(indices) if i == ax else d for i, d in enumerate(self.shape))
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


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file as stored, whatever its type: NumPy-order shape, GGML type name,
    bytes, and a uint8 view of its data (memory-mapped from the shard that holds it)."""
    name: str
    shape: tuple[int, ...]
    type_name: str
    nbytes: int
    raw: np.ndarray
    shard: int = 0

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_paths(path: Path, count: int) -> list[Path]:
    """llama.cpp's names for the shards of a split model (llama_split_path): PREFIX-00001-of-0000N.gguf."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        raise GGUFError(f"{path}: the file says it is shard 1 of {count} (split.count) but its name "
                        "is not PREFIX-00001-of-NNNNN.gguf, so the other shards cannot be found")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


class GGUFFile:
    """An opened GGUF: `metadata` (key -> Python value), `tensors` (name -> WeightData for the
    types moegraph computes with), `infos` (name -> TensorInfo for every tensor) and
    `tensor_types` (name -> the GGML type's name). A split model (llama.cpp's gguf-split:
    PREFIX-00001-of-0000N.gguf, keys split.no/split.count/split.tensors.count) is opened from its
    first shard: every shard is memory-mapped and checked, a missing or mismatched one named."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        reader, self.metadata, self.metadata_types = _open_shard(self.path)
        self.version = int(reader.fields["GGUF.version"].contents()) if "GGUF.version" in reader.fields else None
        self.file_size = self.path.stat().st_size
        self._readers = [reader]          # keep the memory maps alive
        self.infos: dict[str, TensorInfo] = {}
        self._add_tensors(reader, self.path, 0)
        count = int(self.metadata.get("split.count", 1) or 1)
        if count > 1:
            self._open_other_shards(count)
        self.tensors: dict[str, WeightData] = {}
        self.tensor_types: dict[str, str] = {}
        self.unsupported: dict[str, str] = {}
        for name, t in self.infos.items():
            self.tensor_types[name] = t.type_name
            if t.type_name not in GGMLType.__members__ or GGMLType[t.type_name] not in SUPPORTED_DEQUANT:
                self.unsupported[name] = t.type_name
            else:
                self.tensors[name] = WeightData(name, GGMLType[t.type_name], t.shape, t.raw)
        self._reader = reader

    def _add_tensors(self, reader, path: Path, shard: int) -> None:
        size = path.stat().st_size
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise GGUFError(f"{path}: tensor {t.name} ends at byte {end} but the file has "
                                f"{size} bytes (truncated file)")
            if t.name in self.infos:
                raise GGUFError(f"{path}: tensor {t.name} appears twice (also in shard "
                                f"{self.infos[t.name].shard + 1})")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne0 first -> NumPy order
            self.infos[t.name] = TensorInfo(t.name, shape, t.tensor_type.name, int(t.n_bytes),
                                            reader.data[int(t.data_offset):end], shard)

    def _open_other_shards(self, count: int) -> None:
        first_no = self.metadata.get("split.no", 0)
        if first_no != 0:
            raise GGUFError(f"{self.path}: this is shard {first_no + 1} of {count}; open the first "
                            "one (PREFIX-00001-of-NNNNN.gguf)")
        paths = shard_paths(self.path, count)
        for i, p in enumerate(paths[1:], start=1):
            if not p.exists():
                raise GGUFError(f"{self.path}: shard {i + 1} of {count} is missing: {p}")
            reader, meta, _ = _open_shard(p)
            if meta.get("split.count") != count or meta.get("split.no") != i:
                raise GGUFError(f"{p}: says it is shard {meta.get('split.no', 0) + 1} of "
                                f"{meta.get('split.count', 1)}, expected shard {i + 1} of {count}")
            self._readers.append(reader)
            self._add_tensors(reader, p, i)
        want = self.metadata.get("split.tensors.count")
        if want is not None and want != len(self.infos):
            raise GGUFError(f"{self.path}: the shards hold {len(self.infos)} tensors, split.tensors.count "
                            f"says {want}")

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


def _open_shard(path: Path):
    """(gguf reader, metadata, metadata value types) of one file, its header checked first."""
    _check_file(path)
    check_header(path)
    import gguf  # imported here so that `moegraph --help` stays fast
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises many kinds of errors on corrupt files
        raise GGUFError(f"{path}: cannot parse the GGUF header or tensor table "
                        f"(truncated or corrupt file?): {type(e).__name__}: {e}") from None
    metadata: dict[str, Any] = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            metadata[k] = f.contents()
        except UnicodeDecodeError as e:
            raise GGUFError(f"{path}: metadata key {k!r} holds a string that is not valid "
                            f"UTF-8 ({e.reason} at byte {e.start})") from None
    # value types, so that a rewritten file keeps them (e.g. uint32 vs int32)
    types = {k: (f.types[0], f.types[-1] if len(f.types) > 1 else None)
             for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, metadata, types


def _check_file(path: Path) -> None:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    if not stat.S_ISREG(path.stat().st_mode):    # opening a FIFO without a writer blocks forever
        raise GGUFError(f"{path}: not a regular file (a FIFO, socket or device?)")
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(head) < 24:
        raise GGUFError(f"{path}: truncated GGUF (only {len(head)} bytes)")


# GGUF value types: fixed sizes (struct format), 8 = string, 9 = array
_U64 = struct.Struct("<Q")
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_header(path: Path) -> None:
    """Walks the header (metadata and tensor table) checking every count, length and offset
    against the file's size before gguf-py reads it: a declared length past the end of the file
    made the reader allocate without bound, or hang. Raises GGUFError naming the field."""
    import mmap
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 4

        def take(fmt: str, what: str):
            nonlocal pos
            n = struct.calcsize("<" + fmt)
            if pos + n > size:
                raise GGUFError(f"{path}: {what} at byte {pos} runs past the end of the file "
                                f"({size} bytes): truncated or corrupt GGUF")
            v = struct.unpack_from("<" + fmt, m, pos)[0]
            pos += n
            return v

        def skip(n: int, what: str) -> None:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise GGUFError(f"{path}: {what} declares {n} bytes at byte {pos}, past the end of the "
                                f"file ({size} bytes): truncated or corrupt GGUF")
            pos += n

        def skip_strings(count: int, what: str) -> None:
            """count strings, lengths only (a vocabulary: a tight loop, nothing copied)."""
            nonlocal pos
            unpack, p = _U64.unpack_from, pos
            for _ in range(count):
                if p + 8 > size or (p := p + 8 + unpack(m, p)[0]) > size:
                    raise GGUFError(f"{path}: {what}: a string runs past the end of the file ({size} bytes): "
                                    "truncated or corrupt GGUF")
            pos = p

        def string(what: str) -> bytes:
            n = take("Q", what)
            start = pos
            skip(n, what)
            return bytes(m[start:start + n])

        def value(vtype: int, what: str) -> None:
            if vtype in _SCALAR:
                take(_SCALAR[vtype], what)
            elif vtype == 8:
                string(what)
            elif vtype == 9:
                etype, count = take("I", what), take("Q", what)
                if etype in _SCALAR:
                    skip(count * struct.calcsize(_SCALAR[etype]), f"{what} (array of {count})")
                elif etype == 8:
                    if count * 8 > size - pos:
                        raise GGUFError(f"{path}: {what}: an array of {count} strings cannot fit in the "
                                        f"{size - pos} bytes left of the file: truncated or corrupt GGUF")
                    skip_strings(count, what)
                else:
                    raise GGUFError(f"{path}: {what}: arrays of value type {etype} are not allowed")
            else:
                raise GGUFError(f"{path}: {what}: unknown value type {vtype}")

        take("I", "the version")
        n_tensors, n_kv = take("Q", "the tensor count"), take("Q", "the metadata count")
        if n_kv * 12 > size or n_tensors * 24 > size:
            raise GGUFError(f"{path}: the header declares {n_kv} metadata entries and {n_tensors} tensors, "
                            f"more than a {size}-byte file can hold: truncated or corrupt GGUF")
        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata entry {i}'s key").decode("utf-8", errors="replace")
            vtype = take("I", f"metadata key {key!r}'s type")
            if key == "general.alignment" and vtype == 4:
                alignment = max(1, take("I", "general.alignment"))
            else:
                value(vtype, f"metadata key {key!r}")
        infos = []
        for i in range(n_tensors):
            name = string(f"tensor {i}'s name").decode("utf-8", errors="replace")
            n_dims = take("I", f"tensor {name!r}'s rank")
            if n_dims > 8:
                raise GGUFError(f"{path}: tensor {name!r} declares {n_dims} dimensions (at most 8): corrupt GGUF")
            dims = [take("Q", f"tensor {name!r}'s shape") for _ in range(n_dims)]
            infos.append((name, dims, take("I", f"tensor {name!r}'s type"), take("Q", f"tensor {name!r}'s offset")))
        # the tensor data: each known-type tensor must end inside the file (the reader would fail
        # with its own internals, or map past the end)
        data_start = -(-pos // alignment) * alignment
        for name, dims, t, offset in infos:
            try:
                ne = [int(d) for d in dims] or [1]
                nbytes = math.prod(ne[1:]) * row_bytes(GGMLType(t), ne[0])
            except Exception:     # an unknown type, or a row that is not whole blocks: the builder says so
                continue
            end = data_start + offset + nbytes
            if end > size:
                raise GGUFError(f"{path}: tensor {name} ends at byte {end} but the file has {size} bytes "
                                "(truncated file)")


def _infer_value_type(value: Any):
    from gguf import GGUFValueType as V
    def scalar(v):
        if isinstance(v, bool):
            return V.BOOL
        if isinstance(v, int):
            return V.UINT32 if 0 <= v < 2**32 else V.INT64
        if isinstance(v, float):
            return V.FLOAT32
        if isinstance(v, str):
            return V.STRING
        raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")
    if isinstance(value, (list, tuple)):
        return V.ARRAY, (scalar(value[0]) if value else V.INT32)
    return scalar(value), None


def write_gguf(path: str | os.PathLike, metadata: dict[str, Any], tensors: Iterable[WeightData],
               metadata_types: dict | None = None) -> Path:
    """Writes a GGUF tensor by tensor (the tensor data is never gathered in memory) to a
    temporary name and renames it into place at the end, so an interrupted write leaves no
    half-written file under `path`. `tensors` must be a re-iterable collection: it is walked once
    for the tensor table and once for the data."""
    import gguf
    path = Path(path)
    tensors = list(tensors)
    metadata_types = metadata_types or {}
    arch = metadata.get("general.architecture", "llama")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory; give the output file's name")
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(tmp, arch)
        for key, value in metadata.items():
            if key == "general.architecture":
                continue  # the writer adds it
            vtype, sub = metadata_types.get(key) or _infer_value_type(value)
            w.add_key_value(key, value, vtype, sub_type=sub)
        for t in tensors:
            w.add_tensor_info(t.name, _ggml_shape(t), np.dtype(np.uint8), t.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType(int(t.dtype)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            # `raw` may also stream its bytes: any object with `nbytes` and `tofile(fout)`
            raw = t.raw if not isinstance(t.raw, np.ndarray) else np.ascontiguousarray(t.raw).view(np.uint8).reshape(-1)
            w.write_tensor_data(raw)
        w.close()
        os.replace(tmp, path)
    except OSError as e:      # a read-only directory, a full disk, a file-size limit
        raise GGUFError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def _remove_stale_temps(path: Path) -> None:
    """Deletes the temporary files of earlier writes to `path` whose process is gone (a killed
    run cannot clean up after itself)."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                  # still running: another write in progress
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            old.unlink()


def _ggml_shape(t: WeightData) -> tuple[int, ...]:
    """The byte shape gguf's writer expects for raw data: NumPy-order dims, innermost in bytes
    (sizes from gguf's table, so types moegraph cannot compute with are copied as well)."""
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t.dtype))]
    return (*t.shape[:-1], t.shape[-1] // block * size) if t.shape else (t.nbytes,)
