"""The NumPy reference backend: an interpreter that runs any Graph node by node. It is the
executable specification of the op table, written for clarity, not speed.

Numerics follow ggml-cpu where that is observable in the logits: MUL_MAT/MUL_MAT_ID round the
activations to the weight's vec_dot_type first (F16 for an F16 weight or KV cache, 8-bit blocks for
quantized weights) and then accumulate in float64; norms and softmax reduce in float64; RoPE
computes its angles by the same float32 recurrence as ggml. Values are float32 between ops (F16
states are kept as float16)."""
from __future__ import annotations

import numpy as np

from moegraph.errors import InputError
from moegraph.ir import BF16, F16, I32, OPS, Graph, Kind, Node, rope_mscale, rope_yarn_ramp, static_shape

from .lower import UnsupportedOpError, bind_symbols
from moegraph.quants import (GGMLType, quantize_activations, quantize_roundtrip, traits,
                             vec_dot_type)


class NumpyBackend:
    name = "numpy"

    def __init__(self, emulate_ggml_rounding: bool = True, **_ignored):
        self.emulate = emulate_ggml_rounding

    def compile(self, graph: Graph) -> "NumpyExecutable":
        return NumpyExecutable(graph, self.emulate)


def register_impl(op: str, fn) -> None:
    """The reference implementation of a custom op: fn(executable, node, bindings, *input_arrays)
    -> array (FUSED ops need none: their decomposition runs)."""
    IMPL[op] = fn


class NumpyExecutable:
    def __init__(self, graph: Graph, emulate: bool):
        if any(OPS[n.op].kind == Kind.FUSED for n in graph.nodes):
            graph = graph.copy()     # fused ops run as what they mean: their decomposition
            graph.expand_fused()
        missing = [f"{n!r}" for n in graph.toposort() if OPS[n.op].kind != Kind.LEAF and n.op not in IMPL]
        if missing:
            raise UnsupportedOpError("the numpy backend has no implementation for " + ", ".join(missing)
                                     + " (register one with moegraph.backends.reference.register_impl)")
        self.graph, self.emulate = graph, emulate
        self.order = graph.toposort()
        self.dequantized: dict[tuple, np.ndarray] = {}  # (what, id(WeightData)) -> array
        self.states: dict[str, np.ndarray] = {}
        self.reset_state()

    def reset_state(self) -> None:
        for name, n in self.graph.states().items():
            dt = np.float16 if n.dtype == F16 else np.float32
            if name in self.states:
                self.states[name][...] = 0
            else:
                self.states[name] = np.zeros(n.shape, dt)

    def weight(self, n: Node) -> np.ndarray:
        key = ("values", id(n.data))
        if key not in self.dequantized:
            self.dequantized[key] = n.data.dequantize()
        return self.dequantized[key]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # NaN/Inf propagate silently, as in the native backends; the session rejects non-finite
        # logits with one clear error instead of a screen of NumPy warnings
        with np.errstate(all="ignore"):
            return self._run(inputs)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bindings = bind_symbols(self.graph, inputs)
        env: dict[int, np.ndarray] = {}
        for n in self.order:
            if n.op == "INPUT":
                v = inputs[n.name]
            elif n.op == "WEIGHT":
                v = self.weight(n)
            elif n.op == "STATE":
                v = self.states[n.name]
            else:
                args = [None if i is None else env[i.id] for i in n.inputs]
                v = IMPL[n.op](self, n, bindings, *args)
            env[n.id] = v
        return {name: np.asarray(env[o.id], dtype=np.int32 if o.dtype == I32 else np.float32)
                for name, o in self.graph.outputs.items()}

    def round_activations(self, x: np.ndarray, weight_type: GGMLType) -> np.ndarray:
        x = as_f32(x)
        if not self.emulate:
            return x.astype(np.float64)
        return quantize_roundtrip(x, vec_dot_type(weight_type))

    def q8_1_correction(self, w: Node, x: np.ndarray, expert: int | None = None) -> np.ndarray | None:
        """ggml's Q4_1/Q5_1 dot product adds m_w * s_x per block, with s_x = fp16(d_x * sum q_x)
        stored in the Q8_1 activation block; the round trip alone gives m_w * d_x * sum q_x. This
        returns the difference, [..., M, N], or None where it does not apply."""
        if not self.emulate or w.dtype not in (GGMLType.Q4_1, GGMLType.Q5_1) or w.op != "WEIGHT":
            return None
        key = ("mins", id(w.data))
        if key not in self.dequantized:
            blocks = np.frombuffer(w.data.raw, dtype=traits(w.dtype).block_dtype)
            self.dequantized[key] = blocks["m"].astype(np.float64).reshape(*w.shape[:-1], -1)
        mins = self.dequantized[key] if expert is None else self.dequantized[key][expert]
        a = quantize_activations(as_f32(x), GGMLType.Q8_1)
        delta = a.s.astype(np.float64) - a.d.astype(np.float64) * a.qs.sum(axis=-1, dtype=np.int64)
        return delta @ np.swapaxes(mins, -1, -2)


