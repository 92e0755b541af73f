"""Tiled matrix products on GGML blocks, the CPU backend's hot loop.

`@tile_<T>_<RW>x<RA>(ptr w, i64 wstride, ptr a0 .. a_{RA-1}, i64 K) -> <RW*RA x float>` computes
RW consecutive weight rows (raw GGUF blocks, decoded in registers) against RA activation rows
(already in the weight's vec_dot_type); lane r*RA + c is row r . activation c. A decoded weight
block serves RA activations and an activation block RW weight rows: that reuse is what a per-row
dot product lacks. Integer sums are exact and the activations are rounded as ggml-cpu rounds them,
so results equal ggml's up to the order of float additions.

Per block class (x86 with AVX2: vpmaddubsw/vpmaddwd; other CPUs: the same sums in portable IR):
  Q8_0 acts (Q8_0, Q4_0, Q5_0, MXFP4): signed quants w;  acc += dw*da * sum(w*a)     (sign trick)
      (MXFP4: w = the doubled E2M1 table at the nibble, dw = 2^(e - 128))
  Q8_1 acts (Q4_1, Q5_1):       unsigned u, min m; acc += dw*da * sum(u*a) + m*sa
  Q8_K acts (Q2_K .. Q6_K):     unsigned u in 32-value chunks, an int scale per 16 values, and a
      per-16 offset term: acc += da * (d * sum_j sc_j*sum(u*a)_j - c * sum_g m_g*bsum_g), where
      (c, m) = (dmin, mins) for Q2_K/Q4_K/Q5_K and (d*off, scales) for Q3_K (off 4), Q6_K (32).
  F32/F16/BF16: float FMAs over 8 lanes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from moegraph.ir import BF16, F16, F32
from moegraph.quants import KVALUES_MXFP4, GGMLType as G, type_size

from .irgen import I32, Fn, f32

LEGACY = {t: type_size(t) for t in (G.Q8_0, G.Q4_0, G.Q5_0, G.Q4_1, G.Q5_1, G.MXFP4)}     # block bytes
KQUANT = {t: type_size(t) for t in (G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K, G.Q6_K)}
FLOAT = {F32: ("float", 4), F16: ("half", 2), BF16: ("i16", 2)}

# (RW, RA, U): RW x RA tiles for prompts, U x 1 for single activations (decoding, leftovers);
# threads share rows in units of U. Measured on Zen 3 (16 vector registers).
TILES = {"float": (4, 2, 4), "legacy": (2, 4, 4), "kquant": (2, 4, 4)}

DECLS = """
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <32 x i8> @llvm.abs.v32i8(<32 x i8>, i1)
declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
"""


def tile_class(t) -> str:
    return "float" if t in FLOAT else "legacy" if t in LEGACY else "kquant"


def tile_shape(t) -> tuple[int, int, int]:
    return TILES[tile_class(t)]


def _v(n: int, ty: str, vals) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in vals) + ">"


def _mask(vals) -> str:
    vals = list(vals)
    return f"<{len(vals)} x i32> " + _v(len(vals), "i32", vals)


def _sp(n: int, ty: str, v) -> str:
    return _v(n, ty, [v] * n)


class SIMD:
    """The integer dot-product steps, as AVX2 intrinsics or portable IR with the same results
    (our ranges never reach vpmaddubsw's saturation: |w| <= 128, |a| <= 127)."""

    def __init__(self, f: Fn, avx2: bool):
        self.f, self.avx2 = f, avx2

    def _products_paired(self, x: str, x_ext: str, y: str, n: int, ty: str, wide: str) -> str:
        """Portable form of the pairwise multiply-adds: x (extended by x_ext) times sign-extended
        y, lane by lane in `wide`, adjacent pairs summed -> <n/2 x wide>."""
        f = self.f
        xw = f.op(f"{x_ext} <{n} x {ty}> {x} to <{n} x {wide}>")
        p = f.op(f"mul <{n} x {wide}> {xw}, {f.op(f'sext <{n} x {ty}> {y} to <{n} x {wide}>')}")
        ev = f.op(f"shufflevector <{n} x {wide}> {p}, <{n} x {wide}> poison, {_mask(range(0, n, 2))}")
        od = f.op(f"shufflevector <{n} x {wide}> {p}, <{n} x {wide}> poison, {_mask(range(1, n, 2))}")
        return f.op(f"add <{n // 2} x {wide}> {ev}, {od}")

    def maddubs(self, u: str, s: str) -> str:
        """unsigned bytes u times signed bytes s, adjacent pairs summed -> <16 x i16>."""
        if self.avx2:
            return self.f.op(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> {u}, <32 x i8> {s})")
        return self._products_paired(u, "zext", s, 32, "i8", "i16")

    def dot_s8(self, w: str, absw: str | None, a: str) -> str:
        """signed w times signed a, pairs summed -> <16 x i16> (ggml's sign trick on AVX2)."""
        if self.avx2:
            s = self.f.op(f"call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> {a}, <32 x i8> {w})")
            return self.maddubs(absw, s)
        return self._products_paired(w, "sext", a, 32, "i8", "i16")

    def abs(self, w: str) -> str:
        return self.f.op(f"call <32 x i8> @llvm.abs.v32i8(<32 x i8> {w}, i1 false)")

    def madd(self, x: str, y: str) -> str:
        """<16 x i16> x <16 x i16>, adjacent pairs summed -> <8 x i32>."""
        if self.avx2:
            return self.f.op(f"call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {x}, <16 x i16> {y})")
        return self._products_paired(x, "sext", y, 16, "i16", "i32")


# ---------------------------------------------------------------------------------- decoders
def _half(f: Fn, blk: str, off: int) -> str:
    return f.op(f"fpext half {f.load('half', f.gep('i8', blk, off))} to float")


def _nibbles(f: Fn, blk: str, off: int) -> str:
    """16 bytes of nibbles -> <32 x i8>: low nibbles are values 0..15, high nibbles 16..31."""
    v = f.load("<16 x i8>", f.gep("i8", blk, off))
    lo = f.op(f"and <16 x i8> {v}, {_sp(16, 'i8', 15)}")
    hi = f.op(f"lshr <16 x i8> {v}, {_sp(16, 'i8', 4)}")
    return f.op(f"shufflevector <16 x i8> {lo}, <16 x i8> {hi}, {_mask(range(32))}")


def _fifth_bits(f: Fn, blk: str, off: int) -> str:
    """The 32 high bits qh (bit i for value i) -> <32 x i8> of 16 or 0."""
    qh = f.load("<4 x i8>", f.gep("i8", blk, off))
    spread = f.op(f"shufflevector <4 x i8> {qh}, <4 x i8> poison, {_mask([i // 8 for i in range(32)])}")
    bit = f.op(f"and <32 x i8> {spread}, {_v(32, 'i8', [1 << (i % 8) for i in range(32)])}")
    on = f.op(f"icmp ne <32 x i8> {bit}, zeroinitializer")
    return f.op(f"select <32 x i1> {on}, <32 x i8> {_sp(32, 'i8', 16)}, <32 x i8> zeroinitializer")


@dataclass
class LegacyBlock:
    q: str            # <32 x i8>: signed values (Q8_0 acts) or unsigned (Q8_1 acts)
    d: str            # float scale
    m: str | None     # float min (Q4_1/Q5_1)


def _mxfp4_values(f: Fn, n: str, avx2: bool) -> str:
    """Nibbles 0..15 -> KVALUES_MXFP4 (0 1 2 3 4 6 8 12, then negated): one vpshufb on AVX2,
    else m = n & 7: m < 4 ? m : (2 + (m & 1)) << (1 + (m >> 1 & 1)), negated where n & 8."""
    if avx2:
        table = _v(32, "i8", [int(v) for v in KVALUES_MXFP4] * 2)
        return f.op(f"call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> {table}, <32 x i8> {n})")
    op = lambda o, a, k: f.op(f"{o} <32 x i8> {a}, {_sp(32, 'i8', k)}")   # noqa: E731
    m = op("and", n, 7)
    base, shift = op("add", op("and", m, 1), 2), op("add", op("and", op("lshr", m, 1), 1), 1)
    big = f.op(f"shl <32 x i8> {base}, {shift}")
    small = op("icmp ult", m, 4)
    v = f.op(f"select <32 x i1> {small}, <32 x i8> {m}, <32 x i8> {big}")
    neg = f.op(f"icmp ne <32 x i8> {op('and', n, 8)}, zeroinitializer")
    minus = f.op(f"sub <32 x i8> zeroinitializer, {v}")
    return f.op(f"select <32 x i1> {neg}, <32 x i8> {minus}, <32 x i8> {v}")


def e8m0_half(f: Fn, blk: str) -> str:
    """GGML_E8M0_TO_FP32_HALF of the block's first byte: 2^(e - 128), denormal below e = 2."""
    e = f.op(f"zext i8 {f.load('i8', blk)} to i32")
    small, denormal = f.op(f"icmp ult i32 {e}, 2"), f.op(f"shl i32 2097152, {e}")
    e1 = f.op(f"sub i32 {e}, 1")
    normal = f.op(f"shl i32 {e1}, 23")
    bits = f.op(f"select i1 {small}, i32 {denormal}, i32 {normal}")
    return f.op(f"bitcast i32 {bits} to float")


def decode_legacy(f: Fn, t: G, blk: str, avx2: bool = False) -> LegacyBlock:
    if t == G.MXFP4:
        return LegacyBlock(_mxfp4_values(f, _nibbles(f, blk, 1), avx2), e8m0_half(f, blk), None)
    d = _half(f, blk, 0)
    if t == G.Q8_0:
        return LegacyBlock(f.load("<32 x i8>", f.gep("i8", blk, 2)), d, None)
    if t == G.Q4_0:
        return LegacyBlock(f.op(f"sub <32 x i8> {_nibbles(f, blk, 2)}, {_sp(32, 'i8', 8)}"), d, None)
    if t == G.Q5_0:
        u = f.op(f"or <32 x i8> {_nibbles(f, blk, 6)}, {_fifth_bits(f, blk, 2)}")
        return LegacyBlock(f.op(f"sub <32 x i8> {u}, {_sp(32, 'i8', 16)}"), d, None)
    m = _half(f, blk, 2)
    if t == G.Q4_1:
        return LegacyBlock(_nibbles(f, blk, 4), d, m)
    return LegacyBlock(f.op(f"or <32 x i8> {_nibbles(f, blk, 8)}, {_fifth_bits(f, blk, 4)}"), d, m)   # Q5_1


@dataclass
class KBlock:
    chunk: Callable[[int], str]   # j -> <32 x i8> unsigned values j*32 .. j*32+31
    sc16: str                     # <16 x i16>: integer scale of each 16 values
    m16: str                      # <16 x i16>: offset multiplier of each 16 values
    d: str                        # float super-block scale
    c: str                        # float offset scale (dmin, or d*offset)


def _bytes16(f: Fn, words: list[str]) -> str:
    v = "poison"
    for i, w in enumerate(words):
        v = f.op(f"insertelement <4 x i32> {v}, i32 {w}, i64 {i}")
    return f.op(f"bitcast <4 x i32> {v} to <16 x i8>")


def _widen(f: Fn, v16: str, lanes, signed: bool) -> str:
    """<16 x i8> -> <16 x i16> of the given lanes, sign- or zero-extended."""
    s = f.op(f"shufflevector <16 x i8> {v16}, <16 x i8> poison, {_mask(lanes)}")
    return f.op(f"{'sext' if signed else 'zext'} <16 x i8> {s} to <16 x i16>")


def _k4_scales(f: Fn, blk: str) -> tuple[str, str]:
    """Q4_K/Q5_K's 8 6-bit scales and mins (12 bytes at 4) -> per-16 <16 x i16> each."""
    u0, u1, u2 = (f.load("i32", f.gep("i8", blk, 4 + 4 * i)) for i in range(3))
    k1, k2, k3 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303
    sc_lo = f.and_(u0, k1, I32)
    sc_hi = f.or_(f.and_(u2, k2, I32), f.shl(f.and_(f.lshr(u0, 6, I32), k3, I32), 4, I32), I32)
    mn_lo = f.and_(u1, k1, I32)
    mn_hi = f.or_(f.and_(f.lshr(u2, 4, I32), k2, I32), f.shl(f.and_(f.lshr(u1, 6, I32), k3, I32), 4, I32), I32)
    v = _bytes16(f, [sc_lo, sc_hi, mn_lo, mn_hi])
    return (_widen(f, v, [i // 2 for i in range(16)], False), _widen(f, v, [8 + i // 2 for i in range(16)], False))


def _bit_select(f: Fn, bits: str, mask: int, value: int) -> str:
    """value where (bits & mask) != 0, else 0, per byte."""
    hit = f.op(f"and <32 x i8> {bits}, {_sp(32, 'i8', mask)}")
    on = f.op(f"icmp ne <32 x i8> {hit}, zeroinitializer")
    return f.op(f"select <32 x i1> {on}, <32 x i8> {_sp(32, 'i8', value)}, <32 x i8> zeroinitializer")


def _crumbs(f: Fn, qs: str, shift: int) -> str:
    """((qs >> shift) & 3) for 32 bytes."""
    v = f.op(f"lshr <32 x i8> {qs}, {_sp(32, 'i8', shift)}")
    return f.op(f"and <32 x i8> {v}, {_sp(32, 'i8', 3)}")


def decode_kquant(f: Fn, t: G, blk: str) -> KBlock:
    ld = lambda off: f.load("<32 x i8>", f.gep("i8", blk, off))   # noqa: E731
    if t in (G.Q4_K, G.Q5_K):
        sc16, m16 = _k4_scales(f, blk)
        qs_off = 16 if t == G.Q4_K else 48
        qh = ld(16) if t == G.Q5_K else None

        def chunk(j):
            v = ld(qs_off + 32 * (j // 2))
            u = f.op(f"and <32 x i8> {v}, {_sp(32, 'i8', 15)}") if j % 2 == 0 else \
                f.op(f"lshr <32 x i8> {v}, {_sp(32, 'i8', 4)}")
            if qh is not None:
                u = f.op(f"or <32 x i8> {u}, {_bit_select(f, qh, 1 << j, 16)}")
            return u
        return KBlock(chunk, sc16, m16, _half(f, blk, 0), _half(f, blk, 2))
    if t == G.Q6_K:
        sc = f.load("<16 x i8>", f.gep("i8", blk, 192))
        sc16 = _widen(f, sc, range(16), True)
        d = _half(f, blk, 208)

        def chunk(j):
            h, k = divmod(j, 4)
            ql = ld(64 * h + 32 * (k % 2))
            low = f.op(f"and <32 x i8> {ql}, {_sp(32, 'i8', 15)}") if k < 2 else \
                f.op(f"lshr <32 x i8> {ql}, {_sp(32, 'i8', 4)}")
            hb = f.op(f"shl <32 x i8> {_crumbs(f, ld(128 + 32 * h), 2 * k)}, {_sp(32, 'i8', 4)}")
            return f.op(f"or <32 x i8> {low}, {hb}")
        return KBlock(chunk, sc16, sc16, d, f.op(f"fmul float {d}, {f32(32.0)}"))
    if t == G.Q3_K:
        a0, a1, a2 = (f.load("i32", f.gep("i8", blk, 96 + 4 * i)) for i in range(3))
        lo4 = lambda w, s: f.and_(f.lshr(w, s, I32), 0x0F0F0F0F, I32)                         # noqa: E731
        hi2 = lambda s: f.shl(f.and_(f.lshr(a2, s, I32), 0x03030303, I32), 4, I32)              # noqa: E731
        words = [f.or_(lo4(a0, 0), hi2(0), I32), f.or_(lo4(a1, 0), hi2(2), I32),
                 f.or_(lo4(a0, 4), hi2(4), I32), f.or_(lo4(a1, 4), hi2(6), I32)]
        sc = f.op(f"sub <16 x i8> {_bytes16(f, words)}, {_sp(16, 'i8', 32)}")
        sc16 = _widen(f, sc, range(16), True)
        d = _half(f, blk, 108)
        hm = ld(0)

        def chunk(j):
            h, sh = divmod(j, 4)
            low = _crumbs(f, ld(32 + 32 * h), 2 * sh)
            return f.op(f"or <32 x i8> {low}, {_bit_select(f, hm, 1 << j, 4)}")
        return KBlock(chunk, sc16, sc16, d, f.op(f"fmul float {d}, {f32(4.0)}"))
    assert t == G.Q2_K, t
    s = f.load("<16 x i8>", f.gep("i8", blk, 0))
    sc16 = _widen(f, f.op(f"and <16 x i8> {s}, {_sp(16, 'i8', 15)}"), range(16), False)
    m16 = _widen(f, f.op(f"lshr <16 x i8> {s}, {_sp(16, 'i8', 4)}"), range(16), False)

    def chunk(j):
        h, sh = divmod(j, 4)
        return _crumbs(f, ld(16 + 32 * h), 2 * sh)
    return KBlock(chunk, sc16, m16, _half(f, blk, 80), _half(f, blk, 82))


# ---------------------------------------------------------------------------------- tiles
def _splat8(f: Fn, x: str, ty: str = "float") -> str:
    v = f.op(f"insertelement <8 x {ty}> poison, {ty} {x}, i64 0")
    return f.op(f"shufflevector <8 x {ty}> {v}, <8 x {ty}> poison, <8 x i32> zeroinitializer")


def _hadd(f: Fn, a: str, b: str) -> str:
    """vhaddps: per 128-bit half, [a0+a1, a2+a3, b0+b1, b2+b3]."""
    ev = f.op(f"shufflevector <8 x float> {a}, <8 x float> {b}, {_mask([0, 2, 8, 10, 4, 6, 12, 14])}")
    od = f.op(f"shufflevector <8 x float> {a}, <8 x float> {b}, {_mask([1, 3, 9, 11, 5, 7, 13, 15])}")
    return f.op(f"fadd <8 x float> {ev}, {od}")


def reduce_many(f: Fn, vecs: list[str]) -> list[str]:
    """Horizontal sums of many <8 x float>, four at a time (transpose-and-add)."""
    out = []
    for i in range(0, len(vecs), 4):
        g = vecs[i:i + 4]
        p = g + ["zeroinitializer"] * (4 - len(g))
        hh = _hadd(f, _hadd(f, p[0], p[1]), _hadd(f, p[2], p[3]))
        lo = f.op(f"shufflevector <8 x float> {hh}, <8 x float> poison, <4 x i32> <i32 0, i32 1, i32 2, i32 3>")
        hi = f.op(f"shufflevector <8 x float> {hh}, <8 x float> poison, <4 x i32> <i32 4, i32 5, i32 6, i32 7>")
        s = f.op(f"fadd <4 x float> {lo}, {hi}")
        out += [f.op(f"extractelement <4 x float> {s}, i64 {k}") for k in range(len(g))]
    return out


def _prefetch(f: Fn, rows: list[str], offset: str, nbytes: int = 64) -> None:
    """Software prefetch of the same blocks of the next RW rows, which the next tile call reads:
    weight rows stream from DRAM when decoding, each row is short, and the decode work per byte
    keeps the hardware from running ahead on its own. (A hint: it cannot fault, so prefetching
    past the end of the tensor is harmless.)"""
    ahead = f.mul("%ws", len(rows))
    for r in rows:
        _prefetch_lines(f, r, f.add(offset, ahead), nbytes)


def _prefetch_lines(f: Fn, base: str, offset, nbytes: int) -> None:
    """Prefetch every cache line of base[offset : offset + nbytes] (a hint, never a fault)."""
    for line in range(0, nbytes, 64):
        p = f.gep("i8", base, f.add(offset, line) if line else offset, inbounds=False)
        f(f"call void @llvm.prefetch.p0(ptr {p}, i32 0, i32 3, i32 1)")


def _concat(f: Fn, vs: list[str], w: int) -> str:
    """Concatenate len(vs) (a power of two) <w x float> vectors."""
    while len(vs) > 1:
        vs = [f.op(f"shufflevector <{w} x float> {vs[i]}, <{w} x float> {vs[i + 1]}, {_mask(range(2 * w))}")
              for i in range(0, len(vs), 2)]
        w *= 2
    return vs[0]


def _fma8(f: Fn, a: str, b: str, acc: str) -> str:
    return f.call("<8 x float>", "@llvm.fma.v8f32", f"<8 x float> {a}", f"<8 x float> {b}", f"<8 x float> {acc}")


# ---------------------------------------------------------------------------------- x8 layouts
# Q4_K and Q8_0 weights read only by products are repacked when the session is built (same values,
# same integer sums; only the byte order changes, as llama.cpp's repack buffers do). A product then
# puts 8 rows in the lanes of a vector: no horizontal sums, one activation broadcast serves 8 rows.
# Per 8 rows and one block (256 values for Q4_K, 32 for Q8_0):
#   Q4_K, 1184 bytes:  0 d[8] fp16 | 16 dmin[8] fp16 | 32 sc[8 sub-blocks][8 rows] u8 |
#       96 mn[8][8] u8 | 160 quants[4 groups][8 pieces][8 rows][4 bytes]: piece p of group g is
#       nibble bytes 4p..4p+3 of the row's 32 bytes of group g (low nibbles: values 64g+4p..,
#       high nibbles: 64g+32+4p..); int16 sums over a sub-block (|sum| <= 8*2*15*127 < 2^15)
#       before one vpmaddwd applies the 8 rows' scales.
#   Q5_K, 1440 bytes: Q4_K's, with qh[8 pieces][8 rows][4 bytes] at 160 (bit j of byte l: the
#       fifth bit of value 32j+l) and the quants at 416; int16 sums over 4 pieces (<= 4*2*31*127).
#   Q6_K, 1680 bytes (= 8 x 210):  0 d[8] fp16 | 16 sc[16 groups of 16][8 rows] i8 |
#       144 ql[32 pieces][8 rows][4 bytes] | 1168 qh[16 pieces][8 rows][4 bytes] (the file's bit
#       planes, interleaved by 4-byte pieces); int16 sums over 2 pieces (<= 2*2*63*127 < 2^15).
#   Q3_K, 912 bytes:  0 d[8] fp16 | 16 sc[16 groups][8 rows] i8 (decoded, minus 32) |
#       144 hmask[8 pieces][8 rows][4 bytes] | 400 qs[16 pieces][8 rows][4 bytes]; as Q6_K with
#       values low | hbit << 2 (0..7) and offset 4.
#   Q8_0, 272 bytes (= 8 x 34):  0 d[8] fp16 | 16 quants[8 pieces][8 rows][4 bytes].
#   Q4_0, 144 bytes (= 8 x 18):  0 d[8] fp16 | 16 nibbles[4 pieces][8 rows][4 bytes] (low nibbles:
#       values 4p.., high: 16+4p..); the -8 offset as -8 * the activation block's sum.
#   Q4_1, 160 bytes (= 8 x 20):  0 d[8] | 16 m[8] fp16 | 32 nibbles as Q4_0; + m * s (Q8_1's s).
X8 = {G.Q3_K: (256, 912), G.Q4_K: (256, 1184), G.Q5_K: (256, 1440), G.Q6_K: (256, 1680),
      G.Q8_0: (32, 272), G.Q4_0: (32, 144), G.Q4_1: (32, 160)}   # (values per block, bytes per 8 rows)
X8_TILE = (8, 4, 8)


def x8_row_bytes(t, K: int) -> int:
    """Bytes per row in the x8 layout (the offset of row j, j % 8 == 0, is j times this)."""
    B, size = X8[t]
    return K // B * size // 8


def repack_x8(t, raw: np.ndarray, n_rows: int, K: int) -> np.ndarray:
    """Raw rows [..., n_rows, row_bytes] (uint8; n_rows % 8 == 0) -> the x8 layout of type t,
    as [..., n_rows/8, blocks, bytes per 8 rows] uint8."""
    B, size = X8[t]
    nb, raw_size = K // B, type_size(t)
    b = np.ascontiguousarray(raw).reshape(-1, n_rows // 8, 8, nb, raw_size)
    lead = b.shape[:2]
    b = b.transpose(0, 1, 3, 2, 4)                                  # [.., group, block, row, bytes]
    out = np.empty((*lead, nb, size), np.uint8)
    if t == G.Q3_K:
        from moegraph.quants import q3_k_scales
        out[..., 0:16] = b[..., 108:110].reshape(*lead, nb, 16)
        sc = q3_k_scales(b[..., 96:108].reshape(-1, 12)).view(np.uint8)
        out[..., 16:144] = sc.reshape(*lead, nb, 8, 16).swapaxes(-1, -2).reshape(*lead, nb, 128)
        out[..., 144:400] = b[..., 0:32].reshape(*lead, nb, 8, 8, 4).swapaxes(-3, -2).reshape(*lead, nb, 256)
        out[..., 400:] = b[..., 32:96].reshape(*lead, nb, 8, 16, 4).swapaxes(-3, -2).reshape(*lead, nb, 512)
        return out.reshape(*raw.shape[:-2], n_rows // 8, nb, size)
    if t == G.Q6_K:
        out[..., 0:16] = b[..., 208:210].reshape(*lead, nb, 16)
        out[..., 16:144] = b[..., 192:208].swapaxes(-1, -2).reshape(*lead, nb, 128)
        out[..., 144:1168] = b[..., 0:128].reshape(*lead, nb, 8, 32, 4).swapaxes(-3, -2).reshape(*lead, nb, 1024)
        out[..., 1168:] = b[..., 128:192].reshape(*lead, nb, 8, 16, 4).swapaxes(-3, -2).reshape(*lead, nb, 512)
        return out.reshape(*raw.shape[:-2], n_rows // 8, nb, size)
    out[..., 0:16] = b[..., 0:2].reshape(*lead, nb, 16)
    if t in (G.Q4_0, G.Q4_1):
        qs = 16 if t == G.Q4_1 else 0
        if t == G.Q4_1:
            out[..., 16:32] = b[..., 2:4].reshape(*lead, nb, 16)
        out[..., 16 + qs:] = b[..., 2 + qs // 8:].reshape(*lead, nb, 8, 4, 4).swapaxes(-3, -2).reshape(*lead, nb, 128)
    elif t == G.Q8_0:
        out[..., 16:] = b[..., 2:34].reshape(*lead, nb, 8, 8, 4).swapaxes(-3, -2).reshape(*lead, nb, 256)
    else:                                                           # Q4_K, Q5_K
        from moegraph.quants import k4_scale_min
        out[..., 16:32] = b[..., 2:4].reshape(*lead, nb, 16)
        sc, mn = k4_scale_min(b[..., 4:16].reshape(-1, 12))
        out[..., 32:96] = sc.reshape(*lead, nb, 8, 8).swapaxes(-1, -2).reshape(*lead, nb, 64)
        out[..., 96:160] = mn.reshape(*lead, nb, 8, 8).swapaxes(-1, -2).reshape(*lead, nb, 64)
        qs = 16
        if t == G.Q5_K:
            out[..., 160:416] = b[..., 16:48].reshape(*lead, nb, 8, 8, 4).swapaxes(-3, -2).reshape(*lead, nb, 256)
            qs = 48
        q = b[..., qs:qs + 128].reshape(*lead, nb, 8, 4, 8, 4)      # row, group, piece, byte
        out[..., size - 1024:] = q.transpose(0, 1, 2, 4, 5, 3, 6).reshape(*lead, nb, 1024)
    return out.reshape(*raw.shape[:-2], n_rows // 8, nb, size)


def _q36k_x8(t, f: Fn, simd: SIMD, w: str, acts: list[str]) -> list[str]:
    """8 repacked Q6_K or Q3_K rows at w against Q8_K activations: one <8 x float> (lanes =
    rows) each. Both have a signed scale per 16 values and an offset (32 for Q6_K, 4 for Q3_K):
    sum sc*(u-off)*a = sum sc*u*a - off * sum_g sc_g*bsum_g, all in int32 as ggml does."""
    RA = len(acts)
    size = X8[t][1]
    q6 = t == G.Q6_K
    fa = [f.var("<8 x float>", "zeroinitializer") for _ in range(RA)]
    with f.loop(0, f.udiv("%K", 256)) as sb:
        blk = f.gep("i8", w, f.mul(sb, size))
        _prefetch_lines(f, blk, size, size)        # the next block of these 8 rows
        d8 = f.op(f"fpext <8 x half> {f.load('<8 x half>', blk, 2)} to <8 x float>")

        def pairs(off, lanes):          # signed scale bytes -> <16 x i16> for vpmaddwd
            v = f.load("<16 x i8>", f.gep("i8", blk, off))
            return f.op(f"sext <16 x i8> {f.op(f'shufflevector <16 x i8> {v}, <16 x i8> poison, {_mask(lanes)}')} to <16 x i16>")
        abs_ = [f.gep("i8", a, f.mul(sb, 292)) for a in acts]
        tots = [None] * RA
        one, two, three, four = (_sp(32, "i8", v) for v in (1, 2, 3, 4))
        for j in range(8):
            h, k = divmod(j, 4)
            for p0 in (0, 2, 4, 6):
                sums = [None] * RA
                for p in (p0, p0 + 1):
                    if q6:      # 4 low bits from ql, 2 high bits from qh
                        ql = f.load("<32 x i8>", f.gep("i8", blk, 144 + 32 * (16 * h + 8 * (k % 2) + p)))
                        qh = f.load("<32 x i8>", f.gep("i8", blk, 1168 + 32 * (8 * h + p)))
                        lo = f.op(f"lshr <32 x i8> {ql}, {_sp(32, 'i8', 4 * (k // 2))}")
                        lo = f.op(f"and <32 x i8> {lo}, {_sp(32, 'i8', 15)}")
                        hb = f.op(f"lshr <32 x i8> {qh}, {_sp(32, 'i8', 2 * k)}")
                        hb = f.op(f"shl <32 x i8> {f.op(f'and <32 x i8> {hb}, {three}')}, {four}")
                    else:       # Q3_K: 2 low bits from qs (shift 2k), bit j of hmask
                        qs = f.load("<32 x i8>", f.gep("i8", blk, 400 + 32 * (8 * h + p)))
                        hm = f.load("<32 x i8>", f.gep("i8", blk, 144 + 32 * p))
                        lo = f.op(f"lshr <32 x i8> {qs}, {_sp(32, 'i8', 2 * k)}")
                        lo = f.op(f"and <32 x i8> {lo}, {three}")
                        hb = f.op(f"lshr <32 x i8> {hm}, {_sp(32, 'i8', j)}")
                        hb = f.op(f"shl <32 x i8> {f.op(f'and <32 x i8> {hb}, {one}')}, {two}")
                    u = f.op(f"or <32 x i8> {lo}, {hb}")
                    for c, ab in enumerate(abs_):
                        a4 = f.load("i32", f.gep("i8", ab, 4 + 32 * j + 4 * p))
                        s = simd.maddubs(u, f.op(f"bitcast <8 x i32> {_splat8(f, a4, 'i32')} to <32 x i8>"))
                        sums[c] = s if p == p0 else f.op(f"add <16 x i16> {sums[c]}, {s}")
                g = 2 * j + p0 // 4                  # the 16-value group these 8 values are in
                sc = pairs(16 + 8 * (g - g % 2), [8 * (g % 2) + i // 2 for i in range(16)])
                for c in range(RA):
                    s = simd.madd(sums[c], sc)
                    tots[c] = s if tots[c] is None else f.op(f"add <8 x i32> {tots[c]}, {s}")
        scp = [pairs(16 + 16 * q, [(i % 2) * 8 + i // 2 for i in range(16)]) for q in range(8)]
        for c, ab in enumerate(abs_):
            off = None
            for q in range(8):                       # (bsum_2q, bsum_2q+1) against (sc_2q, sc_2q+1)
                b2 = f.load("i32", f.gep("i8", ab, 260 + 4 * q))
                s = simd.madd(scp[q], f.op(f"bitcast <8 x i32> {_splat8(f, b2, 'i32')} to <16 x i16>"))
                off = s if off is None else f.op(f"add <8 x i32> {off}, {s}")
            off32 = f.op(f"shl <8 x i32> {off}, {_sp(8, 'i32', 5 if q6 else 2)}")
            isum = f.op(f"sub <8 x i32> {tots[c]}, {off32}")
            scale = f.op(f"fmul <8 x float> {d8}, {_splat8(f, f.load('float', ab))}")
            fa[c].set(_fma8(f, f.op(f"sitofp <8 x i32> {isum} to <8 x float>"), scale, fa[c].get()))
    return [x.get() for x in fa]


def _q4_x8(t, f: Fn, simd: SIMD, w: str, acts: list[str]) -> list[str]:
    """8 repacked Q4_0 (Q8_0 acts) or Q4_1 (Q8_1 acts) rows: unsigned nibbles, int16 sums over
    the block (<= 8*2*15*127 < 2^15), then the offset: -8*sum(a) (Q4_0) or m*s (Q4_1)."""
    RA = len(acts)
    size, q1 = X8[t][1], t == G.Q4_1
    asize, aq = (40, 8) if q1 else (36, 4)
    fa = [f.var("<8 x float>", "zeroinitializer") for _ in range(RA)]
    ones = _sp(16, "i16", 1)
    with f.loop(0, f.udiv("%K", 32)) as b:
        blk = f.gep("i8", w, f.mul(b, size))
        _prefetch_lines(f, blk, 4 * size, size)        # the next block of these 8 rows
        d8 = f.op(f"fpext <8 x half> {f.load('<8 x half>', blk, 2)} to <8 x float>")
        abs_ = [f.gep("i8", a, f.mul(b, asize)) for a in acts]
        sums = [None] * RA
        for p in range(4):
            v = f.load("<32 x i8>", f.gep("i8", blk, (32 if q1 else 16) + 32 * p))
            q = (f.op(f"and <32 x i8> {v}, {_sp(32, 'i8', 15)}"), f.op(f"lshr <32 x i8> {v}, {_sp(32, 'i8', 4)}"))
            for c, ab in enumerate(abs_):
                for h in range(2):
                    a4 = f.load("i32", f.gep("i8", ab, aq + 16 * h + 4 * p))
                    s = simd.maddubs(q[h], f.op(f"bitcast <8 x i32> {_splat8(f, a4, 'i32')} to <32 x i8>"))
                    sums[c] = s if sums[c] is None else f.op(f"add <16 x i16> {sums[c]}, {s}")
        for c, ab in enumerate(abs_):
            isum = simd.madd(sums[c], ones)
            if not q1:                               # - 8 * sum of the block's activations
                av = f.load("<32 x i8>", f.gep("i8", ab, aq))
                asum = f.call("i32", "@llvm.vector.reduce.add.v8i32",
                              f"<8 x i32> {simd.madd(simd.maddubs(_sp(32, 'i8', 1), av), ones)}")
                isum = f.op(f"sub <8 x i32> {isum}, {_splat8(f, f.op(f'shl i32 {asum}, 3'), 'i32')}")
            scale = f.op(f"fmul <8 x float> {d8}, {_splat8(f, f.load('float', ab))}")
            acc = _fma8(f, f.op(f"sitofp <8 x i32> {isum} to <8 x float>"), scale, fa[c].get())
            if q1:
                m8 = f.op(f"fpext <8 x half> {f.load('<8 x half>', f.gep('i8', blk, 16), 2)} to <8 x float>")
                acc = _fma8(f, m8, _splat8(f, f.load("float", f.gep("i8", ab, 4))), acc)
            fa[c].set(acc)
    return [x.get() for x in fa]


def _q8_0_x8(f: Fn, simd: SIMD, w: str, acts: list[str]) -> list[str]:
    """8 repacked Q8_0 rows at w against Q8_0 activations: one <8 x float> (lanes = rows) each.
    Signed x signed, so ggml's sign trick per piece; int32 sums per block."""
    RA = len(acts)
    fa = [f.var("<8 x float>", "zeroinitializer") for _ in range(RA)]
    ones = _sp(16, "i16", 1)
    with f.loop(0, f.udiv("%K", 32)) as b:
        blk = f.gep("i8", w, f.mul(b, 272))
        _prefetch_lines(f, blk, 4 * 272, 272)        # the next block of these 8 rows
        d8 = f.op(f"fpext <8 x half> {f.load('<8 x half>', blk, 2)} to <8 x float>")
        abs_ = [f.gep("i8", a, f.mul(b, 36)) for a in acts]
        tots = [None] * RA
        for p in range(8):
            wv = f.load("<32 x i8>", f.gep("i8", blk, 16 + 32 * p))
            aw = simd.abs(wv) if simd.avx2 else None
            for c, ab in enumerate(abs_):
                a4 = f.load("i32", f.gep("i8", ab, 4 + 4 * p))
                av = f.op(f"bitcast <8 x i32> {_splat8(f, a4, 'i32')} to <32 x i8>")
                s = simd.madd(simd.dot_s8(wv, aw, av), ones)
                tots[c] = s if tots[c] is None else f.op(f"add <8 x i32> {tots[c]}, {s}")
        for c, ab in enumerate(abs_):
            scale = f.op(f"fmul <8 x float> {d8}, {_splat8(f, f.load('float', ab))}")
            fa[c].set(_fma8(f, f.op(f"sitofp <8 x i32> {tots[c]} to <8 x float>"), scale, fa[c].get()))
    return [x.get() for x in fa]


def _q45k_x8(t, f: Fn, simd: SIMD, w: str, acts: list[str]) -> list[str]:
    """8 repacked Q4_K or Q5_K rows at w against Q8_K activations: one <8 x float> (lanes =
    rows) each. Q5_K's fifth bits (value < 32: int16 sums over 4 pieces, not 8)."""
    RA = len(acts)
    size = X8[t][1]
    q5 = t == G.Q5_K
    qs_off, flush = (416, 4) if q5 else (160, 8)
    one8, four8 = _sp(32, "i8", 1), _sp(32, "i8", 4)
    fa = [f.var("<8 x float>", "zeroinitializer") for _ in range(RA)]
    ones = _sp(16, "i16", 1)
    with f.loop(0, f.udiv("%K", 256)) as sb:
        blk = f.gep("i8", w, f.mul(sb, size))
        _prefetch_lines(f, blk, size, size)        # the next block of these 8 rows

        def halves(off):
            return f.op(f"fpext <8 x half> {f.load('<8 x half>', f.gep('i8', blk, off), 2)} to <8 x float>")
        d8, dmin8 = halves(0), halves(16)

        def pairs(off, lanes):          # bytes -> <16 x i16> for vpmaddwd
            v = f.load("<16 x i8>", f.gep("i8", blk, off))
            return f.op(f"zext <16 x i8> {f.op(f'shufflevector <16 x i8> {v}, <16 x i8> poison, {_mask(lanes)}')} to <16 x i16>")
        tots = [None] * RA
        abs_ = [f.gep("i8", a, f.mul(sb, 292)) for a in acts]
        for g in range(4):
            scs = [pairs(32 + 8 * (j - j % 2), [8 * (j % 2) + i // 2 for i in range(16)]) for j in (2 * g, 2 * g + 1)]
            sums = [[None, None] for _ in range(RA)]
            for p in range(8):
                b = f.load("<32 x i8>", f.gep("i8", blk, qs_off + 256 * g + 32 * p))
                q = [f.op(f"and <32 x i8> {b}, {_sp(32, 'i8', 15)}"),
                     f.op(f"lshr <32 x i8> {b}, {_sp(32, 'i8', 4)}")]
                if q5:                          # bit 2g (low nibbles) / 2g+1 (high) of qh
                    qh = f.load("<32 x i8>", f.gep("i8", blk, 160 + 32 * p))
                    for h in range(2):
                        bit = f.op(f"lshr <32 x i8> {qh}, {_sp(32, 'i8', 2 * g + h)}")
                        bit = f.op(f"shl <32 x i8> {f.op(f'and <32 x i8> {bit}, {one8}')}, {four8}")
                        q[h] = f.op(f"or <32 x i8> {q[h]}, {bit}")
                for c, ab in enumerate(abs_):
                    for h in range(2):
                        a4 = f.load("i32", f.gep("i8", ab, 4 + 64 * g + 32 * h + 4 * p))
                        s = simd.maddubs(q[h], f.op(f"bitcast <8 x i32> {_splat8(f, a4, 'i32')} to <32 x i8>"))
                        sums[c][h] = s if sums[c][h] is None else f.op(f"add <16 x i16> {sums[c][h]}, {s}")
                if p % flush == flush - 1:      # apply the scales before int16 could overflow
                    for h in range(2):
                        for c in range(RA):
                            s = simd.madd(sums[c][h], scs[h])
                            tots[c] = s if tots[c] is None else f.op(f"add <8 x i32> {tots[c]}, {s}")
                            sums[c][h] = None
        mns = [pairs(96 + 16 * q, [(i % 2) * 8 + i // 2 for i in range(16)]) for q in range(4)]
        for c, ab in enumerate(abs_):
            # the activation's sums of 32 values as int16 pairs (bsum_2q, bsum_2q+1), against the
            # rows' (mn_2q, mn_2q+1) pairs
            b32 = f.op(f"bitcast <8 x i32> {simd.madd(f.load('<16 x i16>', f.gep('i8', ab, 260)), ones)} to <16 x i16>")
            b16 = f.op(f"bitcast <16 x i16> {f.op(f'shufflevector <16 x i16> {b32}, <16 x i16> poison, {_mask(list(range(0, 16, 2)) * 2)}')} to <8 x i32>")
            msum = None
            for q in range(4):
                pair = f.op(f"extractelement <8 x i32> {b16}, i64 {q}")
                s = simd.madd(mns[q], f.op(f"bitcast <8 x i32> {_splat8(f, pair, 'i32')} to <16 x i16>"))
                msum = s if msum is None else f.op(f"add <8 x i32> {msum}, {s}")
            da = _splat8(f, f.load("float", ab))
            acc = _fma8(f, f.op(f"sitofp <8 x i32> {tots[c]} to <8 x float>"), f.op(f"fmul <8 x float> {d8}, {da}"), fa[c].get())
            nm = f.op(f"fneg <8 x float> {f.op(f'fmul <8 x float> {dmin8}, {da}')}")
            fa[c].set(_fma8(f, f.op(f"sitofp <8 x i32> {msum} to <8 x float>"), nm, acc))
    return [x.get() for x in fa]


def tile_name(t, RW: int, RA: int) -> str:
    return f"@tile_{getattr(t, 'name', t)}_{RW}x{RA}"


def tile_fn(t, RW: int, RA: int, avx2: bool) -> str:
    acts = [f"%a{c}" for c in range(RA)]
    n = RW * RA
    f = Fn(tile_name(t, RW, RA)[1:], [("ptr", "%w"), ("i64", "%ws")] + [("ptr", a) for a in acts] + [("i64", "%K")],
           ret=f"<{n} x float>", attrs="noinline")
    simd = SIMD(f, avx2)
    accs = [[f.var("<8 x float>", "zeroinitializer") for _ in range(RA)] for _ in range(RW)]
    extras = [[f.var("float", "0.0") for _ in range(RA)] for _ in range(RW)]
    if t in X8 and RW == 8:                     # the repacked layout (X8_TILE)
        kernel = {G.Q4_K: _q45k_x8, G.Q5_K: _q45k_x8, G.Q3_K: _q36k_x8, G.Q6_K: _q36k_x8,
                  G.Q8_0: lambda _t, *a: _q8_0_x8(*a), G.Q4_0: _q4_x8, G.Q4_1: _q4_x8}[t]
        vs = kernel(t, f, simd, "%w", acts)
        out = vs[0]
        if RA > 1:                              # lanes c*8 + r -> r*RA + c
            out = f.op(f"shufflevector <{8 * RA} x float> {_concat(f, vs, 8)}, <{8 * RA} x float> poison, "
                       f"{_mask([c * 8 + r for r in range(8) for c in range(RA)])}")
        f(f"ret <{n} x float> {out}")
        return f.text()
    rows = [f.gep("i8", "%w", f.mul("%ws", r)) for r in range(RW)]

    if t in FLOAT:
        ety, esz = FLOAT[t]

        def load(p, i, n=8):            # n floats at element i, widened from the weight's type
            vt, ft = (f"<{n} x {ety}>", f"<{n} x float>") if n > 1 else (ety, "float")
            v = f.load(vt, f.gep(ety, p, i), 2)
            if t == F16:
                return f.op(f"fpext {vt} {v} to {ft}")
            if t == BF16:
                it = f"<{n} x i32>" if n > 1 else "i32"
                w = f.op(f"shl {it} {f.op(f'zext {vt} {v} to {it}')}, {_sp(n, 'i32', 16) if n > 1 else 16}")
                return f.op(f"bitcast {it} {w} to {ft}")
            return v
        nv = f.and_("%K", -8)
        with f.loop(0, nv, 8) as i:
            _prefetch(f, rows, f.mul(i, esz))
            ws = [load(rows[r], i) for r in range(RW)]
            for c in range(RA):
                av = load(acts[c], i)
                for r in range(RW):
                    accs[r][c].set(_fma8(f, ws[r], av, accs[r][c].get()))
        with f.loop(nv, "%K") as i:       # rows not a multiple of 8
            ws = [load(rows[r], i, 1) for r in range(RW)]
            for c in range(RA):
                av = load(acts[c], i, 1)
                for r in range(RW):
                    extras[r][c].set(f.op(f"call float @llvm.fma.f32(float {ws[r]}, float {av}, float {extras[r][c].get()})"))
    elif t in LEGACY:
        size = LEGACY[t]
        q81 = t in (G.Q4_1, G.Q5_1)
        asize, qoff = (40, 8) if q81 else (36, 4)     # quantk.ACT_SIZE: float d (and s) first
        ones = _sp(16, "i16", 1)
        with f.loop(0, f.udiv("%K", 32)) as b:
            _prefetch(f, rows, f.mul(b, size))
            wbs = [decode_legacy(f, t, f.gep("i8", rows[r], f.mul(b, size)), avx2) for r in range(RW)]
            absw = [simd.abs(w.q) if (avx2 and not q81) else None for w in wbs]
            dws = [_splat8(f, w.d) for w in wbs]
            for c in range(RA):
                ab = f.gep("i8", acts[c], f.mul(b, asize))
                aq = f.load("<32 x i8>", f.gep("i8", ab, qoff))
                da = _splat8(f, f.load("float", ab))
                sa = f.load("float", f.gep("i8", ab, 4)) if q81 else None
                for r, w in enumerate(wbs):
                    p = simd.maddubs(w.q, aq) if q81 else simd.dot_s8(w.q, absw[r], aq)
                    isum = f.op(f"sitofp <8 x i32> {simd.madd(p, ones)} to <8 x float>")
                    scaled = f.op(f"fmul <8 x float> {isum}, {dws[r]}")
                    accs[r][c].set(_fma8(f, scaled, da, accs[r][c].get()))
                    if q81:
                        extras[r][c].set(f.op(f"call float @llvm.fma.f32(float {w.m}, float {sa}, float {extras[r][c].get()})"))
    else:
        size = KQUANT[t]
        with f.loop(0, f.udiv("%K", 256)) as sb:
            # row by row: the row's 8 decoded chunks meet the RA activations while only RA integer
            # sums are live (2D register tiles over chunks spill on 16 registers)
            abs_ = [f.gep("i8", a, f.mul(sb, 292)) for a in acts]
            _prefetch(f, rows, f.mul(sb, size), size)
            for r in range(RW):
                kb = decode_kquant(f, t, f.gep("i8", rows[r], f.mul(sb, size)))
                isums = [None] * RA
                for j in range(8):
                    u = kb.chunk(j)
                    scv = f.op(f"shufflevector <16 x i16> {kb.sc16}, <16 x i16> poison, "
                               f"{_mask([2 * j] * 8 + [2 * j + 1] * 8)}")
                    for c, ab in enumerate(abs_):
                        aq = f.load("<32 x i8>", f.gep("i8", ab, 4 + 32 * j))
                        s = simd.madd(simd.maddubs(u, aq), scv)
                        isums[c] = s if j == 0 else f.op(f"add <8 x i32> {isums[c]}, {s}")
                for c, ab in enumerate(abs_):
                    da = f.load("float", ab)
                    bsums = f.load("<16 x i16>", f.gep("i8", ab, 260))
                    ms = f.op(f"sitofp <8 x i32> {simd.madd(kb.m16, bsums)} to <8 x float>")
                    isum = f.op(f"sitofp <8 x i32> {isums[c]} to <8 x float>")
                    acc = _fma8(f, isum, _splat8(f, f.op(f"fmul float {kb.d}, {da}")), accs[r][c].get())
                    nc = f.op(f"fneg float {f.op(f'fmul float {kb.c}, {da}')}")
                    accs[r][c].set(_fma8(f, ms, _splat8(f, nc), acc))
    sums = reduce_many(f, [accs[r][c].get() for r in range(RW) for c in range(RA)])
    out = "poison"
    for i, s in enumerate(sums):
        r, c = divmod(i, RA)
        v = f.op(f"fadd float {s}, {extras[r][c].get()}")
        out = f.op(f"insertelement <{n} x float> {out}, float {v}, i64 {i}")
    f(f"ret <{n} x float> {out}")
    return f.text()


def tiles_text(tiles: set, avx2: bool) -> str:
    return "\n".join([DECLS] + [tile_fn(t, rw, ra, avx2) for t, rw, ra in sorted(tiles, key=str)])
