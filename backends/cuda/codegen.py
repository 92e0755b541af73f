"""CUDA C for a planned graph: one kernel (or a few phases) per Step of the backend-neutral Plan
(backends/llvm/plan.py), shapes and strides baked in as constants, symbolic dims (T, KV) read
from a small device array at run time, every index bounds-checked.

Every kernel has the signature  k(const long long* syms, char* p0, char* p1, ...)  where pN are
operand pointers (slot base + byte offset, computed by the runtime), so identical kernels of
different layers share one function. Each kernel loops grid-stride over its work items, so any
grid size is correct; the runtime sizes grids from the bound dims (or their maxima when a CUDA
graph is captured).

Work-item modes: "thread" (one thread per item), "warp" (one warp per item, 4 warps a block),
"block" (one block per item), "single" (one block in all)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from moegraph.errors import MoeGraphError
from moegraph.ir import BF16, F16, F32, I32, Node, rope_mscale, rope_yarn_corr_dims, rope_yarn_ramp
from moegraph.quants import GGMLType as G
from moegraph.quants import block_size, is_quantized, row_bytes, type_size, vec_dot_type

from ..lower import SYMBOLS, Plan, Target, View, elem_size, graph_n_ctx, lower

HEADER = (Path(__file__).with_name("header.cu")).read_text()
CTYPE = {F32: "float", F16: "u16", BF16: "u16", I32: "int"}
DOT_TYPES = (G.Q8_0, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q4_K, G.Q5_K, G.Q6_K, G.MXFP4)
FLOAT_W = (F32, F16, BF16)
ACT_BYTES = {t: (block_size(t), type_size(t)) for t in (G.Q8_0, G.Q8_1, G.Q8_K)}   # activation blocks
WARPS_PER_BLOCK = 4
MMQ_MIN_T = 16          # from this many tokens on, quantized products run as tiled tensor-core GEMMs
MMQ_TILE = 64           # weight rows x tokens per block (4 warps of 16 rows x 64 tokens)


@dataclass
class Launch:
    """One kernel launch of a step: function name, operands (slot, byte offset), work items."""
    name: str
    operands: list[tuple[int, int]]
    items: tuple            # dims (int or symbol) whose product is the number of work items
    mode: str = "thread"
    block: int = 256
    smem: int = 0           # dynamic shared memory bytes (at the dims' maxima)
    step: str = ""          # the plan step it belongs to ("MUL_MAT blk.0.attn_q"): for profiles
    t_range: tuple = (0, 1 << 62)   # launched only when lo <= T <= hi (tiled vs per-row products)
    min_cc: int = 0         # compute capability it needs (80: integer tensor cores); negative:
                            # the fallback of such a launch, whose t_range holds only where cc >= -min_cc
    step_index: int = -1    # index in plan.steps
    group: tuple = ()       # the (step index, part) entries of plan.groups it computes


@dataclass
class Program:
    source: str
    launches: list[Launch] = field(default_factory=list)
    n_unique: int = 0


def f32lit(x: float) -> str:
    if math.isnan(x):
        return "__int_as_float(0x7fc00000)"
    if math.isinf(x):
        return "__int_as_float(0x7f800000)" if x > 0 else "__int_as_float(0xff800000)"
    import numpy as np
    return f"__int_as_float({int(np.float32(x).view(np.int32))})"


class KB:
    """Kernel builder: operands, dims, indexing and typed loads/stores for one kernel."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.operands: list[tuple[int, int]] = []
        self.lines: list[str] = []

    def op(self, slot: int, byte_offset: int) -> str:
        key = (slot, byte_offset)
        if key not in self.operands:
            self.operands.append(key)
        return f"p{self.operands.index(key)}"

    def base(self, v: View) -> str:
        return self.op(v.slot, v.offset * elem_size(v.dtype))

    @staticmethod
    def dim(d) -> str:
        return f"{d}LL" if isinstance(d, int) else f"sym_{d}"

    def count(self, dims) -> str:
        return "*".join(f"({self.dim(d)})" for d in dims) or "1LL"

    @staticmethod
    def offset(v: View, idx: list[str]) -> str:
        terms = [f"({i})*{s}LL" if s != 1 else f"({i})" for i, s in zip(idx, v.strides) if s != 0 and i != "0"]
        return " + ".join(terms) or "0"

    def unflatten(self, flat: str, dims, prefix: str) -> list[str]:
        """Emits index variables prefix0.. for `flat` over dims (row-major)."""
        names = [f"{prefix}{i}" for i in range(len(dims))]
        if not dims:
            return []
        self.lines.append(f"    i64 {prefix}_rem = {flat};")
        for i in range(len(dims) - 1, 0, -1):
            self.lines.append(f"    i64 {names[i]} = {prefix}_rem % {self.dim(dims[i])}; {prefix}_rem /= {self.dim(dims[i])};")
        self.lines.append(f"    i64 {names[0]} = {prefix}_rem;")
        return names

    def load(self, v: View, idx: list[str]) -> str:
        p = f"{self.base(v)}"
        o = self.offset(v, idx)
        if v.dtype == F32:
            return f"((const float*){p})[{o}]"
        if v.dtype == F16:
            return f"h2f(((const u16*){p})[{o}])"
        if v.dtype == BF16:
            return f"bf2f(((const u16*){p})[{o}])"
        if v.dtype == I32:
            return f"((const int*){p})[{o}]"
        raise MoeGraphError(f"cuda: cannot load {v.dtype.name} elements")

    def store(self, v: View, idx: list[str], value: str) -> str:
        p = self.base(v)
        o = self.offset(v, idx)
        if v.dtype == F32:
            return f"((float*){p})[{o}] = {value};"
        if v.dtype == F16:
            return f"((u16*){p})[{o}] = f2h({value});"
        if v.dtype == BF16:
            return f"((u16*){p})[{o}] = f2bf({value});"
        if v.dtype == I32:
            return f"((int*){p})[{o}] = {value};"
        raise MoeGraphError(f"cuda: cannot store {v.dtype.name} elements")

    @staticmethod
    def bview(v: View, out_shape) -> View:
        pad = len(out_shape) - v.rank
        strides = [0] * pad + [0 if d == 1 and o != 1 else s
                               for d, s, o in zip(v.shape, v.strides, out_shape[pad:])]
        return View(v.slot, v.offset, tuple(out_shape), tuple(strides), v.dtype)

    def finish(self, name: str, body_lines: list[str], mode: str) -> str:
        params = ", ".join(["const i64* __restrict__ syms"] + [f"u8* p{i}" for i in range(len(self.operands))])
        syms = " ".join(f"const i64 sym_{s} = syms[{i}];" for i, s in enumerate(SYMBOLS))
        loop = {
            "thread": "for (i64 it = blockIdx.x * (i64)blockDim.x + threadIdx.x; it < total; it += (i64)gridDim.x * blockDim.x) {",
            "warp": "const int lane = threadIdx.x & 31;\n  for (i64 it = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5; it < total; it += ((i64)gridDim.x * blockDim.x) >> 5) {",
            "block": "for (i64 it = blockIdx.x; it < total; it += gridDim.x) {",
            "single": "if (blockIdx.x == 0) { const i64 it = 0; (void)it;",
        }[mode]
        return (f'extern "C" __global__ void {name}({params}) {{\n  {syms} (void)sym_T; (void)sym_KV; (void)sym_O;\n'
                + "\n".join(self.lines) + f"\n  {loop}\n" + "\n".join(body_lines) + "\n  }\n}\n")