def as_f32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _mul_mat(ex, n, b, a, x):
    xr = ex.round_activations(x, n.inputs[0].dtype)
    a = as_f32(a)
    reps = xr.shape[0] // a.shape[0] if a.ndim == 3 else 1   # GQA: b batch i uses a batch i // r
    if a.ndim >= 3 and reps > 1:
        a = np.repeat(a, reps, axis=0)
    y = xr @ np.swapaxes(a, -1, -2).astype(np.float64)
    corr = ex.q8_1_correction(n.inputs[0], x)
    return (y if corr is None else y + corr).astype(np.float32)


def _mul_mat_id(ex, n, b, a, x, ids):
    xr = ex.round_activations(x, n.inputs[0].dtype)
    T, k = ids.shape
    out = np.zeros((T, k, a.shape[1]), np.float32)
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        rows = xr[t, j if xr.shape[1] > 1 else 0]
        y = rows @ a[e].T.astype(np.float64)
        corr = ex.q8_1_correction(n.inputs[0], x[t, j if x.shape[1] > 1 else 0], expert=e)
        out[t, j] = y if corr is None else y + corr
    return out


def _rope(ex, n, b, x, pos, ff=None):
    nd, mode = n.attrs["n_dims"], n.attrs["mode"]
    half = nd // 2
    f32 = np.float32
    # ggml's angle recurrence in float32: theta_0 = p, theta_{i+1} = theta_i * base^(-2/n_dims)
    step = f32(n.attrs["freq_base"]) ** f32(-2.0 / nd)
    theta = np.empty((len(pos), half), f32)
    th = pos.astype(f32)
    for i in range(half):
        theta[:, i] = th
        th = (th * step).astype(f32)
    if ff is not None:
        theta = (theta / as_f32(ff)[None, :]).astype(f32)
    interp = (theta * f32(n.attrs["freq_scale"])).astype(f32)
    if n.attrs.get("ext_factor", 0.0) != 0:          # YaRN: mix in the unscaled angle per pair
        mix = rope_yarn_ramp(n.attrs)[None, :]
        interp = (interp * (f32(1) - mix) + theta * mix).astype(f32)
    ms = f32(rope_mscale(n.attrs))
    cos, sin = (np.cos(interp) * ms)[:, None, :], (np.sin(interp) * ms)[:, None, :]
    x = as_f32(x)
    out = x.copy()
    if mode == 0:   # NORM: adjacent pairs
        x0, x1 = x[..., 0:nd:2], x[..., 1:nd:2]
        out[..., 0:nd:2], out[..., 1:nd:2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    else:           # NEOX: halves
        x0, x1 = x[..., :half], x[..., half:nd]
        out[..., :half], out[..., half:nd] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out


def _soft_max(ex, n, b, x, mask, sinks):
    z = as_f32(x).astype(np.float64) * n.attrs["scale"]
    if mask is not None:
        z = z + mask
    mx = z.max(axis=-1, keepdims=True)
    if sinks is not None:     # one more logit per head (axis -3) in the max and the sum
        sk = as_f32(sinks).astype(np.float64).reshape(-1, 1, 1)
        mx = np.maximum(mx, sk)
    e = np.exp(z - mx)
    total = e.sum(axis=-1, keepdims=True)
    if sinks is not None:
        total = total + np.exp(sk - mx)
    return (e / total).astype(np.float32)


def _group_mask(ex, n, b, x):
    x = as_f32(x)
    G, used = n.attrs["n_groups"], n.attrs["n_used"]
    xg = x.reshape(*x.shape[:-1], G, -1)
    top2 = np.sort(xg, axis=-1)[..., -2:]
    score = top2[..., 1] + top2[..., 0]                       # float32, largest first
    best = np.argsort(-score, axis=-1, kind="stable")[..., :used]   # ties: the lower group
    keep = np.zeros(score.shape, bool)
    np.put_along_axis(keep, best, True, axis=-1)
    return np.where(keep[..., None], xg, np.float32(-np.inf)).reshape(x.shape).astype(np.float32)


def _rms_norm(ex, n, b, x, w):
    x = as_f32(x)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    y = (x / np.sqrt(ms + n.attrs["eps"])).astype(np.float32)
    return y if w is None else y * as_f32(w)


def _norm(ex, n, b, x):
    x = as_f32(x).astype(np.float64)
    x = x - x.mean(axis=-1, keepdims=True)
    return (x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + n.attrs["eps"])).astype(np.float32)


