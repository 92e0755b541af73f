"""`moegraph quantize`: GGUF -> GGUF in another GGML type, byte-identical to llama.cpp's
`llama-quantize` (``llama_model_quantize`` without an importance matrix), parallel over whole
experts and row ranges for any thread count, streamed to disk.

    moegraph quantize model-F32.gguf model-Q4_K_M.gguf Q4_K_M -t 8
    moegraph quantize model-F32.gguf Q4_K_M --dry-run          # the per-tensor plan only

    from moegraph.quantize import quantize
    result = quantize("model-F32.gguf", "model-Q4_K_M.gguf", "Q4_K_M", threads=8)

Three parts:

* **Type rules** (:func:`plan_tensors`): llama.cpp's ``llama_tensor_get_type`` for the file types
  listed in :data:`FTYPES`: which tensors are quantized at all (2-D/3-D ``*weight`` tensors, not
  norms, not the MoE router ``ffn_gate_inp``), which get more bits in the mixes (``attn_v`` and
  ``ffn_down`` in the ``use_more_bits`` layers for Q4_K_M/Q5_K_M, ...), ``output.weight`` -> Q6_K
  for quantized types other than Q8_0 (and ``token_embd`` with it when the output is tied), the
  8-expert special cases, and the fallback when a row is not a multiple of the block size (Q4_K
  -> Q5_0, Q6_K -> Q8_0, ...). Tensors are written in llama.cpp's order (by layer, then name).
* **Kernels**: :func:`moegraph.quants.quantize_weights` (ggml's reference quantizers, the same
  bytes): LLVM-JIT native code (llvmlite; compiled once, cached on disk), exact NumPy otherwise.
* **Scheduler** (:func:`make_work_units`, :func:`assign_units`): the unit of work is
  (tensor, experts, row range), sized by bytes: experts smaller than the target unit are grouped
  whole (a unit never splits an expert then), larger experts and 2-D tensors are cut into equal
  row ranges. Units are dealt in file order to the least-loaded thread (list scheduling), so every
  thread's bytes are within one unit of the mean, for any thread count and any mix of tensors;
  each thread works through its units in order. The kernels run without the GIL (the JIT kernels
  are ctypes calls, which release it; the Python around them is < 5 % of the work), so the
  threads really run in parallel; no processes are needed.

The output is written tensor by tensor (unit by unit) as results arrive, in order, with at most a
bounded number of finished units waiting in memory; it goes to a temporary name that is renamed to
the output path only at the end (an interrupted run leaves no file under that name).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import MoeGraphError

__all__ = [
    "ALIASES",
    "FTYPES",
    "QuantizeResult",
    "RequantizeWarning",
    "TensorPlan",
    "WorkUnit",
    "add_parser",
    "assign_units",
    "cmd_quantize",
    "make_work_units",
    "plan_tensors",
    "quantize",
]

# llama.cpp's file types (enum llama_ftype) that moegraph produces: name -> (id, default type name)
FTYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"), "F16": (1, "F16"), "BF16": (32, "BF16"),
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q8_0": (7, "Q8_0"),
    "Q2_K": (10, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"), "Q3_K_M": (12, "Q3_K"), "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
    "MXFP4_MOE": (38, "MXFP4"),       # 3-D (expert) tensors MXFP4, the others Q8_0
}
# llama-quantize's aliases
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# llama.cpp file types that need an importance matrix or types moegraph does not produce yet
_NOT_SUPPORTED = {"Q2_K_S": "needs an importance matrix (imatrix), which moegraph does not use",
                  "IQ1_S": "", "IQ1_M": "", "IQ2_XXS": "", "IQ2_XS": "", "IQ2_S": "", "IQ2_M": "",
                  "IQ3_XXS": "", "IQ3_XS": "", "IQ3_S": "", "IQ3_M": "", "IQ4_NL": "",
                  "IQ4_XS": "", "TQ1_0": "", "TQ2_0": "", "NVFP4": "",
                  "Q1_0": "", "Q2_0": ""}
GGML_QNT_VERSION = 2
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


class RequantizeWarning(UserWarning):
    """The input holds already-quantized tensors that are quantized again (quality loss)."""


# ----------------------------------------------------------------------------------------------
# the per-tensor plan


@dataclass
class TensorPlan:
    """One tensor of the output: NumPy-order shape, source and target type (names), bytes."""
    name: str
    shape: tuple[int, ...]
    src_type: str
    dst_type: str
    src_bytes: int
    dst_bytes: int
    note: str = ""                  # why the type differs from the file type's default, if it does

    @property
    def quantize(self) -> bool:
        return self.src_type != self.dst_type

    @property
    def n_expert(self) -> int:
        """Experts: the leading axis of a 3-D tensor (1 otherwise)."""
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def rows_per_expert(self) -> int:
        rows = 1
        for d in self.shape[:-1]:
            rows *= d
        return rows // self.n_expert

    @property
    def row_len(self) -> int:
        return self.shape[-1] if self.shape else 1


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category (substring rules, in this order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


_NO_QUANT_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup",
                        "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                        "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
                        "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
                        "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                        "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                        "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                        "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
                        "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                        "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
                        "mm.a.code_embd")


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (at least 1)."""
    ne = list(reversed(shape))          # ggml order
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def _allows_quantization(name: str, shape: tuple[int, ...], quantize_output: bool = True) -> tuple[bool, str]:
    """llama.cpp's tensor_allows_quantization, with the reason when not."""
    if _n_dims(shape) < 2:
        return False, "1-D"
    if not name.endswith("weight"):
        return False, "not a weight"
    if "_norm.weight" in name:
        return False, "norm"
    if not quantize_output and name == "output.weight":
        return False, "output kept"
    if "ffn_gate_inp.weight" in name:
        return False, "expert router"
    for s in _NO_QUANT_SUBSTRINGS:
        if s in name:
            return False, "kept by llama.cpp's rules"
    if name in ("position_embd.weight", "token_types.weight"):
        return False, "kept by llama.cpp's rules"
    return True, ""


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _Hparams:
    arch: str
    n_layer: int
    n_expert: int
    n_gqa: int
    is_70b: bool


