"""One LLVM IR kernel per Step of the plan. Every kernel has the signature
    void @kN(ptr %ptrs, ptr %syms, i64 %ith, i64 %nth, ptr %tls)
(ptrs: base pointers of arena/weights/inputs/states; syms: run-time values of T and KV; tls: this
thread's scratch) and does its share (ith of nth) of the op's work. Kernels needing two phases
(quantize activations, then dot products) return two functions; the graph entry puts a barrier
between them. Semantics are those of the op table in moegraph/ir.py; rounding follows the
reference backend (and so ggml-cpu)."""
from __future__ import annotations

import math

from moegraph.errors import MoeGraphError
from moegraph.ir import BF16, F16, F32, I32, Node, rope_mscale, rope_yarn_corr_dims, rope_yarn_ramp
from moegraph.quants import GGMLType, is_quantized, vec_dot_type

from .irgen import I32 as TI32, Fn, f32, f64, splat
from ..lower import SYMBOLS, Plan, View, elem_size
from .gemm import X8_TILE, reduce_many, tile_name, tile_shape, x8_row_bytes
from .quantk import act_row_bytes, unpacked_bytes

PARAMS = [("ptr", "%ptrs"), ("ptr", "%syms"), ("i64", "%ith"), ("i64", "%nth"), ("ptr", "%tls")]
LLTYPE = {F32: "float", F16: "half", I32: "i32", BF16: "i16"}


class K:
    """Helpers shared by kernels: base pointers, run-time dims, element addressing, splitting."""

    def __init__(self, plan: Plan, name: str):
        self.plan = plan
        self.f = Fn(name, list(PARAMS), attrs="noinline")   # the entry stays a list of calls
        self._bases: dict = {}
        self.operands: dict[tuple[int, int], str] = {}   # (slot, byte offset) -> pointer param
        self.work: tuple | None = None   # dims whose product estimates the work (threads or not)

    def operand(self, slot: int, byte_offset: int = 0) -> str:
        """A pointer parameter = base of `slot` + byte_offset, computed by the caller: kernels of
        identical layers then have identical code and are compiled once."""
        key = (slot, byte_offset)
        if key not in self.operands:
            name = f"%op{len(self.operands)}"
            self.f.params.append(("ptr", name))
            self.operands[key] = name
        return self.operands[key]

    def _entry(self, key, ty: str, table: str, index: int) -> str:
        """A value loaded once in the entry block, so it dominates every use."""
        if key not in self._bases:
            f = self.f
            p, v = f.tmp("e"), f.tmp("e")
            f.allocas.append(f"  {p} = getelementptr inbounds {ty}, ptr {table}, i64 {index}")
            f.allocas.append(f"  {v} = load {ty}, ptr {p}, align 8")
            self._bases[key] = v
        return self._bases[key]

    def dim(self, d) -> str:
        if isinstance(d, int):
            return str(d)
        return self._entry(("sym", d), "i64", "%syms", SYMBOLS.index(d))

    def count(self, dims) -> str:
        out = "1"
        for d in dims:
            v = self.dim(d)
            out = v if out == "1" else self.f.op(f"mul i64 {out}, {v}")
        return out

    def split(self, n: str) -> tuple[str, str]:
        """[n*ith/nth, n*(ith+1)/nth): this thread's share of n work items."""
        f = self.f
        lo = f.op(f"udiv i64 {f.op(f'mul i64 {n}, %ith')}, %nth")
        hi = f.udiv(f.mul(n, f.add("%ith", 1)), "%nth")
        return lo, hi

    def unflatten(self, flat: str, dims) -> list[str]:
        """Row-major indices of `flat` over dims (outermost first)."""
        f = self.f
        idx = []
        rest = flat
        for d in reversed(dims[1:]):
            v = self.dim(d)
            idx.append(f.op(f"urem i64 {rest}, {v}"))
            rest = f.op(f"udiv i64 {rest}, {v}")
        idx.append(rest)
        return list(reversed(idx))

    def ptr(self, v: View, idx: list[str], ty: str | None = None) -> str:
        """Address of element idx of view v (idx may be shorter: leading dims)."""
        f = self.f
        off = "0"
        for i, s in zip(idx, v.strides):
            if s == 0 or i == "0":
                continue
            term = i if s == 1 else f.op(f"mul i64 {i}, {s}")
            off = term if off == "0" else f.op(f"add i64 {off}, {term}")
        ty = ty or ("i8" if is_quantized(v.dtype) else LLTYPE[v.dtype])
        return f.gep(ty, self.operand(v.slot, v.offset * elem_size(v.dtype)), off)

    def bview(self, v: View, out_shape) -> View:
        """v broadcast to out_shape (trailing-aligned; size-1 dims get stride 0)."""
        pad = len(out_shape) - v.rank
        strides = [0] * pad + [0 if d == 1 and o != 1 else s
                               for d, s, o in zip(v.shape, v.strides, out_shape[pad:])]
        return View(v.slot, v.offset, tuple(out_shape), tuple(strides), v.dtype)

    def load_f32(self, v: View, p: str) -> str:
        f = self.f
        if v.dtype == F32:
            return f.load("float", p, 4)
        if v.dtype == F16:
            return f.op(f"fpext half {f.load('half', p, 2)} to float")
        if v.dtype == BF16:
            w = f.op(f"zext i16 {f.load('i16', p, 2)} to i32")
            return f.op(f"bitcast i32 {f.op(f'shl i32 {w}, 16')} to float")
        raise MoeGraphError(f"cannot load {v.dtype} as float")

    def store_f32(self, v: View, value: str, p: str) -> None:
        f = self.f
        if v.dtype == F32:
            f.store("float", value, p, 4)
        elif v.dtype == F16:
            f.store("half", f.op(f"fptrunc float {value} to half"), p, 2)
        elif v.dtype == BF16:
            f.store("i16", self.to_bf16(value), p, 2)
        else:
            raise MoeGraphError(f"cannot store float as {v.dtype}")

    def to_bf16(self, value: str) -> str:
        """ggml's fp32 -> bf16: round to nearest even on the bits; NaN made quiet."""
        f = self.f
        u = f.op(f"bitcast float {value} to i32")
        isnan = f.op(f"fcmp uno float {value}, 0.0")
        lsb = f.op(f"and i32 {f.op(f'lshr i32 {u}, 16')}, 1")
        r = f.lshr(f.add(u, f.add(32767, lsb, TI32), TI32), 16, TI32)
        nan = f.op(f"or i32 {f.op(f'lshr i32 {u}, 16')}, 64")
        return f.op(f"trunc i32 {f.op(f'select i1 {isnan}, i32 {nan}, i32 {r}')} to i16")

    def rows_loop(self, shape):
        """Loop over this thread's rows of `shape` (all dims but the last): yields the outer
        index list."""
        outer = shape[:-1]
        n = self.count(outer)
        lo, hi = self.split(n)
        return self.f.loop(lo, hi), outer

    def text(self) -> str:
        return self.f.text()