# --------------------------------------------------------------------------- generators
def _views(plan: Plan, n: Node):
    return plan.views[n.id], [None if i is None else plan.views[i.id] for i in n.inputs]


# One C expression per elementwise op of the op table, from its loaded inputs. An elementwise op
# is supported here exactly when it has an entry.
SCALAR = {
    "ADD": lambda n, a, b: f"{a} + {b}",
    "MUL": lambda n, a, b: f"{a} * {b}",
    "DIV": lambda n, a, b: f"{a} / {b}",
    "SCALE": lambda n, x: f"{x} * {f32lit(n.attrs['scale'])} + {f32lit(n.attrs['bias'])}",
    "SILU": lambda n, x: f"silu_f({x})",
    "SIGMOID": lambda n, x: f"sigmoid_f({x})",
    "GELU": lambda n, x: f"gelu_f({x})",
    "CLAMP": lambda n, x: f"fminf(fmaxf({x}, {f32lit(n.attrs['min'])}), {f32lit(n.attrs['max'])})",
    "CONT": lambda n, x: x,
    "CAST": lambda n, x: x,     # the store rounds to the output's dtype
    "SWIGLU": lambda n, g, u: f"silu_f({g}) * {u}",
}


def g_elementwise(plan: Plan, n: Node):
    """Any elementwise op with a SCALAR expression (inputs broadcast to the output), and the
    copying RESHAPE: one thread per output element."""
    k = KB(plan)
    out, ins = _views(plan, n)
    k.lines.append(f"  const i64 total = {k.count(out.shape)};")
    body = []
    k.lines_backup = k.lines
    k.lines = body
    oi = k.unflatten("it", out.shape, "o")
    if n.op == "RESHAPE":
        val = k.load(ins[0], k.unflatten("it", ins[0].shape, "x"))
    elif n.op == "SWIGLU" and ins[1] is None:   # merged [gate; up]: the two halves of each row
        half = out.shape[-1]
        val = SCALAR[n.op](n, k.load(ins[0], oi), k.load(ins[0], oi[:-1] + [f"{oi[-1]} + {half}"]))
    else:
        val = SCALAR[n.op](n, *(k.load(k.bview(v, out.shape), oi) for v in ins if v is not None))
    if out.dtype == I32 or (ins[0] is not None and ins[0].dtype == I32 and n.op in ("CONT", "RESHAPE")):
        body.append(f"    {k.store(out, oi, val)}")
    else:
        body.append(f"    {{ float v = {val}; {k.store(out, oi, 'v')} }}")
    k.lines = k.lines_backup
    return [(k, body, "thread", tuple(out.shape), 256, 0)]


def g_norm(plan: Plan, n: Node):
    k = KB(plan)
    out, ins = _views(plan, n)
    x = ins[0]
    w = k.bview(ins[1], out.shape) if len(ins) > 1 and ins[1] is not None else None
    L = out.shape[-1]
    k.lines.append(f"  const i64 total = {k.count(out.shape[:-1])};")
    body = []
    k.lines, saved = body, k.lines
    idx = k.unflatten("it", out.shape[:-1], "r")
    xv = lambda i: k.load(x, idx + [i])
    body.append("    double m = 0.0;")
    if n.op == "NORM":
        body.append(f"    for (i64 i = threadIdx.x; i < {L}; i += blockDim.x) m += (double){xv('i')};")
        body.append(f"    m = block_sum_d(m) / {L}.0;")
    body.append("    double s = 0.0;")
    body.append(f"    for (i64 i = threadIdx.x; i < {L}; i += blockDim.x) {{ double v = (double){xv('i')} - m; s += v * v; }}")
    body.append(f"    s = block_sum_d(s);")
    body.append(f"    const float scale = (float)(1.0 / sqrt(s / {L}.0 + {float(n.attrs['eps'])!r}));")
    body.append("    const float meanf = (float)m;")
    val = f"({xv('i')} - meanf) * scale" if n.op == "NORM" else f"{xv('i')} * scale"
    if w is not None:
        val = f"({val}) * {k.load(w, idx + ['i'])}"
    body.append(f"    for (i64 i = threadIdx.x; i < {L}; i += blockDim.x) {{ float y = {val}; {k.store(out, idx + ['i'], 'y')} }}")
    body.append("    __syncthreads();")
    k.lines = saved
    return [(k, body, "block", tuple(out.shape[:-1]), 256, 0)]


def g_soft_max(plan: Plan, n: Node):
    k = KB(plan)
    out, ins = _views(plan, n)
    x, sinks = ins[0], ins[2]
    mask = k.bview(ins[1], out.shape) if ins[1] is not None else None
    L = k.dim(out.shape[-1])
    k.lines.append(f"  const i64 total = {k.count(out.shape[:-1])};")
    body = []
    k.lines, saved = body, k.lines
    idx = k.unflatten("it", out.shape[:-1], "r")
    o = f"((float*){k.base(out)})"
    oo = lambda i: f"{o}[{k.offset(out, idx + [i])}]"
    mterm = f" + {k.load(mask, idx + ['i'])}" if mask is not None else ""
    sink = k.load(sinks, [idx[-2]]) if sinks is not None else None     # the head: axis -3
    body.append("    float mx = NEG_INF;")
    body.append(f"    for (i64 i = threadIdx.x; i < {L}; i += blockDim.x) {{ float v = {k.load(x, idx + ['i'])} * {f32lit(n.attrs['scale'])}{mterm}; {oo('i')} = v; mx = fmaxf(mx, v); }}")
    body.append(f"    mx = {f'fmaxf(block_max(mx), {sink})' if sink else 'block_max(mx)'};")
    body.append("    double s = 0.0;")
    body.append(f"    for (i64 i = threadIdx.x; i < {L}; i += blockDim.x) {{ float e = expf({oo('i')} - mx); {oo('i')} = e; s += (double)e; }}")
    sink_e = f" + (double)expf({sink} - mx)" if sink else ""
    body.append(f"    const float inv = (float)(1.0 / (block_sum_d(s){sink_e}));")
    body.append(f"    for (i64 i = threadIdx.x; i < {L}; i += blockDim.x) {oo('i')} *= inv;")
    body.append("    __syncthreads();")
    k.lines = saved
    if out.dtype != F32:
        raise MoeGraphError("cuda: SOFT_MAX writes F32")
    return [(k, body, "block", tuple(out.shape[:-1]), 256, 0)]


