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
    "quantize_weights", "WEIGHT_TYPES",
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
    MXFP4 = 39


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
    # OCP microscaling FP4 (gpt-oss's experts): an E8M0 exponent, 32 E2M1 values as nibbles
    # (value j low, j + 16 high); value = KVALUES_MXFP4[nibble] * 2^(e - 128) (the table is
    # E2M1 doubled, the scale halved: ggml's GGML_E8M0_TO_FP32_HALF)
    GGMLType.MXFP4: _blk(("e", "u1"), ("qs", "u1", 16)),
}
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)

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


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """GGML_E8M0_TO_FP32_HALF: 2^(e - 128) as float32, from its bits (denormal for e < 2)."""
    e = e.astype(np.uint32)
    return np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << 23).astype(np.uint32).view(_F32)


def _deq_mxfp4(b):
    with np.errstate(over="ignore"):     # e = 255 with |value| 12: inf, as in ggml
        return KVALUES_MXFP4[_nibbles(b["qs"])].astype(_F32) * e8m0_half(b["e"])[:, None]


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


def q3_k_scales(s: np.ndarray) -> np.ndarray:
    # 16 6-bit signed scales (offset 32) in 12 bytes: low 4 bits from bytes 0..7 (low then high
    # nibbles), high 2 bits of scale i from bits 2*(i//4) of byte 8 + i%4
    low = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)
    high = ((s[:, None, 8:12] >> _SHIFT_CRUMBS[None, :, None]) & 3).reshape(len(s), 16)
    return (low | (high << 4)).astype(np.int8) - 32


def _deq_q3_k(b):
    nb = len(b)
    dl = _f(b["d"]) * q3_k_scales(b["scales"]).astype(_F32)
    # q = low 2 bits - 4 unless the hmask bit is set
    q = _crumbs(b["qs"]).astype(np.int8) - ((1 - _bits_by_plane(b["hmask"])) << 2).astype(np.int8)
    return (_per_sub(dl, 16) * q.astype(_F32).reshape(nb, 16, 16)).reshape(nb, QK_K)


def k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    sc, mn = k4_scale_min(b["scales"])
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
    quantize_blocks: Callable | None = None     # f32 [nb, block] -> structured [nb]: ggml's _ref

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
    _quant(T.MXFP4, 32, _deq_mxfp4, vdt=T.Q8_0),
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