# --------------------------------------------------------------------------- math helpers
def vexp_fn() -> str:
    """exp for float and <8 x float> (Cephes-style, ~1 ulp): range reduction by ln 2, a degree-6
    polynomial, and scaling through the exponent bits; exp(x < -88) is exactly 0; exp(NaN) is NaN
    (one select: the clamp itself uses maxnum/minnum, which are cheaper than NaN-propagating ones,
    so the max reductions before an exp may drop NaN too: it comes back through the exp)."""
    out = []
    for ty, n, sfx in (("float", 1, "f"), ("<8 x float>", 8, "v")):
        def c(x):
            return splat("float", n, f32(x)) if n > 1 else f32(x)
        ity = "i32" if n == 1 else "<8 x i32>"
        ci = (lambda x: splat("i32", 8, str(x))) if n > 1 else str
        rnd = "@llvm.roundeven.f32" if n == 1 else "@llvm.roundeven.v8f32"
        out.append(f"""
define internal {ty} @exp_{sfx}({ty} %x0) alwaysinline {{
  %lo = fcmp olt {ty} %x0, {c(-88.0)}
  %x1 = call {ty} @llvm.minnum.{'f32' if n == 1 else 'v8f32'}({ty} %x0, {ty} {c(88.3762626647949)})
  %x = call {ty} @llvm.maxnum.{'f32' if n == 1 else 'v8f32'}({ty} %x1, {ty} {c(-88.0)})
  %t = fmul {ty} %x, {c(1.44269504088896341)}
  %fx = call {ty} {rnd}({ty} %t)
  %a = fmul {ty} %fx, {c(0.693359375)}
  %r0 = fsub {ty} %x, %a
  %b = fmul {ty} %fx, {c(-2.12194440e-4)}
  %r = fsub {ty} %r0, %b
  %p0 = fmul {ty} %r, {c(1.9875691500E-4)}
  %p1 = fadd {ty} %p0, {c(1.3981999507E-3)}
  %p2 = fmul {ty} %p1, %r
  %p3 = fadd {ty} %p2, {c(8.3334519073E-3)}
  %p4 = fmul {ty} %p3, %r
  %p5 = fadd {ty} %p4, {c(4.1665795894E-2)}
  %p6 = fmul {ty} %p5, %r
  %p7 = fadd {ty} %p6, {c(1.6666665459E-1)}
  %p8 = fmul {ty} %p7, %r
  %p9 = fadd {ty} %p8, {c(5.0000001201E-1)}
  %r2 = fmul {ty} %r, %r
  %p10 = fmul {ty} %p9, %r2
  %p11 = fadd {ty} %p10, %r
  %y = fadd {ty} %p11, {c(1.0)}
  %n = fptosi {ty} %fx to {ity}
  %e = add {ity} %n, {ci(127)}
  %bits = shl {ity} %e, {ci(23)}
  %pow = bitcast {ity} %bits to {ty}
  %res = fmul {ty} %y, %pow
  %z = select {'i1' if n == 1 else '<8 x i1>'} %lo, {ty} {c(0.0)}, {ty} %res
  %nan = fcmp uno {ty} %x0, %x0
  %w = select {'i1' if n == 1 else '<8 x i1>'} %nan, {ty} %x0, {ty} %z
  ret {ty} %w
}}""")
    out.append("declare <8 x float> @llvm.minnum.v8f32(<8 x float>, <8 x float>)\n"
               "declare <8 x float> @llvm.maxnum.v8f32(<8 x float>, <8 x float>)\n"
               "declare <8 x float> @llvm.maximum.v8f32(<8 x float>, <8 x float>)")
    return "\n".join(out)


def _unary(op: str, f: Fn, x: str) -> str:
    if op == "SILU":      # x / (1 + exp(-x))
        e = f.call("float", "@exp_f", f"float {f.op(f'fneg float {x}')}")
        return f.op(f"fdiv float {x}, {f.op(f'fadd float 1.0, {e}')}")
    if op == "SIGMOID":
        e = f.call("float", "@exp_f", f"float {f.op(f'fneg float {x}')}")
        return f.op(f"fdiv float 1.0, {f.op(f'fadd float 1.0, {e}')}")
    if op == "GELU":      # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = f.op(f"fmul float {x}, {f.op(f'fmul float {x}, {x}')}")
        c3 = f.op(f"fmul float {f32(0.044715)}, {x3}")
        inner = f.op(f"fmul float {f32(0.7978845608028654)}, {f.op(f'fadd float {x}, {c3}')}")
        th = f.call("float", "@llvm.tanh.f32", f"float {inner}")
        return f.op(f"fmul float {f.op(f'fmul float 0.5, {x}')}, {f.op(f'fadd float 1.0, {th}')}")
    raise AssertionError(op)


# --------------------------------------------------------------------------- kernels
def emit(plan: Plan, step, index: int) -> tuple[list["K"], int]:
    """The kernels (phases) of one step, and the per-thread scratch bytes it needs."""
    n = step.node
    name = f"k{index}"
    gen = GENERATORS.get(step.kind)
    if gen is None:
        raise MoeGraphError(f"the llvm backend has no kernel for {step.kind} ({n!r})")
    kernels, scratch = gen(plan, n, name)
    for k in kernels:
        if k.work is None:
            k.work = tuple(n.shape)
    return kernels, scratch


def _views(plan: Plan, n: Node):
    return plan.views[n.id], [None if i is None else plan.views[i.id] for i in n.inputs]


def _scale(f: Fn, n: Node, x: str) -> str:
    sc, bias = f32(n.attrs["scale"]), f32(n.attrs["bias"])
    return f.op(f"fadd float {f.op(f'fmul float {x}, {sc}')}, {bias}")


def _clamp(f: Fn, n: Node, x: str) -> str:
    v = f.call("float", "@llvm.maximum.f32", f"float {x}", f"float {f32(n.attrs['min'])}")
    return f.call("float", "@llvm.minimum.f32", f"float {v}", f"float {f32(n.attrs['max'])}")


# One scalar expression per elementwise op of the op table: (f, node, *float inputs) -> value.
# An elementwise op is supported here exactly when it has an entry.
SCALAR = {
    "ADD": lambda f, n, a, b: f.op(f"fadd float {a}, {b}"),
    "MUL": lambda f, n, a, b: f.op(f"fmul float {a}, {b}"),
    "DIV": lambda f, n, a, b: f.op(f"fdiv float {a}, {b}"),
    "SCALE": lambda f, n, x: _scale(f, n, x),
    "SILU": lambda f, n, x: _unary("SILU", f, x),
    "SIGMOID": lambda f, n, x: _unary("SIGMOID", f, x),
    "GELU": lambda f, n, x: _unary("GELU", f, x),
    "CLAMP": _clamp,
    "CONT": lambda f, n, x: x,
    "CAST": lambda f, n, x: x,      # the store rounds to the output's dtype
    "SWIGLU": lambda f, n, g, u: f.op(f"fmul float {_unary('SILU', f, g)}, {u}"),
}


def k_elementwise(plan: Plan, n: Node, name: str):
    """Any elementwise op with a SCALAR expression (inputs broadcast to the output as ggml
    repeats them), and the copying RESHAPE."""
    if n.op == "RESHAPE":
        return [_copy_reshape(plan, n, name)], 0
    k = K(plan, name)
    f = k.f
    out, ins = _views(plan, n)
    L = out.shape[-1]
    if n.op == "SWIGLU" and ins[1] is None:   # merged [gate; up]: the two halves of each row
        operands = [(ins[0], 0), (ins[0], L)]
    else:
        operands = [(k.bview(v, out.shape), 0) for v in ins if v is not None]
    loop, outer = k.rows_loop(out.shape)
    with loop as r:
        idx = k.unflatten(r, outer) if outer else []
        # an input broadcast along the row is loaded once per row
        fixed = [k.load_f32(v, k.ptr(v, idx + ["0"])) if v.strides[-1] == 0 else None for v, _ in operands]
        with f.loop(0, k.dim(L)) as i:
            vals = [x if x is not None else k.load_f32(v, k.ptr(v, idx + [f.add(i, off) if off else i]))
                    for (v, off), x in zip(operands, fixed)]
            k.store_f32(out, SCALAR[n.op](f, n, *vals), k.ptr(out, idx + [i]))
    return [k], 0