def g_rope(plan: Plan, n: Node):
    import numpy as np
    k = KB(plan)
    out, (x, pos, ff) = _views(plan, n)
    T, H, D = out.shape
    nd, mode = n.attrs["n_dims"], n.attrs["mode"]
    half = nd // 2
    step = f32lit(float(np.float32(n.attrs["freq_base"]) ** np.float32(-2.0 / nd)))
    fs = f32lit(n.attrs["freq_scale"])
    ms = f32lit(rope_mscale(n.attrs))
    k.lines.append(f"  const i64 total = {k.count((T, H, D - half))};")
    body = []
    k.lines, saved = body, k.lines
    t, h, i = k.unflatten("it", (T, H, D - half), "q")
    body.append(f"    if ({i} < {half}) {{")
    body.append(f"      float th = (float){k.load(pos, [t])};")
    body.append(f"      for (i64 j = 0; j < {i}; j++) th = __fmul_rn(th, {step});")
    if ff is not None:       # Llama 3's rope_freqs: theta / ff_i
        body.append(f"      th = __fdiv_rn(th, {k.load(ff, [i])});")
    body.append(f"      float a = __fmul_rn(th, {fs});")
    if rope_yarn_ramp(n.attrs).any():     # YaRN: mix in the unscaled angle by the ramp
        low, high = rope_yarn_corr_dims(n.attrs)
        span = f32lit(float(max(np.float32(0.001), np.float32(high - low))))
        body.append(f"      const float y = fminf(1.0f, fmaxf(0.0f, __fdiv_rn((float){i} - {f32lit(low)}, {span})));")
        body.append(f"      const float m = __fmul_rn(1.0f - y, {f32lit(n.attrs['ext_factor'])});")
        body.append("      a = __fadd_rn(__fmul_rn(a, 1.0f - m), __fmul_rn(th, m));")
    body.append(f"      const float c = cosf(a) * {ms}, s = sinf(a) * {ms};")
    i0, i1 = (f"2*{i}", f"2*{i}+1") if mode == 0 else (i, f"{i}+{half}")
    body.append(f"      const float x0 = {k.load(x, [t, h, i0])}, x1 = {k.load(x, [t, h, i1])};")
    body.append(f"      {{ float y = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)); {k.store(out, [t, h, i0], 'y')} }}")
    body.append(f"      {{ float y = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c)); {k.store(out, [t, h, i1], 'y')} }}")
    body.append("    } else {")
    body.append(f"      const i64 d = {i} - {half} + {nd}; float y = {k.load(x, [t, h, 'd'])}; {k.store(out, [t, h, 'd'], 'y')}")
    body.append("    }")
    k.lines = saved
    return [(k, body, "thread", (T, H, D - half), 256, 0)]


def g_top_k(plan: Plan, n: Node):
    """One warp per row, k arg-max passes; ties go to the lower index (ggml's stable order)."""
    k = KB(plan)
    out, (x,) = _views(plan, n)
    E = k.dim(x.shape[-1])
    k.lines.append(f"  const i64 total = {k.count(out.shape[:-1])};")
    body = []
    k.lines, saved = body, k.lines
    idx = k.unflatten("it", out.shape[:-1], "r")
    body.append(f"    float lv = {f32lit(math.inf)}; int li = -1;")
    body.append(f"    for (int j = 0; j < {n.attrs['k']}; j++) {{")
    body.append("      float bv = NEG_INF; int bi = -1;")
    body.append(f"      for (int i = lane; i < {E}; i += 32) {{ float v = {k.load(x, idx + ['i'])};")
    body.append("        if ((v < lv || (v == lv && i > li)) && (bi == -1 || v > bv)) { bv = v; bi = i; } }")
    body.append("      for (int o = 16; o > 0; o >>= 1) {")
    body.append("        float ov = __shfl_xor_sync(0xffffffffu, bv, o); int oi = __shfl_xor_sync(0xffffffffu, bi, o);")
    body.append("        if (oi != -1 && (bi == -1 || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; } }")
    body.append(f"      if (lane == 0) {{ {k.store(out, idx + ['j'], 'bi')} }}")
    body.append("      lv = bv; li = bi; }")
    k.lines = saved
    return [(k, body, "warp", tuple(out.shape[:-1]), 32 * WARPS_PER_BLOCK, 0)]


def g_group_mask(plan: Plan, n: Node):
    """One thread per row: the groups' top-2 sums, n_used arg-max passes (ties to the lower
    group, as TOP_K), then the row with the other groups' entries -inf."""
    k = KB(plan)
    out, (x,) = _views(plan, n)
    G, used = n.attrs["n_groups"], n.attrs["n_used"]
    S = x.shape[-1] // G
    k.lines.append(f"  const i64 total = {k.count(out.shape[:-1])};")
    body = []
    k.lines, saved = body, k.lines
    idx = k.unflatten("it", out.shape[:-1], "r")
    body.append(f"    float gs[{G}]; bool keep[{G}];")
    body.append(f"    for (int g = 0; g < {G}; g++) {{ float m1 = NEG_INF, m2 = NEG_INF; keep[g] = false;")
    body.append(f"      for (int i = 0; i < {S}; i++) {{ const float v = {k.load(x, idx + [f'g * {S} + i'])};")
    body.append("        if (v > m1) { m2 = m1; m1 = v; } else if (v > m2) m2 = v; }")
    body.append("      gs[g] = m1 + m2; }")
    body.append(f"    for (int j = 0; j < {used}; j++) {{ int bg = -1; float bv = NEG_INF;")
    body.append(f"      for (int g = 0; g < {G}; g++) if (!keep[g] && (bg == -1 || gs[g] > bv)) {{ bv = gs[g]; bg = g; }}")
    body.append("      keep[bg] = true; }")
    body.append(f"    for (int i = 0; i < {G * S}; i++) {{ const float v = keep[i / {S}] ? {k.load(x, idx + ['i'])} : NEG_INF; {k.store(out, idx + ['i'], 'v')} }}")
    k.lines = saved
    return [(k, body, "thread", tuple(out.shape[:-1]), 128, 0)]


def g_sum(plan: Plan, n: Node):
    k = KB(plan)
    out, (x,) = _views(plan, n)
    ax = n.attrs["axis"] % x.rank
    k.lines.append(f"  const i64 total = {k.count(out.shape)};")
    body = []
    k.lines, saved = body, k.lines
    oi = k.unflatten("it", out.shape, "o")
    xi = oi[:ax] + ["j"] + oi[ax:]
    body.append(f"    float acc = 0.0f; for (i64 j = 0; j < {k.dim(x.shape[ax])}; j++) acc += {k.load(x, xi)};")
    body.append(f"    {k.store(out, oi, 'acc')}")
    k.lines = saved
    return [(k, body, "thread", tuple(out.shape), 256, 0)]


