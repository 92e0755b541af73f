"""LLVM IR for GGML block formats outside the matrix products (those are gemm.py): activation
quantization (Q8_0, Q8_1, Q8_K, rounded as ggml-cpu rounds them on x86) and row dequantization
for GET_ROWS (embedding lookups), the latter through one common unpacked form of a row:
    q[K]      int8 quants (signed; already offset, e.g. Q4_0 nibble - 8)
    sc[K/S]   int32 sub-block scales (1 for the legacy 32-blocks), S = sub-block size
    mn[K/S]   int32 sub-block mins (K-quants with mins)
    d[K/SB]   float super-block scale (the block scale for legacy types), SB = 32 or 256
    dm[K/SB]  float min scale (K-quants: dmin; Q4_1/Q5_1: the block's m)
dequantized in ggml's operation order ((d*sc)*q - dmin*m), so rows equal gguf-py's.
"""
from __future__ import annotations

from dataclasses import dataclass

from moegraph.quants import GGMLType as G, row_bytes, traits

from .gemm import e8m0_half
from .irgen import I32, Fn, f32


@dataclass(frozen=True)
class Layout:
    block: int        # elements per block
    size: int         # bytes per block
    sub: int          # sub-block size S
    super_: int       # SB: elements per d entry
    act: G            # vec_dot_type


def _layout(t: G, sub: int) -> Layout:
    """Block size, bytes and vec_dot type from the type table (moegraph.quants, their one home);
    the sub-block size is how this backend's unpacking walks the block."""
    tr = traits(t)
    return Layout(tr.block_size, tr.type_size, sub, tr.block_size, tr.vec_dot_type)


LAYOUTS = {t: _layout(t, sub) for t, sub in [
    (G.Q4_0, 32), (G.Q4_1, 32), (G.Q5_0, 32), (G.Q5_1, 32), (G.Q8_0, 32), (G.MXFP4, 32),
    (G.Q2_K, 16), (G.Q3_K, 16), (G.Q4_K, 32), (G.Q5_K, 32), (G.Q6_K, 16)]}
# Activation blocks in this backend's scratch: ggml's values, but the fp16 scales d (and Q8_1's s)
# stored widened to float32, so products load them without conversion: Q8_0 = d, qs[32];
# Q8_1 = d, s, qs[32]; Q8_K as ggml (float d, qs[256], int16 bsums[16]).
ACT_SIZE = {G.Q8_0: (32, 36), G.Q8_1: (32, 40), G.Q8_K: (256, 292)}


def act_row_bytes(vt, K: int) -> int:
    """Bytes of one activation row of K values in vec_dot_type vt, as kernels lay it out."""
    if vt in ACT_SIZE:
        B, size = ACT_SIZE[vt]
        return K // B * size
    return row_bytes(vt, K)