def _hparams(metadata: dict[str, Any]) -> _Hparams:
    arch = str(metadata.get("general.architecture", ""))

    def first(v, default=0):
        if isinstance(v, (list, tuple)):
            return int(v[0]) if v else default
        return int(v) if v is not None else default
    n_layer = first(metadata.get(f"{arch}.block_count"))
    n_head = first(metadata.get(f"{arch}.attention.head_count"))
    n_head_kv = first(metadata.get(f"{arch}.attention.head_count_kv"), n_head)
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    n_expert = first(metadata.get(f"{arch}.expert_count"))
    # llama.cpp's LLM_TYPE_70B (only the llama architecture's 80-layer GQA model)
    is_70b = arch == "llama" and n_layer == 80 and n_head != n_head_kv
    return _Hparams(arch, n_layer, n_expert, n_gqa, is_70b)


def _sort_key(name: str):
    """llama.cpp's weight_name_comparer: tensors outside blk.N first, then by layer, then name."""
    m = re.match(r"blk\.(-?\d+)", name)
    return (int(m.group(1)) if m else -1, name)


class _TypeRules:
    """llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for the file types in FTYPES, with
    its state: the attn_v and per-FFN counters advance as tensors are visited in file order."""

    def __init__(self, ftype: str, names: list[str], metadata: dict[str, Any], pure: bool,
                 output_tensor_type: str | None, token_embedding_type: str | None):
        self.ftype, self.pure = ftype, pure
        self.default = FTYPES[ftype][1]
        self.hp = _hparams(metadata)
        self.output_type, self.embd_type = output_tensor_type, token_embedding_type
        cats = [_category(n) for n in names]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.tied = "output" not in cats
        self.n_ffn = self.hp.n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def _layer(self, counter: int, name: str) -> tuple[int, int]:
        n_layer = self.n_ffn
        if max(1, self.hp.n_expert) > 1:
            m = re.match(r"blk\.(-?\d+)", name)
            if not m:
                raise MoeGraphError(f"{name}: cannot determine the layer of the tensor "
                                    "(llama.cpp needs blk.N. names in MoE models)")
            i = int(m.group(1))
            if not 0 <= i < n_layer:
                raise MoeGraphError(f"{name}: bad layer {i}, must be in [0, {n_layer})")
            return i, n_layer
        return counter, n_layer

    def _impl(self, t: str, name: str, shape: tuple[int, ...], cat: str) -> tuple[str, str]:
        from .quants import block_size
        ft, hp, arch, ne0 = self.ftype, self.hp, self.hp.arch, shape[-1]
        if cat == "output" or (self.tied and cat == "token_embd"):
            if self.output_type:
                return self.output_type, "output type"
            if ft == "MXFP4_MOE":
                return "Q8_0", "output tensor"
            if arch == "falcon" or ne0 % block_size(t) != 0:
                return "Q8_0", "output tensor"
            if t != "Q8_0":
                return "Q6_K", "output tensor"
            return t, ""
        if ft == "MXFP4_MOE":   # (llama.cpp: any 3-D tensor with more than one matrix, MLA's too)
            return ("MXFP4", "") if len(shape) == 3 and shape[0] > 1 else ("Q8_0", "MXFP4_MOE: not an expert tensor")
        if cat == "token_embd":
            return t, ""
        new, note = t, ""
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            i, n = self.i_attention_wv, self.n_attention_wv
            if ft == "Q2_K":
                new = "Q4_K" if hp.n_gqa >= 4 else "Q3_K"
            elif ft == "Q3_K_M":
                new = "Q5_K" if i < 2 else "Q4_K"
            elif ft == "Q3_K_L":
                new = "Q5_K"
            elif ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
                new = "Q6_K"
            elif ft == "Q4_K_S" and i < 4:
                new = "Q5_K"
            if hp.is_70b and new in ("Q3_K", "Q4_K"):
                new = "Q5_K"
            if hp.n_expert == 8:
                new = "Q8_0"
            self.i_attention_wv += 1
            note = "attn_v mix rule"
        elif cat == "attn_k":
            if hp.n_expert == 8:
                new, note = "Q8_0", "8-expert attn_k"
        elif cat == "ffn_down":
            i_layer, n_layer = self._layer(self.i_ffn_down, name)
            if ft == "Q2_K":
                new = "Q3_K"
            elif ft == "Q3_K_M":
                new = ("Q5_K" if i_layer < n_layer // 16 else
                       "Q4_K" if arch != "falcon" or _use_more_bits(i_layer, n_layer) else "Q3_K")
            elif ft == "Q3_K_L":
                new = "Q4_K" if arch == "falcon" else "Q5_K"
            elif ft == "Q4_K_M":
                if arch == "falcon":
                    new = ("Q6_K" if i_layer < n_layer // 16 else
                           "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
                elif _use_more_bits(i_layer, n_layer):
                    new = "Q6_K"
            elif ft == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
                new = "Q6_K"
            elif ft == "Q4_K_S" and arch != "falcon" and i_layer < n_layer // 8:
                new = "Q5_K"
            self.i_ffn_down += 1
            note = "ffn_down mix rule"
        elif cat == "attn_output":
            if arch != "falcon":
                if hp.n_expert == 8:
                    if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                        new = "Q5_K"
                elif ft == "Q2_K":
                    new = "Q3_K"
                elif ft == "Q3_K_M":
                    new = "Q4_K"
                elif ft == "Q3_K_L":
                    new = "Q5_K"
            elif ft == "Q3_K_L":
                new = "Q4_K"
            note = "attn_output mix rule"
        elif cat == "ffn_gate":
            self._layer(self.i_ffn_gate, name)
            self.i_ffn_gate += 1
        elif cat == "ffn_up":
            self._layer(self.i_ffn_up, name)
            self.i_ffn_up += 1
        return new, (note if new != t else "")

    @staticmethod
    def _fallback(t: str, name: str, ne0: int) -> tuple[str, str]:
        from .quants import block_size
        if ne0 % block_size(t) == 0:
            return t, ""
        fb = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(t)
        if fb is None and block_size(t) <= 32:   # no smaller block: F16 below (MLA's k_b rows)
            fb = t
        if fb is None:
            raise MoeGraphError(f"{name}: rows of {ne0} values are not a multiple of {t}'s block "
                                f"size {block_size(t)}, and llama.cpp defines no fallback type for {t}")
        if ne0 % block_size(fb) != 0:
            fb = "F16"
        return fb, f"fallback from {t}: {ne0} % {block_size(t)} != 0"

    def target(self, name: str, shape: tuple[int, ...], src_type: str) -> tuple[str, str]:
        from .quants import GGMLType, is_quantized
        ok, why = _allows_quantization(name, shape)
        if not ok:
            return src_type, why
        cat = _category(name)
        if self.embd_type and cat == "token_embd":
            return self.embd_type, "token embedding type"
        if self.output_type and cat == "output":
            return self.output_type, "output type"
        t, note = self.default, ""
        if is_quantized(GGMLType[t]):
            if not self.pure:
                t, note = self._impl(t, name, shape, cat)
            t, fb_note = self._fallback(t, name, shape[-1])
            note = fb_note or note
        return t, note


def resolve_ftype(type_name: str) -> str:
    """A file type name as llama-quantize takes it (case-insensitive; Q4_K = Q4_K_M etc.)."""
    name = str(type_name).strip().upper()
    name = ALIASES.get(name, name)
    if name in FTYPES:
        return name
    supported = ", ".join(list(FTYPES) + [f"{a} (= {b})" for a, b in ALIASES.items()])
    if name in _NOT_SUPPORTED:
        why = _NOT_SUPPORTED[name] or "moegraph does not produce this type yet"
        raise MoeGraphError(f"quantize: type {name} is not supported: {why}. Supported: {supported}")
    raise MoeGraphError(f"quantize: unknown type {type_name!r}. Supported: {supported}")


def plan_tensors(src, type_name: str, *, pure: bool = False, output_tensor_type: str | None = None,
                 token_embedding_type: str | None = None) -> list[TensorPlan]:
    """The output's tensors in llama.cpp's order with their target types. ``src`` is a path or a
    :class:`~moegraph.gguf_file.GGUFFile`."""
    from .gguf_file import GGUFFile
    from .quants import WEIGHT_TYPES, row_bytes
    f = src if isinstance(src, GGUFFile) else GGUFFile(src)
    ftype = resolve_ftype(type_name)
    produced = {t.name for t in WEIGHT_TYPES}
    for opt, v in (("output_tensor_type", output_tensor_type), ("token_embedding_type", token_embedding_type)):
        if v is not None and v.upper() not in produced:
            raise MoeGraphError(f"quantize: {opt} {v} is not a type moegraph produces "
                                f"({', '.join(sorted(produced))})")
    infos = _tensor_infos(f)
    names = sorted(infos, key=_sort_key)
    rules = _TypeRules(ftype, names, f.metadata, pure, output_tensor_type and output_tensor_type.upper(),
                       token_embedding_type and token_embedding_type.upper())
    plan = []
    for name in names:
        shape, src_type, nbytes = infos[name]
        dst_type, note = rules.target(name, shape, src_type)
        rows = 1
        for d in shape[:-1]:
            rows *= d
        if dst_type != src_type:
            if dst_type not in produced:
                raise MoeGraphError(f"{name}: target type {dst_type} is not supported")
            dst_bytes = rows * row_bytes(dst_type, shape[-1])
        else:
            dst_bytes = nbytes
        plan.append(TensorPlan(name, shape, src_type, dst_type, nbytes, dst_bytes, note))
    return plan


def _tensor_infos(f) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (NumPy-order shape, type name, bytes) for every tensor, also unsupported types."""
    return {t.name: (t.shape, t.type_name, t.nbytes) for t in f.infos.values()}


def _raw(f, name: str):
    """The tensor's bytes (uint8 memory-mapped view), for every type."""
    return f.infos[name].raw


# ----------------------------------------------------------------------------------------------
# the scheduler


@dataclass(frozen=True)
class WorkUnit:
    """Rows [row0, row1) of experts [expert, expert + n_experts) of tensor `tensor` (an index into
    the plan). A unit either holds whole experts (n_experts >= 1, all rows) or a row range of one
    expert. Its output is the byte range [dst_offset, dst_offset + dst_bytes) of the tensor."""
    tensor: int
    expert: int
    n_experts: int
    row0: int
    row1: int
    src_bytes: int
    dst_offset: int
    dst_bytes: int


MIN_UNIT_BYTES = 1 << 18         # 256 KiB: below this, per-unit overhead shows
MAX_UNIT_BYTES = 32 << 20        # 32 MiB: bounds the memory a unit needs


def default_unit_bytes(total_bytes: int, n_threads: int) -> int:
    """About 8 units per thread, within [256 KiB, 32 MiB]."""
    return int(min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total_bytes // max(1, 8 * n_threads))))


def make_work_units(tensors: list[TensorPlan], n_threads: int = 1,
                    unit_bytes: int | None = None) -> list[WorkUnit]:
    """Cut the tensors to quantize into work units of about ``unit_bytes`` source bytes (default:
    :func:`default_unit_bytes`), in file order. Experts no larger than the target are grouped
    whole; a larger expert (or a 2-D tensor, one "expert") is split into equal row ranges."""
    todo = [t for t in tensors if t.quantize]
    if unit_bytes is None:
        unit_bytes = default_unit_bytes(sum(t.src_bytes for t in todo), n_threads)
    unit_bytes = max(1, int(unit_bytes))
    units: list[WorkUnit] = []
    for ti, t in enumerate(tensors):
        if not t.quantize:
            continue
        E, R = t.n_expert, t.rows_per_expert
        if E == 0 or R == 0:
            continue
        src_row, dst_row = t.src_bytes // (E * R), t.dst_bytes // (E * R)
        expert_bytes = R * src_row
        if expert_bytes <= unit_bytes:
            per = max(1, unit_bytes // max(1, expert_bytes))
            n_units = -(-E // per)
            # spread the experts evenly over the units (sizes differ by at most one expert)
            bounds = [E * k // n_units for k in range(n_units + 1)]
            for e0, e1 in itertools.pairwise(bounds):
                units.append(WorkUnit(ti, e0, e1 - e0, 0, R, (e1 - e0) * expert_bytes,
                                      e0 * R * dst_row, (e1 - e0) * R * dst_row))
        else:
            n_parts = min(R, -(-expert_bytes // unit_bytes))
            bounds = [R * k // n_parts for k in range(n_parts + 1)]
            for e in range(E):
                for r0, r1 in itertools.pairwise(bounds):
                    units.append(WorkUnit(ti, e, 1, r0, r1, (r1 - r0) * src_row,
                                          (e * R + r0) * dst_row, (r1 - r0) * dst_row))
    return units


def assign_units(units: list[WorkUnit], n_threads: int) -> list[list[int]]:
    """Deal the units, in order, each to the thread with the fewest bytes so far (ties: the lowest
    thread). Every thread ends within one unit of the mean load (the last unit a thread received
    found it at or below the mean), and at every point of the file the threads are as far along."""
    import heapq
    n_threads = max(1, int(n_threads))
    heap = [(0, i) for i in range(n_threads)]
    out: list[list[int]] = [[] for _ in range(n_threads)]
    for k, u in enumerate(units):
        load, i = heapq.heappop(heap)
        out[i].append(k)
        heapq.heappush(heap, (load + u.src_bytes, i))
    return out


# ----------------------------------------------------------------------------------------------
# execution


def _to_f32(raw, src_type: str, shape: tuple[int, ...]):
    import numpy as np

    from .quants import dequantize
    x = dequantize(raw, src_type, shape)
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _validate(t: TensorPlan, u: WorkUnit, out) -> None:
    """llama.cpp's ggml_validate_row_data: no inf/NaN in the result's floats (a block's scales,
    or the values of F16/BF16/F32): llama-quantize stops with "quantized data validation failed"."""
    import numpy as np

    from .quants import GGMLType, traits
    tr = traits(t.dst_type)
    if tr.block_dtype is not None:
        blocks = out.view(tr.block_dtype)
        fields = [blocks[n] for n in ("d", "dmin", "m") if n in tr.block_dtype.names]
    elif tr.type == GGMLType.BF16:
        fields = [(out.view(np.uint16).astype(np.uint32) << 16).view(np.float32)]
    else:
        fields = [out.view({GGMLType.F32: np.float32, GGMLType.F16: np.float16}[tr.type])]
    for v in fields:
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.argmax(bad.reshape(-1)))
            raise MoeGraphError(
                f"{t.name}: quantized data validation failed: {'nan' if np.isnan(v.reshape(-1)[i]) else 'inf'} "
                f"in {t.dst_type} block {i} of work unit rows {u.row0}..{u.row1} (expert {u.expert}); "
                "the input has non-finite values or values too large for the type's fp16 scales")


class _Runner:
    """Worker threads that run their assigned units, and the in-order delivery of their results."""

    def __init__(self, f, tensors: list[TensorPlan], units: list[WorkUnit], n_threads: int,
                 max_ahead: int, on_done=None):
        self.f, self.tensors, self.units = f, tensors, units
        self.assignment = assign_units(units, n_threads)
        self.results: dict[int, Any] = {}
        self.cv = threading.Condition()
        self.next_write = 0                  # units [0, next_write) are written (or being written)
        self.max_ahead = max(1, max_ahead)
        self.error: BaseException | None = None
        self.cancelled = False
        self.buffered = self.peak_buffered = 0    # bytes of finished units not yet written
        self.on_done = on_done
        self.threads = [threading.Thread(target=self._work, args=(mine,), daemon=True,
                                         name=f"moegraph-quantize-{i}")
                        for i, mine in enumerate(self.assignment) if mine]

    def start(self):
        for t in self.threads:
            t.start()

    def _compute(self, u: WorkUnit):
        import numpy as np

        from .quants import quantize_weights, row_bytes
        t = self.tensors[u.tensor]
        raw = _raw(self.f, t.name)
        R, C = t.rows_per_expert, t.row_len
        src_row = row_bytes(t.src_type, C)
        first = u.expert * R + u.row0
        last = (u.expert + u.n_experts - 1) * R + u.row1
        part = raw[first * src_row:last * src_row]
        x = _to_f32(part, t.src_type, (last - first, C))
        out = np.empty(u.dst_bytes, dtype=np.uint8)
        quantize_weights(x, t.dst_type, out=out.reshape(last - first, -1))
        _validate(t, u, out)
        return out

    def _work(self, mine: list[int]) -> None:
        for k in mine:
            with self.cv:
                while not self.cancelled and k >= self.next_write + self.max_ahead:
                    self.cv.wait()
                if self.cancelled:
                    return
            try:
                res = self._compute(self.units[k])
            except BaseException as e:  # noqa: BLE001 (delivered to the writer, which raises it)
                with self.cv:
                    self.error = self.error or e
                    self.cancelled = True
                    self.cv.notify_all()
                return
            with self.cv:
                self.results[k] = res
                self.buffered += res.nbytes
                self.peak_buffered = max(self.peak_buffered, self.buffered)
                self.cv.notify_all()

    def take(self, k: int):
        """The result of unit k (blocks until it is ready); frees its slot for the run-ahead."""
        with self.cv:
            while k not in self.results and self.error is None:
                self.cv.wait()
            if self.error is not None:
                raise self.error
            res = self.results.pop(k)
            self.buffered -= res.nbytes
            self.next_write = k + 1
            self.cv.notify_all()
        return res

    def stop(self) -> None:
        with self.cv:
            self.cancelled = True
            self.cv.notify_all()
        for t in self.threads:
            t.join()


class _Streamed:
    """A tensor's data for gguf's writer (``nbytes`` and ``tofile``): copied from the input in
    slabs, or assembled from its units' results as they arrive, in order."""

    COPY_SLAB = 64 << 20

    def __init__(self, job: _Job, index: int):
        self.job, self.index = job, index
        self.nbytes = job.tensors[index].dst_bytes

    def tofile(self, fout) -> None:
        job, t = self.job, self.job.tensors[self.index]
        written = 0
        if not t.quantize:
            raw = _raw(job.f, t.name).reshape(-1)
            for i in range(0, raw.nbytes, self.COPY_SLAB):
                piece = raw[i:i + self.COPY_SLAB]
                fout.write(memoryview(piece))
                written += piece.nbytes
                job.progress(piece.nbytes)
                job.check_interrupt()
        else:
            for k in job.units_of[self.index]:
                u = job.units[k]
                res = job.runner.take(k)
                fout.write(memoryview(res))
                written += res.nbytes
                job.progress(u.src_bytes)
                job.check_interrupt()
        if written != self.nbytes:
            raise AssertionError(f"{t.name}: wrote {written} bytes, expected {self.nbytes}")

    def byteswap(self, inplace=False):
        raise NotImplementedError("moegraph writes little-endian GGUF files")


class _Job:
    def __init__(self, f, tensors, units, runner, bar, interrupt_after: int | None = None):
        self.f, self.tensors, self.units, self.runner, self.bar = f, tensors, units, runner, bar
        self.units_of: dict[int, list[int]] = {}
        for k, u in enumerate(units):
            self.units_of.setdefault(u.tensor, []).append(k)
        self.done_bytes = 0
        self.interrupt_after = interrupt_after

    def progress(self, n: int) -> None:
        self.done_bytes += n
        if self.bar is not None:
            self.bar.update(n)

    def check_interrupt(self) -> None:
        # testing hook: simulate a failure (e.g. Ctrl-C, a full disk) part-way through the write
        if self.interrupt_after is not None and self.done_bytes >= self.interrupt_after:
            raise KeyboardInterrupt("quantize: interrupted (test hook)")


@dataclass
class QuantizeResult:
    """What :func:`quantize` did (or would do, with ``dry_run``)."""
    input: str
    output: str | None
    ftype: str
    threads: int
    tensors: list[TensorPlan]
    n_units: int
    unit_bytes: int
    thread_bytes: list[int]
    seconds: float = 0.0
    written: bool = False
    peak_buffered_bytes: int = 0     # most output bytes held in memory at once (finished units)
    jit: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_bytes for t in self.tensors)

    @property
    def dst_bytes(self) -> int:
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def bytes_per_s(self) -> float:
        return self.src_bytes / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["tensors"] = [dict(asdict(t), shape=list(t.shape)) for t in self.tensors]
        d.update(src_bytes=self.src_bytes, dst_bytes=self.dst_bytes, bytes_per_s=self.bytes_per_s)
        return d

    def table(self) -> str:
        """The per-tensor plan as text (llama-quantize --dry-run's information)."""
        w = max([len(t.name) for t in self.tensors] + [6])
        lines = [f"{'tensor':<{w}}  {'shape':<18} {'type':>5} -> {'new':<5} {'MiB':>9} -> {'MiB':>8}  note"]
        for t in self.tensors:
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            lines.append(f"{t.name:<{w}}  {shape:<18} {t.src_type:>5} -> {t.dst_type:<5} "
                         f"{t.src_bytes / 2**20:9.3f} -> {t.dst_bytes / 2**20:8.3f}  {t.note}")
        n = sum(1 for t in self.tensors if t.quantize)
        lines.append(f"{len(self.tensors)} tensors ({n} quantized), {self.src_bytes / 2**20:.2f} MiB -> "
                     f"{self.dst_bytes / 2**20:.2f} MiB; {self.n_units} work units of ~"
                     f"{self.unit_bytes / 2**20:.2f} MiB over {self.threads} threads (MiB per thread: "
                     + ", ".join(f"{b / 2**20:.1f}" for b in self.thread_bytes) + ")")
        return "\n".join(lines)


def _output_metadata(f, ftype_id: int) -> tuple[dict, dict]:
    """The input's metadata with general.quantization_version and general.file_type (re)set, as
    llama.cpp does (gguf_set_val removes a key and appends it: these two come last)."""
    from gguf import GGUFValueType
    meta = {k: v for k, v in f.metadata.items()
            if k not in ("general.quantization_version", "general.file_type") and k not in _SPLIT_KEYS}
    if meta.get("general.alignment", 32) != 32:
        # the tensor data is written 32-byte aligned (GGUF's default): a different declared
        # alignment would make readers look for the tensors at the wrong offsets
        del meta["general.alignment"]
    types = {k: v for k, v in f.metadata_types.items() if k in meta}
    meta["general.quantization_version"] = GGML_QNT_VERSION
    meta["general.file_type"] = ftype_id
    types["general.quantization_version"] = (GGUFValueType.UINT32, None)
    types["general.file_type"] = (GGUFValueType.UINT32, None)
    return meta, types


def quantize(src, dst=None, type: str = "Q4_K_M", *, threads: int | None = None, pure: bool = False,
             dry_run: bool = False, progress: bool = False, output_tensor_type: str | None = None,
             token_embedding_type: str | None = None, unit_bytes: int | None = None,
             max_ahead: int | None = None, _interrupt_after: int | None = None) -> QuantizeResult:
    """Quantize the GGUF ``src`` to ``dst`` with llama.cpp's file type ``type`` (see :data:`FTYPES`;
    Q3_K/Q4_K/Q5_K mean the _M mixes, as in llama-quantize). Tensors are byte-identical to
    ``llama_model_quantize`` without an importance matrix (the same type for every tensor, the
    same bytes). All metadata is copied; general.file_type is set.

    ``threads``: worker threads (default: the CPU count). ``pure``: every quantizable tensor gets
    the file type's base type (llama-quantize --pure). ``output_tensor_type`` /
    ``token_embedding_type``: override those two tensors' types. ``dry_run``: only plan (nothing
    is read or written). ``progress``: a progress bar on stderr (bytes/s). ``unit_bytes``: the
    target size of a work unit. Already-quantized input tensors are dequantized and quantized again
    with a :class:`RequantizeWarning` (llama.cpp needs --allow-requantize for that).
    """
    from .gguf_file import GGUFFile
    threads = max(1, int(threads or os.cpu_count() or 1))
    f = GGUFFile(src)
    ftype = resolve_ftype(type)
    tensors = plan_tensors(f, ftype, pure=pure, output_tensor_type=output_tensor_type,
                           token_embedding_type=token_embedding_type)
    units = make_work_units(tensors, threads, unit_bytes)
    ub = unit_bytes or default_unit_bytes(sum(t.src_bytes for t in tensors if t.quantize), threads)
    assignment = assign_units(units, threads)
    result = QuantizeResult(str(src), None if dst is None else str(dst), ftype, threads, tensors,
                            len(units), ub, [sum(units[k].src_bytes for k in a) for a in assignment])
    from .quants import SUPPORTED_DEQUANT, is_quantized
    supported_src = {t.name for t in SUPPORTED_DEQUANT}
    requant = sorted({t.src_type for t in tensors if t.quantize and t.src_type in supported_src
                      and is_quantized(t.src_type)})
    for t in tensors:
        if t.quantize and t.src_type not in supported_src:
            raise MoeGraphError(f"{t.name}: cannot convert from {t.src_type} (moegraph reads "
                                f"{', '.join(sorted(supported_src))})")
    if requant:
        msg = (f"requantizing tensors that are already {', '.join(requant)} to {ftype}: quality is "
               "lower than quantizing from F32/F16/BF16 (llama.cpp refuses this without --allow-requantize; "
               "pass it to silence this warning)")
        result.warnings.append(msg)
        warnings.warn(msg, RequantizeWarning, stacklevel=2)
    if dry_run:
        return result
    if dst is None:
        raise MoeGraphError("quantize: an output path is needed (or dry_run=True)")
    dst = Path(dst)
    if dst.resolve() == Path(src).resolve():
        raise MoeGraphError(f"quantize: the output {dst} is the input file")
    if dst.is_dir():
        raise MoeGraphError(f"quantize: the output {dst} is a directory; give the output file's name")
    if not dst.parent.exists():
        raise MoeGraphError(f"quantize: {dst.parent}: no such directory")
    from .quants import jit_functions
    if any(t.quantize and is_quantized(t.dst_type) for t in tensors):
        result.jit = jit_functions() is not None   # compile (or load) before the clock starts

    from .gguf_file import WeightData, write_gguf
    from .quants import GGMLType
    meta, types = _output_metadata(f, FTYPES[ftype][0])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=result.src_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"quantize {ftype}", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    if max_ahead is None:
        # finished units waiting for the writer: a few per thread, at most ~512 MiB of them
        biggest = max([u.dst_bytes for u in units] + [1])
        max_ahead = max(threads + 1, min(3 * threads, (512 << 20) // biggest))
    runner = _Runner(f, tensors, units, threads, max_ahead)
    job = _Job(f, tensors, units, runner, bar, _interrupt_after)
    out = []
    for i, t in enumerate(tensors):
        if t.dst_type not in GGMLType.__members__:
            raise MoeGraphError(f"{t.name}: cannot write type {t.dst_type}")
        out.append(WeightData(t.name, GGMLType[t.dst_type], t.shape, _Streamed(job, i)))
    t0 = time.perf_counter()
    runner.start()
    try:
        write_gguf(dst, meta, out, metadata_types=types)
    finally:
        runner.stop()
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    result.written = True
    result.peak_buffered_bytes = runner.peak_buffered
    return result


# ----------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers, parents) -> argparse.ArgumentParser:
    """Registers `moegraph quantize` on the CLI's subparsers."""
    types = ", ".join(FTYPES) + "; aliases " + ", ".join(f"{a}={b}" for a, b in ALIASES.items())
    import textwrap
    desc = ("Quantize a GGUF to another GGML type, tensor for tensor byte-identical to llama.cpp's "
            "llama-quantize without an importance matrix (same per-tensor type rules). Parallel "
            "over whole experts and row ranges for any thread count; streamed to disk (an "
            f"interrupted run leaves no output file). Types: {types}.")
    sp = subparsers.add_parser(
        "quantize", parents=parents, help="quantize a GGUF (byte-identical to llama-quantize)",
        usage="moegraph quantize [options] IN.gguf OUT.gguf TYPE\n"
              "       moegraph quantize [options] IN.gguf TYPE --dry-run",
        description="\n".join(textwrap.wrap(desc, 90)),
        epilog="examples:\n  moegraph quantize model-F32.gguf model-Q4_K_M.gguf Q4_K_M -t 8\n"
               "  moegraph quantize model-F32.gguf Q4_K_M --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("files", nargs="+", metavar="ARGS",
                    help="IN.gguf OUT.gguf TYPE (IN.gguf TYPE with --dry-run)")
    sp.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                    help=f"worker threads (default: the CPU count, {os.cpu_count()})")
    sp.add_argument("--dry-run", action="store_true",
                    help="print the per-tensor plan (types, sizes) and write nothing")
    sp.add_argument("--pure", action="store_true",
                    help="no mix rules: every quantizable tensor gets the type's base type")
    sp.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight")
    sp.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    sp.add_argument("--unit-mib", type=float, default=None, metavar="MIB",
                    help="target size of a work unit in MiB (default: about 8 per thread)")
    sp.add_argument("--allow-requantize", action="store_true",
                    help="requantize tensors that are already quantized without a warning (llama.cpp "
                         "refuses them without this flag; moegraph warns)")
    sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    sp.add_argument("--json", metavar="FILE", help="also write the plan and timings as JSON")
    sp.set_defaults(func=cmd_quantize)
    return sp


def cmd_quantize(args) -> int:
    import json
    files = list(args.files)
    if args.dry_run and len(files) == 2:
        inp, out, typ = files[0], None, files[1]
    elif len(files) == 3:
        inp, out, typ = files
    else:
        raise MoeGraphError("quantize: expected IN.gguf OUT.gguf TYPE (or IN.gguf TYPE with --dry-run), "
                            f"got {len(files)} arguments")
    if args.threads is not None and args.threads < 1:
        raise MoeGraphError(f"quantize: --threads must be >= 1, got {args.threads}")
    unit = int(args.unit_mib * 2**20) if args.unit_mib else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequantizeWarning)
        res = quantize(inp, None if args.dry_run else out, typ, threads=args.threads, pure=args.pure,
                       dry_run=args.dry_run, progress=args.progress and not args.dry_run,
                       output_tensor_type=args.output_tensor_type,
                       token_embedding_type=args.token_embedding_type, unit_bytes=unit)
    for w in caught:
        if args.allow_requantize and issubclass(w.category, RequantizeWarning):
            continue
        print(f"moegraph: warning: {w.message}", file=sys.stderr)
    if args.dry_run:
        print(res.table())
        print("dry run: nothing written")
    else:
        mb = res.src_bytes / 1e6
        print(f"moegraph: {res.input} -> {res.output} ({res.ftype}): {res.src_bytes / 2**20:.2f} MiB -> "
              f"{res.dst_bytes / 2**20:.2f} MiB in {res.seconds:.2f} s ({mb / res.seconds if res.seconds else 0:.1f} MB/s), "
              f"{res.threads} threads, {res.n_units} work units"
              + ("" if res.jit else " (NumPy kernels: install llvmlite for the JIT)"), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(res.to_json(), indent=1) + "\n", encoding="utf-8")
    return 0
