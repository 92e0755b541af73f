"""CUDA C -> CUBIN with NVRTC, for one compute capability, cached on disk.

NVRTC comes from the pip wheel `nvidia-cuda-nvrtc-cu12` (found by cuda.bindings' path finder, or
loaded directly from the wheel's lib/ folder with ctypes). We compile to a CUBIN (`-arch=sm_XX`),
never to PTX: a CUBIN from the CUDA 12 NVRTC loads on any driver >= 12.0, whereas PTX from a newer
NVRTC can be rejected by an older driver's JIT. No GPU or driver is needed to compile.

The cache key is sha256(source, arch, options, NVRTC version); files live in
$MOEGRAPH_CACHE/cuda (default ~/.cache/moegraph/cuda)."""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import threading
from pathlib import Path

from moegraph.errors import MoeGraphError

DEFAULT_ARCH = "sm_90"       # H100/H200 when no device is present to ask
OPTIONS = ("-std=c++17", "--fmad=false", "-diag-suppress=177,550")
_lock = threading.Lock()
_lib = None


class NVRTCError(MoeGraphError):
    """NVRTC is missing, or the source does not compile (the message holds NVRTC's log)."""


def cache_dir() -> Path:
    from moegraph.cache import cache_dir as root
    return root("cuda")


def _find_wheel_lib() -> str | None:
    try:
        import nvidia.cuda_nvrtc as pkg
    except ImportError:
        return None
    for root in list(getattr(pkg, "__path__", [])):
        hits = sorted(glob.glob(os.path.join(root, "lib", "libnvrtc.so.*")))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[0]
    return None


class _Lib:
    """The few NVRTC C entry points we need, through ctypes (works with any cuda-python)."""

    def __init__(self, path: str):
        self.path = path
        self.dll = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        d = self.dll
        d.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(d.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = self.dll.nvrtcGetErrorString(rc).decode()
            raise NVRTCError(f"NVRTC {what} failed: {msg} (code {rc})")

    def compile(self, source: str, arch: str, options: tuple[str, ...], name: str) -> bytes:
        d = self.dll
        prog = ctypes.c_void_p()
        self._check(d.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            opts = [f"-arch={arch}".encode(), *(o.encode() for o in options)]
            arr = (ctypes.c_char_p * len(opts))(*opts)
            rc = d.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            d.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            d.nvrtcGetProgramLog(prog, log)
            if rc != 0:
                text = log.value.decode(errors="replace")
                raise NVRTCError(f"NVRTC could not compile {name} for {arch} "
                                 f"({d.nvrtcGetErrorString(rc).decode()}):\n{_clip(text)}")
            self._check(d.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(d.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
            return buf.raw
        finally:
            d.nvrtcDestroyProgram(ctypes.byref(prog))


def _clip(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"


def load() -> _Lib:
    """The NVRTC library, or NVRTCError saying how to install it."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        candidates = []
        wheel = _find_wheel_lib()
        if wheel:
            candidates.append(wheel)
        try:   # cuda.bindings' finder (knows conda and CUDA_HOME layouts too)
            from cuda.pathfinder import load_nvidia_dynamic_lib
            candidates.append(load_nvidia_dynamic_lib("nvrtc").abs_path)
        except Exception:
            pass
        candidates += ["libnvrtc.so.12", "libnvrtc.so"]
        errors = []
        for c in candidates:
            if not c:
                continue
            try:
                _lib = _Lib(c)
                return _lib
            except (OSError, NVRTCError) as e:
                errors.append(f"{c}: {e}")
        raise NVRTCError("NVRTC not found: install it with `pip install 'moegraph[cuda]'` "
                         "(nvidia-cuda-nvrtc-cu12); tried " + "; ".join(errors or candidates))


def available() -> tuple[bool, str]:
    try:
        lib = load()
        return True, f"NVRTC {lib.version[0]}.{lib.version[1]} ({lib.path})"
    except NVRTCError as e:
        return False, str(e)


def version() -> tuple[int, int]:
    return load().version


def normalize_arch(arch: str | int | tuple | None) -> str:
    if arch is None:
        return DEFAULT_ARCH
    if isinstance(arch, tuple):
        return f"sm_{arch[0]}{arch[1]}"
    if isinstance(arch, int):
        return f"sm_{arch}"
    arch = str(arch)
    if arch.startswith("compute_"):
        raise NVRTCError(f"{arch}: moegraph compiles CUBINs (sm_XX), not PTX")
    return arch if arch.startswith("sm_") else f"sm_{arch}"


def compile_cubin(source: str, arch: str | int | tuple | None = None, *, name: str = "moegraph.cu",
                  options: tuple[str, ...] = OPTIONS, use_cache: bool = True) -> tuple[bytes, dict]:
    """Compiles `source` to a CUBIN for `arch` (e.g. "sm_90"). Returns (cubin, info) with
    info = {arch, nvrtc, cache: hit|miss|off, key, seconds}."""
    import time
    lib = load()
    arch = normalize_arch(arch)
    key = hashlib.sha256("\0".join([source, arch, " ".join(options), f"{lib.version}", "v1"])
                         .encode()).hexdigest()[:32]
    info = {"arch": arch, "nvrtc": f"{lib.version[0]}.{lib.version[1]}", "key": key}
    path = cache_dir() / f"{key}.cubin"
    from moegraph.cache import read_entry, write_entry
    cached = read_entry(path) if use_cache else None     # verified, or None
    if cached is not None:
        info.update(cache="hit", seconds=0.0)
        return cached, info
    t0 = time.perf_counter()
    cubin = lib.compile(source, arch, options, name)
    info.update(cache="miss" if use_cache else "off", seconds=time.perf_counter() - t0)
    if use_cache:
        write_entry(path, cubin)
    return cubin, info