def g_concat(plan: Plan, n: Node):
    out = plan.views[n.id]
    ax = n.attrs["axis"] % out.rank
    res, start = [], 0
    for xn in n.inputs:
        x = plan.views[xn.id]
        k = KB(plan)
        k.lines.append(f"  const i64 total = {k.count(x.shape)};")
        body = []
        k.lines, saved = body, k.lines
        xi = k.unflatten("it", x.shape, "x")
        oi = list(xi)
        oi[ax] = f"{xi[ax]} + {start}"
        v = k.load(x, xi)
        body.append(f"    {k.store(out, oi, v)}" if out.dtype == I32 else f"    {{ float v = {v}; {k.store(out, oi, 'v')} }}")
        k.lines = saved
        res.append((k, body, "thread", tuple(x.shape), 256, 0))
        start += xn.shape[ax]
    return res


def g_set_rows(plan: Plan, n: Node):
    k = KB(plan)
    dst, src, idx = (plan.views[i.id] for i in n.inputs)
    R = dst.shape[0]
    k.lines.append(f"  const i64 total = {k.count(src.shape)};")
    body = []
    k.lines, saved = body, k.lines
    si = k.unflatten("it", src.shape, "s")
    body.append(f"    const i64 row = {k.load(idx, [si[0]])};")
    body.append(f"    if (row >= 0 && row < {k.dim(R)}) {{ float v = {k.load(src, si)}; {k.store(dst, ['row'] + si[1:], 'v')} }}")
    k.lines = saved
    return [(k, body, "thread", tuple(src.shape), 256, 0)]


def g_get_rows(plan: Plan, n: Node):
    k = KB(plan)
    out, (table, ids) = _views(plan, n)
    R = table.shape[-2]
    k.lines.append(f"  const i64 total = {k.count(out.shape)};")
    body = []
    k.lines, saved = body, k.lines
    oi = k.unflatten("it", out.shape, "o")
    body.append(f"    i64 row = {k.load(ids, oi[:-1])}; if (row < 0 || row >= {k.dim(R)}) row = 0;")
    ti = oi[len(oi) - 2 - (table.rank - 2):-2] + ["row"]    # the table's own batch dims
    if is_quantized(table.dtype):
        if table.dtype not in DOT_TYPES:
            raise MoeGraphError(f"cuda: GET_ROWS from {table.dtype.name} tables is not supported")
        p = f"((const u8*){k.base(table)} + {k.offset(table, ti)})"
        val = f"deq_{table.dtype.name}({p}, {oi[-1]})"
    else:
        val = k.load(table, ti + [oi[-1]])
    body.append(f"    {{ float v = {val}; {k.store(out, oi, 'v')} }}")
    k.lines = saved
    return [(k, body, "thread", tuple(out.shape), 256, 0)]


def _act_phase(plan: Plan, b: View, rows_dims, vt, Kdim: int, scratch_off: int):
    """Activation rows -> dense vec_dot_type rows at arena[scratch_off]."""
    k = KB(plan)
    dst = k.op(0, scratch_off)
    rb = row_bytes(vt, Kdim)
    body = []
    if vt in ACT_BYTES:
        bs, size = ACT_BYTES[vt]
        nb = Kdim // bs
        k.lines.append(f"  const i64 total = {k.count(rows_dims)} * {nb};")
        k.lines, saved = body, k.lines
        body.append(f"    const i64 r = it / {nb}, blk = it % {nb};")
        ri = k.unflatten("r", rows_dims, "b")
        body.append(f"    float v[{bs}];")
        body.append(f"    for (int i = 0; i < {bs}; i++) v[i] = {k.load(b, ri + [f'blk * {bs} + i'])};")
        u8p = f"{dst} + r * {rb}LL + blk * {size}"
        if vt == G.Q8_K:
            body.append(f"    quant_q8_k_block(v, {u8p});")
        else:
            body.append(f"    quant_q8_0_block(v, {u8p}, {'true' if vt == G.Q8_1 else 'false'});")
        k.lines = saved
        return k, body, "thread", (*rows_dims, nb), 128, 0
    k.lines.append(f"  const i64 total = {k.count(rows_dims)} * {Kdim};")
    k.lines, saved = body, k.lines
    body.append(f"    const i64 r = it / {Kdim}, i = it % {Kdim};")
    ri = k.unflatten("r", rows_dims, "b")
    conv = "f2h" if vt == F16 else "f2bf"
    body.append(f"    ((u16*)({dst}))[r * {Kdim}LL + i] = {conv}({k.load(b, ri + ['i'])});")
    k.lines = saved
    return k, body, "thread", (*rows_dims, Kdim), 256, 0


def _row_dot(k: KB, wt, wptr: str, aptr: str, b: View | None, bidx: list[str] | None, Kdim: int) -> list[str]:
    """Lines leaving the warp's dot product of a weight row and an activation row in `s`."""
    if wt in DOT_TYPES:
        nb = Kdim // (256 if wt in (G.Q4_K, G.Q5_K, G.Q6_K) else 32)
        return [f"      float s = rowdot_{wt.name}({wptr}, {aptr}, {nb}, lane);",
                "      s = warp_sum(s);"]
    if wt == F32:
        return [f"      float s = 0.0f; for (i64 i = lane; i < {Kdim}; i += 32) s += ((const float*)({wptr}))[i] * {k.load(b, bidx + ['i'])};",
                "      s = warp_sum(s);"]
    cv = "h2f" if wt == F16 else "bf2f"
    return [f"      float s = 0.0f; for (i64 i = lane; i < {Kdim}; i += 32) s += {cv}(((const u16*)({wptr}))[i]) * {cv}(((const u16*)({aptr}))[i]);",
            "      s = warp_sum(s);"]


