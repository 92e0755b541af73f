"""GGML tensor types: block layouts, dequantization, and ggml-cpu's activation quantization.

Everything here is plain NumPy and bit-exact with ggml:

* ``dequantize`` reproduces ggml's ``dequantize_row_*`` (and ``gguf.quants.dequantize``) bit for
  bit, in float32, with the same operation order (e.g. Q4_K is ``(d*sc)*q - (dmin*m)``).
* ``quantize_activations`` / ``quantize_roundtrip`` reproduce what ggml-cpu does to the
  *activations* of a matmul before its integer dot products (``from_float`` of the weight type's
  ``vec_dot_type``), as built for x86-64 with AVX2 (the oracle machine: Zen 3, AVX2/FMA/F16C).

Block layouts follow ggml/src/ggml-common.h; one structured NumPy dtype per block type documents
the bytes and lets the decoders read fields by name. Per-type behaviour lives in one table
(``_TRAITS``) so a later reference weight quantizer (``quantize(x, t)``) is one more column.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = [
    "GGMLType", "TypeTraits", "ActivationBlocks",
    "block_size", "type_size", "row_bytes", "is_quantized", "traits",
    "dequantize", "SUPPORTED_DEQUANT",
    "vec_dot_type", "quantize_activations", "quantize_roundtrip", "ACTIVATION_TYPES",
]


class GGMLType(enum.IntEnum):
    """ggml's ``enum ggml_type`` ids (the values stored in GGUF tensor infos)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


QK_K = 256  # super-block size of the K-quants


def _blk(*fields) -> np.dtype:
    # packed (align=False) like the C structs: 1- and 2-byte members only (+ Q8_K's leading float)
    return np.dtype(list(fields))