def unpacked_bytes(t: G, K: int) -> int:
    L = LAYOUTS[t]
    return K + 8 * (K // L.sub) + 8 * (K // L.super_) + 64


# --------------------------------------------------------------------------- shared helpers
DECLS = """
declare float @llvm.fabs.f32(float)
declare float @llvm.roundeven.f32(float)
declare <8 x float> @llvm.roundeven.v8f32(<8 x float>)
declare <8 x float> @llvm.fabs.v8f32(<8 x float>)
declare float @llvm.maximum.f32(float, float)
declare float @llvm.minimum.f32(float, float)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.minnum.f32(float, float)
declare float @llvm.vector.reduce.fmaximum.v8f32(<8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare double @llvm.vector.reduce.fadd.v8f64(double, <8 x double>)
declare i32 @llvm.vector.reduce.add.v32i32(<32 x i32>)
declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)
declare i32 @llvm.vector.reduce.add.v8i32(<8 x i32>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.fma.f32(float, float, float)
declare float @llvm.exp.f32(float)
declare float @llvm.cos.f32(float)
declare float @llvm.sin.f32(float)
declare float @llvm.sqrt.f32(float)
declare double @llvm.sqrt.f64(double)
declare float @llvm.tanh.f32(float)
"""


# --------------------------------------------------------------------------- activations
def _via_half(f: Fn, x: str) -> str:
    """x rounded to fp16 (ggml stores it so) and widened back."""
    return f.op(f"fpext half {f.op(f'fptrunc float {x} to half')} to float")


def quantize_act_fn(t: G) -> str:
    """@quant_<T>(ptr x, ptr out, i64 K): one row of float32 to ggml blocks (x86 rounding)."""
    f = Fn(f"quant_{t.name}", [("ptr", "%x"), ("ptr", "%out"), ("i64", "%K")], attrs="noinline")
    B, size = ACT_SIZE[t]
    nb = f.op("udiv i64 %K, " + str(B))
    with f.loop(0, nb) as b:
        xb = f.gep("float", "%x", f.op(f"mul i64 {b}, {B}"))
        ob = f.gep("i8", "%out", f.op(f"mul i64 {b}, {size}"))
        if t in (G.Q8_0, G.Q8_1):      # 4 x 8 lanes, as ggml's AVX2 quantize_row_q8_0/q8_1
            xs = [f.load("<8 x float>", f.gep("float", xb, 8 * i), 4) for i in range(4)]
            ab = [f.op(f"call <8 x float> @llvm.fabs.v8f32(<8 x float> {x})") for x in xs]
            m = [f.op(f"call <8 x float> @llvm.maximum.v8f32(<8 x float> {ab[i]}, <8 x float> {ab[i + 2]})") for i in (0, 1)]
            m = f.op(f"call <8 x float> @llvm.maximum.v8f32(<8 x float> {m[0]}, <8 x float> {m[1]})")
            am = f.op(f"call float @llvm.vector.reduce.fmaximum.v8f32(<8 x float> {m})")
            d = f.op(f"fdiv float {am}, {f32(127.0)}")
            nz = f.op(f"fcmp one float {am}, 0.0")
            inv = f.op(f"fdiv float {f32(127.0)}, {am}")
            mul = f.op(f"select i1 {nz}, float {inv}, float 0.0")
            mv = f.op(f"shufflevector <8 x float> {f.op(f'insertelement <8 x float> poison, float {mul}, i64 0')}, "
                      "<8 x float> poison, <8 x i32> zeroinitializer")
            qs = []
            for x in xs:
                r = f.op(f"call <8 x float> @llvm.roundeven.v8f32(<8 x float> {f.op(f'fmul <8 x float> {x}, {mv}')})")
                qs.append(f.op(f"fptosi <8 x float> {r} to <8 x i32>"))
            lo = f.op(f"shufflevector <8 x i32> {qs[0]}, <8 x i32> {qs[1]}, <16 x i32> <{', '.join(f'i32 {i}' for i in range(16))}>")
            hi = f.op(f"shufflevector <8 x i32> {qs[2]}, <8 x i32> {qs[3]}, <16 x i32> <{', '.join(f'i32 {i}' for i in range(16))}>")
            q32 = f.op(f"shufflevector <16 x i32> {lo}, <16 x i32> {hi}, <32 x i32> <{', '.join(f'i32 {i}' for i in range(32))}>")
            f.store("<32 x i8>", f.op(f"trunc <32 x i32> {q32} to <32 x i8>"), f.gep("i8", ob, 4 if t == G.Q8_0 else 8))
            f.store("float", _via_half(f, d), ob)
            if t == G.Q8_1:
                total = f.op(f"call i32 @llvm.vector.reduce.add.v32i32(<32 x i32> {q32})")
                s = f.op(f"fmul float {d}, {f.op(f'sitofp i32 {total} to float')}")
                f.store("float", _via_half(f, s), f.gep("i8", ob, 4))
        else:  # Q8_K: scale by the element of largest |x| (first one), nearest_int, min(127)
            amax, mx = f.var("float", "0.0"), f.var("float", "0.0")
            with f.loop(0, 256) as i:
                v = f.load("float", f.gep("float", xb, i))
                a = f.op(f"call float @llvm.fabs.f32(float {v})")
                gt = f.op(f"fcmp ogt float {a}, {amax.get()}")
                amax.set(f.op(f"select i1 {gt}, float {a}, float {amax.get()}"))
                mx.set(f.op(f"select i1 {gt}, float {v}, float {mx.get()}"))
            nz = f.op(f"fcmp one float {amax.get()}, 0.0")
            iscale0 = f.op(f"fdiv float {f32(-127.0)}, {mx.get()}")
            iscale = f.op(f"select i1 {nz}, float {iscale0}, float 0.0")
            with f.loop(0, 256) as i:
                v = f.load("float", f.gep("float", xb, i))
                r = f.op(f"call float @llvm.roundeven.f32(float {f.op(f'fmul float {iscale}, {v}')})")
                qi = f.op(f"fptosi float {r} to i32")
                lt = f.op(f"icmp slt i32 {qi}, 127")
                qc = f.op(f"select i1 {lt}, i32 {qi}, i32 127")
                f.store("i8", f.op(f"trunc i32 {qc} to i8"), f.gep("i8", ob, f.op(f"add i64 {i}, 4")))
            dinv = f.op(f"fdiv float 1.0, {iscale}")
            f.store("float", f.op(f"select i1 {nz}, float {dinv}, float 0.0"), ob)
            with f.loop(0, 16) as j:
                acc = f.var("i32", "0")
                with f.loop(0, 16) as i:
                    idx = f.op(f"add i64 {f.op(f'mul i64 {j}, 16')}, {i}")
                    qv = f.load("i8", f.gep("i8", ob, f.op(f"add i64 {idx}, 4")))
                    acc.set(f.op(f"add i32 {acc.get()}, {f.op(f'sext i8 {qv} to i32')}"))
                bp = f.gep("i8", ob, f.op(f"add i64 {f.op(f'mul i64 {j}, 2')}, 260"))
                f.store("i16", f.op(f"trunc i32 {acc.get()} to i16"), bp)
    return f.text()


def _unpacked_arrays(f: Fn, L: Layout, K: str = "%K") -> tuple[str, str, str, str, str]:
    """Pointers to q, sc, mn, d, dm inside the unpacked row at %u (layout in the module doc)."""
    sc_off = f.and_(f.add(K, 15), -16)
    nsub, nsup = f.udiv(K, L.sub), f.udiv(K, L.super_)
    mn_off = f.add(sc_off, f.mul(nsub, 4))
    d_off = f.add(mn_off, f.mul(nsub, 4))
    dm_off = f.add(d_off, f.mul(nsup, 4))
    return tuple(f.gep("i8", "%u", o) for o in ("0", sc_off, mn_off, d_off, dm_off))


# --------------------------------------------------------------------------- weight unpacking
def _mxfp4_value(f: Fn, n: str) -> str:
    """KVALUES_MXFP4[n] for an i32 nibble: m = n & 7 is m (m < 4) or (2 + (m & 1)) << (1 + (m >> 1 & 1)),
    negated where n & 8 (the table's E2M1 values, doubled)."""
    m = f.and_(n, 7, I32)
    big = f.shl(f.add(f.and_(m, 1, I32), 2, I32), f.add(f.and_(f.lshr(m, 1, I32), 1, I32), 1, I32), I32)
    v = f.op(f"select i1 {f.op(f'icmp ult i32 {m}, 4')}, i32 {m}, i32 {big}")
    neg = f.op(f"icmp ne i32 {f.and_(n, 8, I32)}, 0")
    return f.op(f"select i1 {neg}, i32 {f.op(f'sub i32 0, {v}')}, i32 {v}")


def unpack_fn(t: G) -> str:
    """@unpack_<T>(ptr row, ptr dst, i64 K): one weight row to the common unpacked form."""
    L = LAYOUTS[t]
    f = Fn(f"unpack_{t.name}", [("ptr", "%w"), ("ptr", "%u"), ("i64", "%K")], attrs="noinline")
    K = "%K"
    q, sc, mn, dd, dm = _unpacked_arrays(f, L)
    nb = f.op(f"udiv i64 {K}, {L.block}")

    def half_at(blk, off):
        return f.op(f"fpext half {f.load('half', f.gep('i8', blk, off))} to float")

    def byte_at(blk, off):
        return f.op(f"zext i8 {f.load('i8', f.gep('i8', blk, off))} to i32")

    def put_q(base_idx, i, val_i32):
        f.store("i8", f.op(f"trunc i32 {val_i32} to i8"), f.gep("i8", q, f.op(f"add i64 {base_idx}, {i}")))

    def put_i32(arr, idx, val):
        f.store("i32", val, f.gep("i32", arr, idx))

    def put_f(arr, idx, val):
        f.store("float", val, f.gep("float", arr, idx))

    with f.loop(0, nb) as b:
        blk = f.gep("i8", "%w", f.op(f"mul i64 {b}, {L.size}"))
        base = f.op(f"mul i64 {b}, {L.block}")
        if t == G.MXFP4:     # the doubled E2M1 table at each nibble, the halved E8M0 scale
            put_f(dd, b, e8m0_half(f, blk))
            put_i32(sc, b, "1")
            put_i32(mn, b, "0")
            with f.loop(0, 16) as j:
                byte = byte_at(blk, f.op(f"add i64 {j}, 1"))
                put_q(base, j, _mxfp4_value(f, f.op(f"and i32 {byte}, 15")))
                put_q(base, f.op(f"add i64 {j}, 16"), _mxfp4_value(f, f.op(f"lshr i32 {byte}, 4")))
        elif t in (G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0):
            put_f(dd, b, half_at(blk, 0))
            put_i32(sc, b, "1")
            put_i32(mn, b, "0")
            if t in (G.Q4_1, G.Q5_1):
                put_f(dm, b, half_at(blk, 2))
            if t == G.Q8_0:
                with f.loop(0, 32) as i:
                    v = f.op(f"sext i8 {f.load('i8', f.gep('i8', blk, f.op(f'add i64 {i}, 2')))} to i32")
                    put_q(base, i, v)
            else:
                qs_off = {G.Q4_0: 2, G.Q4_1: 4, G.Q5_0: 6, G.Q5_1: 8}[t]
                qh = None
                if t in (G.Q5_0, G.Q5_1):
                    qh_off = 2 if t == G.Q5_0 else 4
                    qh = f.load("i32", f.gep("i8", blk, qh_off))
                offset = {G.Q4_0: 8, G.Q4_1: 0, G.Q5_0: 16, G.Q5_1: 0}[t]
                with f.loop(0, 16) as j:
                    byte = byte_at(blk, f.op(f"add i64 {j}, {qs_off}"))
                    lo = f.op(f"and i32 {byte}, 15")
                    hi = f.op(f"lshr i32 {byte}, 4")
                    if qh is not None:
                        j32 = f.op(f"trunc i64 {j} to i32")
                        hl = f.op(f"and i32 {f.op(f'lshr i32 {qh}, {j32}')}, 1")
                        hh = f.and_(f.lshr(qh, f.add(j32, 16, I32), I32), 1, I32)
                        lo = f.op(f"or i32 {lo}, {f.op(f'shl i32 {hl}, 4')}")
                        hi = f.op(f"or i32 {hi}, {f.op(f'shl i32 {hh}, 4')}")
                    put_q(base, j, f.op(f"sub i32 {lo}, {offset}"))
                    put_q(base, f.op(f"add i64 {j}, 16"), f.op(f"sub i32 {hi}, {offset}"))
        # K-quants: one super-block of 256
        elif t == G.Q4_K or t == G.Q5_K:
            put_f(dd, b, half_at(blk, 0))
            put_f(dm, b, half_at(blk, 2))
            with f.loop(0, 8) as j:   # 6-bit scales and mins packed in 12 bytes (get_scale_min_k4)
                j4 = f.op(f"icmp slt i64 {j}, 4")
                s_lo = byte_at(blk, f.op(f"add i64 {j}, 4"))
                m_lo = byte_at(blk, f.op(f"add i64 {j}, 8"))
                a_sc = f.op(f"and i32 {s_lo}, 63")
                a_mn = f.op(f"and i32 {m_lo}, 63")
                jm4 = f.op(f"sub i64 {j}, 4")
                jm4c = f.op(f"select i1 {j4}, i64 0, i64 {jm4}")
                b_hi = byte_at(blk, f.op(f"add i64 {jm4c}, 12"))
                b_s = byte_at(blk, f.op(f"add i64 {jm4c}, 4"))
                b_m = byte_at(blk, f.op(f"add i64 {jm4c}, 8"))
                b_sc = f.or_(f.and_(b_hi, 15, I32), f.shl(f.lshr(b_s, 6, I32), 4, I32), I32)
                b_mn = f.or_(f.lshr(b_hi, 4, I32), f.shl(f.lshr(b_m, 6, I32), 4, I32), I32)
                sidx = f.op(f"add i64 {f.op(f'mul i64 {b}, 8')}, {j}")
                put_i32(sc, sidx, f.op(f"select i1 {j4}, i32 {a_sc}, i32 {b_sc}"))
                put_i32(mn, sidx, f.op(f"select i1 {j4}, i32 {a_mn}, i32 {b_mn}"))
            qs_off = 16 if t == G.Q4_K else 48
            with f.loop(0, 4) as g:      # 4 groups of 64: 32 low nibbles, then 32 high nibbles
                with f.loop(0, 32) as l:
                    byte = byte_at(blk, f.add(f.add(f.mul(g, 32), l), qs_off))
                    lo = f.op(f"and i32 {byte}, 15")
                    hi = f.op(f"lshr i32 {byte}, 4")
                    if t == G.Q5_K:
                        hbyte = byte_at(blk, f.op(f"add i64 {l}, 16"))
                        g32 = f.op(f"trunc i64 {g} to i32")
                        sh0 = f.op(f"mul i32 {g32}, 2")
                        bl = f.op(f"and i32 {f.op(f'lshr i32 {hbyte}, {sh0}')}, 1")
                        bh = f.and_(f.lshr(hbyte, f.add(sh0, 1, I32), I32), 1, I32)
                        lo = f.op(f"or i32 {lo}, {f.op(f'shl i32 {bl}, 4')}")
                        hi = f.op(f"or i32 {hi}, {f.op(f'shl i32 {bh}, 4')}")
                    i0 = f.op(f"add i64 {f.op(f'mul i64 {g}, 64')}, {l}")
                    put_q(base, i0, lo)
                    put_q(base, f.op(f"add i64 {i0}, 32"), hi)
        elif t == G.Q6_K:
            put_f(dd, b, half_at(blk, 208))
            with f.loop(0, 16) as j:
                v = f.op(f"sext i8 {f.load('i8', f.gep('i8', blk, f.op(f'add i64 {j}, 192')))} to i32")
                put_i32(sc, f.op(f"add i64 {f.op(f'mul i64 {b}, 16')}, {j}"), v)
                put_i32(mn, f.op(f"add i64 {f.op(f'mul i64 {b}, 16')}, {j}"), "0")
            with f.loop(0, 2) as h:      # two halves of 128: ql[64], qh[32]
                with f.loop(0, 32) as l:
                    ql0 = byte_at(blk, f.op(f"add i64 {f.op(f'mul i64 {h}, 64')}, {l}"))
                    ql1 = byte_at(blk, f.op(f"add i64 {f.op(f'mul i64 {h}, 64')}, {f.op(f'add i64 {l}, 32')}"))
                    qhb = byte_at(blk, f.add(f.add(f.mul(h, 32), l), 128))
                    def hi2(shift):
                        return f.shl(f.and_(f.lshr(qhb, shift, I32), 3, I32), 4, I32)
                    vals = [f.or_(f.and_(ql0, 15, I32), hi2(0), I32),
                            f.or_(f.and_(ql1, 15, I32), hi2(2), I32),
                            f.or_(f.lshr(ql0, 4, I32), hi2(4), I32),
                            f.or_(f.lshr(ql1, 4, I32), hi2(6), I32)]
                    i0 = f.op(f"add i64 {f.op(f'mul i64 {h}, 128')}, {l}")
                    for k, v in enumerate(vals):
                        put_q(base, f.op(f"add i64 {i0}, {32 * k}"), f.op(f"sub i32 {v}, 32"))
        elif t == G.Q2_K:
            put_f(dd, b, half_at(blk, 80))
            put_f(dm, b, half_at(blk, 82))
            with f.loop(0, 16) as j:
                s = byte_at(blk, j)
                idx = f.op(f"add i64 {f.op(f'mul i64 {b}, 16')}, {j}")
                put_i32(sc, idx, f.op(f"and i32 {s}, 15"))
                put_i32(mn, idx, f.op(f"lshr i32 {s}, 4"))
            with f.loop(0, 2) as h:      # two halves of 128 from qs[32] each, 4 shifts
                with f.loop(0, 4) as sh:
                    with f.loop(0, 32) as l:
                        byte = byte_at(blk, f.add(f.add(f.mul(h, 32), l), 16))
                        shift = f.op(f"trunc i64 {f.op(f'mul i64 {sh}, 2')} to i32")
                        v = f.op(f"and i32 {f.op(f'lshr i32 {byte}, {shift}')}, 3")
                        i0 = f.add(f.add(f.mul(h, 128), f.mul(sh, 32)), l)
                        put_q(base, i0, v)
        elif t == G.Q3_K:
            put_f(dd, b, half_at(blk, 108))
            # 16 6-bit scales from 12 bytes (kmask1/kmask2 unpacking), minus 32
            aux = [f.load("i32", f.gep("i8", blk, 96 + 4 * i)) for i in range(3)]
            a0, a1, a2 = aux
            tmp = a2
            def lo4(word, shift):      # (word >> shift) & kmask2
                return f.and_(f.lshr(word, shift, I32), 0x0F0F0F0F, I32)

            def hi2(shift):            # ((tmp >> shift) & kmask1) << 4
                return f.shl(f.and_(f.lshr(tmp, shift, I32), 0x03030303, I32), 4, I32)
            s0 = f.or_(lo4(a0, 0), hi2(0), I32)
            s1 = f.or_(lo4(a1, 0), hi2(2), I32)
            s2 = f.or_(lo4(a0, 4), hi2(4), I32)
            s3 = f.or_(lo4(a1, 4), hi2(6), I32)
            for wi, word in enumerate((s0, s1, s2, s3)):
                for byte_i in range(4):
                    v = f.op(f"and i32 {f.op(f'lshr i32 {word}, {8 * byte_i}')}, 255")
                    idx = f.op(f"add i64 {f.op(f'mul i64 {b}, 16')}, {4 * wi + byte_i}")
                    put_i32(sc, idx, f.op(f"sub i32 {v}, 32"))
                    put_i32(mn, idx, "0")
            with f.loop(0, 2) as h:
                with f.loop(0, 4) as sh:
                    with f.loop(0, 32) as l:
                        byte = byte_at(blk, f.add(f.add(f.mul(h, 32), l), 32))
                        shift = f.op(f"trunc i64 {f.op(f'mul i64 {sh}, 2')} to i32")
                        low = f.op(f"and i32 {f.op(f'lshr i32 {byte}, {shift}')}, 3")
                        hm = byte_at(blk, l)
                        bit = f.op(f"trunc i64 {f.add(f.mul(h, 4), sh)} to i32")
                        hset = f.op(f"and i32 {f.op(f'lshr i32 {hm}, {bit}')}, 1")
                        unset = f.op(f"icmp eq i32 {hset}, 0")
                        v = f.sub(low, f.op(f"select i1 {unset}, i32 4, i32 0"), I32)
                        i0 = f.add(f.add(f.mul(h, 128), f.mul(sh, 32)), l)
                        put_q(base, i0, v)
    return f.text()


def dequant_row_fn(t: G) -> str:
    """@dequant_<T>(ptr unpacked, ptr out, i64 K): floats from the unpacked form, in ggml's
    operation order ((d*sc)*q - dmin*m)."""
    L = LAYOUTS[t]
    f = Fn(f"dequant_{t.name}", [("ptr", "%u"), ("ptr", "%o"), ("i64", "%K")], attrs="noinline")
    K = "%K"
    _, sc, mn, dd, dm = _unpacked_arrays(f, L)
    nsub = f.udiv(K, L.sub)
    with f.loop(0, nsub) as j:
        sup = f.op(f"udiv i64 {f.op(f'mul i64 {j}, {L.sub}')}, {L.super_}")
        d = f.load("float", f.gep("float", dd, sup))
        scv = f.load("i32", f.gep("i32", sc, j))
        scale = f.op(f"fmul float {d}, {f.op(f'sitofp i32 {scv} to float')}")
        if t in (G.Q2_K, G.Q4_K, G.Q5_K):
            mnv = f.load("i32", f.gep("i32", mn, j))
            off = f.op(f"fmul float {f.load('float', f.gep('float', dm, sup))}, {f.op(f'sitofp i32 {mnv} to float')}")
        elif t in (G.Q4_1, G.Q5_1):
            off = f.op(f"fneg float {f.load('float', f.gep('float', dm, sup))}")
        else:
            off = "0.0"
        with f.loop(0, L.sub) as i:
            idx = f.op(f"add i64 {f.op(f'mul i64 {j}, {L.sub}')}, {i}")
            qv = f.op(f"sitofp i8 {f.load('i8', f.gep('i8', '%u', idx))} to float")
            v = f.op(f"fsub float {f.op(f'fmul float {scale}, {qv}')}, {off}")
            f.store("float", v, f.gep("float", "%o", idx))
    return f.text()


def module_text(types: set[G]) -> str:
    """Activation quantizers for the weight types present, and row dequantizers (GET_ROWS)."""
    parts = [DECLS]
    acts = {LAYOUTS[t].act for t in types}
    parts += [quantize_act_fn(a) for a in sorted(acts)]
    for t in sorted(types):
        parts += [unpack_fn(t), dequant_row_fn(t)]
    return "\n".join(parts)