def _copy_reshape(plan: Plan, n: Node, name: str) -> str:
    """Element-wise copy into a dense buffer, mapping the flat index through x's shape."""
    k = K(plan, name)
    f = k.f
    out, (x,) = _views(plan, n)
    total = k.count(out.shape)
    lo, hi = k.split(total)
    with f.loop(lo, hi) as e:
        oi = k.unflatten(e, out.shape)
        xi = k.unflatten(e, x.shape)
        k.store_f32(out, k.load_f32(x, k.ptr(x, xi)), k.ptr(out, oi))
    return k


def k_norm(plan: Plan, n: Node, name: str):
    k = K(plan, name)
    f = k.f
    out, ins = _views(plan, n)
    x = ins[0]
    w = k.bview(ins[1], out.shape) if len(ins) > 1 and ins[1] is not None else None
    L = out.shape[-1]
    loop, outer = k.rows_loop(out.shape)
    with loop as r:
        idx = k.unflatten(r, outer) if outer else []
        px = k.ptr(x, idx + ["0"])
        s, m = f.var("double", "0.0"), f.var("double", "0.0")
        if n.op == "NORM":
            with f.loop(0, L) as i:
                v = f.op(f"fpext float {f.load('float', f.gep('float', px, i))} to double")
                m.set(f.op(f"fadd double {m.get()}, {v}"))
            mean = f.op(f"fdiv double {m.get()}, {f64(L)}")
        with f.loop(0, L) as i:
            v = f.op(f"fpext float {f.load('float', f.gep('float', px, i))} to double")
            if n.op == "NORM":
                v = f.op(f"fsub double {v}, {mean}")
            s.set(f.op(f"fadd double {s.get()}, {f.op(f'fmul double {v}, {v}')}"))
        var = f.op(f"fadd double {f.op(f'fdiv double {s.get()}, {f64(L)}')}, {f64(n.attrs['eps'])}")
        inv = f.op(f"fdiv double 1.0, {f.call('double', '@llvm.sqrt.f64', f'double {var}')}")
        scale = f.op(f"fptrunc double {inv} to float")
        meanf = f.op(f"fptrunc double {mean} to float") if n.op == "NORM" else None
        po = k.ptr(out, idx + ["0"])
        pw = k.ptr(w, idx + ["0"]) if w is not None else None
        with f.loop(0, L) as i:
            v = f.load("float", f.gep("float", px, i))
            if meanf:
                v = f.op(f"fsub float {v}, {meanf}")
            y = f.op(f"fmul float {v}, {scale}")
            if pw is not None:
                y = f.op(f"fmul float {y}, {f.load('float', f.gep('float', pw, i) if w.strides[-1] else pw)}")
            f.store("float", y, f.gep("float", po, i), 4)
    return [k], 0


def _sink_term(f: Fn, sink: str | None, mx: str) -> str:
    """exp(sink - mx) in double (an attention sink's share of the softmax sum), or 0."""
    if sink is None:
        return "0.0"
    e = f.call("float", "@exp_f", f"float {f.op(f'fsub float {sink}, {mx}')}")
    return f.op(f"fpext float {e} to double")


def _exp_in_place(f: Fn, row: str, n, mx: str, sink: str | None = None) -> str:
    """row[i] = exp(row[i] - mx) for i < n; returns 1 / sum (the sum taken in double, as ggml),
    the sum with exp(sink - mx) where a sink is given."""
    total = f.var("double", _sink_term(f, sink, mx))
    with f.loop(0, n) as i:
        p = f.gep("float", row, i)
        x = f.load("float", p)
        e = f.call("float", "@exp_f", f"float {f.op(f'fsub float {x}, {mx}')}")
        f.store("float", e, p, 4)
        total.set(f.op(f"fadd double {total.get()}, {f.op(f'fpext float {e} to double')}"))
    return f.op(f"fptrunc double {f.op(f'fdiv double 1.0, {total.get()}')} to float")


def k_soft_max(plan: Plan, n: Node, name: str):
    k = K(plan, name)
    f = k.f
    out, ins = _views(plan, n)
    x, sinks = ins[0], ins[2]
    mask = k.bview(ins[1], out.shape) if ins[1] is not None else None
    L = k.dim(out.shape[-1])
    scale = f32(n.attrs["scale"])
    loop, outer = k.rows_loop(out.shape)
    with loop as r:
        idx = k.unflatten(r, outer) if outer else []
        px, po = k.ptr(x, idx + ["0"]), k.ptr(out, idx + ["0"])
        pm = k.ptr(mask, idx + ["0"]) if mask is not None else None
        sink = f.load("float", k.ptr(sinks, [idx[-2]])) if sinks is not None else None  # head: axis -3
        mx = f.var("float", sink or f32(-math.inf))
        with f.loop(0, L) as i:
            v = f.op(f"fmul float {f.load('float', f.gep('float', px, i))}, {scale}")
            if pm is not None:
                v = f.op(f"fadd float {v}, {f.load('float', f.gep('float', pm, i))}")
            f.store("float", v, f.gep("float", po, i), 4)
            mx.set(f.call("float", "@llvm.maxnum.f32", f"float {mx.get()}", f"float {v}"))   # a NaN flows through exp
        inv = _exp_in_place(f, po, L, mx.get(), sink)
        with f.loop(0, L) as i:
            p = f.gep("float", po, i)
            f.store("float", f.op(f"fmul float {f.load('float', p)}, {inv}"), p, 4)
    return [k], 0