def _silu(x):
    x = as_f32(x)
    return x / (np.float32(1) + np.exp(-x))


def _top_k(ex, n, b, x):
    order = np.argsort(-as_f32(x), axis=-1, kind="stable")
    return order[..., : n.attrs["k"]].astype(np.int32)


def _swiglu(ex, n, b, gate, up):
    if up is None:
        half = gate.shape[-1] // 2
        gate, up = gate[..., :half], gate[..., half:]
    return _silu(gate) * as_f32(up)


def _set_rows(ex, n, b, dst, src, idx):
    if idx.size and (idx.min() < 0 or idx.max() >= dst.shape[0]):
        raise InputError(f"{n.inputs[0].name}: row index out of range 0..{dst.shape[0] - 1}")
    dst[idx] = src.astype(dst.dtype)
    return dst


def _cast(ex, n, b, x):
    t = n.attrs["dtype"]
    if t == F16:
        return x.astype(np.float16)
    if t == BF16:
        return quantize_roundtrip(as_f32(x), BF16).astype(np.float32)
    return as_f32(x)


IMPL = {
    "GET_ROWS": lambda ex, n, b, table, ids: np.take_along_axis(   # (a table is broadcast over ids' leading dims)
        as_f32(table).reshape((1,) * (ids.ndim + 1 - np.ndim(table)) + np.shape(table)), ids[..., None].astype(np.intp), axis=-2)
    if table.ndim == ids.ndim + 1 else as_f32(table)[ids],
    "RMS_NORM": _rms_norm,
    "NORM": _norm,
    "ADD": lambda ex, n, b, x, y: as_f32(x) + as_f32(y),
    "MUL": lambda ex, n, b, x, y: as_f32(x) * as_f32(y),
    "DIV": lambda ex, n, b, x, y: as_f32(x) / as_f32(y),
    "SCALE": lambda ex, n, b, x: as_f32(x) * np.float32(n.attrs["scale"]) + np.float32(n.attrs["bias"]),
    "SILU": lambda ex, n, b, x: _silu(x),
    "GELU": lambda ex, n, b, x: (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))).astype(np.float32),
    "SIGMOID": lambda ex, n, b, x: (1 / (1 + np.exp(-as_f32(x).astype(np.float64)))).astype(np.float32),
    "CONT": lambda ex, n, b, x: np.ascontiguousarray(x),
    "CLAMP": lambda ex, n, b, x: np.clip(as_f32(x), np.float32(n.attrs["min"]), np.float32(n.attrs["max"])),
    "SWIGLU": _swiglu,
    "MUL_MAT": _mul_mat,
    "MUL_MAT_ID": _mul_mat_id,
    "TOP_K": _top_k,
    "SOFT_MAX": _soft_max,
    "GROUP_MASK": _group_mask,
    "ROPE": _rope,
    "RESHAPE": lambda ex, n, b, x: x.reshape(static_shape(n.shape, b)),
    "PERMUTE": lambda ex, n, b, x: np.transpose(x, n.attrs["axes"]),
    "SLICE": lambda ex, n, b, x: np.take(x, range(n.attrs["start"], static_shape((n.attrs["stop"],), b)[0]), axis=n.attrs["axis"]),
    "CONCAT": lambda ex, n, b, *xs: np.concatenate(xs, axis=n.attrs["axis"]),
    "SUM": lambda ex, n, b, x: as_f32(x).sum(axis=n.attrs["axis"], dtype=np.float64).astype(np.float32),
    "CAST": _cast,
    "SET_ROWS": _set_rows,
}