def first_nonfinite(raw: np.ndarray, t) -> int | None:
    """The index of the first element (plain float types) or block (quantized types: its float
    fields, the scales d/dmin/m) that is NaN or Inf, or None. Reads the data in chunks."""
    tr = traits(t)
    raw = np.asarray(raw).view(np.uint8).reshape(-1)
    if tr.is_quantized:
        fields = [k for k, (dt, _) in tr.block_dtype.fields.items() if dt.kind == "f"]
        blocks = raw[:len(raw) // tr.type_size * tr.type_size].view(tr.block_dtype)
        step = _CHUNK_ELEMS * 4
        for i in range(0, len(blocks), step):
            chunk = blocks[i:i + step]
            bad = np.zeros(len(chunk), bool)
            for k in fields:
                bad |= ~np.isfinite(chunk[k])
            if bad.any():
                return i + int(np.argmax(bad))
        return None
    # Inf or NaN: the exponent bits all ones (an integer test, faster than isfinite on halves)
    exponent = {GGMLType.BF16: ("<u2", 0x7F80), GGMLType.F16: ("<u2", 0x7C00),
                GGMLType.F32: ("<u4", 0x7F800000), GGMLType.F64: ("<u8", 0x7FF0000000000000)}
    if tr.type not in exponent:
        return None                     # integers
    dt, mask = exponent[tr.type]
    vals = raw[:len(raw) // tr.type_size * tr.type_size].view(dt)
    mask = np.array(mask, dtype=dt)
    test = lambda c: (c & mask) == mask     # noqa: E731
    step = _CHUNK_ELEMS * 16
    for i in range(0, len(vals), step):
        bad = test(vals[i:i + step])
        if bad.any():
            return i + int(np.argmax(bad))
    return None


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


# ---------------------------------------------------------------------------------------------
# Weight quantization: ggml's reference quantizers (quantize_row_*_ref in ggml/src/ggml-quants.c),
# which are what llama_model_quantize runs without an importance matrix, reproduced byte for byte.
#
# ggml-quants.c lives in ggml-base, which is compiled without -march flags (plain x86-64 SSE2):
# every operation is a separately rounded float32 operation (no FMA contraction, no reassociation
# of sums), fp32 -> fp16 is ggml's software round-to-nearest-even, sqrtf is correctly rounded.
# The kernels below follow the C code's operation order exactly, vectorized over blocks (or
# sub-blocks): elementwise ops are done on whole arrays, sums are sequential left folds
# (np.add.accumulate; NumPy's np.sum is pairwise and would round differently), the candidate-scale
# searches (make_qkx2_quants, make_qx_quants) loop in Python over the ~20 candidates, and
# make_q3_quants' coordinate descent loops over the 16 positions of a sub-block; never over blocks.
#
# Layout: a search works on "position-major" arrays [n, M] (n values of each of M sub-blocks), so
# each position is one contiguous row and a sequential sum is a row-by-row fold.
# ---------------------------------------------------------------------------------------------

_MAGIC = _F32(12582912.0)        # 1.5 * 2**23, ggml's nearest_int trick
_GROUP_MAX_EPS = _F32(1e-15)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5*2^23 in float32 and keep the low 23 bits (round half to even
    for |v| < 2^22; the same garbage as C outside it). float32 -> int32."""
    return ((v + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def _fold_rows(a: np.ndarray) -> np.ndarray:
    s = a[0].copy()
    for row in a[1:]:
        s += row
    return s


def _check_reduce_is_sequential() -> bool:
    # np.add.reduce over the outer axis of a C-contiguous [n, M] float32 array (M >= 2) adds whole
    # rows in order (out += a[i]): a sequential fold per column, 3x faster than a Python loop over
    # rows. (With M == 1 NumPy sums pairwise instead.) Checked once on hard data, not assumed.
    rng = np.random.default_rng(1234)
    for m in (2, 3, 17, 1000):
        a = (rng.standard_normal((32, m)) * np.exp(3 * rng.standard_normal((32, m)))).astype(_F32)
        if not np.array_equal(np.add.reduce(a, axis=0), _fold_rows(a)):
            return False
    return True


_REDUCE_IS_SEQUENTIAL = _check_reduce_is_sequential()


def _fold(a: np.ndarray) -> np.ndarray:
    """Sequential sum over axis 0, a[0] + a[1] + ... (C's `s = a[0]; s += a[i]`) of a C-contiguous
    float32 array. (NumPy's np.sum over a contiguous axis is pairwise and rounds differently;
    np.add.accumulate is exact but walks column by column, 60x slower.)"""
    if _REDUCE_IS_SEQUENTIAL and a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    return _fold_rows(a)


def _fold0(a: np.ndarray) -> np.ndarray:
    """Sequential sum over axis 0 starting from 0.f (C's `s = 0; s += a[i]`): the same value as
    _fold, and + 0.f turns the one possible difference, a -0.f, into C's +0.f."""
    return _fold(a) + _F32(0)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Over axis 0: (amax, max) = (largest |x|, the first x that has it) as C's loop
    `amax = max = 0; if (|x| > amax) { amax = |x|; max = x; }` (all zero: max = +0)."""
    ax = np.abs(x)
    idx = ax.argmax(axis=0)[None]
    amax = np.take_along_axis(ax, idx, axis=0)[0]
    mx = np.take_along_axis(x, idx, axis=0)[0]
    return amax, np.where(amax > 0, mx, _F32(0))


def _first_extreme(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The first element of each row of x [nb, n] equal to v [nb] (C's `if (x < min) min = x`
    keeps the first of equal values: this matters only for the sign of a zero)."""
    zero = v == 0
    if zero.any():
        rows = np.nonzero(zero)[0]
        first = (x[rows] == 0).argmax(axis=1)
        v = v.copy()
        v[rows] = x[rows, first]
    return v


def _fp16(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v, dtype=np.float32).astype(np.float16)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), float32 in and out."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= _F32(0.5), np.sign(v), _F32(0)).astype(_F32)


def _trunc_i32(v: np.ndarray) -> np.ndarray:
    """C float -> int conversion (truncation; cvttss2si gives INT_MIN for NaN/out of range)."""
    with np.errstate(invalid="ignore"):
        ok = np.abs(v) < _F32(2**31)
        return np.where(ok, v, _F32(-(2**31))).astype(np.int32)


def _i8(v: np.ndarray) -> np.ndarray:
    """C int -> int8_t conversion (wraps modulo 256, as GCC does)."""
    return v.astype(np.int8)


def _pack_crumbs(L: np.ndarray) -> np.ndarray:
    """[nb, 256] values 0..3 -> [nb, 64] bytes: qs[32*h + l] = L[128h+l] | L[128h+l+32] << 2 |
    L[128h+l+64] << 4 | L[128h+l+96] << 6 (Q2_K, Q3_K)."""
    q = L.astype(np.uint8).reshape(len(L), 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(len(L), 64)


def _blocks_out(t: GGMLType, nb: int) -> np.ndarray:
    return np.zeros(nb, dtype=_BLOCK_DTYPES[t])


# --- 32-element blocks -------------------------------------------------------------------------

def _wq_q8_0(x):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _wq_q8_0_body(x)


def _wq_q8_0_body(x):
    out = _blocks_out(GGMLType.Q8_0, len(x))
    amax = np.abs(x).max(axis=1)
    d = amax / _F32(127)
    with np.errstate(divide="ignore"):
        iden = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    out["d"] = _fp16(d)
    out["qs"] = _trunc_i32(_roundf(x * iden[:, None])).astype(np.int8)
    return out


def _wq_q4_0_like(x, nlev: int, t: GGMLType):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _wq_q4_0_like_body(x, nlev)


def _wq_q4_0_like_body(x, nlev: int):
    # Q4_0 (nlev 8) and Q5_0 (nlev 16): d = max / -nlev with max the first element of largest |x|
    _, mx = _first_absmax(x.T)
    d = mx / _F32(-nlev)
    with np.errstate(divide="ignore"):
        iden = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    q = np.minimum(2 * nlev - 1, _i8(_trunc_i32(x * iden[:, None] + _F32(nlev + 0.5))))
    return d, q.astype(np.uint8)


def _wq_q4_1_like(x, nmax: int, clamp: bool):
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _wq_q4_1_like_body(x, nmax, clamp)


def _wq_q4_1_like_body(x, nmax: int, clamp: bool):
    mn, mx = _first_extreme(x, x.min(axis=1)), _first_extreme(x, x.max(axis=1))
    d = (mx - mn) / _F32(nmax)
    with np.errstate(divide="ignore"):
        iden = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    q = _trunc_i32((x - mn[:, None]) * iden[:, None] + _F32(0.5))
    q = np.minimum(nmax, _i8(q)) if clamp else (q & 0xFF)   # Q4_1: MIN(15, (int8_t)v); Q5_1: (uint8_t)v
    return d, mn, q.astype(np.uint8)


def _nibbles_pack(q):
    # [nb, 32] -> [nb, 16]: low nibble = element j, high nibble = element j + 16
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _qh_bits(q):
    # bit 4 of element j -> bit j of the little-endian u32 qh
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _wq_q4_0(x):
    out = _blocks_out(GGMLType.Q4_0, len(x))
    d, q = _wq_q4_0_like(x, 8, GGMLType.Q4_0)
    out["d"], out["qs"] = _fp16(d), _nibbles_pack(q)
    return out


def _wq_q5_0(x):
    out = _blocks_out(GGMLType.Q5_0, len(x))
    d, q = _wq_q4_0_like(x, 16, GGMLType.Q5_0)
    out["d"], out["qh"], out["qs"] = _fp16(d), _qh_bits(q), _nibbles_pack(q)
    return out


def _wq_q4_1(x):
    out = _blocks_out(GGMLType.Q4_1, len(x))
    d, mn, q = _wq_q4_1_like(x, 15, clamp=True)
    out["d"], out["m"], out["qs"] = _fp16(d), _fp16(mn), _nibbles_pack(q)
    return out


def _wq_q5_1(x):
    out = _blocks_out(GGMLType.Q5_1, len(x))
    d, mn, q = _wq_q4_1_like(x, 31, clamp=False)
    out["d"], out["m"], out["qh"], out["qs"] = _fp16(d), _fp16(mn), _qh_bits(q), _nibbles_pack(q)
    return out


# --- the K-quant searches, over position-major sub-blocks [n, M] ------------------------------

_NI_LIMIT = _F32(4194303)   # |v| <= this: nearest_int(v) == (v + 1.5*2^23) - 1.5*2^23 == rint(v)


def _round_levels(v: np.ndarray, lo: int, hi: int, exact: bool) -> np.ndarray:
    """In place: v <- clamp(nearest_int(v), lo, hi) as float32. exact=False may be used only when
    every |v| <= 4194303 (then the float round trip through 1.5*2^23 is nearest_int exactly)."""
    if exact:
        v[...] = np.clip(_nearest_int(v), lo, hi)
        return v
    v += _MAGIC
    v -= _MAGIC
    np.maximum(v, _F32(lo), out=v)
    np.minimum(v, _F32(hi), out=v)
    return v


def _make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool):
    """make_qkx2_quants for M sub-blocks at once (x, w: position-major [n, M]): returns
    (scale, the_min, L uint8 [n, M]). `min` is updated by each better candidate and the later
    candidates use it, as in C. In-place arithmetic on a few preallocated buffers."""
    fnmax = _F32(nmax)
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    lo_x = mn                                   # the column's smallest x (for the range bound)
    sum_w = _fold(w)
    wx = w * x
    sum_x = _fold(wx)
    mn = np.where(mn > 0, _F32(0), mn)
    degenerate = mx == mn
    lv = np.empty_like(x)                       # the candidate's levels (float)
    t = np.empty_like(x)                        # scratch

    def levels(iscale, mn):
        np.subtract(x, mn, out=lv)
        np.multiply(lv, iscale, out=lv)
        # |iscale*(x - min)| <= |iscale| * max(max - min, |min_x - min|) (monotone rounding)
        bound = np.abs(iscale) * np.maximum(np.abs(mx - mn), np.abs(lo_x - mn))
        exact = not bool(np.all(bound <= _NI_LIMIT))
        return _round_levels(lv, 0, nmax, exact)

    def error(scale, lf, mn):
        np.multiply(lf, scale, out=t)
        np.add(t, mn, out=t)
        np.subtract(t, x, out=t)
        if use_mad:
            np.abs(t, out=t)
        else:
            np.multiply(t, t, out=t)
        np.multiply(t, w, out=t)
        return _fold0(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / (mx - mn)
        scale = _F32(1) / iscale
        L = levels(iscale, mn).copy()
        best = error(scale, L, mn)
        wl = np.empty_like(x)
        for step in range(nstep + 1):
            num = _F32(rmin) + _F32(rdelta) * _F32(step) + fnmax
            iscale = num / (mx - mn)
            levels(iscale, mn)
            np.multiply(w, lv, out=wl)
            sum_l = _fold0(wl)
            np.multiply(wl, lv, out=t)
            sum_l2 = _fold0(t)
            np.multiply(wl, x, out=t)
            sum_xl = _fold0(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, lv, this_min)
            better = (D > 0) & (cur < best) & ~degenerate
            if better.any():
                np.copyto(L, lv, where=better)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
    scale = np.where(degenerate, _F32(0), scale)
    np.copyto(L, _F32(0), where=degenerate)
    return scale, -mn, L.astype(np.uint8)


def _make_qx_quants_rmse1(x, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for M sub-blocks (x position-major
    [n, M]): (scale, L uint8 [n, M])."""
    fnmax = _F32(nmax)
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    lv = np.empty_like(x)
    t = np.empty_like(x)

    def levels(iscale):
        np.multiply(x, iscale, out=lv)
        # |iscale * x| <= |iscale| * amax
        exact = not bool(np.all(np.abs(iscale) * amax <= _NI_LIMIT))
        return _round_levels(lv, -nmax, nmax - 1, exact)

    def sums():
        np.multiply(wx, lv, out=t)
        sumlx = _fold0(t)
        np.multiply(w, lv, out=t)
        np.multiply(t, lv, out=t)
        return sumlx, _fold0(t)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(-nmax) / mx
        L = levels(iscale).copy()
        sumlx, suml2 = sums()
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(fnmax + _F32(0.1) * _F32(step)) / mx
            levels(iscale)
            sumlx, suml2 = sums()
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                np.copyto(L, lv, where=better)
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, _F32(0), scale)
    L += fnmax
    np.copyto(L, _F32(0), where=zero)
    return scale, L.astype(np.uint8)


def _make_q3_quants_rmse(x, nmax: int = 4):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) for M sub-blocks: (scale, L int [n, M] in
    0..2*nmax-1). The coordinate descent is sequential over the n positions, vectorized over M."""
    n = x.shape[0]
    amax, mx = _first_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(-nmax) / mx
        L = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        Lf = L.astype(_F32)
        sumlx = _fold0(wx * Lf)
        suml2 = _fold0(w * Lf * Lf)
        for _ in range(5):
            changed = False
            for i in range(n):
                wi, xi, wxi, li = w[i], x[i], wx[i], Lf[i]
                slx = sumlx - wxi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(_F32)
                slx = slx + wxi * new_l
                sl2 = sl2 + wi * new_l * new_l
                take = ((sumlx - wxi * li) > 0) & (new_l != li) & (sl2 > 0) & \
                    (slx * slx * suml2 > sumlx * sumlx * sl2)
                if take.any():
                    changed = True
                    Lf[i] = np.where(take, new_l, li)
                    sumlx = np.where(take, slx, sumlx)
                    suml2 = np.where(take, sl2, suml2)
            if not changed:   # a pass without change leaves every sub-block where it is
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    scale = np.where(zero, _F32(0), scale)
    L = np.where(zero, 0, Lf.astype(np.int32) + nmax)
    return scale, L


def _subblocks(x: np.ndarray, n: int) -> np.ndarray:
    """[nb, 256] -> position-major [n, nb * 256/n] (sub-block s of block b is column b*(256/n)+s)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _unsub(a: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of _subblocks for an [n, M] result -> [nb, 256]."""
    return a.T.reshape(nb, QK_K)


def _requant_levels(x, d, dm, lo: int, hi: int, keep):
    """Final levels nearest_int((x + dm)/d) clamped, per sub-block; sub-blocks with d == 0 keep
    `keep`. x: [nb, nsub, len]; d, dm: [nb, nsub] (dm None: x/d)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (x if dm is None else x + dm[..., None]) / d[..., None]
        lv = np.clip(_nearest_int(v), lo, hi)
    return np.where((d != 0)[..., None], lv, keep)


# --- K-quants ----------------------------------------------------------------------------------

# The searches: the LLVM-JIT kernels (below) when llvmlite is there, else the NumPy ones. Both give
# the same bytes; _USE_JIT = False forces NumPy (tests compare the two).
_USE_JIT = True


def _search_qkx2(kernel, xs, w, nmax, rmin, rdelta, nstep, use_mad):
    r = _jit_search(kernel, xs, w, n_out_vecs=2) if _USE_JIT else None
    if r is None:
        return _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad)
    return r[0], r[1], r[2].astype(np.uint8)


def _search_qx(xs):
    r = _jit_search("q6k_search", xs, n_out_vecs=1) if _USE_JIT else None
    if r is None:
        return _make_qx_quants_rmse1(xs, 32)
    return r[0], r[1].astype(np.uint8)


def _search_q3(xs):
    r = _jit_search("q3k_search", xs, n_out_vecs=1) if _USE_JIT else None
    if r is None:
        return _make_q3_quants_rmse(xs, 4)
    return r[0], r[1].astype(np.int32)


def _wq_q2_k(x):
    nb = len(x)
    out = _blocks_out(GGMLType.Q2_K, nb)
    r = _jit_kblocks("q2k", _subblocks(x, 16))
    if r is not None:
        Lq, sc, _, d, dmin = r
        out["scales"], out["d"], out["dmin"] = sc.reshape(nb, 16), _fp16(d[::16]), _fp16(dmin[::16])
        out["qs"] = _pack_crumbs(np.ascontiguousarray(Lq.T).reshape(nb, QK_K))
        return out
    xs = _subblocks(x, 16)
    scales, mins, L = _search_qkx2("q2k_search", xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    L = _unsub(L, nb).reshape(nb, 16, 16).astype(np.int32)
    q4 = _F32(15)
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        isc = (q4 / max_scale)[:, None]
        sc = np.where((max_scale > 0)[:, None], _nearest_int(isc * scales), 0) & 0xFF
        d = np.where(max_scale > 0, max_scale / q4, _F32(0))
        imn = (q4 / max_min)[:, None]
        sc = np.where((max_min > 0)[:, None], sc | ((_nearest_int(imn * mins) << 4) & 0xFF), sc)
        dmin = np.where(max_min > 0, max_min / q4, _F32(0))
    d16, dmin16 = _fp16(d), _fp16(dmin)
    dl = d16.astype(_F32)[:, None] * (sc & 0xF).astype(_F32)
    ml = dmin16.astype(_F32)[:, None] * (sc >> 4).astype(_F32)
    L = _requant_levels(x.reshape(nb, 16, 16), dl, ml, 0, 3, L)
    out["scales"], out["d"], out["dmin"] = sc.astype(np.uint8), d16, dmin16
    out["qs"] = _pack_crumbs(L.reshape(nb, QK_K))
    return out


def _q3_k_pack(out, nb, ls, d16, L):
    """Q3_K fields from the 6-bit scales ls [nb, 16], d16 and the final levels L [nb, 256] (0..7)."""
    # the 16 6-bit scales: low nibbles in bytes 0..7 (j and j+8 share a byte), high crumbs of
    # scale j at bits 2*(j//4) of byte 8 + j%4
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(nb, 4, 4)          # [nb, j//4, j%4]
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    high = L > 3
    # bit j//32 of hmask[j % 32] = the high bit of element j
    out["hmask"] = np.packbits(high.reshape(nb, 8, 32).transpose(0, 2, 1), axis=2,
                               bitorder="little").reshape(nb, 32)
    out["qs"] = _pack_crumbs(np.where(high, L - 4, L))
    out["scales"], out["d"] = packed, d16
    return out


def _wq_q3_k(x):
    nb = len(x)
    out = _blocks_out(GGMLType.Q3_K, nb)
    r = _jit_kblocks("q3k", _subblocks(x, 16))
    if r is not None:
        Lq, ls, _, d, _ = r
        L = np.ascontiguousarray(Lq.T).reshape(nb, QK_K)
        return _q3_k_pack(out, nb, ls.reshape(nb, 16).astype(np.int32), _fp16(d[::16]), L)
    scales, L = _search_q3(_subblocks(x, 16))
    scales = scales.reshape(nb, 16)
    L = _unsub(L, nb).reshape(nb, 16, 16)
    _, max_scale = _first_absmax(scales.T)
    nz = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(-32) / max_scale
        ls = np.clip(_i8(_nearest_int(iscale[:, None] * scales)).astype(np.int32), -32, 31) + 32
        d = _F32(1) / iscale
    ls = np.where(nz[:, None], ls, 0)
    d16 = np.where(nz, _fp16(d), np.float16(0))
    sc = np.where(nz[:, None], ls, 32) - 32  # the decoded scales (0 when the block is all zero)
    dl = d16.astype(_F32)[:, None] * sc.astype(_F32)
    L = _requant_levels(x.reshape(nb, 16, 16), dl, None, -4, 3, L - 4) + 4
    return _q3_k_pack(out, nb, ls, d16, L.reshape(nb, QK_K))


def _k4_pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (inverse of get_scale_min_k4)."""
    out = np.empty((len(ls), 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _wq_k4(x, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The common part of Q4_K and Q5_K: (d16, dmin16, packed scales, L [nb, 256])."""
    nb = len(x)
    xs = _subblocks(x, 32)
    r = _jit_kblocks("q4k" if nmax == 15 else "q5k", xs)
    if r is not None:
        Lq, ls, lm, d, dmin = r
        return (_fp16(d[::8]), _fp16(dmin[::8]), _k4_pack_scales(ls.reshape(nb, 8), lm.reshape(nb, 8)),
                np.ascontiguousarray(Lq.T).reshape(nb, QK_K))
    av_x = np.sqrt(_fold0(xs * xs) / _F32(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _search_qkx2(f"q{4 if nmax == 15 else 5}k_search", xs, w, nmax, rmin,
                                   rdelta, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    L = _unsub(L, nb).reshape(nb, 8, 32).astype(np.int32)
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
        ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
        lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
        d16, dmin16 = _fp16(max_scale / _F32(63)), _fp16(max_min / _F32(63))
    d = d16.astype(_F32)[:, None] * ls.astype(_F32)
    dm = dmin16.astype(_F32)[:, None] * lm.astype(_F32)
    L = _requant_levels(x.reshape(nb, 8, 32), d, dm, 0, nmax, L)
    return d16, dmin16, _k4_pack_scales(ls, lm), L.reshape(nb, QK_K)


def _wq_q4_k(x):
    out = _blocks_out(GGMLType.Q4_K, len(x))
    d16, dmin16, sc, L = _wq_k4(x, 15, -1.0, 0.1, 20)
    q = L.astype(np.uint8).reshape(len(x), 4, 2, 32)
    out["d"], out["dmin"], out["scales"] = d16, dmin16, sc
    out["qs"] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(x), 128)
    return out


def _wq_q5_k(x):
    nb = len(x)
    out = _blocks_out(GGMLType.Q5_K, nb)
    d16, dmin16, sc, L = _wq_k4(x, 31, -0.5, 0.1, 15)
    L = L.astype(np.uint8)
    q = (L & 0xF).reshape(nb, 4, 2, 32)
    out["d"], out["dmin"], out["scales"] = d16, dmin16, sc
    out["qs"] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    # bit s of qh[j] = the 5th bit of element 32*s + j
    out["qh"] = np.packbits(((L >> 4) & 1).reshape(nb, 8, 32).transpose(0, 2, 1), axis=2,
                            bitorder="little").reshape(nb, 32)
    return out


def _q6_k_pack(out, nb, L, sc, d16):
    L = L.astype(np.uint8).reshape(nb, 2, 4, 32)
    lo, hi = L & 0xF, L >> 4
    out["ql"] = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                               axis=2).reshape(nb, 128)
    out["qh"] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    out["scales"], out["d"] = sc, d16
    return out


def _wq_q6_k(x):
    nb = len(x)
    out = _blocks_out(GGMLType.Q6_K, nb)
    r = _jit_kblocks("q6k", _subblocks(x, 16))
    if r is not None:
        Lq, sc, _, d, _ = r
        return _q6_k_pack(out, nb, np.ascontiguousarray(Lq.T), sc.view(np.int8).reshape(nb, 16),
                          _fp16(d[::16]))
    scales, L = _search_qx(_subblocks(x, 16))
    scales = scales.reshape(nb, 16)
    L = _unsub(L, nb).reshape(nb, 16, 16).astype(np.int32)
    max_abs, max_scale = _first_absmax(scales.T)
    zero = max_abs < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(-128) / max_scale
        d16 = np.where(zero, np.float16(0), _fp16(_F32(1) / iscale))
        sc = _i8(np.minimum(127, _nearest_int(iscale[:, None] * scales)))
    sc = np.where(zero[:, None], np.int8(0), sc)
    dl = d16.astype(_F32)[:, None] * sc.astype(_F32)
    L = _requant_levels(x.reshape(nb, 16, 16), dl, None, -32, 31, L - 32) + 32
    L = np.where(zero[:, None, None], 0, L)
    return _q6_k_pack(out, nb, L, sc, d16)


def _wq_mxfp4(x):
    """quantize_row_mxfp4_ref: e from floor(log2f(amax)) - 2 (float32 log2, correctly rounded as
    glibc's log2f is), each value the nearest table entry (the first of equals)."""
    out = _blocks_out(GGMLType.MXFP4, len(x))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        amax = np.where(np.isnan(x), 0, np.abs(x)).max(axis=1)    # NaN never wins `amax < |v|`
        lg = np.floor(np.log2(amax.astype(np.float64)).astype(_F32))
        e = np.where(amax > 0, (lg - 2 + 127).astype(np.int64) & 0xFF, 0).astype(np.uint8)
        d = e8m0_half(e)
        err = np.abs(KVALUES_MXFP4.astype(_F32)[None, None, :] * d[:, None, None] - x[:, :, None])
    idx = np.argmin(np.where(np.isnan(err), np.inf, err), axis=2).astype(np.uint8)   # (NaN: index 0)
    out["e"] = e
    out["qs"] = idx[:, :16] | (idx[:, 16:] << 4)
    return out


def _with_weight_quantizers() -> None:
    import dataclasses
    for t, fn in {GGMLType.Q4_0: _wq_q4_0, GGMLType.Q4_1: _wq_q4_1, GGMLType.Q5_0: _wq_q5_0,
                  GGMLType.Q5_1: _wq_q5_1, GGMLType.Q8_0: _wq_q8_0, GGMLType.Q2_K: _wq_q2_k,
                  GGMLType.Q3_K: _wq_q3_k, GGMLType.Q4_K: _wq_q4_k, GGMLType.Q5_K: _wq_q5_k,
                  GGMLType.Q6_K: _wq_q6_k, GGMLType.MXFP4: _wq_mxfp4}.items():
        _TRAITS[t] = dataclasses.replace(_TRAITS[t], quantize_blocks=fn)


_with_weight_quantizers()

# types quantize_weights() produces (plain floats: F32 as is, F16 round-to-nearest-even, BF16 as
# ggml_fp32_to_bf16_row_ref)
WEIGHT_TYPES: tuple[GGMLType, ...] = _PLAIN_FLOATS + tuple(
    t for t, tr in _TRAITS.items() if tr.quantize_blocks)

# values per call of a block quantizer. NumPy kernels: every temporary stays inside the L2 cache.
# JIT kernels: few temporaries, so larger chunks; the Python around each call (~0.1 ms, the only
# time the GIL is held) is then under 5 % of the work.
_QUANT_CHUNK_ELEMS = 1 << 15
_JIT_CHUNK_ELEMS = 1 << 17


def quantize_weights(x, t, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize the rows of ``x`` (float32 [..., n]) to ggml type ``t`` exactly as ggml's reference
    quantizer does (``quantize_row_*_ref``, which ``llama_model_quantize`` uses without an
    importance matrix): the same bytes. Returns uint8 [..., row_bytes(t, n)] (GGUF row layout);
    ``out`` (uint8, that many bytes) receives the result in place when given.

    Works chunk by chunk over whole blocks (a few hundred KB of temporaries), vectorized: NumPy
    releases the GIL inside each operation, so calls on different threads run in parallel.
    """
    tr = traits(t)
    if tr.type not in WEIGHT_TYPES:
        raise NotImplementedError(
            f"quantize_weights: {tr.type.name} is not supported; supported: "
            + ", ".join(x.name for x in WEIGHT_TYPES))
    x, tr = _rows(x, t)
    lead, n = x.shape[:-1], x.shape[-1]
    nrow_bytes = row_bytes(tr.type, n)
    if out is None:
        out = np.empty((*lead, nrow_bytes), dtype=np.uint8)
    flat_out = out.reshape(-1)
    if flat_out.nbytes != int(np.prod(lead, dtype=np.int64)) * nrow_bytes:
        raise ValueError(f"quantize_weights: out has {flat_out.nbytes} bytes, expected "
                         f"{int(np.prod(lead, dtype=np.int64)) * nrow_bytes}")
    xf = x.reshape(-1)
    if tr.type == GGMLType.F32:
        flat_out.view(np.float32)[:] = xf
        return out
    if tr.type == GGMLType.F16:
        flat_out.view(np.float16)[:] = _to_f16(xf)
        return out
    if tr.type == GGMLType.BF16:
        flat_out.view(np.uint16)[:] = _round_bf16(np.ascontiguousarray(xf)).view(np.uint32) >> 16
        return out
    blocks = xf.reshape(-1, tr.block_size)
    fns = jit_functions() if _USE_JIT else None
    kernel = fns and fns.get(f"{tr.type.name.lower()}_blocks")
    if kernel is not None:      # the whole block in native code, straight into `out`
        xc = np.ascontiguousarray(xf, dtype=_F32)
        if not flat_out.flags.c_contiguous:
            raise ValueError("quantize_weights: out must be C-contiguous")
        kernel(xc.ctypes.data, len(blocks), flat_out.ctypes.data)
        return out
    dst = flat_out.view(tr.block_dtype)
    native = fns is not None and f"{tr.type.name[:2].lower()}k_blocks" in fns
    step = max(1, (_JIT_CHUNK_ELEMS if native else _QUANT_CHUNK_ELEMS) // tr.block_size)
    for i in range(0, len(blocks), step):
        dst[i:i + step] = tr.quantize_blocks(np.ascontiguousarray(blocks[i:i + step]))
    return out


# ---------------------------------------------------------------------------------------------
# The weight quantizers JIT-compiled with LLVM (llvmlite).
#
# Same algorithms, same float32 operation order as the C code and the NumPy kernels above, in
# native code. K-quants are vectorized across sub-blocks: SIMD lane j of a <16 x float> holds
# sub-block j of a group (the sub-blocks of a super-block are adjacent lanes), so a candidate scale
# is tried on 16 sub-blocks per instruction; the whole block is done natively (weights, search,
# fp16 super-block scales, final levels) and NumPy only packs the uint8 levels into the block
# layout. The 32-element types do one block per <32 x float>, straight into the GGUF bytes.
# The IR uses plain fadd/fsub/fmul/fdiv (no fast-math flags, no `contract`): LLVM then neither
# reassociates nor fuses into FMA, so each lane computes exactly what ggml's scalar C does. Calls
# go through ctypes, which releases the GIL. Without F16C only the searches are compiled (fp16
# conversion would be a libcall); without llvmlite everything runs on the NumPy kernels.
# ---------------------------------------------------------------------------------------------

import threading as _threading

_VW = 16            # lanes per vector: two AVX2 registers, so two independent chains interleave


def _llf(x: float) -> str:
    """An LLVM float literal: the float32 value in LLVM's double hex form."""
    import struct
    v = struct.unpack("<f", struct.pack("<f", float(x)))[0]
    return f"0x{struct.unpack('<Q', struct.pack('<d', v))[0]:016X}"




class _KernelIR:
    """A tiny writer of vector LLVM IR: fresh SSA names, stack variables (mem2reg promotes them),
    counted loops. Every float op is emitted exactly as written, in order."""

    def __init__(self, name: str, params: list[str], vw: int | None = None):
        vw = vw or _VW
        self.name, self.params, self.vw = name, params, vw
        self.V, self.VI, self.VB = f"<{vw} x float>", f"<{vw} x i32>", f"<{vw} x i1>"
        self.zero = self.vf(0.0)
        self.allocas: list[str] = []
        self.body: list[str] = []
        self.n = 0

    def op(self, expr: str) -> str:
        self.n += 1
        name = f"%t{self.n}"
        self.body.append(f"  {name} = {expr}")
        return name

    def line(self, s: str) -> None:
        self.body.append(s if s.endswith(":") else "  " + s)

    def label(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def vf(self, x: float) -> str:
        return "<" + ", ".join([f"float {_llf(x)}"] * self.vw) + ">"

    def vi(self, x: int) -> str:
        return "<" + ", ".join([f"i32 {int(x)}"] * self.vw) + ">"

    # float vectors
    def add(self, a, b): return self.op(f"fadd {self.V} {a}, {b}")
    def sub(self, a, b): return self.op(f"fsub {self.V} {a}, {b}")
    def mul(self, a, b): return self.op(f"fmul {self.V} {a}, {b}")
    def div(self, a, b): return self.op(f"fdiv {self.V} {a}, {b}")
    def neg(self, a): return self.op(f"fneg {self.V} {a}")
    def abs(self, a): return self.op(f"call {self.V} @llvm.fabs.v{self.vw}f32({self.V} {a})")
    def cmp(self, pred, a, b): return self.op(f"fcmp {pred} {self.V} {a}, {b}")
    def sel(self, c, a, b): return self.op(f"select {self.VB} {c}, {self.V} {a}, {self.V} {b}")
    def and_(self, a, b): return self.op(f"and {self.VB} {a}, {b}")

    def nearest_clamp(self, v, lo: int, hi: int) -> str:
        """clamp(nearest_int(v), lo, hi) as float: ggml's bit trick, then integer MIN/MAX."""
        t = self.add(v, self.vf(12582912.0))
        i = self.op(f"bitcast {self.V} {t} to {self.VI}")
        i = self.op(f"and {self.VI} {i}, {self.vi(0x007FFFFF)}")
        i = self.op(f"sub {self.VI} {i}, {self.vi(0x00400000)}")
        c = self.op(f"icmp slt {self.VI} {i}, {self.vi(lo)}")
        i = self.op(f"select {self.VB} {c}, {self.VI} {self.vi(lo)}, {self.VI} {i}")
        c = self.op(f"icmp sgt {self.VI} {i}, {self.vi(hi)}")
        i = self.op(f"select {self.VB} {c}, {self.VI} {self.vi(hi)}, {self.VI} {i}")
        return self.op(f"sitofp {self.VI} {i} to {self.V}")

    def splat(self, scalar: str) -> str:
        e = self.op(f"insertelement {self.V} poison, float {scalar}, i32 0")
        return self.op(f"shufflevector {self.V} {e}, {self.V} poison, <{self.vw} x i32> zeroinitializer")

    def gep(self, base: str, g: str) -> str:
        return self.op(f"getelementptr inbounds float, ptr {base}, i64 {g}")

    def if_any(self, cond: str):
        """`if (any lane of cond) { ... }` as a branch (the body is skipped when no lane needs it)."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            then, done = self.label("then"), self.label("endif")
            self.line(f"br i1 {self.any(cond)}, label %{then}, label %{done}")
            self.line(f"{then}:")
            yield
            self.line(f"br label %{done}")
            self.line(f"{done}:")
        return cm()

    def any(self, c) -> str:
        b = self.op(f"bitcast {self.VB} {c} to i{self.vw}")
        return self.op(f"icmp ne i{self.vw} {b}, 0")

    # memory: element (i, lane group g) of a position-major [n, M] array
    def ptr(self, base: str, i: int, g: str, M: str) -> str:
        off = self.op(f"mul i64 {i}, {M}")
        off = self.op(f"add i64 {off}, {g}")
        return self.op(f"getelementptr inbounds float, ptr {base}, i64 {off}")

    def load(self, p: str) -> str:
        return self.op(f"load {self.V}, ptr {p}, align 4")

    def store(self, v: str, p: str) -> None:
        self.line(f"store {self.V} {v}, ptr {p}, align 4")

    # variables and loops
    def var(self, ty: str, init: str) -> _KVar:
        self.n += 1
        name = f"%v{self.n}"
        self.allocas.append(f"  {name} = alloca {ty}, align 32")
        v = _KVar(self, name, ty)
        v.set(init)
        return v

    def loop(self, start: str, stop: str, step: int = 1, ty: str = "i64"):
        import contextlib

        @contextlib.contextmanager
        def cm():
            i = self.var(ty, start)
            head, body, done = self.label("head"), self.label("body"), self.label("done")
            self.line(f"br label %{head}")
            self.line(f"{head}:")
            iv = i.get()
            c = self.op(f"icmp slt {ty} {iv}, {stop}")
            self.line(f"br i1 {c}, label %{body}, label %{done}")
            self.line(f"{body}:")
            yield iv
            i.set(self.op(f"add {ty} {iv}, {step}"))
            self.line(f"br label %{head}")
            self.line(f"{done}:")
        return cm()

    def text(self) -> str:
        return "\n".join([f"define void @{self.name}({', '.join(self.params)}) nounwind {{", "entry:",
                          *self.allocas, *self.body, "  ret void", "}"])


class _KVar:
    def __init__(self, k: _KernelIR, ptr: str, ty: str):
        self.k, self.ptr, self.ty = k, ptr, ty

    def get(self) -> str:
        return self.k.op(f"load {self.ty}, ptr {self.ptr}, align 32")

    def set(self, v: str) -> None:
        self.k.line(f"store {self.ty} {v}, ptr {self.ptr}, align 32")


def _ir_first_absmax(k: _KernelIR, xs: list[str]) -> tuple[str, str]:
    amax, mx = k.zero, k.zero
    for xi in xs:                      # if (ax > amax) { amax = ax; max = x[i]; }
        ax = k.abs(xi)
        c = k.cmp("ogt", ax, amax)
        amax, mx = k.sel(c, ax, amax), k.sel(c, xi, mx)
    return amax, mx


def _emit_qkx2(k: _KernelIR, xs, ws, lp, nmax: int, rmin: float, rdelta: float, nstep: int,
               use_mad: bool) -> tuple[str, str]:
    """make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) on
    the lanes: stores L (float levels) at the pointers lp, returns (scale, the_min)."""
    fn = k.vf(nmax)
    mn, mx, sum_w, sum_x = xs[0], xs[0], ws[0], k.mul(ws[0], xs[0])
    for xi, wi in zip(xs[1:], ws[1:]):
        mn = k.sel(k.cmp("olt", xi, mn), xi, mn)
        mx = k.sel(k.cmp("ogt", xi, mx), xi, mx)
        sum_w = k.add(sum_w, wi)
        sum_x = k.add(sum_x, k.mul(wi, xi))
    mn = k.sel(k.cmp("ogt", mn, k.zero), k.zero, mn)
    mn0 = mn
    degenerate = k.cmp("oeq", mx, mn)

    def error(scale, ls, mn):
        e = k.zero
        for xi, wi, li in zip(xs, ws, ls):
            diff = k.sub(k.add(k.mul(scale, li), mn), xi)
            diff = k.abs(diff) if use_mad else k.mul(diff, diff)
            e = k.add(e, k.mul(wi, diff))
        return e

    iscale = k.div(fn, k.sub(mx, mn))
    scale = k.div(k.vf(1.0), iscale)
    ls = [k.nearest_clamp(k.mul(iscale, k.sub(xi, mn)), 0, nmax) for xi in xs]
    for li, p in zip(ls, lp):
        k.store(li, p)
    best = k.var(k.V, error(scale, ls, mn))
    v_scale, v_min = k.var(k.V, scale), k.var(k.V, mn)
    with k.loop("0", str(nstep + 1), 1, "i32") as step:
        mn = v_min.get()
        fstep = k.op(f"sitofp i32 {step} to float")
        num = k.op(f"fmul float {_llf(rdelta)}, {fstep}")
        num = k.op(f"fadd float {_llf(rmin)}, {num}")
        num = k.op(f"fadd float {num}, {_llf(nmax)}")
        iscale = k.div(k.splat(num), k.sub(mx, mn))
        la = [k.nearest_clamp(k.mul(iscale, k.sub(xi, mn)), 0, nmax) for xi in xs]
        sum_l = sum_l2 = sum_xl = k.zero
        for xi, wi, li in zip(xs, ws, la):
            wl = k.mul(wi, li)
            sum_l = k.add(sum_l, wl)
            sum_l2 = k.add(sum_l2, k.mul(wl, li))
            sum_xl = k.add(sum_xl, k.mul(wl, xi))
        D = k.sub(k.mul(sum_w, sum_l2), k.mul(sum_l, sum_l))
        this_scale = k.div(k.sub(k.mul(sum_w, sum_xl), k.mul(sum_x, sum_l)), D)
        this_min = k.div(k.sub(k.mul(sum_l2, sum_x), k.mul(sum_l, sum_xl)), D)
        pos = k.cmp("ogt", this_min, k.zero)
        this_min = k.sel(pos, k.zero, this_min)
        this_scale = k.sel(pos, k.div(sum_xl, sum_l2), this_scale)
        cur = error(this_scale, la, this_min)
        b = best.get()
        better = k.and_(k.cmp("ogt", D, k.zero), k.cmp("olt", cur, b))
        with k.if_any(better):
            for li, p in zip(la, lp):
                k.store(k.sel(better, li, k.load(p)), p)
            best.set(k.sel(better, cur, b))
            v_scale.set(k.sel(better, this_scale, v_scale.get()))
            v_min.set(k.sel(better, this_min, mn))
    scale = k.sel(degenerate, k.zero, v_scale.get())
    mn = k.sel(degenerate, mn0, v_min.get())
    for p in lp:
        k.store(k.sel(degenerate, k.zero, k.load(p)), p)
    return scale, k.neg(mn)


def _emit_qx_rmse1(k: _KernelIR, xs, lp, nmax: int) -> str:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL): stores L (level + nmax), returns scale."""
    fn = k.vf(nmax)
    amax, mx = _ir_first_absmax(k, xs)
    zero = k.cmp("olt", amax, k.vf(1e-15))
    ws = [k.mul(xi, xi) for xi in xs]
    wxs = [k.mul(wi, xi) for wi, xi in zip(ws, xs)]

    def sums(iscale):
        ls = [k.nearest_clamp(k.mul(iscale, xi), -nmax, nmax - 1) for xi in xs]
        slx = sl2 = k.zero
        for wi, wxi, li in zip(ws, wxs, ls):
            slx = k.add(slx, k.mul(wxi, li))
            sl2 = k.add(sl2, k.mul(k.mul(wi, li), li))
        return ls, slx, sl2

    ls, slx, sl2 = sums(k.div(k.vf(-nmax), mx))
    for li, p in zip(ls, lp):
        k.store(li, p)
    scale = k.sel(k.cmp("une", sl2, k.zero), k.div(slx, sl2), k.zero)
    v_scale, v_best = k.var(k.V, scale), k.var(k.V, k.mul(scale, slx))
    for step in [s for s in range(-9, 10) if s != 0]:
        t = k.add(fn, k.mul(k.vf(0.1), k.vf(step)))      # nmax + 0.1f*is
        iscale = k.div(k.neg(t), mx)
        ls, slx, sl2 = sums(iscale)
        best = v_best.get()
        better = k.and_(k.cmp("ogt", sl2, k.zero), k.cmp("ogt", k.mul(slx, slx), k.mul(best, sl2)))
        with k.if_any(better):
            for li, p in zip(ls, lp):
                k.store(k.sel(better, li, k.load(p)), p)
            scale = k.sel(better, k.div(slx, sl2), v_scale.get())
            v_scale.set(scale)
            v_best.set(k.sel(better, k.mul(scale, slx), best))
    for p in lp:
        k.store(k.sel(zero, k.zero, k.add(k.load(p), fn)), p)
    return k.sel(zero, k.zero, v_scale.get())


def _emit_q3(k: _KernelIR, xs, lp, nmax: int) -> str:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): stores L (level + nmax; 0 if all zero),
    returns scale."""
    n = len(xs)
    amax, mx = _ir_first_absmax(k, xs)
    zero = k.cmp("olt", amax, k.vf(1e-15))
    iscale = k.div(k.vf(-nmax), mx)
    ws = [k.mul(xi, xi) for xi in xs]
    wxs = [k.mul(wi, xi) for wi, xi in zip(ws, xs)]
    ls = [k.nearest_clamp(k.mul(iscale, xi), -nmax, nmax - 1) for xi in xs]
    sumlx = suml2 = k.zero
    for wi, wxi, li in zip(ws, wxs, ls):
        sumlx = k.add(sumlx, k.mul(wxi, li))
        suml2 = k.add(suml2, k.mul(k.mul(wi, li), li))
    # five passes of coordinate descent (a sub-block whose pass changed nothing would change
    # nothing in the next one either, so running all five equals C's early break)
    for _ in range(5):
        for i in range(n):
            wi, xi, wxi, li = ws[i], xs[i], wxs[i], ls[i]
            slx = k.sub(sumlx, k.mul(wxi, li))
            sl2 = k.sub(suml2, k.mul(k.mul(wi, li), li))
            new_l = k.nearest_clamp(k.div(k.mul(xi, sl2), slx), -nmax, nmax - 1)
            slx2 = k.add(slx, k.mul(wxi, new_l))
            sl22 = k.add(sl2, k.mul(k.mul(wi, new_l), new_l))
            take = k.and_(k.and_(k.cmp("ogt", slx, k.zero), k.cmp("une", new_l, li)),
                          k.and_(k.cmp("ogt", sl22, k.zero),
                                 k.cmp("ogt", k.mul(k.mul(slx2, slx2), suml2),
                                       k.mul(k.mul(sumlx, sumlx), sl22))))
            ls[i] = k.sel(take, new_l, li)
            sumlx = k.sel(take, slx2, sumlx)
            suml2 = k.sel(take, sl22, suml2)
    scale = k.sel(k.cmp("ogt", suml2, k.zero), k.div(sumlx, suml2), k.zero)
    for li, p in zip(ls, lp):
        k.store(k.sel(zero, k.zero, k.add(li, k.vf(nmax))), p)
    return k.sel(zero, k.zero, scale)


def _ir_search(name: str, kind: str) -> str:
    """Only the search of a K-quant, position-major: x [n, M] (+ weights for qkx2) -> scale [M]
    (+ the_min [M]), L float [n, M]. Used where fp16 conversion is not native (no F16C)."""
    n, nmax, args = _KQ[kind]
    if kind in ("q2k", "q4k", "q5k"):
        k = _KernelIR(name, ["ptr %x", "ptr %w", "i64 %M", "ptr %scale", "ptr %themin", "ptr %L"])
    else:
        k = _KernelIR(name, ["ptr %x", "i64 %M", "ptr %scale", "ptr %L"])
    with k.loop("0", "%M", k.vw) as g:
        xs = [k.load(k.ptr("%x", i, g, "%M")) for i in range(n)]
        lp = [k.ptr("%L", i, g, "%M") for i in range(n)]
        if kind in ("q2k", "q4k", "q5k"):
            ws = [k.load(k.ptr("%w", i, g, "%M")) for i in range(n)]
            scale, the_min = _emit_qkx2(k, xs, ws, lp, nmax, *args)
            k.store(the_min, k.gep("%themin", g))
        elif kind == "q6k":
            scale = _emit_qx_rmse1(k, xs, lp, nmax)
        else:
            scale = _emit_q3(k, xs, lp, nmax)
        k.store(scale, k.gep("%scale", g))
    return k.text()


# kind -> (values per sub-block, nmax, qkx2 arguments (rmin, rdelta, nstep, use_mad))
_KQ = {"q2k": (16, 3, (-0.5, 0.1, 15, True)), "q3k": (16, 4, ()), "q4k": (32, 15, (-1.0, 0.1, 20, False)),
       "q5k": (32, 31, (-0.5, 0.1, 15, False)), "q6k": (16, 32, ())}


def _ir_kquant(name: str, kind: str) -> str:
    """A whole K-quant super-block in native code, position-major (lane = sub-block; the
    sub-blocks of one super-block are adjacent lanes): weights, the search, the super-block scales
    (fp16 by LLVM's fptrunc: round to nearest even, as ggml) and the final levels, as
    quantize_row_*_ref. Outputs: final levels uint8 [n, M]; per sub-block the 8-bit scale fields
    (uint8 [M]; Q4_K/Q5_K also the mins) and per lane its super-block's d (and dmin) as float."""
    n, nmax, args = _KQ[kind]
    per = 8 if kind in ("q4k", "q5k") else 16          # sub-blocks per super-block
    k = _KernelIR(name, ["ptr %x", "i64 %M", "ptr %L", "ptr %Lq", "ptr %sc", "ptr %mq",
                         "ptr %dout", "ptr %dminout"])
    V, VI, VB = k.V, k.VI, k.VB
    V8 = f"<{k.vw} x i8>"
    assert k.vw % per == 0

    def seg_max(v):
        """max(0, v over each super-block's lanes), broadcast to those lanes: C's
        `m = 0; if (s > m) m = s;` (a zero result is +0)."""
        step = 1
        while step < per:
            perm = k.op(f"shufflevector {V} {v}, {V} poison, <{k.vw} x i32> <"
                        + ", ".join(f"i32 {i ^ step}" for i in range(k.vw)) + ">")
            v = k.sel(k.cmp("ogt", perm, v), perm, v)
            step *= 2
        return k.sel(k.cmp("ogt", v, k.zero), v, k.zero)

    def first_absmax_lane(v):
        """(amax, the first lane's value with |v| == amax; +0 if all zero), broadcast (per == vw)."""
        av = k.abs(v)
        am = k.op(f"call float @llvm.vector.reduce.fmax.v{k.vw}f32({V} {av})")
        c = k.op(f"fcmp oeq {V} {av}, {k.splat(am)}")
        m = k.op(f"bitcast {VB} {c} to i{k.vw}")
        m = k.op(f"zext i{k.vw} {m} to i32") if k.vw < 32 else m
        j = k.op(f"call i32 @llvm.cttz.i32(i32 {m}, i1 false)")
        val = k.op(f"extractelement {V} {v}, i32 {j}")
        pos = k.op(f"fcmp ogt float {am}, 0.0")
        val = k.op(f"select i1 {pos}, float {val}, float 0.0")
        return k.splat(am), k.splat(val)

    def half(v):          # fp32 -> fp16 -> fp32 (round to nearest even)
        h = k.op(f"fptrunc {V} {v} to <{k.vw} x half>")
        return k.op(f"fpext <{k.vw} x half> {h} to {V}")

    def to_int(v):        # nearest_int(v) as i32
        t = k.add(v, k.vf(12582912.0))
        i = k.op(f"bitcast {V} {t} to {VI}")
        i = k.op(f"and {VI} {i}, {k.vi(0x007FFFFF)}")
        return k.op(f"sub {VI} {i}, {k.vi(0x00400000)}")

    def imin(i, c):       # MIN(c, i) signed
        lim = k.vi(c)
        return k.op(f"select {VB} {k.op(f'icmp slt {VI} {i}, {lim}')}, {VI} {i}, {VI} {lim}")

    def imax(i, c):
        lim = k.vi(c)
        return k.op(f"select {VB} {k.op(f'icmp sgt {VI} {i}, {lim}')}, {VI} {i}, {VI} {lim}")

    def store_u8(vi, base, g):
        b = k.op(f"trunc {VI} {vi} to {V8}")
        k.line(f"store {V8} {b}, ptr {k.op(f'getelementptr inbounds i8, ptr {base}, i64 {g}')}, align 1")

    def final_levels(xs, lp, g, d, dm, lo, hi, zero=None):
        """L = clamp(nearest_int((x + dm)/d), lo, hi) - lo where d != 0, else the search's L
        (and 0 in the lanes of `zero`)."""
        nz = k.cmp("une", d, k.zero)
        for i, (xi, p) in enumerate(zip(xs, lp)):
            v = xi if dm is None else k.add(xi, dm)
            li = k.op(f"sitofp {VI} {imin(imax(to_int(k.div(v, d)), lo), hi)} to {V}")
            li = k.sel(nz, k.add(li, k.vf(-lo)), k.load(p))
            if zero is not None:
                li = k.sel(zero, k.zero, li)
            off = k.op(f"add i64 {k.op(f'mul i64 {i}, %M')}, {g}")
            store_u8(k.op(f"fptosi {V} {li} to {VI}"), "%Lq", off)

    with k.loop("0", "%M", k.vw) as g:
        xs = [k.load(k.ptr("%x", i, g, "%M")) for i in range(n)]
        lp = [k.ptr("%L", i, g, "%M") for i in range(n)]
        if kind in ("q4k", "q5k"):
            sum_x2 = k.zero
            for xi in xs:
                sum_x2 = k.add(sum_x2, k.mul(xi, xi))
            av_x = k.op(f"call {V} @llvm.sqrt.v{k.vw}f32({V} {k.div(sum_x2, k.vf(32.0))})")
            ws = [k.add(av_x, k.abs(xi)) for xi in xs]
        elif kind == "q2k":
            ws = [k.abs(xi) for xi in xs]
        if kind in ("q2k", "q4k", "q5k"):
            scale, the_min = _emit_qkx2(k, xs, ws, lp, nmax, *args)
        elif kind == "q6k":
            scale = _emit_qx_rmse1(k, xs, lp, nmax)
        else:
            scale = _emit_q3(k, xs, lp, nmax)

        if kind in ("q4k", "q5k"):
            max_scale, max_min = seg_max(scale), seg_max(the_min)
            inv_s = k.sel(k.cmp("ogt", max_scale, k.zero), k.div(k.vf(63.0), max_scale), k.zero)
            inv_m = k.sel(k.cmp("ogt", max_min, k.zero), k.div(k.vf(63.0), max_min), k.zero)
            # uint8_t ls = nearest_int(...); ls = MIN(63, ls)
            ls = k.op(f"and {VI} {to_int(k.mul(inv_s, scale))}, {k.vi(255)}")
            lm = k.op(f"and {VI} {to_int(k.mul(inv_m, the_min))}, {k.vi(255)}")
            ls, lm = imin(ls, 63), imin(lm, 63)
            d16 = half(k.div(max_scale, k.vf(63.0)))
            dmin16 = half(k.div(max_min, k.vf(63.0)))
            d = k.mul(d16, k.op(f"sitofp {VI} {ls} to {V}"))
            dm = k.mul(dmin16, k.op(f"sitofp {VI} {lm} to {V}"))
            final_levels(xs, lp, g, d, dm, 0, nmax)
            store_u8(ls, "%sc", g)
            store_u8(lm, "%mq", g)
            k.store(d16, k.gep("%dout", g))
            k.store(dmin16, k.gep("%dminout", g))
        elif kind == "q2k":
            max_scale, max_min = seg_max(scale), seg_max(the_min)
            q4 = k.vf(15.0)
            pos_s = k.cmp("ogt", max_scale, k.zero)
            pos_m = k.cmp("ogt", max_min, k.zero)
            lo = k.op(f"and {VI} {to_int(k.mul(k.div(q4, max_scale), scale))}, {k.vi(255)}")
            lo = k.op(f"select {VB} {pos_s}, {VI} {lo}, {VI} zeroinitializer")
            hi = k.op(f"shl {VI} {to_int(k.mul(k.div(q4, max_min), the_min))}, {k.vi(4)}")
            sc = k.op(f"and {VI} {k.op(f'or {VI} {lo}, {hi}')}, {k.vi(255)}")
            sc = k.op(f"select {VB} {pos_m}, {VI} {sc}, {VI} {lo}")
            d16 = half(k.sel(pos_s, k.div(max_scale, q4), k.zero))
            dmin16 = half(k.sel(pos_m, k.div(max_min, q4), k.zero))
            dl = k.mul(d16, k.op(f"sitofp {VI} {k.op(f'and {VI} {sc}, {k.vi(15)}')} to {V}"))
            ml = k.mul(dmin16, k.op(f"sitofp {VI} {k.op(f'lshr {VI} {sc}, {k.vi(4)}')} to {V}"))
            final_levels(xs, lp, g, dl, ml, 0, 3)
            store_u8(sc, "%sc", g)
            k.store(d16, k.gep("%dout", g))
            k.store(dmin16, k.gep("%dminout", g))
        elif kind == "q3k":
            _, max_scale = first_absmax_lane(scale)
            nz = k.cmp("une", max_scale, k.zero)
            iscale = k.div(k.vf(-32.0), max_scale)
            li = to_int(k.mul(iscale, scale))
            li = k.op(f"trunc {VI} {li} to {V8}")                        # int8_t l = nearest_int(..)
            li = k.op(f"sext {V8} {li} to {VI}")
            li = k.op(f"add {VI} {imin(imax(li, -32), 31)}, {k.vi(32)}")
            li = k.op(f"select {VB} {nz}, {VI} {li}, {VI} zeroinitializer")
            d16 = half(k.sel(nz, k.div(k.vf(1.0), iscale), k.zero))
            sc = k.op(f"select {VB} {nz}, {VI} {k.op(f'sub {VI} {li}, {k.vi(32)}')}, {VI} zeroinitializer")
            d = k.mul(d16, k.op(f"sitofp {VI} {sc} to {V}"))
            final_levels(xs, lp, g, d, None, -4, 3)
            store_u8(li, "%sc", g)
            k.store(d16, k.gep("%dout", g))
        else:  # q6k
            max_abs, max_scale = first_absmax_lane(scale)
            zero = k.cmp("olt", max_abs, k.vf(1e-15))
            iscale = k.div(k.vf(-128.0), max_scale)
            d16 = half(k.sel(zero, k.zero, k.div(k.vf(1.0), iscale)))
            sci = imin(to_int(k.mul(iscale, scale)), 127)
            sci = k.op(f"trunc {VI} {sci} to {V8}")                     # int8_t scales[ib]
            sci = k.op(f"sext {V8} {sci} to {VI}")
            sci = k.op(f"select {VB} {zero}, {VI} zeroinitializer, {VI} {sci}")
            d = k.mul(d16, k.op(f"sitofp {VI} {sci} to {V}"))
            final_levels(xs, lp, g, d, None, -32, 31, zero)     # all-zero block: memset 0
            store_u8(sci, "%sc", g)
            k.store(d16, k.gep("%dout", g))
    return k.text()


def _ir_block32(name: str, kind: str) -> str:
    """A whole 32-element block type (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1), row-major: block i of x
    (32 floats) -> block i of out (the GGUF bytes), as quantize_row_*_ref. One block is one
    <32 x float> (LLVM splits it over AVX2 registers); fp16 is LLVM's fptrunc (round to nearest
    even, as ggml's conversion)."""
    k = _KernelIR(name, ["ptr %x", "i64 %nb", "ptr %out"], vw=32)
    V, VI = k.V, k.VI
    V8 = "<32 x i8>"
    size = {"q8_0": 34, "q4_0": 18, "q5_0": 22, "q4_1": 20, "q5_1": 24}[kind]

    def splat(v):
        e = k.op(f"insertelement {V} poison, float {v}, i32 0")
        return k.op(f"shufflevector {V} {e}, {V} poison, <32 x i32> zeroinitializer")

    def first_equal(x, v):
        # the first element of x equal to v (v is one of them): C's first-wins ties
        c = k.op(f"fcmp oeq {V} {x}, {splat(v)}")
        m = k.op(f"bitcast <32 x i1> {c} to i32")
        i = k.op(f"call i32 @llvm.cttz.i32(i32 {m}, i1 false)")
        return k.op(f"extractelement {V} {x}, i32 {i}")

    def fp16(v):
        h = k.op(f"fptrunc float {v} to half")
        return k.op(f"bitcast half {h} to i16")

    def inv(d):   # d ? 1.0f/d : 0.0f
        nz = k.op(f"fcmp une float {d}, 0.0")
        r = k.op(f"fdiv float 1.0, {d}")
        return k.op(f"select i1 {nz}, float {r}, float 0.0")

    def to_i8(v):  # C float -> int8_t/uint8_t: cvttss2si to int32, keep the low byte
        i = k.op(f"fptosi {V} {v} to {VI}")
        return k.op(f"trunc {VI} {i} to {V8}")

    def nibbles(q):   # qs[j] = (q[j] & 15) | (q[j+16] & 15) << 4
        lo = k.op(f"shufflevector {V8} {q}, {V8} poison, <16 x i32> <{', '.join(f'i32 {j}' for j in range(16))}>")
        hi = k.op(f"shufflevector {V8} {q}, {V8} poison, <16 x i32> <{', '.join(f'i32 {j}' for j in range(16, 32))}>")
        m = "<" + ", ".join(["i8 15"] * 16) + ">"
        lo = k.op(f"and <16 x i8> {lo}, {m}")
        hi = k.op(f"and <16 x i8> {hi}, {m}")
        hi = k.op(f"shl <16 x i8> {hi}, <{', '.join(['i8 4'] * 16)}>")
        return k.op(f"or <16 x i8> {lo}, {hi}")

    def high_bits(q):  # bit 4 of element j -> bit j of a little-endian u32
        b = k.op(f"and {V8} {q}, <{', '.join(['i8 16'] * 32)}>")
        c = k.op(f"icmp ne {V8} {b}, zeroinitializer")
        return k.op(f"bitcast <32 x i1> {c} to i32")

    with k.loop("0", "%nb", 1) as i:
        off = k.op(f"mul i64 {i}, 32")
        px = k.op(f"getelementptr inbounds float, ptr %x, i64 {off}")
        x = k.op(f"load {V}, ptr {px}, align 4")
        ob = k.op(f"mul i64 {i}, {size}")
        obp = k.op(f"getelementptr inbounds i8, ptr %out, i64 {ob}")

        def store_at(ty, v, o):
            p = k.op(f"getelementptr inbounds i8, ptr {obp}, i64 {o}")
            k.line(f"store {ty} {v}, ptr {p}, align 1")

        if kind in ("q8_0", "q4_0", "q5_0"):
            ax = k.abs(x)
            amax = k.op(f"call float @llvm.vector.reduce.fmax.v32f32({V} {ax})")
            if kind == "q8_0":
                d = k.op(f"fdiv float {amax}, {_llf(127.0)}")
                q = k.op(f"call {V} @llvm.round.v32f32({V} {k.mul(x, splat(inv(d)))})")   # roundf
                store_at("i16", fp16(d), 0)
                store_at(V8, to_i8(q), 2)
            else:
                nlev = 8 if kind == "q4_0" else 16
                # max = the first x with |x| == amax (+0 when the block is all zero)
                c = k.op(f"fcmp oeq {V} {ax}, {splat(amax)}")
                m = k.op(f"bitcast <32 x i1> {c} to i32")
                j = k.op(f"call i32 @llvm.cttz.i32(i32 {m}, i1 false)")
                mx = k.op(f"extractelement {V} {x}, i32 {j}")
                pos = k.op(f"fcmp ogt float {amax}, 0.0")
                mx = k.op(f"select i1 {pos}, float {mx}, float 0.0")
                d = k.op(f"fdiv float {mx}, {_llf(-nlev)}")
                v = k.add(k.mul(x, splat(inv(d))), k.vf(nlev + 0.5))
                q = to_i8(v)
                lim = f"<{', '.join([f'i8 {2 * nlev - 1}'] * 32)}>"
                c = k.op(f"icmp sgt {V8} {q}, {lim}")                 # MIN(2*nlev-1, (int8_t)v)
                q = k.op(f"select <32 x i1> {c}, {V8} {lim}, {V8} {q}")
                store_at("i16", fp16(d), 0)
                if kind == "q4_0":
                    store_at("<16 x i8>", nibbles(q), 2)
                else:
                    store_at("i32", high_bits(q), 2)
                    store_at("<16 x i8>", nibbles(q), 6)
        else:
            nmax = 15 if kind == "q4_1" else 31
            mn = first_equal(x, k.op(f"call float @llvm.vector.reduce.fmin.v32f32({V} {x})"))
            mx = first_equal(x, k.op(f"call float @llvm.vector.reduce.fmax.v32f32({V} {x})"))
            rng = k.op(f"fsub float {mx}, {mn}")
            d = k.op(f"fdiv float {rng}, {_llf(nmax)}")
            v = k.add(k.mul(k.sub(x, splat(mn)), splat(inv(d))), k.vf(0.5))
            q = to_i8(v)
            if kind == "q4_1":
                lim = f"<{', '.join(['i8 15'] * 32)}>"
                c = k.op(f"icmp sgt {V8} {q}, {lim}")
                q = k.op(f"select <32 x i1> {c}, {V8} {lim}, {V8} {q}")
            store_at("i16", fp16(d), 0)
            store_at("i16", fp16(mn), 2)
            if kind == "q4_1":
                store_at("<16 x i8>", nibbles(q), 4)
            else:
                store_at("i32", high_bits(q), 4)
                store_at("<16 x i8>", nibbles(q), 8)
    return k.text()


# kernel name -> (IR generator, its arguments)
_JIT_KERNELS = {
    **{f"{kind}_search": (_ir_search, (kind,)) for kind in _KQ},
    **{f"{kind}_blocks": (_ir_kquant, (kind,)) for kind in _KQ},
    "q8_0_blocks": (_ir_block32, ("q8_0",)),
    "q4_0_blocks": (_ir_block32, ("q4_0",)),
    "q5_0_blocks": (_ir_block32, ("q5_0",)),
    "q4_1_blocks": (_ir_block32, ("q4_1",)),
    "q5_1_blocks": (_ir_block32, ("q5_1",)),
}
_jit_lock = _threading.Lock()
_jit_state: dict = {}


def _jit_kernel_names(f16c: bool) -> list[str]:
    # the block kernels convert to fp16 with fptrunc: one instruction with F16C, else a libcall
    # the JIT may not resolve; without F16C those types use the NumPy kernels
    # with F16C: whole blocks natively; without: only the K-quant searches (the rest in NumPy)
    return [n for n in _JIT_KERNELS if n.endswith("_blocks") == f16c]


def _jit_module_text(names: list[str] | None = None) -> str:
    decls = ["declare <32 x float> @llvm.round.v32f32(<32 x float>)", "declare i32 @llvm.cttz.i32(i32, i1)"]
    for w in sorted({_VW, 32}):
        v = f"<{w} x float>"
        decls += [f"declare {v} @llvm.fabs.v{w}f32({v})", f"declare {v} @llvm.sqrt.v{w}f32({v})",
                  f"declare float @llvm.vector.reduce.fmax.v{w}f32({v})",
                  f"declare float @llvm.vector.reduce.fmin.v{w}f32({v})"]
    names = list(_JIT_KERNELS) if names is None else names
    return "\n\n".join(decls + [gen(n, *_JIT_KERNELS[n][1]) for n in names
                                  for gen in [_JIT_KERNELS[n][0]]])


def _jit_cache_dir():
    from .cache import cache_dir
    return cache_dir("quant-jit")


def jit_functions() -> dict | None:
    """The compiled kernels as ctypes functions, or None without llvmlite (or with
    MOEGRAPH_QUANT_JIT=0; =search: only the K-quant searches, as on a CPU without F16C).
    Compiled once per process; the object code is cached on disk."""
    import os
    if os.environ.get("MOEGRAPH_QUANT_JIT", "1") == "0":
        return None
    with _jit_lock:
        if "fns" in _jit_state:
            return _jit_state["fns"]
        _jit_state["fns"] = None
        try:
            import ctypes
            import hashlib

            import llvmlite.binding as llvm
        except ImportError:
            return None
        try:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            cpu, feats = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
            f16c = bool(llvm.get_host_cpu_features().get("f16c"))
            if os.environ.get("MOEGRAPH_QUANT_JIT") == "search":   # what a host without F16C runs
                f16c = False
            names = _jit_kernel_names(f16c)
            ir = _jit_module_text(names)
            key = hashlib.sha256("\n".join([ir, cpu, feats, str(llvm.llvm_version_info)]).encode()).hexdigest()[:24]
            path = _jit_cache_dir() / f"{key}.o"
            from .cache import read_entry, write_entry
            obj = read_entry(path)          # verified, or None (a bad entry is recompiled)
            cached = obj is not None
            mod = llvm.parse_assembly(ir)
            mod.verify()
            tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(
                cpu=cpu, features=feats, opt=3, jit=True)
            if not cached:
                pto = llvm.create_pipeline_tuning_options(speed_level=3)
                llvm.create_pass_builder(tm, pto).getModulePassManager().run(mod, llvm.create_pass_builder(tm, pto))
            ee = llvm.create_mcjit_compiler(mod, tm)

            def notify(module, buffer):
                write_entry(path, buffer)

            ee.set_object_cache(notify, lambda module: obj)
            ee.finalize_object()
            P, I = ctypes.c_void_p, ctypes.c_int64
            sig = {"q2k_search": (P, P, I, P, P, P), "q4k_search": (P, P, I, P, P, P),
                   "q5k_search": (P, P, I, P, P, P), "q6k_search": (P, I, P, P), "q3k_search": (P, I, P, P)}
            sig.update({f"{t}_blocks": (P, I, P) for t in ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1")})
            sig.update({f"{t}_blocks": (P, I, P, P, P, P, P, P) for t in _KQ})
            fns = {name: ctypes.CFUNCTYPE(None, *sig[name])(ee.get_function_address(name))
                   for name in names}
            _jit_state.update(fns=fns, ee=ee, mod=mod, tm=tm)
            return fns
        except Exception as e:  # noqa: BLE001 (a broken LLVM: the NumPy kernels give the same bytes)
            import warnings
            warnings.warn(f"moegraph: LLVM JIT of the quantization kernels failed ({type(e).__name__}: "
                          f"{e}); using the NumPy kernels", RuntimeWarning)
            return None


def _jit_kblocks(kind: str, xs: np.ndarray):
    """A K-quant's whole blocks in native code (see _ir_kquant) on position-major sub-blocks
    xs [n, M]: (final levels uint8 [n, M], scale fields uint8 [M], mins uint8 [M],
    d float32 [M], dmin float32 [M]) per sub-block, or None without the JIT."""
    fns = jit_functions() if _USE_JIT else None
    fn = fns and fns.get(f"{kind}_blocks")
    if fn is None:
        return None
    n, M = xs.shape
    Mp = -(-M // _VW) * _VW
    if Mp != M or not xs.flags.c_contiguous:
        b = np.zeros((n, Mp), _F32)
        b[:, :M] = xs
        xs = b
    L = np.empty((n, Mp), _F32)
    Lq = np.empty((n, Mp), np.uint8)
    sc, mq = np.empty(Mp, np.uint8), np.empty(Mp, np.uint8)
    d, dmin = np.empty(Mp, _F32), np.empty(Mp, _F32)
    fn(xs.ctypes.data, Mp, L.ctypes.data, Lq.ctypes.data, sc.ctypes.data, mq.ctypes.data,
       d.ctypes.data, dmin.ctypes.data)
    return Lq[:, :M], sc[:M], mq[:M], d[:M], dmin[:M]


def _jit_search(name: str, *arrays: np.ndarray, n_out_vecs: int) -> tuple[np.ndarray, ...] | None:
    """Run a JIT search kernel on position-major inputs [n, M]; returns (per-sub-block outputs...,
    L float32 [n, M]) or None when the JIT is not available."""
    fns = jit_functions()
    if fns is None:
        return None
    n, M = arrays[0].shape
    Mp = -(-M // _VW) * _VW
    ins = []
    for a in arrays:
        if Mp != M or not a.flags.c_contiguous or a.dtype != _F32:
            b = np.zeros((n, Mp), _F32)
            b[:, :M] = a
            a = b
        ins.append(a)
    outs = [np.empty(Mp, _F32) for _ in range(n_out_vecs)]
    L = np.empty((n, Mp), _F32)
    fns[name](*[a.ctypes.data for a in ins], Mp, *[o.ctypes.data for o in outs], L.ctypes.data)
    return (*[o[:M] for o in outs], L[:, :M])