def k_rope(plan: Plan, n: Node, name: str):
    """Per token: the cos/sin table once (ggml's float32 angle recurrence), then every head."""
    import numpy as np
    k = K(plan, name)
    f = k.f
    out, (x, pos, ff) = _views(plan, n)
    T, H, D = out.shape
    nd, mode = n.attrs["n_dims"], n.attrs["mode"]
    half = nd // 2
    step = f32(float(np.float32(n.attrs["freq_base"]) ** np.float32(-2.0 / nd)))
    fs = f32(n.attrs["freq_scale"])
    mix = rope_yarn_ramp(n.attrs)             # YaRN's per-pair mix (zeros without it)
    ms = rope_mscale(n.attrs)
    lo, hi = k.split(k.dim(T))
    cs = f.op(f"getelementptr float, ptr %tls, i64 0")
    sn = f.gep("float", "%tls", half)
    with f.loop(lo, hi) as t:
        p = f.op(f"sitofp i32 {f.load('i32', k.ptr(pos, [t]))} to float")
        th = f.var("float", p)
        with f.loop(0, half) as i:
            te = th.get()
            if ff is not None:               # Llama 3's rope_freqs: theta / ff_i
                te = f.op(f"fdiv float {te}, {f.load('float', k.ptr(ff, [i]))}")
            a = f.op(f"fmul float {te}, {fs}")
            if mix.any():                    # YaRN: the ramp per pair, as ggml computes it
                low, high = rope_yarn_corr_dims(n.attrs)
                span = f32(max(np.float32(0.001), np.float32(high - low)))
                fi = f.op(f"uitofp i64 {i} to float")
                y = f.op(f"fdiv float {f.op(f'fsub float {fi}, {f32(low)}')}, {span}")
                y = f.call("float", "@llvm.maximum.f32", "float 0.0", f"float {y}")
                y = f.call("float", "@llvm.minimum.f32", "float 1.0", f"float {y}")
                m = f.op(f"fmul float {f.op(f'fsub float 1.0, {y}')}, {f32(n.attrs['ext_factor'])}")
                keep = f.op(f"fmul float {a}, {f.op(f'fsub float 1.0, {m}')}")
                a = f.op(f"fadd float {keep}, {f.op(f'fmul float {te}, {m}')}")
            c = f.call("float", "@llvm.cos.f32", f"float {a}")
            sv = f.call("float", "@llvm.sin.f32", f"float {a}")
            if ms != 1.0:
                c, sv = f.op(f"fmul float {c}, {f32(ms)}"), f.op(f"fmul float {sv}, {f32(ms)}")
            f.store("float", c, f.gep("float", cs, i), 4)
            f.store("float", sv, f.gep("float", sn, i), 4)
            th.set(f.op(f"fmul float {th.get()}, {step}"))
        with f.loop(0, H) as h:
            px, po = k.ptr(x, [t, h, "0"]), k.ptr(out, [t, h, "0"])
            with f.loop(0, half) as i:
                if mode == 0:
                    i0 = f.op(f"mul i64 {i}, 2")
                    i1 = f.op(f"add i64 {i0}, 1")
                else:
                    i0, i1 = i, f.op(f"add i64 {i}, {half}")
                x0 = f.load("float", f.gep("float", px, i0))
                x1 = f.load("float", f.gep("float", px, i1))
                c = f.load("float", f.gep("float", cs, i))
                s = f.load("float", f.gep("float", sn, i))
                y0 = f.op(f"fsub float {f.op(f'fmul float {x0}, {c}')}, {f.op(f'fmul float {x1}, {s}')}")
                y1 = f.op(f"fadd float {f.op(f'fmul float {x0}, {s}')}, {f.op(f'fmul float {x1}, {c}')}")
                f.store("float", y0, f.gep("float", po, i0), 4)
                f.store("float", y1, f.gep("float", po, i1), 4)
            with f.loop(nd, D) as i:
                f.store("float", f.load("float", f.gep("float", px, i)), f.gep("float", po, i), 4)
    return [k], 8 * half


def k_top_k(plan: Plan, n: Node, name: str):
    """k passes of arg-max; ties go to the lower index (a stable descending sort)."""
    k = K(plan, name)
    f = k.f
    out, (x,) = _views(plan, n)
    E = x.shape[-1]
    loop, outer = k.rows_loop(out.shape)
    with loop as r:
        idx = k.unflatten(r, outer) if outer else []
        px, po = k.ptr(x, idx + ["0"]), k.ptr(out, idx + ["0"])
        last_v, last_i = f.var("float", f32(math.inf)), f.var("i64", "-1")
        with f.loop(0, n.attrs["k"]) as j:
            best_v, best_i = f.var("float", f32(-math.inf)), f.var("i64", "-1")
            lv, li = last_v.get(), last_i.get()
            with f.loop(0, k.dim(E)) as i:
                v = f.load("float", f.gep("float", px, i))
                eq = f.op(f"fcmp oeq float {v}, {lv}")
                later = f.op(f"icmp sgt i64 {i}, {li}")
                after = f.op(f"or i1 {f.op(f'fcmp olt float {v}, {lv}')}, {f.op(f'and i1 {eq}, {later}')}")
                better = f.op(f"or i1 {f.op(f'fcmp ogt float {v}, {best_v.get()}')}, {f.op(f'icmp eq i64 {best_i.get()}, -1')}")
                take = f.op(f"and i1 {after}, {better}")
                best_v.set(f.op(f"select i1 {take}, float {v}, float {best_v.get()}"))
                best_i.set(f.op(f"select i1 {take}, i64 {i}, i64 {best_i.get()}"))
            f.store("i32", f.op(f"trunc i64 {best_i.get()} to i32"), f.gep("i32", po, j), 4)
            last_v.set(best_v.get())
            last_i.set(best_i.get())
    return [k], 0


def k_group_mask(plan: Plan, n: Node, name: str):
    """Per row: each group's top-2 sum (in %tls), n_used arg-max passes over the groups (ties to
    the lower index, as TOP_K), then the row with the other groups' entries -inf."""
    k = K(plan, name)
    f = k.f
    out, (x,) = _views(plan, n)
    G, used = n.attrs["n_groups"], n.attrs["n_used"]
    S = x.shape[-1] // G
    ninf = f32(-math.inf)
    gs, keep = "%tls", f.gep("float", "%tls", G)       # group scores, kept flags (1.0 / 0.0)
    loop, outer = k.rows_loop(out.shape)
    with loop as r:
        idx = k.unflatten(r, outer) if outer else []
        px, po = k.ptr(x, idx + ["0"]), k.ptr(out, idx + ["0"])
        with f.loop(0, G) as g:
            m1, m2 = f.var("float", ninf), f.var("float", ninf)
            with f.loop(0, S) as i:
                v = f.load("float", f.gep("float", px, f.add(f.mul(g, S), i)))
                top = f.op(f"fcmp ogt float {v}, {m1.get()}")
                second = f.op(f"fcmp ogt float {v}, {m2.get()}")
                m2.set(f.op(f"select i1 {top}, float {m1.get()}, float {f.op(f'select i1 {second}, float {v}, float {m2.get()}')}"))
                m1.set(f.op(f"select i1 {top}, float {v}, float {m1.get()}"))
            f.store("float", f.op(f"fadd float {m1.get()}, {m2.get()}"), f.gep("float", gs, g), 4)
            f.store("float", "0.0", f.gep("float", keep, g), 4)
        with f.loop(0, used):
            best_v, best_g = f.var("float", ninf), f.var("i64", "-1")
            with f.loop(0, G) as g:
                v = f.load("float", f.gep("float", gs, g))
                free = f.op(f"fcmp oeq float {f.load('float', f.gep('float', keep, g))}, 0.0")
                better = f.op(f"or i1 {f.op(f'fcmp ogt float {v}, {best_v.get()}')}, {f.op(f'icmp eq i64 {best_g.get()}, -1')}")
                take = f.op(f"and i1 {free}, {better}")
                best_v.set(f.op(f"select i1 {take}, float {v}, float {best_v.get()}"))
                best_g.set(f.op(f"select i1 {take}, i64 {g}, i64 {best_g.get()}"))
            f.store("float", "1.0", f.gep("float", keep, best_g.get()), 4)
        with f.loop(0, k.dim(x.shape[-1])) as i:
            kept = f.op(f"fcmp oeq float {f.load('float', f.gep('float', keep, f.udiv(i, S)))}, 1.0")
            v = f.load("float", f.gep("float", px, i))
            f.store("float", f.op(f"select i1 {kept}, float {v}, float {ninf}"), f.gep("float", po, i), 4)
    return [k], 8 * G


def k_sum(plan: Plan, n: Node, name: str):
    k = K(plan, name)
    f = k.f
    out, (x,) = _views(plan, n)
    ax = n.attrs["axis"] % x.rank
    total = k.count(out.shape)
    lo, hi = k.split(total)
    with f.loop(lo, hi) as e:
        oi = k.unflatten(e, out.shape)
        acc = f.var("float", "0.0")
        with f.loop(0, k.dim(x.shape[ax])) as j:
            xi = oi[:ax] + [j] + oi[ax:]
            acc.set(f.op(f"fadd float {acc.get()}, {k.load_f32(x, k.ptr(x, xi))}"))
        f.store("float", acc.get(), k.ptr(out, oi), 4)
    return [k], 0