def _mmq(k: KB, wt, vt, Kdim: int, N: int, tile_prefix: list[str], w_row, up_row, tok_of, store) -> list[str]:
    """Body of a tiled integer tensor-core product (block mode, 128 threads): a block computes
    64 weight rows x 64 tokens; per 32-value chunk, threads 0-63 unpack one weight row each
    (to int8 + scales) into shared memory and threads 64-127 one activation row, then every warp
    multiplies its 16 rows by the 64 tokens with m16n8k32 MMAs and scales the integer sums.
    `w_row(r)` / `up_row(r)` give a weight row's byte pointer (up_row: the SWIGLU up half, or
    None), `tok_of` the lines mapping tile slot `q` to (valid, activation row pointer `ap`,
    output index variables), `store(idx_vars, value)` the output statement."""
    nc = Kdim // 32
    halves = wt == G.Q6_K
    sw = up_row is not None
    S = 12   # shared row stride in words: 8 used, padded so that the fragment loads hit 32 banks
    L = list(tile_prefix)
    L.append(f"    __shared__ int As[64 * {S}]; __shared__ float Adw[64], Adw2[64], Amw[64];")
    if sw:
        L.append(f"    __shared__ int Us[64 * {S}]; __shared__ float Udw[64], Udw2[64], Umw[64];")
    L.append(f"    __shared__ int Bs[64 * {S}]; __shared__ float Bdy[64], Bys[64]; __shared__ i64 Bix[64][2];")
    L.append("    __shared__ const u8* Bap[64];")
    L.append("    const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t4 = tid & 3;")
    L.append("    if (tid >= 64) { const int q = tid - 64; bool ok = false; const u8* ap = 0; i64 ix0 = 0, ix1 = 0;")
    L += ["      " + ln for ln in tok_of]
    L.append("      Bix[q][0] = ok ? ix0 : -1; Bix[q][1] = ix1; Bap[q] = ok ? ap : (const u8*)0; }")
    L.append("    __syncthreads();")
    L.append("    float acc[8][4]; for (int i = 0; i < 8; i++) for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;")
    if sw:
        L.append("    float accu[8][4]; for (int i = 0; i < 8; i++) for (int j = 0; j < 4; j++) accu[i][j] = 0.0f;")
    L.append(f"    for (int c = 0; c < {nc}; c++) {{")
    L.append("      if (tid < 64) {")
    L.append(f"        const i64 r = tile_n * 64 + tid; WChunk w;")

    def unpack(dst, dw, dw2, mw, rowexpr):
        return [f"        if (r < {N}) wchunk_{wt.name}({rowexpr}, c, w); else {{ for (int i = 0; i < 8; i++) w.q[i] = 0; w.dw = w.dw2 = w.mw = 0.0f; }}",
                f"        for (int i = 0; i < 8; i++) {dst}[tid * {S} + i] = w.q[i];",
                f"        {dw}[tid] = w.dw; {mw}[tid] = w.mw;" + (f" {dw2}[tid] = w.dw2;" if halves else "")]
    L += unpack("As", "Adw", "Adw2", "Amw", w_row("r"))
    if sw:
        L += unpack("Us", "Udw", "Udw2", "Umw", up_row("r"))
    L.append("      } else {")
    L.append(f"        const int q = tid - 64; YChunk y;")
    L.append(f"        if (Bap[q]) ychunk_{vt.name}(Bap[q], c, y); else {{ for (int i = 0; i < 8; i++) y.q[i] = 0; y.dy = y.ys = 0.0f; }}")
    L.append(f"        for (int i = 0; i < 8; i++) Bs[q * {S} + i] = y.q[i];")
    L.append("        Bdy[q] = y.dy; Bys[q] = y.ys;")
    L.append("      }")
    L.append("      __syncthreads();")

    def frag_and_mma(As, dw, dw2, mw, acc):
        out = [f"      {{ const int* Ar = {As} + warp * 16 * {S};",
               f"        const int a0 = Ar[g * {S} + t4], a1 = Ar[(g + 8) * {S} + t4], a2 = Ar[g * {S} + 4 + t4], a3 = Ar[(g + 8) * {S} + 4 + t4];",
               f"        const float w0 = {dw}[warp * 16 + g], w8 = {dw}[warp * 16 + g + 8], m0 = {mw}[warp * 16 + g], m8 = {mw}[warp * 16 + g + 8];"]
        if halves:
            out.append(f"        const float v0 = {dw2}[warp * 16 + g], v8 = {dw2}[warp * 16 + g + 8];")
        out.append("        for (int nt = 0; nt < 8; nt++) {")
        out.append(f"          const int* Bt = Bs + (nt * 8 + g) * {S}; const int b0 = Bt[t4], b1 = Bt[4 + t4];")
        out.append("          const int j0 = nt * 8 + 2 * t4, j1 = j0 + 1;")
        out.append("          const float y0 = Bdy[j0], y1 = Bdy[j1], s0 = Bys[j0], s1 = Bys[j1];")
        if halves:
            out.append("          int d[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0};")
            out.append("          mma_s8(d, a0, a1, 0, 0, b0, b1); mma_s8(e, 0, 0, a2, a3, b0, b1);")
            out.append(f"          {acc}[nt][0] += y0 * (w0 * (float)d[0] + v0 * (float)e[0]); {acc}[nt][1] += y1 * (w0 * (float)d[1] + v0 * (float)e[1]);")
            out.append(f"          {acc}[nt][2] += y0 * (w8 * (float)d[2] + v8 * (float)e[2]); {acc}[nt][3] += y1 * (w8 * (float)d[3] + v8 * (float)e[3]);")
        else:
            out.append("          int d[4] = {0, 0, 0, 0}; mma_s8(d, a0, a1, a2, a3, b0, b1);")
            out.append(f"          {acc}[nt][0] += (w0 * y0) * (float)d[0] + m0 * s0; {acc}[nt][1] += (w0 * y1) * (float)d[1] + m0 * s1;")
            out.append(f"          {acc}[nt][2] += (w8 * y0) * (float)d[2] + m8 * s0; {acc}[nt][3] += (w8 * y1) * (float)d[3] + m8 * s1;")
        out.append("        } }")
        return out
    L += frag_and_mma("As", "Adw", "Adw2", "Amw", "acc")
    if sw:
        L += frag_and_mma("Us", "Udw", "Udw2", "Umw", "accu")
    L.append("      __syncthreads();")
    L.append("    }")
    L.append("    for (int nt = 0; nt < 8; nt++) for (int i = 0; i < 4; i++) {")
    L.append("      const int row = warp * 16 + g + (i >= 2 ? 8 : 0), q = nt * 8 + 2 * t4 + (i & 1);")
    L.append(f"      const i64 nn = tile_n * 64 + row, ix0 = Bix[q][0], ix1 = Bix[q][1];")
    L.append(f"      if (nn < {N} && ix0 >= 0) {{")
    val = "silu_f(acc[nt][i]) * accu[nt][i]" if sw else "acc[nt][i]"
    L.append(f"        const float v = {val}; {store(['ix0', 'ix1', 'nn'], 'v')}")
    L.append("      }")
    L.append("    }")
    L.append("    __syncthreads();")
    return L


def _check_weight(n: Node, wt):
    if wt not in DOT_TYPES and wt not in FLOAT_W:
        raise MoeGraphError(f"cuda: {n.op} with {wt.name} weights is not supported "
                            f"(supported: {', '.join(t.name for t in (*FLOAT_W, *DOT_TYPES))})")