# One block of each type, field for field as in ggml-common.h ("<f2" = ggml_half).
_BLOCK_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.Q4_0: _blk(("d", "<f2"), ("qs", "u1", 16)),
    GGMLType.Q4_1: _blk(("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)),
    GGMLType.Q5_0: _blk(("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)),
    GGMLType.Q5_1: _blk(("d", "<f2"), ("m", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)),
    GGMLType.Q8_0: _blk(("d", "<f2"), ("qs", "i1", 32)),
    GGMLType.Q8_1: _blk(("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)),
    GGMLType.Q2_K: _blk(("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")),
    GGMLType.Q3_K: _blk(("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")),
    GGMLType.Q4_K: _blk(("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)),
    GGMLType.Q5_K: _blk(("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                        ("qs", "u1", 128)),
    GGMLType.Q6_K: _blk(("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")),
    GGMLType.Q8_K: _blk(("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)),
}

# ---------------------------------------------------------------------------------------------
# Dequantization: structured blocks [nb] -> float32 [nb, block_size]. All arithmetic in float32,
# in ggml's order, so results are bit-identical (NumPy never contracts a*b+c into an FMA).
# ---------------------------------------------------------------------------------------------

_F32 = np.float32
_SHIFT_NIBBLES = np.array([0, 4], dtype=np.uint8)
_SHIFT_CRUMBS = np.array([0, 2, 4, 6], dtype=np.uint8)


def _f(a) -> np.ndarray:
    """Field -> float32 column [nb, 1] (fp16 -> fp32 is exact)."""
    return a.astype(_F32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # [nb, 16] bytes -> [nb, 32]: low nibbles are elements 0..15, high nibbles 16..31
    return ((qs[:, None, :] >> _SHIFT_NIBBLES[None, :, None]) & 0x0F).reshape(len(qs), -1)


def _bits_by_plane(bytes_: np.ndarray) -> np.ndarray:
    # [nb, L] bytes -> [nb, 8*L] with element b*L + l = bit b of byte l (Q3_K hmask, Q5_K qh layout)
    nb, length = bytes_.shape
    bits = np.unpackbits(bytes_, axis=-1, bitorder="little").reshape(nb, length, 8)
    return bits.transpose(0, 2, 1).reshape(nb, 8 * length)


def _deq_q4_0(b):
    return _f(b["d"]) * (_nibbles(b["qs"]).astype(np.int8) - 8).astype(_F32)


def _deq_q4_1(b):
    return _f(b["d"]) * _nibbles(b["qs"]).astype(_F32) + _f(b["m"])


def _q5(b):
    # 4 low bits from qs nibbles, 5th bit j from the little-endian u32 qh
    qh = np.unpackbits(b["qh"], axis=-1, bitorder="little")
    return _nibbles(b["qs"]) | (qh << 4)


def _deq_q5_0(b):
    return _f(b["d"]) * (_q5(b).astype(np.int8) - 16).astype(_F32)


def _deq_q5_1(b):
    return _f(b["d"]) * _q5(b).astype(_F32) + _f(b["m"])


def _deq_q8_0(b):
    return b["qs"].astype(_F32) * _f(b["d"])


def _crumbs(qs: np.ndarray) -> np.ndarray:
    # [nb, 64] -> [nb, 256] 2-bit values: element 128*n + 32*j + l = (qs[32*n + l] >> 2j) & 3
    nb = len(qs)
    return ((qs.reshape(nb, 2, 1, 32) >> _SHIFT_CRUMBS[None, None, :, None]) & 3).reshape(nb, QK_K)


def _per_sub(v: np.ndarray, n_sub: int) -> np.ndarray:
    # [nb, n_sub] per-sub-block factor -> [nb, n_sub, 1] to broadcast over [nb, n_sub, QK_K/n_sub]
    return v.reshape(len(v), n_sub, 1)


def _deq_q2_k(b):
    nb, sc = len(b), b["scales"]
    dl = _f(b["d"]) * (sc & 0x0F).astype(_F32)      # 16 sub-blocks of 16, scale = low nibble
    ml = _f(b["dmin"]) * (sc >> 4).astype(_F32)     # min = high nibble
    q = _crumbs(b["qs"]).astype(_F32).reshape(nb, 16, 16)
    return (_per_sub(dl, 16) * q - _per_sub(ml, 16)).reshape(nb, QK_K)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    # 16 6-bit signed scales (offset 32) in 12 bytes: low 4 bits from bytes 0..7 (low then high
    # nibbles), high 2 bits of scale i from bits 2*(i//4) of byte 8 + i%4
    low = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)
    high = ((s[:, None, 8:12] >> _SHIFT_CRUMBS[None, :, None]) & 3).reshape(len(s), 16)
    return (low | (high << 4)).astype(np.int8) - 32


def _deq_q3_k(b):
    nb = len(b)
    dl = _f(b["d"]) * _q3_k_scales(b["scales"]).astype(_F32)
    # q = low 2 bits - 4 unless the hmask bit is set
    q = _crumbs(b["qs"]).astype(np.int8) - ((1 - _bits_by_plane(b["hmask"])) << 2).astype(np.int8)
    return (_per_sub(dl, 16) * q.astype(_F32).reshape(nb, 16, 16)).reshape(nb, QK_K)


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # ggml's get_scale_min_k4 for all 8 sub-blocks: 6-bit scales and mins packed in 12 bytes
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _k4_low(qs: np.ndarray) -> np.ndarray:
    # [nb, 128] -> [nb, 256]: element 64*j + 32*h + l = nibble h of qs[32*j + l]
    nb = len(qs)
    q = (qs.reshape(nb, 4, 1, 32) >> _SHIFT_NIBBLES[None, None, :, None]) & 0x0F
    return q.reshape(nb, QK_K)


def _deq_k4(b, q: np.ndarray):
    nb = len(b)
    sc, mn = _k4_scale_min(b["scales"])
    d1 = _f(b["d"]) * sc.astype(_F32)
    m1 = _f(b["dmin"]) * mn.astype(_F32)
    return (_per_sub(d1, 8) * q.astype(_F32).reshape(nb, 8, 32) - _per_sub(m1, 8)).reshape(nb, QK_K)


def _deq_q4_k(b):
    return _deq_k4(b, _k4_low(b["qs"]))


def _deq_q5_k(b):
    # 5th bit of element 32*s + l is bit s of qh[l]
    return _deq_k4(b, _k4_low(b["qs"]) | (_bits_by_plane(b["qh"]) << 4))


def _deq_q6_k(b):
    nb = len(b)
    # element 128*n + 32*k + l: low 4 bits = nibble k//2 of ql[64*n + 32*(k%2) + l],
    # high 2 bits = bits 2k of qh[32*n + l]; scale index = element // 16
    lo = (b["ql"].reshape(nb, 2, 1, 2, 32) >> _SHIFT_NIBBLES[None, None, :, None, None]) & 0x0F
    hi = (b["qh"].reshape(nb, 2, 1, 32) >> _SHIFT_CRUMBS[None, None, :, None]) & 3
    q = (lo.reshape(nb, 2, 4, 32) | (hi << 4)).astype(np.int8) - 32
    dl = _f(b["d"]) * b["scales"].astype(_F32)
    return (_per_sub(dl, 16) * q.astype(_F32).reshape(nb, 16, 16)).reshape(nb, QK_K)


# ---------------------------------------------------------------------------------------------
# Activation quantization as ggml-cpu does it on x86-64 AVX2. xb: float32 [m, block] -> blocks.
#
# Q8_0 / Q8_1 (ggml/src/ggml-cpu/arch/x86/quants.c quantize_row_q8_0 / quantize_row_q8_1; the
# repacked path ggml_quantize_mat_q8_0_4x8 in arch/x86/repack.cpp is the same): the AVX2 code
# differs from the scalar reference quantize_row_q8_0_ref (ggml/src/ggml-quants.c, also what
# gguf.quants.quantize does) in two ways, and we follow AVX2:
#   * multiplier id = 127/amax, not 1/(amax/127)  (can differ by an ulp, moving a q at a .5 edge);
#   * _mm256_round_ps(_MM_ROUND_NEAREST) = round half to EVEN, not roundf (half away from zero).
#   Then _mm256_cvtps_epi32 (NaN/out of range -> INT_MIN) and saturating packs to int8.
#   d is stored as fp16(amax/127) (F16C, round-nearest-even); Q8_1's s = fp16(d_f32 * sum(q)),
#   computed from the unrounded f32 d.
# Q8_K: x86 has no SIMD quantize_row_q8_K; it calls quantize_row_q8_K_ref: iscale = -127/max
#   where max is the first element of largest |x| (sign kept), q = nearest_int(iscale*x) (the
#   +1.5*2^23 trick: round half to even), q = min(127, q), d = 1/iscale kept in float32, plus
#   int16 bsums over groups of 16. The AVX2 repack variant ggml_quantize_mat_q8_K_4x8 may flip
#   the sign of iscale; d and q flip together, so d*q and every dot product are unchanged.
# ---------------------------------------------------------------------------------------------

def _cvtps_epi32(v: np.ndarray) -> np.ndarray:
    # cvtps2dq on already-rounded floats: NaN, inf and out-of-range give INT_MIN ("indefinite")
    return np.where(np.abs(v) < _F32(2**31), v, _F32(-(2**31))).astype(np.int32)


def _act_q8_0(xb: np.ndarray):
    amax = np.abs(xb).max(axis=-1)
    d = amax / _F32(127)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        mul = np.where(amax != 0, _F32(127) / amax, _F32(0))
        q32 = _cvtps_epi32(np.rint(xb * mul[:, None]))
    qs = np.clip(q32, -128, 127).astype(np.int8)  # packs_epi32 + packs_epi16 saturate
    return d, q32, qs


def _to_f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # F16C: too large -> inf, silently
        return v.astype(np.float16)


def _act_q8_0_blocks(xb):
    d, _, qs = _act_q8_0(xb)
    return _to_f16(d), qs, {}


def _act_q8_1_blocks(xb):
    d, q32, qs = _act_q8_0(xb)
    total = q32.sum(axis=-1, dtype=np.int32)  # hsum_i32_8 (wraps like the C int sum)
    return _to_f16(d), qs, {"s": _to_f16(d * total.astype(_F32))}


def _act_q8_k_blocks(xb):
    ax = np.abs(xb)
    ax[np.isnan(ax)] = 0  # the C loop's `ax > amax` never picks a NaN
    idx = ax.argmax(axis=-1)[:, None]  # first index of the largest |x|, as the strict `>` loop
    amax = np.take_along_axis(ax, idx, axis=-1)[:, 0]
    mx = np.take_along_axis(xb, idx, axis=-1)[:, 0]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        iscale = np.where(amax != 0, _F32(-127) / mx, _F32(0))
        # nearest_int: add 1.5*2^23 in float32, keep the low 23 bits (exact incl. garbage inputs)
        bits = (xb * iscale[:, None] + _F32(12582912)).view(np.int32)
        q = np.minimum((bits & 0x007FFFFF) - 0x00400000, 127)
        d = np.where(amax != 0, _F32(1) / iscale, _F32(0))
    qs = q.astype(np.int8)  # (int8_t) store wraps, as GCC does
    qs[amax == 0] = 0        # all-zero block: d = 0, qs = 0, bsums = 0
    bsums = qs.reshape(len(qs), -1, 16).sum(axis=-1, dtype=np.int16)
    return d, qs, {"bsums": bsums}


# ---------------------------------------------------------------------------------------------
# The per-type table.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TypeTraits:
    """What moegraph knows about one ggml type (the Python side of ggml's type_traits)."""
    type: GGMLType
    block_size: int                    # elements per block (1 for plain types)
    type_size: int                     # bytes per block
    block_dtype: np.dtype | None       # structured layout of one block (None for plain types)
    dequantize_blocks: Callable | None = None   # structured [nb] -> float32 [nb, block_size]
    quantize_activation: Callable | None = None  # f32 [m, block] -> (d, qs, extra), ggml-cpu x86
    vec_dot_type: GGMLType | None = None        # activation type of a matmul with this weight type
    # quantize_blocks (llama.cpp's reference weight quantizer) comes with the quantize tool.

    @property
    def is_quantized(self) -> bool:
        return self.block_dtype is not None


def _plain(t: GGMLType, size: int, vdt: GGMLType | None = None) -> TypeTraits:
    return TypeTraits(t, 1, size, None, vec_dot_type=vdt)


def _quant(t: GGMLType, block: int, deq=None, act=None, vdt=None) -> TypeTraits:
    return TypeTraits(t, block, _BLOCK_DTYPES[t].itemsize, _BLOCK_DTYPES[t], deq, act, vdt)


T = GGMLType
# vec_dot_type from type_traits_cpu in ggml/src/ggml-cpu/ggml-cpu.c
_TRAITS: dict[GGMLType, TypeTraits] = {tr.type: tr for tr in [
    _plain(T.F32, 4, T.F32),
    _plain(T.F16, 2, T.F16),
    _plain(T.BF16, 2, T.BF16),
    _plain(T.I8, 1), _plain(T.I16, 2), _plain(T.I32, 4), _plain(T.I64, 8), _plain(T.F64, 8),
    _quant(T.Q4_0, 32, _deq_q4_0, vdt=T.Q8_0),
    _quant(T.Q4_1, 32, _deq_q4_1, vdt=T.Q8_1),
    _quant(T.Q5_0, 32, _deq_q5_0, vdt=T.Q8_0),
    _quant(T.Q5_1, 32, _deq_q5_1, vdt=T.Q8_1),
    _quant(T.Q8_0, 32, _deq_q8_0, _act_q8_0_blocks, T.Q8_0),
    _quant(T.Q8_1, 32, None, _act_q8_1_blocks, T.Q8_1),
    _quant(T.Q2_K, QK_K, _deq_q2_k, vdt=T.Q8_K),
    _quant(T.Q3_K, QK_K, _deq_q3_k, vdt=T.Q8_K),
    _quant(T.Q4_K, QK_K, _deq_q4_k, vdt=T.Q8_K),
    _quant(T.Q5_K, QK_K, _deq_q5_k, vdt=T.Q8_K),
    _quant(T.Q6_K, QK_K, _deq_q6_k, vdt=T.Q8_K),
    _quant(T.Q8_K, QK_K, None, _act_q8_k_blocks),
]}
del T

_PLAIN_FLOATS = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "name", None) or f"ggml type id {t!r}"


def traits(t) -> TypeTraits:
    """Traits of ggml type ``t`` (GGMLType, gguf.GGMLQuantizationType, int id or name)."""
    try:
        return _TRAITS[GGMLType[t] if isinstance(t, str) else GGMLType(int(t))]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"unknown or unsupported ggml type {_name(t)}") from None


def block_size(t) -> int:
    """Elements per block (1 for F32/F16/BF16/integers)."""
    return traits(t).block_size


def type_size(t) -> int:
    """Bytes per block."""
    return traits(t).type_size


def is_quantized(t) -> bool:
    return traits(t).is_quantized


def row_bytes(t, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements (ggml_row_size)."""
    tr = traits(t)
    if n_cols % tr.block_size:
        raise ValueError(f"{tr.type.name}: row length {n_cols} is not a multiple of the block "
                         f"size {tr.block_size}")
    return n_cols // tr.block_size * tr.type_size


# types dequantize() decodes, and types quantize_roundtrip() rounds to
SUPPORTED_DEQUANT: tuple[GGMLType, ...] = _PLAIN_FLOATS + tuple(
    t for t, tr in _TRAITS.items() if tr.dequantize_blocks)
ACTIVATION_TYPES: tuple[GGMLType, ...] = _PLAIN_FLOATS + tuple(
    t for t, tr in _TRAITS.items() if tr.quantize_activation)


# ~256 KiB of float32 per chunk: temporaries stay small whatever the tensor size
_CHUNK_ELEMS = 1 << 16


def dequantize(raw: np.ndarray, t, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ggml data of type ``t`` into a float32 array of ``shape``.

    ``raw`` holds the rows of ``shape`` back to back, as in a GGUF file (any dtype: uint8 bytes or
    the type's own dtype, e.g. a np.memmap slice from gguf.GGUFReader). Only ``raw`` itself is
    read, block-chunk by block-chunk. F32 is returned as a view of ``raw`` (no copy) when ``raw``
    is contiguous; every other type returns a new array.
    """
    shape = tuple(int(s) for s in shape)
    try:
        tr = traits(t)
    except ValueError:
        tr = None
    if tr is None or (tr.dequantize_blocks is None and tr.type not in _PLAIN_FLOATS):
        raise NotImplementedError(
            f"dequantize: {_name(t)} is not supported; supported types: "
            + ", ".join(x.name for x in SUPPORTED_DEQUANT))
    n_cols = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if shape else 1
    nbytes = n_rows * row_bytes(tr.type, n_cols)
    if not isinstance(raw, np.ndarray):
        raw = np.frombuffer(raw, dtype=np.uint8)
    if raw.nbytes != nbytes:
        raise ValueError(f"dequantize {tr.type.name} {shape}: expected {nbytes} bytes, "
                         f"got {raw.nbytes}")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)  # no copy if already contiguous

    if tr.type == GGMLType.F32:
        return data.view(np.float32).reshape(shape)
    if tr.type == GGMLType.F16:
        return data.view(np.float16).astype(np.float32).reshape(shape)
    if tr.type == GGMLType.BF16:
        # bf16 is the top half of an f32: widen, shift in place (no second temporary)
        out = data.view(np.uint16).astype(np.uint32)
        out <<= 16
        return out.view(np.float32).reshape(shape)

    blocks = data.view(tr.block_dtype)
    out = np.empty((len(blocks), tr.block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // tr.block_size)
    for i in range(0, len(blocks), step):  # chunks of many blocks, never one block at a time
        out[i:i + step] = tr.dequantize_blocks(blocks[i:i + step])
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------------------------

def vec_dot_type(weight_type) -> GGMLType:
    """The type ggml-cpu converts a matmul's activations to for a weight of ``weight_type``.

    (F16 weights keep F16 activations on x86 AVX2, tinyBLAS included; BF16 likewise.)
    """
    tr = traits(weight_type)
    if tr.vec_dot_type is None:
        raise NotImplementedError(f"vec_dot_type: {tr.type.name} is not a matmul weight type")
    return tr.vec_dot_type


@dataclass(frozen=True)
class ActivationBlocks:
    """Rows of activations quantized to Q8_0, Q8_1 or Q8_K, field for field as ggml-cpu holds them.

    Shapes: x [..., n] gives d [..., nb], qs [..., nb, block], s [..., nb] (Q8_1 only),
    bsums [..., nb, 16] (Q8_K only), with nb = n / block.
    """
    type: GGMLType
    d: np.ndarray                   # float16 (Q8_0, Q8_1) or float32 (Q8_K) block scale
    qs: np.ndarray                  # int8 quants
    s: np.ndarray | None = None     # Q8_1: float16 d*sum(qs) (from the f32 d)
    bsums: np.ndarray | None = None  # Q8_K: int16 sums of 16 quants

    def dequantize(self) -> np.ndarray:
        """d * q for every element, exact, in float64 [..., n]."""
        v = self.d.astype(np.float64)[..., None] * self.qs
        return v.reshape(*v.shape[:-2], v.shape[-2] * v.shape[-1])

    def to_bytes(self) -> np.ndarray:
        """The ggml blocks as bytes, uint8 [..., nb * type_size] (same layout as a GGUF row)."""
        tr = _TRAITS[self.type]
        out = np.zeros(self.d.shape, dtype=tr.block_dtype)
        out["d"], out["qs"] = self.d, self.qs
        if self.s is not None:
            out["s"] = self.s
        if self.bsums is not None:
            out["bsums"] = self.bsums
        return out.view(np.uint8).reshape(*self.d.shape[:-1], -1)


def _rows(x, t) -> tuple[np.ndarray, TypeTraits]:
    tr = traits(t)
    x = np.asarray(x, dtype=np.float32)  # ggml quantizes the f32 activations
    if x.ndim == 0:
        raise ValueError("quantize: x must have at least one axis (the row)")
    if x.shape[-1] % tr.block_size:
        raise ValueError(f"{tr.type.name}: row length {x.shape[-1]} is not a multiple of the "
                         f"block size {tr.block_size}")
    return x, tr


def quantize_activations(x, t) -> ActivationBlocks:
    """Quantize each row of ``x`` (float32 [..., n]) to Q8_0/Q8_1/Q8_K as ggml-cpu x86 AVX2 does."""
    tr = traits(t)
    if tr.quantize_activation is None:
        raise NotImplementedError(
            f"quantize_activations: {tr.type.name} is not an activation block type; supported: "
            + ", ".join(x.name for x in ACTIVATION_TYPES if x not in _PLAIN_FLOATS))
    x, tr = _rows(x, t)
    lead, nb = x.shape[:-1], x.shape[-1] // tr.block_size
    d, qs, extra = tr.quantize_activation(np.ascontiguousarray(x).reshape(-1, tr.block_size))
    extra = {k: v.reshape(*lead, nb, *v.shape[1:]) for k, v in extra.items()}
    return ActivationBlocks(tr.type, d.reshape(*lead, nb), qs.reshape(*lead, nb, tr.block_size),
                            **extra)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16 (ggml-impl.h; ggml-cpu uses it unless AVX512BF16): round to nearest
    # even on the bit pattern, NaN -> quiet NaN, no flush of subnormals
    u = x.view(np.uint32)
    with np.errstate(over="ignore"):
        r = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    r = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 64, r)
    return (r << 16).view(np.float32)


def quantize_roundtrip(x, t) -> np.ndarray:
    """x rounded the way ggml-cpu rounds a matmul's activations of type ``t``, as float64.

    t = F32: x itself; F16: fp32 -> fp16 (F16C, round-nearest-even); BF16: ggml's fp32 -> bf16;
    Q8_0/Q8_1/Q8_K: ``quantize_activations(x, t).dequantize()`` (d * q, exact).
    ``x`` is first cast to float32; rows must be a whole number of blocks. Inputs are expected to
    be finite (NaN/inf give whatever ggml's arithmetic gives, which is rarely meaningful).
    """
    tr = traits(t)
    if tr.type not in ACTIVATION_TYPES:
        raise NotImplementedError(
            f"quantize_roundtrip: {tr.type.name} is not an activation type; supported: "
            + ", ".join(x.name for x in ACTIVATION_TYPES))
    x, tr = _rows(x, t)
    if tr.type == GGMLType.F32:
        return x.astype(np.float64)
    if tr.type == GGMLType.F16:
        return _to_f16(x).astype(np.float64)
    if tr.type == GGMLType.BF16:
        return _round_bf16(np.ascontiguousarray(x)).astype(np.float64)
    return quantize_activations(x, tr.type).dequantize()