def k_concat(plan: Plan, n: Node, name: str):
    k = K(plan, name)
    f = k.f
    out = plan.views[n.id]
    ax = n.attrs["axis"] % out.rank
    start = 0
    for xn in n.inputs:
        x = plan.views[xn.id]
        total = k.count(x.shape)
        lo, hi = k.split(total)
        with f.loop(lo, hi) as e:
            xi = k.unflatten(e, x.shape)
            oi = list(xi)
            oi[ax] = f.op(f"add i64 {xi[ax]}, {start}")
            if out.dtype in (F32, F16, BF16):
                k.store_f32(out, k.load_f32(x, k.ptr(x, xi)), k.ptr(out, oi))
            else:
                f.store("i32", f.load("i32", k.ptr(x, xi)), k.ptr(out, oi))
        start += xn.shape[ax]
    return [k], 0


def k_set_rows(plan: Plan, n: Node, name: str):
    k = K(plan, name)
    f = k.f
    dst, src, idx = (plan.views[i.id] for i in n.inputs)
    R = dst.shape[0]
    rows = k.count(src.shape[:-1])
    lo, hi = k.split(rows)
    with f.loop(lo, hi) as r:
        si = k.unflatten(r, src.shape[:-1])
        row = f.op(f"sext i32 {f.load('i32', k.ptr(idx, [si[0]]))} to i64")
        ok = f.op(f"icmp ult i64 {row}, {k.dim(R)}")    # never write out of bounds
        with f.if_(ok):
            ps = k.ptr(src, si + ["0"])
            pd = k.ptr(dst, [row] + si[1:] + ["0"])
            ty = LLTYPE[dst.dtype]
            with f.loop(0, k.dim(src.shape[-1])) as i:
                v = k.load_f32(src, f.gep("float", ps, i))
                k.store_f32(dst, v, f.gep(ty, pd, i))
    return [k], 0


def k_get_rows(plan: Plan, n: Node, name: str):
    k = K(plan, name)
    f = k.f
    out, (table, ids) = _views(plan, n)
    C = table.shape[-1]
    R = table.shape[-2]
    loop, outer = k.rows_loop(out.shape)
    t = table.dtype
    scratch = unpacked_bytes(t, C) if is_quantized(t) else 0
    with loop as r:
        oi = k.unflatten(r, outer) if outer else []
        row = f.op(f"sext i32 {f.load('i32', k.ptr(ids, oi))} to i64")
        ok = f.op(f"icmp ult i64 {row}, {k.dim(R)}")
        rowc = f.op(f"select i1 {ok}, i64 {row}, i64 0")   # out-of-range ids read row 0 (validated upstream)
        ti = oi[len(oi) - 1 - (table.rank - 2):-1] + [rowc]    # the table's own batch dims
        po = k.ptr(out, oi + ["0"])
        if is_quantized(t):
            pw = k.ptr(table, ti)
            f.call("void", f"@unpack_{t.name}", f"ptr {pw}", "ptr %tls", f"i64 {C}")
            f.call("void", f"@dequant_{t.name}", "ptr %tls", f"ptr {po}", f"i64 {C}")
        else:
            with f.loop(0, k.dim(C)) as i:
                v = k.load_f32(table, k.ptr(table, ti + [i]))
                f.store("float", v, f.gep("float", po, i), 4)
    return [k], scratch


def _act_quant_phase(k: K, b: View, rows_dims, vt, Kdim: int, dst: str) -> None:
    """Phase 1 of a matmul: activation rows -> vec_dot_type rows (dense) at dst."""
    f = k.f
    n = k.count(rows_dims)
    lo, hi = k.split(n)
    rb = act_row_bytes(vt, Kdim)
    with f.loop(lo, hi) as r:
        bi = k.unflatten(r, rows_dims)
        pb = k.ptr(b, bi + ["0"])
        pd = f.gep("i8", dst, f.op(f"mul i64 {r}, {rb}"))
        if vt in (GGMLType.Q8_0, GGMLType.Q8_1, GGMLType.Q8_K):
            f.call("void", f"@quant_{vt.name}", f"ptr {pb}", f"ptr {pd}", f"i64 {Kdim}")
        else:   # F16 / BF16 activations
            with f.loop(0, Kdim) as i:
                v = f.load("float", f.gep("float", pb, i))
                if vt == F16:
                    f.store("half", f.op(f"fptrunc float {v} to half"), f.gep("half", pd, i), 2)
                else:
                    f.store("i16", k.to_bf16(v), f.gep("i16", pd, i), 2)