def g_mul_mat(plan: Plan, n: Node):
    out, (a, b) = _views(plan, n)
    batched = a.rank == 3        # one weight matrix per batch entry (MLA's per-head k_b/v_b)
    if a.rank not in (2, 3) or (batched and b.shape[0] != a.shape[0]):
        raise MoeGraphError(f"cuda: MUL_MAT of a {list(a.shape)} weight on {list(b.shape)} "
                            f"(broadcast batches) is not supported ({n!r})")
    N, Kdim = a.shape[-2:]
    wt = a.dtype
    _check_weight(n, wt)
    vt = vec_dot_type(wt)
    rows_dims = b.shape[:-1]
    phases = []
    sc = plan.scratch.get(n.id, 0)
    if vt != F32 and n.id not in plan.shared_act:   # (unless another product converted them)
        phases.append(_act_phase(plan, b, rows_dims, vt, Kdim, sc))
    k = KB(plan)
    M = k.count(rows_dims)
    k.lines.append(f"  const i64 M = {M};")
    k.lines.append(f"  const i64 total = M * {N};")
    body = []
    k.lines, saved = body, k.lines
    body.append(f"    const i64 nn = it / M, m = it % M;")
    esz = 1 if is_quantized(wt) else elem_size(wt)
    oidx = k.unflatten("m", rows_dims, "o") if batched else None   # (batch, rows..) of m
    batch = f" + o0 * {a.strides[0] * esz}LL" if batched else ""
    wptr = f"((const u8*){k.base(a)}{batch} + nn * {a.strides[-2] * esz}LL)"
    if vt != F32:
        aptr = f"((const u8*){k.op(0, sc)} + m * {row_bytes(vt, Kdim)}LL)"
        bidx = None
    else:
        aptr = None
        bidx = oidx or k.unflatten("m", rows_dims, "b")
    body.append("    {")
    body += _row_dot(k, wt, wptr, aptr, b, bidx, Kdim)
    if batched:    # buffers are strided by their largest shapes
        body.append(f"      if (lane == 0) ((float*){k.base(out)})[{k.offset(out, oidx + ['nn'])}] = s;")
    else:
        body.append(f"      if (lane == 0) ((float*){k.base(out)})[m * {N}LL + nn] = s;")
    body.append("    }")
    k.lines = saved
    if wt not in DOT_TYPES or batched:
        phases.append((k, body, "warp", (*rows_dims, N), 32 * WARPS_PER_BLOCK, 0))
        return phases
    phases.append((k, body, "warp", (*rows_dims, N), 32 * WARPS_PER_BLOCK, 0, (0, MMQ_MIN_T - 1), -80))
    # the tiled tensor-core version for many tokens
    k = KB(plan)
    tn = -(-N // MMQ_TILE)
    rb = row_bytes(vt, Kdim)
    k.lines.append(f"  const i64 M = {k.count(rows_dims)}, tn = {tn}, tm = (M + 63) / 64, total = tn * tm;")
    act = k.op(0, sc)
    body = _mmq(k, wt, vt, Kdim, N, ["    const i64 tile_n = it % tn, tile_m = it / tn;"],
                lambda r: f"((const u8*){k.base(a)} + {r} * {a.strides[0]}LL)", None,
                ["const i64 m = tile_m * 64 + q;",
                 f"if (m < M) {{ ok = true; ap = (const u8*){act} + m * {rb}LL; ix0 = m; }}"],
                lambda idx, v: f"((float*){k.base(out)})[{idx[0]} * {N}LL + {idx[2]}] = {v};")
    phases.append((k, body, "block", (tn, ("ceil", tuple(rows_dims), MMQ_TILE)), 128, 0, (MMQ_MIN_T, 1 << 62), 80))
    return phases


def g_mul_mat_id(plan: Plan, n: Node):
    """MUL_MAT_ID, and MOE_SWIGLU: silu(gate . x) * (up . x) per selected expert (merged
    [gate; up] or two tensors), neither product stored: one warp computes both dots of an
    (expert, row)."""
    m = plan.moe_operands(n)
    out, a, b, ids, a_up, up_row0 = m.out, m.a, m.b, m.ids, m.a_up, m.up_row0
    E, N, Kdim, T, S, kk = m.E, m.N, m.K, m.T, m.S, m.kk
    scratch_node = m.scratch_node
    wt = a.dtype
    _check_weight(n, wt)
    vt = vec_dot_type(wt)
    base_off = plan.scratch[scratch_node.id]
    rows_max = math.prod(plan.max_shape(b.shape[:-1]))
    lists_off = base_off + (rows_max * row_bytes(vt, Kdim) if vt != F32 else 0)
    lists_off = (lists_off + 63) // 64 * 64
    per_t = plan.maxes["T"] * kk if isinstance(T, str) else T * kk
    phases = []
    if vt != F32:
        phases.append(_act_phase(plan, b, b.shape[:-1], vt, Kdim, base_off))
    # bucket (token, slot) pairs by expert: cnt[E], n_active, active[E] (the experts with
    # tokens, so that the product kernel's grid spans only those), lists[E][per_t]
    layout = f"int* cnt = (int*){{lst}}; int* n_act = cnt + {E}; int* act = n_act + 1; int* lst = act + {E};"
    k = KB(plan)
    k.lines.append("  const i64 total = 1; " + layout.format(lst=k.op(0, lists_off)))
    body = [f"    for (int e = threadIdx.x; e < {E}; e += blockDim.x) cnt[e] = 0;",
            "    __syncthreads();",
            f"    for (i64 x = threadIdx.x; x < {k.dim(T)} * {kk}; x += blockDim.x) {{",
            f"      const i64 t = x / {kk}, j = x % {kk};"]
    k.lines, saved = body, k.lines
    body.append(f"      const int e = {k.load(ids, ['t', 'j'])};")
    body.append(f"      if (e >= 0 && e < {E}) {{ int c = atomicAdd(&cnt[e], 1); if (c < {per_t}) lst[(i64)e * {per_t} + c] = (int)x; }}")
    body.append("    }")
    body.append("    __syncthreads();")
    body.append(f"    if (threadIdx.x == 0) {{ int na = 0; for (int e = 0; e < {E}; e++) if (cnt[e] > 0) act[na++] = e; *n_act = na; }}")
    k.lines = saved
    phases.append((k, body, "single", (1,), 1024, 0))
    # one warp per (active expert, output row): the weight row is read once for all its tokens
    k = KB(plan)
    k.lines.append("  " + layout.format(lst=k.op(0, lists_off)) + f" const i64 total = (i64)(*n_act) * {N};")
    body = [f"    const i64 e = act[it / {N}], nn = it % {N};",
            f"    const int c = min(cnt[e], {per_t});"]
    esz = 1 if is_quantized(wt) else elem_size(wt)
    k.lines, saved = body, k.lines
    wptr = f"((const u8*){k.base(a)} + e * {a.strides[0] * esz}LL + nn * {a.strides[1] * esz}LL)"
    body.append("    for (int q = 0; q < c; q++) {")
    body.append(f"      const i64 tj = lst[e * {per_t} + q], t = tj / {kk}, jj = tj % {kk}, srow = {'jj' if S != 1 else '0'};")
    if vt != F32:
        aptr = f"((const u8*){k.op(0, base_off)} + (t * {S} + srow) * {row_bytes(vt, Kdim)}LL)"
        bidx = None
    else:
        aptr, bidx = None, ["t", "srow"]
    body += _row_dot(k, wt, wptr, aptr, b, bidx, Kdim)
    if a_up is not None:
        uptr = (f"((const u8*){k.base(a_up)} + e * {a_up.strides[0] * esz}LL + "
                f"(nn + {up_row0}) * {a_up.strides[1] * esz}LL)")
        body.append("      const float sg = s; {")
        body += [ln.replace("float s ", "float s2 ").replace("s = warp_sum(s)", "s2 = warp_sum(s2)").replace("s += ", "s2 += ")
                 for ln in _row_dot(k, wt, uptr, aptr, b, bidx, Kdim)]
        body.append("      s = silu_f(sg) * s2; }")
    body.append(f"      if (lane == 0) {{ {k.store(out, ['t', 'jj', 'nn'], 's')} }}")
    body.append("    }")
    k.lines = saved
    if wt not in DOT_TYPES:
        phases.append((k, body, "warp", (("active_experts", E, kk), N), 32 * WARPS_PER_BLOCK, 0))
        return phases
    phases.append((k, body, "warp", (("active_experts", E, kk), N), 32 * WARPS_PER_BLOCK, 0, (0, MMQ_MIN_T - 1), -80))
    # tiled tensor-core version: (active expert, 64 rows, 64 of the expert's tokens) per block
    k = KB(plan)
    tn = -(-N // MMQ_TILE)
    rb = row_bytes(vt, Kdim)
    k.lines.append("  " + layout.format(lst=k.op(0, lists_off)))
    k.lines.append(f"  const i64 tn = {tn}, tm = ({k.dim(T)} + 63) / 64, total = (i64)(*n_act) * tn * tm;")
    act = k.op(0, base_off)
    prefix = ["    const i64 ei = it / (tn * tm), tile_n = (it % (tn * tm)) % tn, tile_m = (it % (tn * tm)) / tn;",
              f"    const i64 e = act[ei]; const int c_e = min(cnt[e], {per_t});",
              "    if (tile_m * 64 >= c_e) continue;"]
    up = None
    if a_up is not None:
        up = lambda r: (f"((const u8*){k.base(a_up)} + e * {a_up.strides[0]}LL + "
                        f"({r} + {up_row0}) * {a_up.strides[1]}LL)")
    srow = "ix1" if S != 1 else "0"
    body = _mmq(k, wt, vt, Kdim, N, prefix,
                lambda r: f"((const u8*){k.base(a)} + e * {a.strides[0]}LL + {r} * {a.strides[1]}LL)", up,
                ["const i64 qq = tile_m * 64 + q;",
                 f"if (qq < c_e) {{ const i64 tj = lst[e * {per_t} + qq]; ix0 = tj / {kk}; ix1 = tj % {kk}; ok = true;",
                 f"  ap = (const u8*){act} + (ix0 * {S} + {srow}) * {rb}LL; }}"],
                lambda idx, v: k.store(out, idx, v))
    items = (("active_experts", E, kk), tn, ("ceil", (T,), MMQ_TILE))
    phases.append((k, body, "block", items, 128, 0, (MMQ_MIN_T, 1 << 62), 80))
    return phases


def g_attention(plan: Plan, n: Node):
    """out[h, t, :] = softmax(scale * q[t, h] . k[j, h/g] + mask[t, j]) . v[j, h/g]; one block per
    (t, h), scores in shared memory; with an F16 cache q and p are rounded to F16 as ggml-cpu's
    F16 matmuls do; masked cells (-inf) are skipped."""
    k = KB(plan)
    out = plan.views[n.id]
    q, kc, vc, mask, sinks = (plan.views[x.id] if x is not None else None for x in n.inputs)
    T, H, D = q.shape
    KV, Hkv, Dv = vc.shape
    g = H // Hkv
    mask = k.bview(mask, (T, KV))
    sink = k.load(sinks, ["h"]) if sinks is not None else None       # gpt-oss: a logit per head
    kf16, vf16 = kc.dtype == F16, vc.dtype == F16
    k.lines.append(f"  const i64 total = {k.dim(T)} * {H};")
    k.lines.append("  extern __shared__ float sh[];")
    k.lines.append(f"  float* qb = sh; float* sc = sh + {D};")
    body = []
    k.lines, saved = body, k.lines
    body.append(f"    const i64 t = it / {H}, h = it % {H}, hk = h / {g}; const i64 nkv = {k.dim(KV)};")
    qv = k.load(q, ["t", "h", "i"])
    body.append(f"    for (int i = threadIdx.x; i < {D}; i += blockDim.x) qb[i] = {'rnd_f16(' + qv + ')' if kf16 else qv};")
    body.append("    __syncthreads();")
    # scores: one warp per key, lanes across the head dimension (coalesced reads of the cache)
    body.append("    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;")
    body.append("    for (i64 j = threadIdx.x >> 5; j < nkv; j += nw) {")
    body.append(f"      const float mv = {k.load(mask, ['t', 'j'])}; float s = NEG_INF;")
    body.append(f"      if (mv > NEG_INF) {{ float d = 0.0f; for (int i = lane; i < {D}; i += 32) d += qb[i] * {k.load(kc, ['j', 'hk', 'i'])};")
    body.append(f"        s = warp_sum(d) * {f32lit(n.attrs['scale'])} + mv; }}")
    body.append("      if (lane == 0) sc[j] = s;")
    body.append("    }")
    body.append("    __syncthreads();")
    body.append("    float mx = NEG_INF;")
    body.append("    for (i64 j = threadIdx.x; j < nkv; j += blockDim.x) mx = fmaxf(mx, sc[j]);")
    body.append(f"    mx = {f'fmaxf(block_max(mx), {sink})' if sink else 'block_max(mx)'};")
    body.append("    double tot = 0.0;")
    body.append("    for (i64 j = threadIdx.x; j < nkv; j += blockDim.x) { float e = sc[j] == NEG_INF ? 0.0f : expf(sc[j] - mx); sc[j] = e; tot += (double)e; }")
    sink_e = f" + (double)expf({sink} - mx)" if sink else ""
    body.append(f"    const float inv = (float)(1.0 / (block_sum_d(tot){sink_e}));")
    body.append("    __syncthreads();")
    body.append(f"    for (int i = threadIdx.x; i < {Dv}; i += blockDim.x) {{")
    body.append("      float acc = 0.0f;")
    body.append(f"      for (i64 j = 0; j < nkv; j++) {{ float p = sc[j] * inv; {'p = rnd_f16(p);' if vf16 else ''} if (p != 0.0f) acc += p * {k.load(vc, ['j', 'hk', 'i'])}; }}")
    body.append(f"      {k.store(out, ['h', 't', 'i'], 'acc')}")
    body.append("    }")
    body.append("    __syncthreads();")
    k.lines = saved
    smem = 4 * (D + plan.maxes["KV"])
    return [(k, body, "block", (T, H), 128, smem)]


GENERATORS = {
    **{op: g_elementwise for op in (*SCALAR, "RESHAPE")},
    "RMS_NORM": g_norm, "NORM": g_norm, "SOFT_MAX": g_soft_max, "ROPE": g_rope, "TOP_K": g_top_k,
    "GROUP_MASK": g_group_mask,
    "SUM": g_sum, "CONCAT": g_concat, "SET_ROWS": g_set_rows, "GET_ROWS": g_get_rows,
    "MUL_MAT": g_mul_mat, "MUL_MAT_ID": g_mul_mat_id, "MOE_SWIGLU": g_mul_mat_id, "ATTENTION": g_attention,
}


def generate(plan: Plan) -> Program:
    """The CUDA C module and the launch list for the plan's groups, in order: a row-wise group
    is one launch (group_kernel); any other group launches each of its steps' phases."""
    parts = [HEADER]
    seen: dict[str, str] = {}
    launches = []
    phases: dict[int, list] = {}

    def phases_of(i: int, part: str) -> list:
        """A step's phases (generated once): all of them, its prelude (the first) or the rest."""
        if i not in phases:
            step = plan.steps[i]
            gen = GENERATORS.get(step.kind)
            if gen is None:
                raise MoeGraphError(f"the cuda backend has no kernel for {step.kind} ({step.node!r})")
            phases[i] = gen(plan, step.node)
        return {"all": phases[i], "prelude": phases[i][:1], "rest": phases[i][1:]}[part]

    def name_of(text: str) -> str:
        if text not in seen:
            seen[text] = f"mg_k{len(seen)}"
            parts.append(text.replace("void KERNEL(", f"void {seen[text]}(", 1))
        return seen[text]

    for group, kind in zip(plan.groups, plan.group_kind):
        members = [phases_of(i, part) for i, part in group]
        if kind == "rows" and len(group) > 1 and all(len(m) == 1 and _token_major(m[0]) for m in members):
            text, operands = group_kernel([m[0] for m in members])
            label = "GROUP " + "+".join(plan.steps[i].kind for i, _ in group)
            launches.append(Launch(name_of(text), operands, ("T",), "block", 256, 0, label,
                                   step_index=group[0][0], group=tuple(group)))
            continue
        for (i, part), member in zip(group, members):
            step = plan.steps[i]
            for k, body, mode, items, block, smem, *when in member:
                t_range, min_cc = when if when else ((0, 1 << 62), 0)
                label = f"{step.kind} {step.node.name or ''}".strip()
                launches.append(Launch(name_of(k.finish("KERNEL", body, mode)), list(k.operands), tuple(items),
                                       mode, block, smem, label, t_range, min_cc, i, ((i, part),)))
    return Program("\n".join(parts), launches, len(seen))


def _token_major(phase) -> bool:
    """A phase whose work items are the tokens' rows, tokens first (so a block can do one token's)."""
    k, body, mode, items, block, smem, *when = phase
    return (mode in ("thread", "warp", "block") and items[:1] == ("T",) and not when and smem == 0
            and all(isinstance(d, int) for d in items[1:]))


def group_kernel(members: list) -> tuple[str, list]:
    """One kernel for a row-wise group: a block per token (grid-stride over the tokens) runs every
    member's work items of that token in turn, with a block barrier between members (a token's
    rows are written and read by the same block). Members keep their own code: each in a scope
    of its own, its operands renumbered."""
    operands, scopes = [], []
    for k, body, mode, items, block, smem in members:
        base = len(operands)
        operands += k.operands
        renumber = lambda line: re.sub(r"\bp(\d+)\b", lambda m: f"p{base + int(m.group(1))}", line)
        per_token = math.prod(items[1:])
        loop = {
            "thread": "for (i64 it = it_lo + threadIdx.x; it < it_hi; it += blockDim.x) {",
            "warp": "const int lane = threadIdx.x & 31; (void)lane;\n"
                    "    for (i64 it = it_lo + (threadIdx.x >> 5); it < it_hi; it += blockDim.x >> 5) {",
            "block": "for (i64 it = it_lo; it < it_hi; it++) {",
        }[mode]
        scopes.append("\n".join(["  {", *map(renumber, k.lines),
                                  f"    const i64 it_lo = tok * {per_token}LL, it_hi = it_lo + {per_token}LL;",
                                  f"    {loop}", *map(renumber, body), "    }", "  }", "  __syncthreads();"]))
    params = ", ".join(["const i64* __restrict__ syms"] + [f"u8* p{i}" for i in range(len(operands))])
    syms = " ".join(f"const i64 sym_{s} = syms[{i}];" for i, s in enumerate(SYMBOLS))
    text = (f'extern "C" __global__ void KERNEL({params}) {{\n  {syms} (void)sym_T; (void)sym_KV; (void)sym_O;\n'
            "  for (i64 tok = blockIdx.x; tok < sym_T; tok += gridDim.x) {\n"
            + "\n".join(scopes) + "\n  }\n}\n")
    return text, operands


def lowered(plan: Plan, program: Program, cc: int = 90) -> list[dict]:
    """The launches a device of compute capability `cc` makes, with the graph nodes each computes
    and the token range it runs for (dump --lowered)."""
    from ..lower import lowered_steps
    rows = []
    for L in program.launches:
        lo, hi = L.t_range
        if L.min_cc > cc:
            continue
        if L.min_cc < 0 and cc < -L.min_cc:    # a fallback: it runs for every T on such a device
            lo, hi = 0, 1 << 62
        full = lo <= 1 and hi >= plan.maxes["T"]
        rows.append((list(L.group) or [L.step_index], L.name, None if full else (max(lo, 1), min(hi, plan.maxes["T"]))))
    return lowered_steps(plan, rows)


TARGET = Target("cuda", GENERATORS, weight_types=frozenset((*FLOAT_W, *DOT_TYPES)),
                notes={})


def generate_for_graph(graph, max_tokens: int = 512) -> tuple[Plan, Program]:
    """Lowers the graph for CUDA (a copy; fusion rules applied) and generates its program."""
    graph = lower(graph, TARGET)
    n_ctx = graph_n_ctx(graph)
    plan = Plan(graph, TARGET, min(max_tokens, n_ctx), n_ctx)
    return plan, generate(plan)