def _products(k: K, wt, rows: list, wstride: int, n_rows: int, Kdim: int, M: str, locate, act_ptr, store,
              act_rb: int, combine=None, shape=None, all_rows: bool = False) -> None:
    """out(m, j) = weight row j . activation row m for this thread's share of the n_rows rows and
    all M activation rows, in tiles (gemm.py): units of U rows, each as RW x RA tiles over the
    activations and U x 1 tiles for the activations left over (all of them when decoding); the
    rows left over after the last full unit go 1 x RA / 1 x 1. all_rows: this thread does every
    row (whole experts scheduled across threads). Activations go in chunks that stay in
    L2 while this thread's rows pass over them. rows: one function per weight tensor (j -> pointer
    to row j); with two (SWIGLU's gate and up) combine(g, u, n) merges their <n x float> results.
    locate(m) -> a handle on activation row m, computed once per tile; act_ptr(handle) -> the row
    (in vec_dot_type); store(handle, j, value)."""
    f = k.f
    RW, RA, U = shape or tile_shape(wt)
    U = min(U, n_rows)
    RW = min(RW, U)
    chunk = max(RA, (1 << 17) // max(act_rb, 1) // RA * RA)
    units = -(-n_rows // U)
    ulo, uhi = ("0", str(units)) if all_rows else k.split(str(units))

    def tile(rw, ra, j, m):
        k.plan.codegen.setdefault("tiles", set()).add((wt, rw, ra))
        n = rw * ra
        where = [locate(m if c == 0 else f.add(m, c)) for c in range(ra)]
        acts = [f"ptr {act_ptr(x)}" for x in where]
        vs = [f.call(f"<{n} x float>", tile_name(wt, rw, ra), f"ptr {row(j)}", f"i64 {wstride}", *acts,
                     f"i64 {Kdim}") for row in rows]
        v = combine(*vs, n) if combine else vs[0]
        for r in range(rw):
            jr = f.add(j, r) if r else j
            for c in range(ra):
                store(where[c], jr, f.op(f"extractelement <{n} x float> {v}, i64 {r * ra + c}"))

    def over_acts(u, rw, j, m0, m1, mfull):
        with f.loop(m0, mfull, RA) as m:
            for r in range(0, u, rw):
                tile(rw, RA, f.add(j, r) if r else j, m)
        with f.loop(mfull, m1) as m:
            tile(u, 1, j, m)

    with f.loop(0, M, chunk) as m0:
        end = f.add(m0, chunk)
        m1 = f.op(f"select i1 {f.op(f'icmp slt i64 {end}, {M}')}, i64 {end}, i64 {M}")
        mfull = f.add(m0, f.mul(f.udiv(f.sub(m1, m0), RA), RA))
        with f.loop(ulo, uhi) as u:
            j0 = f.mul(u, U)
            if n_rows % U == 0:
                over_acts(U, RW, j0, m0, m1, mfull)
            else:                       # only the last unit is short
                full = f.op(f"icmp ule i64 {f.add(j0, U)}, {n_rows}")
                with f.if_(full):
                    over_acts(U, RW, j0, m0, m1, mfull)
                with f.if_(f.op(f"xor i1 {full}, true")):
                    with f.loop(j0, n_rows) as j:
                        over_acts(1, 1, j, m0, m1, mfull)


def _swiglu(f: Fn, g: str, u: str, n: int) -> str:
    """silu(g) * u on <n x float>, 8 lanes at a time through the vector exp."""
    parts, one = [], splat("float", 8, "1.0")
    for c0 in range(0, n, 8):
        lanes = [min(c0 + i, n - 1) for i in range(8)]           # short tails repeat a lane
        mask = "<8 x i32> <" + ", ".join(f"i32 {i}" for i in lanes) + ">"
        g8, u8 = (f.op(f"shufflevector <{n} x float> {x}, <{n} x float> poison, {mask}") for x in (g, u))
        e = f.call("<8 x float>", "@exp_v", f"<8 x float> {f.op(f'fneg <8 x float> {g8}')}")
        sg = f.op(f"fdiv <8 x float> {g8}, {f.op(f'fadd <8 x float> {one}, {e}')}")
        parts.append(f.op(f"fmul <8 x float> {sg}, {u8}"))
    out = "poison"
    for i in range(n):
        v = f.op(f"extractelement <8 x float> {parts[i // 8]}, i64 {i % 8}")
        out = f.op(f"insertelement <{n} x float> {out}, float {v}, i64 {i}")
    return out


def _esize(t) -> int:
    """Bytes per stride unit of a weight view (quantized views count bytes)."""
    return 1 if is_quantized(t) else elem_size(t)


def _weight_layout(plan: Plan, w: Node, v: View):
    """(bytes per row, bytes per expert, tile shape or None) of a product's weight. A repacked
    (x8) tensor has the raw size and the same 8-row group offsets, so 'row j' (j % 8 == 0) is at
    x8_row_bytes(...) (gemm.py)."""
    if w.id in plan.repacked:
        row = x8_row_bytes(v.dtype, v.shape[-1])
        return row, row * v.shape[-2], X8_TILE
    es = _esize(v.dtype)
    return v.strides[-2] * es, (v.strides[-3] * es if v.rank >= 3 else 0), None


def k_mul_mat(plan: Plan, n: Node, name: str):
    """y = b . a^T on a weight a [N, K], or batched on a [B, N, K] with b [B, M.., K] (one
    weight matrix per batch entry: MLA's per-head k_b/v_b)."""
    out, (a, b) = _views(plan, n)
    if a.rank not in (2, 3) or (a.rank == 3 and b.shape[0] != a.shape[0]):
        raise MoeGraphError(f"llvm backend: MUL_MAT of a {list(a.shape)} weight on {list(b.shape)} "
                            f"(broadcast batches) is not supported ({n!r})")
    B = a.shape[0] if a.rank == 3 else 1
    N, Kdim = a.shape[-2:]
    wt = a.dtype
    vt = vec_dot_type(wt)
    rows_dims = b.shape[:-1]
    act_rb = act_row_bytes(vt, Kdim)
    scratch_off = plan.scratch.get(n.id)
    phases = []
    converted = vt != F32            # activations rounded to vec_dot_type in phase 1
    if converted and n.id not in plan.shared_act:   # (unless another product did it already)
        k1 = K(plan, name + "a")
        _act_quant_phase(k1, b, rows_dims, vt, Kdim, k1.operand(0, scratch_off))
        k1.work = (*rows_dims, Kdim)
        phases.append(k1)
    k2 = K(plan, name + "b")
    k2.work = (*rows_dims, N, Kdim)
    f = k2.f
    es = _esize(wt)
    acts = k2.operand(0, scratch_off) if converted else None
    wbase = k2.operand(a.slot, a.offset * es)
    wrow, wbatch, shape = _weight_layout(plan, n.inputs[0], a)
    if B == 1:
        def act_ptr(m):
            if converted:
                return f.gep("i8", acts, f.mul(m, act_rb))
            return k2.ptr(b, k2.unflatten(m, rows_dims) + ["0"])

        def store(m, j, v):
            f.store("float", v, f.gep("float", k2.operand(0, out.offset * 4), f.add(f.mul(m, N), j)), 4)
        _products(k2, wt, [lambda j: f.gep("i8", wbase, f.mul(j, wrow))], wrow, N, Kdim,
                  k2.count(rows_dims), lambda m: m, act_ptr, store, act_rb, shape=shape)
    else:   # batch bi: weight bi on activation rows (bi, m); buffers are strided by max shapes
        M = k2.count(rows_dims[1:])
        with f.loop(0, B) as bi:
            wb = f.gep("i8", wbase, f.mul(bi, wbatch))
            index = lambda m, bi=bi: [bi] + k2.unflatten(m, rows_dims[1:])

            def act_ptr(m, bi=bi):   # converted rows are dense over (B, M)
                if converted:
                    return f.gep("i8", acts, f.mul(f.add(f.mul(bi, M), m), act_rb))
                return k2.ptr(b, index(m) + ["0"])

            def store(m, j, v):
                f.store("float", v, k2.ptr(out, index(m) + [j]), 4)
            _products(k2, wt, [lambda j, wb=wb: f.gep("i8", wb, f.mul(j, wrow))], wrow, N, Kdim, M,
                      lambda m: m, act_ptr, store, act_rb, shape=shape)
    phases.append(k2)
    return phases, 0


def claim_counter(plan: Plan) -> tuple[int, int]:
    """(slot, byte offset) of a new pair of zeroed counters that persist across runs (the
    executable allocates the "counters" slot: 128 bytes per pair, two cache lines)."""
    cg = plan.codegen
    if "counter_slot" not in cg:
        cg["counter_slot"] = plan.slot("counters", None)
        cg["counters"] = 0
    cg["counters"] += 1
    return cg["counter_slot"], 128 * (cg["counters"] - 1)


def k_mul_mat_id(plan: Plan, n: Node, name: str):
    """MUL_MAT_ID, and MOE_SWIGLU: silu(gate . x) * (up . x) per selected expert, from a merged
    [gate; up] tensor or two tensors, without storing either product (ik_llama.cpp's fused MoE
    up/gate)."""
    m = plan.moe_operands(n)
    out, a, b, ids, a_up, up_row0 = m.out, m.a, m.b, m.ids, m.a_up, m.up_row0
    E, N, Kdim, T, S, kk = m.E, m.N, m.K, m.T, m.S, m.kk
    scratch_node = m.scratch_node
    wt = a.dtype
    vt = vec_dot_type(wt)
    act_rb = act_row_bytes(vt, Kdim)
    base_off = plan.scratch[scratch_node.id]
    converted = vt != F32
    per_t = math.prod(plan.max_shape((T,))) * kk
    phases = []
    if converted:    # phase 1, row-wise (the lowering may run it with the steps before)
        k1 = K(plan, name + "a")
        k1.work = (T, S, Kdim)
        _act_quant_phase(k1, b, b.shape[:-1], vt, Kdim, k1.operand(0, base_off))
        phases.append(k1)
    k2 = K(plan, name + "b")
    k2.work = (T, kk, N, Kdim) if a_up is None else (T, kk, 2 * N, Kdim)
    f = k2.f
    # every thread buckets the (token, slot) pairs by expert for itself, in its scratch (a
    # counting sort: no barrier, no shared counters): cnt[E], off[E], active[E], lst[T * k]
    cnt = "%tls"
    off = f.gep("i32", cnt, E)
    active = f.gep("i32", cnt, 2 * E)
    lst = f.gep("i32", cnt, 3 * E)
    with f.loop(0, E) as e:
        f.store("i32", "0", f.gep("i32", cnt, e), 4)

    def each_choice(body):
        with f.loop(0, k2.dim(T)) as t:
            with f.loop(0, kk) as j:
                ev = f.op(f"sext i32 {f.load('i32', k2.ptr(ids, [t, j]))} to i64")
                with f.if_(f.op(f"icmp ult i64 {ev}, {E}")):   # out-of-range ids choose nothing
                    body(t, j, f.gep("i32", cnt, ev), ev)
    each_choice(lambda t, j, pc, ev: f.store("i32", f.op(f"add i32 {f.load('i32', pc, 4)}, 1"), pc, 4))
    # offsets, the active experts (those with tokens) and their number; counts restart for the fill
    n_act, total = f.var("i32", "0"), f.var("i32", "0")
    with f.loop(0, E) as e:
        pc = f.gep("i32", cnt, e)
        c = f.load("i32", pc, 4)
        f.store("i32", total.get(), f.gep("i32", off, e), 4)
        with f.if_(f.op(f"icmp sgt i32 {c}, 0")):
            f.store("i32", f.op(f"trunc i64 {e} to i32"), f.gep("i32", active, f.op(f"sext i32 {n_act.get()} to i64")), 4)
            n_act.set(f.op(f"add i32 {n_act.get()}, 1"))
        total.set(f.op(f"add i32 {total.get()}, {c}"))
        f.store("i32", "0", pc, 4)

    def fill(t, j, pc, ev):
        c = f.load("i32", pc, 4)
        slot = f.op(f"add i32 {f.load('i32', f.gep('i32', off, ev), 4)}, {c}")
        f.store("i32", f.op(f"trunc i64 {f.add(f.mul(t, kk), j)} to i32"), f.gep("i32", lst, f.op(f"sext i32 {slot} to i64")), 4)
        f.store("i32", f.op(f"add i32 {c}, 1"), pc, 4)
    each_choice(fill)
    n_act, total = n_act.get(), total.get()
    acts = k2.operand(0, base_off)
    es = _esize(wt)

    def expert(e, all_rows):
        c = f.op(f"sext i32 {f.load('i32', f.gep('i32', cnt, e), 4)} to i64")
        with f.if_(f.op(f"icmp sgt i64 {c}, 0")):
            def row_fn(w, wnode, row0):
                wrow, wexp, _ = _weight_layout(plan, wnode, w)
                base = f.gep("i8", k2.operand(w.slot, w.offset * es), f.mul(e, wexp))
                return lambda j: f.gep("i8", base, f.mul(f.add(j, row0) if row0 else j, wrow))
            rows = [row_fn(a, m.weight, 0)]
            if a_up is not None:
                rows.append(row_fn(a_up, m.up_weight, up_row0))

            def entry(q):   # (token, slot) of the q-th selection of expert e
                first = f.op(f"sext i32 {f.load('i32', f.gep('i32', off, e), 4)} to i64")
                tj = f.op(f"sext i32 {f.load('i32', f.gep('i32', lst, f.add(first, q)), 4)} to i64")
                return f.udiv(tj, kk), f.urem(tj, kk)

            def act_ptr(where):
                t, jj = where
                srow = jj if S != 1 else "0"
                if converted:
                    return f.gep("i8", acts, f.mul(f.add(f.mul(t, S), srow), act_rb))
                return k2.ptr(b, [t, srow, "0"])

            def store(where, j, v):
                f.store("float", v, k2.ptr(out, [where[0], where[1], j]), 4)
            wrow, _, shape = _weight_layout(plan, m.weight, a)
            if a_up is not None:    # gate and up tiles are called alike: same type, same layout
                assert _weight_layout(plan, m.up_weight, a_up)[::2] == (wrow, shape)
            _products(k2, wt, rows, wrow, N, Kdim, c, entry, act_ptr, store, act_rb,
                      None if a_up is None else (lambda g, u, n: _swiglu(f, g, u, n)), shape=shape,
                      all_rows=all_rows)
    # Many active experts (>= 2 per thread): whole experts, claimed one at a time from a counter
    # shared by the threads (uneven token counts and a descheduled thread balance themselves);
    # the last thread to stop claiming resets it for the next run. Few: every expert's rows
    # split among the threads.
    whole = f.op(f"icmp uge i64 {f.op(f'zext i32 {n_act} to i64')}, {f.op('mul i64 %nth, 2')}")
    with f.if_(whole):
        claim = k2.operand(*claim_counter(plan))
        done = f.gep("i8", claim, 64)
        with f.loop(0, n_act, ty="i32") as _:
            q = f.op(f"atomicrmw add ptr {claim}, i32 1 seq_cst")
            with f.if_(f.op(f"icmp slt i32 {q}, {n_act}")):
                expert(f.op(f"sext i32 {f.load('i32', f.gep('i32', active, f.op(f'sext i32 {q} to i64')), 4)} to i64"), True)
        d = f.op(f"atomicrmw add ptr {done}, i32 1 seq_cst")
        with f.if_(f.op(f"icmp eq i64 {f.op(f'zext i32 {d} to i64')}, {f.op('sub i64 %nth, 1')}")):
            f(f"store atomic i32 0, ptr {claim} seq_cst, align 4")
            f(f"store atomic i32 0, ptr {done} seq_cst, align 4")
    with f.if_(f.op(f"xor i1 {whole}, true")):
        with f.loop(0, E) as e:
            expert(e, False)
    phases.append(k2)
    return phases, 4 * (3 * E + per_t) + 64


V8F = "<8 x float>"


def _exp8_in_place(f: Fn, row: str, n: str, mx: str, sink: str | None = None) -> str:
    """row[i] = exp(row[i] - mx) for i < n, 8 lanes at a time (row has room for 8 more; lanes
    past n become 0); returns 1 / sum, the sum taken in double (as ggml's soft_max), with
    exp(sink - mx) where a sink is given."""
    def bcast(ty, x):
        one = f.op(f"insertelement <8 x {ty}> poison, {ty} {x}, i64 0")
        return f.op(f"shufflevector <8 x {ty}> {one}, <8 x {ty}> poison, <8 x i32> zeroinitializer")
    total = f.var("<8 x double>", "zeroinitializer")
    mxv, nv = bcast("float", mx), bcast("i64", n)
    lane = "<" + ", ".join(f"i64 {i}" for i in range(8)) + ">"
    with f.loop(0, n, 8) as i:
        p = f.gep("float", row, i)
        x = f.op(f"fsub <8 x float> {f.load(V8F, p, 4)}, {mxv}")
        e = f.call(V8F, "@exp_v", f"<8 x float> {x}")
        idx = f.op(f"add <8 x i64> {bcast('i64', i)}, {lane}")
        live = f.op(f"icmp slt <8 x i64> {idx}, {nv}")
        e = f.op(f"select <8 x i1> {live}, <8 x float> {e}, <8 x float> zeroinitializer")
        f.store(V8F, e, p, 4)
        total.set(f.op(f"fadd <8 x double> {total.get()}, {f.op(f'fpext <8 x float> {e} to <8 x double>')}"))
    tot = f.call("double", "@llvm.vector.reduce.fadd.v8f64", "double 0.0", f"<8 x double> {total.get()}")
    if sink is not None:
        tot = f.op(f"fadd double {tot}, {_sink_term(f, sink, mx)}")
    return f.op(f"fptrunc double {f.op(f'fdiv double 1.0, {tot}')} to float")


def k_attention(plan: Plan, n: Node, name: str):
    """out[h, t, :] = softmax(scale * q[t, h] . k[j, h/g] + mask[t, j]) . v[j, h/g]. A work item
    is one token and one KV head with its g query heads, so each cached K and V row is loaded and
    converted once for g heads; output rows stay in vector registers. Only cells up to the last
    unmasked one are visited (for a causal mask: up to the token's own position); scores go four
    keys at a time (one transpose-and-add for their sums), exp eight at a time. With an F16 cache,
    q and the probabilities are rounded to F16 first (as ggml-cpu's F16 matmuls do)."""
    k = K(plan, name)
    f = k.f
    out = plan.views[n.id]
    q, kc, vc, mask, sinks = (plan.views[x.id] if x is not None else None for x in n.inputs)
    k.work = (q.shape[0], q.shape[1], "KV", q.shape[2])
    T, H, D = q.shape
    KV, Hkv, Dv = vc.shape
    if D % 8 or Dv % 8:
        raise MoeGraphError(f"llvm attention needs head dims divisible by 8, got {D} and {Dv}")
    g = H // Hkv
    row = plan.maxes["KV"] + 16                       # a head's scores, with room past the end
    scale = f32(n.attrs["scale"])
    Tv, KVv = k.dim(T), k.dim(KV)
    lo, hi = k.split(f.op(f"mul i64 {Tv}, {Hkv}"))
    scores = "%tls"                                   # [g, row] floats
    qbuf = f.gep("float", "%tls", g * row)            # [g, D] floats
    ninf = f32(-math.inf)

    def vec(p, dtype, i):
        if dtype == F16:
            return f.op(f"fpext <8 x half> {f.load('<8 x half>', f.gep('half', p, 8 * i), 2)} to <8 x float>")
        return f.load("<8 x float>", f.gep("float", p, 8 * i), 4)
    with f.loop(lo, hi) as it:
        hk = f.op(f"urem i64 {it}, {Hkv}")
        t = f.op(f"udiv i64 {it}, {Hkv}")
        for hh in range(g):
            pq = k.ptr(q, [t, f.add(f.mul(hk, g), hh), "0"])
            with f.loop(0, D) as i:
                v = f.load("float", f.gep("float", pq, i))
                if kc.dtype == F16:
                    v = f.op(f"fpext half {f.op(f'fptrunc float {v} to half')} to float")
                f.store("float", v, f.gep("float", qbuf, f.add(i, hh * D)), 4)
        qv = [[vec(f.gep("float", qbuf, hh * D), F32, i) for i in range(D // 8)] for hh in range(g)]
        pm = k.ptr(k.bview(mask, (T, KV)), [t, "0"])
        end = f.var("i64", "0")                       # 1 + the last unmasked cell
        with f.loop(0, KVv) as j:
            live = f.op(f"fcmp ogt float {f.load('float', f.gep('float', pm, j))}, {ninf}")
            end.set(f.op(f"select i1 {live}, i64 {f.add(j, 1)}, i64 {end.get()}"))
        kv_end = end.get()
        sink = [f.load("float", k.ptr(sinks, [f.add(f.mul(hk, g), hh)])) if sinks is not None else None
                for hh in range(g)]                   # gpt-oss: one more logit per head
        mx = [f.var("float", sink[hh] or ninf) for hh in range(g)]
        with f.loop(0, kv_end, 4) as j0:
            keys = [f.op(f"select i1 {f.op(f'icmp slt i64 {f.add(j0, i)}, {kv_end}')}, i64 {f.add(j0, i)}, i64 {f.sub(kv_end, 1)}")
                    for i in range(4)]              # past the end: recompute the last key, unused
            accs = [["zeroinitializer"] * 4 for _ in range(g)]
            for i, j in enumerate(keys):
                pk = k.ptr(kc, [j, hk, "0"])
                for d in range(D // 8):
                    kv = vec(pk, kc.dtype, d)
                    for hh in range(g):
                        accs[hh][i] = f.call("<8 x float>", "@llvm.fma.v8f32", f"<8 x float> {qv[hh][d]}",
                                             f"<8 x float> {kv}", f"<8 x float> {accs[hh][i]}")
            for hh in range(g):
                for i, dot in enumerate(reduce_many(f, accs[hh])):
                    ji = f.add(j0, i)
                    mv = f.load("float", f.gep("float", pm, keys[i]))
                    sc = f.op(f"fadd float {f.op(f'fmul float {dot}, {scale}')}, {mv}")
                    f.store("float", sc, f.gep("float", scores, f.add(ji, hh * row)), 4)
                    ok = f.op(f"icmp slt i64 {ji}, {kv_end}")
                    mx[hh].set(f.op(f"select i1 {ok}, float {f.call('float', '@llvm.maxnum.f32', f'float {mx[hh].get()}', f'float {sc}')}, float {mx[hh].get()}"))
        invs = [_exp8_in_place(f, f.gep("float", scores, hh * row), kv_end, mx[hh].get(), sink[hh])
                for hh in range(g)]
        acc = [[f.var("<8 x float>", "zeroinitializer") for _ in range(Dv // 8)] for _ in range(g)]
        with f.loop(0, kv_end) as j:
            pv = k.ptr(vc, [j, hk, "0"])
            ps = []
            for hh in range(g):
                p = f.op(f"fmul float {f.load('float', f.gep('float', scores, f.add(j, hh * row)))}, {invs[hh]}")
                if vc.dtype == F16:
                    p = f.op(f"fpext half {f.op(f'fptrunc float {p} to half')} to float")
                ps.append(f.op(f"shufflevector <8 x float> {f.op(f'insertelement <8 x float> poison, float {p}, i64 0')}, "
                               "<8 x float> poison, <8 x i32> zeroinitializer"))
            for i in range(Dv // 8):
                vv = vec(pv, vc.dtype, i)
                for hh in range(g):
                    acc[hh][i].set(f.call("<8 x float>", "@llvm.fma.v8f32", f"<8 x float> {ps[hh]}",
                                          f"<8 x float> {vv}", f"<8 x float> {acc[hh][i].get()}"))
        for hh in range(g):
            po = k.ptr(out, [f.add(f.mul(hk, g), hh), t, "0"])
            for i in range(Dv // 8):
                f.store("<8 x float>", acc[hh][i].get(), f.gep("float", po, 8 * i), 4)
    return [k], 4 * (g * row + g * D + 16)


GENERATORS = {
    **{op: k_elementwise for op in (*SCALAR, "RESHAPE")},
    "RMS_NORM": k_norm, "NORM": k_norm, "SOFT_MAX": k_soft_max, "ROPE": k_rope, "TOP_K": k_top_k,
    "GROUP_MASK": k_group_mask,
    "SUM": k_sum, "CONCAT": k_concat, "SET_ROWS": k_set_rows, "GET_ROWS": k_get_rows,
    "MUL_MAT": k_mul_mat, "MUL_MAT_ID": k_mul_mat_id, "ATTENTION": k_attention,
    "MOE_SWIGLU": k_mul_mat_id,
}
