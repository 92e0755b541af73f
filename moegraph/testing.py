"""Random GGUF models for tests and benchmarks, written the way llama.cpp's converters write them.

``write_random_model(path, arch, ...)`` writes a complete, loadable model of one of the supported
architectures -- ``llama`` (dense, or with Mixtral-style experts), ``qwen2moe`` (shared expert with a
sigmoid gate, Q/K/V biases), ``qwen3moe`` (per-head Q/K RMS norms) -- with random weights, correct
``{arch}.*`` metadata and a small byte-level ``gpt2`` tokenizer, in any of several tensor types
(and layer stacks of ``gpt-oss`` and ``deepseek2`` at real shapes, for benchmarks). The
files load in llama.cpp as well as in moegraph (tensor names and GGUF dims as in llama.cpp's
``src/llama-arch.cpp`` and ``src/models/<arch>.cpp``).

Weights
    Matrices, biases and routers are N(0, ``scale``) (or uniform with that deviation,
    ``dist="uniform"``, 4x faster to draw); norm weights are 1 + N(0, 0.1) (near 1, as in a trained
    model). Values depend only on (``seed``, the tensor's *unmerged* name, its shape):
    the same seed gives the same weights whatever the file type, and a file written with
    ``merged_gate_up=True`` / ``fused_qkv=True`` holds exactly the weights of the unmerged file.
    Tensors are generated, quantized and written chunk by chunk (one expert or about 4M values at
    a time, on ``threads`` threads): memory stays flat for models of any size.

Layout facts (llama.cpp ``src/llama-arch.cpp``: ``LLM_TENSOR_FFN_GATE_UP_EXPS`` ->
``blk.%d.ffn_gate_up_exps``, ``LLM_TENSOR_ATTN_QKV`` -> ``blk.%d.attn_qkv``; no merged name exists
for a dense or shared-expert gate/up pair)
    * ``blk.N.ffn_gate_up_exps``: NumPy shape [n_expert, 2*n_ff_exp, n_embd]; within each expert the
      gate rows, then the up rows (``build_moe_ffn`` views the first half as gate).
    * ``blk.N.attn_qkv`` (+ ``.bias``): rows Q, then K, then V (``build_qkv``).
    * Dense and shared-expert FFNs always stay split (``ffn_gate``/``ffn_up``[``_shexp``]).
    * llama.cpp's loaders for llama, qwen2moe and qwen3moe accept ``attn_qkv`` (create_tensor_qkv)
      but not ``ffn_gate_up_exps`` ("tensor 'blk.0.ffn_gate_exps.weight' not found"; only other
      architectures use create_tensor_gate_up_exps), and the qwen2moe loader requires
      ``output.weight``: such files are for moegraph, which must load what other engines merged.

Tensor types
    ``F32``, ``F16``, ``BF16``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``, ``Q4_K``,
    ``Q5_K``, ``Q6_K`` plus the mixes ``Q4_K_M`` / ``Q5_K_M`` (Q6_K for ``output``, and for
    ``attn_v`` / ``ffn_down[_exps]`` in the layers llama-quantize's ``use_more_bits`` picks),
    quantized by the package's quantizer (``moegraph.quants.quantize_weights``): the bytes
    llama-quantize writes for the same values. As in llama-quantize, 1-D tensors and the router ``ffn_gate_inp`` stay F32,
    and a tensor whose rows are not a multiple of the type's block falls back (Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0; then F16).

Command line: ``examples/make_random_model.py``.
"""
from __future__ import annotations

import fnmatch
import os
import re
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .quants import GGMLType, block_size, quantize_weights, type_size

__all__ = [
    "ARCHS",
    "DTYPES",
    "PRESETS",
    "RandomModelPlan",
    "bytes_to_unicode",
    "gpt2_byte_vocab",
    "plan_random_model",
    "quantize_rows",
    "write_plan",
    "write_random_model",
]

ARCHS = ("llama", "qwen2moe", "qwen3moe", "gpt-oss", "deepseek2")

# name -> (file type id as gguf.LlamaFileType, base tensor type, mix rule)
_FILE_TYPES: dict[str, tuple[int, str, str | None]] = {
    "F32": (0, "F32", None), "F16": (1, "F16", None), "BF16": (32, "BF16", None),
    "Q4_0": (2, "Q4_0", None), "Q4_1": (3, "Q4_1", None), "Q5_0": (8, "Q5_0", None),
    "Q5_1": (9, "Q5_1", None), "Q8_0": (7, "Q8_0", None),
    "Q4_K": (14, "Q4_K", None), "Q4_K_S": (14, "Q4_K", None), "Q4_K_M": (15, "Q4_K", "M"),
    "Q5_K": (16, "Q5_K", None), "Q5_K_S": (16, "Q5_K", None), "Q5_K_M": (17, "Q5_K", "M"),
    "Q6_K": (18, "Q6_K", None),
    "MXFP4_MOE": (38, "Q8_0", "MXFP4"),      # 3-D (expert) tensors MXFP4, the rest Q8_0
}
DTYPES = tuple(_FILE_TYPES)

# GGML type -> (block size, bytes per block)
# the tensor types random models are written in (block layouts: moegraph.quants, their one home)
_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4")
_BLOCK = {t: (block_size(GGMLType[t]), type_size(GGMLType[t])) for t in _TYPES}
# llama-quantize's fallback when a row is not a multiple of the K-quant super-block (256)
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Real models' hyper-parameters (benchmark shapes; pass n_layer=... to make them smaller).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3moe-30b-a3b": dict(arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
                             head_dim=128, n_ff=6144, n_expert=128, n_expert_used=8, n_ff_exp=768,
                             n_vocab=151936, n_ctx=40960, rope_freq_base=1e6),
    "qwen2moe-a2.7b": dict(arch="qwen2moe", n_layer=24, n_embd=2048, n_head=16, n_head_kv=16,
                           n_ff=5632, n_expert=60, n_expert_used=4, n_ff_exp=1408, n_ff_shexp=5632,
                           n_vocab=151936, n_ctx=8192, rope_freq_base=1e6),
    "mixtral-8x7b": dict(arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                         n_ff=14336, n_expert=8, n_expert_used=2, n_ff_exp=14336, n_vocab=32000,
                         n_ctx=32768, rope_freq_base=1e6),
    "smollm2-135m": dict(arch="llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536,
                         n_expert=0, n_vocab=49152, n_ctx=8192, rope_freq_base=1e5),
    "tiny": dict(arch="qwen3moe", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128,
                 n_expert=8, n_expert_used=2, n_ff_exp=32, n_vocab=300, n_ctx=256),
    "gpt-oss-20b": dict(arch="gpt-oss", n_layer=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64,
                        n_ff=2880, n_expert=32, n_expert_used=4, n_ff_exp=2880, n_vocab=201088,
                        n_ctx=131072, rope_freq_base=150000.0, n_swa=128),
    "deepseek-v2-lite": dict(arch="deepseek2", n_layer=27, n_embd=2048, n_head=16, n_head_kv=1,
                             n_ff=10944, n_expert=64, n_expert_used=6, n_ff_exp=1408, n_vocab=102400,
                             n_ctx=163840, kv_lora_rank=512, qk_rope_dim=64, qk_nope_dim=128,
                             v_head_dim=128, n_expert_shared=2, n_layer_dense_lead=1),
}

_CHUNK_VALUES = 1 << 22   # about this many values per generated/quantized piece of a 2-D tensor


# ----------------------------------------------------------------------------------------------
# tokenizer: a byte-level GPT-2 vocabulary


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Public-domain text (KJV, Genesis 1) the small vocabulary's merges are learned from.
_CORPUS = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and "
    "void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face "
    "of the waters. And God said, Let there be light: and there was light. And God saw the light, "
    "that it was good: and God divided the light from the darkness. And God called the light Day, "
    "and the darkness he called Night. And the evening and the morning were the first day. "
    "hello world, hello there! Hello, World. 0123456789 The quick brown fox jumps over the lazy dog."
)
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def gpt2_byte_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocabulary of exactly ``n_vocab`` tokens:
    id 0 ``<|endoftext|>`` (control), ids 1..256 the 256 byte tokens, then merged tokens -- first
    the merges BPE learns on a short English text, then systematic ones (token + letter) to reach
    any size. Every merge ``a b`` yields a token ``ab`` of the vocabulary."""
    if n_vocab < 257:
        raise ValueError(f"n_vocab must be at least 257 (1 control + 256 byte tokens), got {n_vocab}")
    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>"] + [b2u[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []
    need = n_vocab - len(tokens)

    def add(a: str, b: str) -> bool:
        t = a + b
        if t in known:
            return False
        known.add(t)
        tokens.append(t)
        merges.append(f"{a} {b}")
        return True

    # 1) BPE training on the corpus (most frequent pair first, first-seen on ties)
    words: dict[tuple[str, ...], int] = {}
    for w in _WORD_RE.findall(_CORPUS):
        key = tuple(b2u[b] for b in w.encode("utf-8"))
        words[key] = words.get(key, 0) + 1
    while len(merges) < need:
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for p in pairwise(w):
                pairs[p] = pairs.get(p, 0) + c
        if not pairs:
            break
        best = max(pairs, key=pairs.get)   # dicts keep insertion order: first seen wins ties
        if not add(*best):
            # already a token (made by another pair); merging it again only changes the words
            pass
        merged: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    # 2) systematic merges: existing token + one letter, in id order
    letters = [b2u[b] for b in b"etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ"]
    i = 1
    while len(merges) < need:
        base = tokens[i]
        for c in letters:
            if len(merges) >= need:
                break
            add(base, c)
        i += 1
    types = [3] + [1] * (len(tokens) - 1)   # CONTROL, then NORMAL
    return tokens, types, merges


# ----------------------------------------------------------------------------------------------
# quantization of float32 rows to GGML block bytes


def quantize_rows(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [..., cols] -> the GGML bytes of ``qtype`` as uint8 [..., row_bytes]
    (F32/F16 as their little-endian bytes), quantized as llama.cpp does (the package's
    byte-identical quantizer)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    cols = x.shape[-1]
    blk, size = _BLOCK[qtype]
    if cols % blk:
        raise ValueError(f"{qtype}: rows of {cols} values are not a multiple of the block size {blk}")
    lead = x.shape[:-1]
    if qtype == "F32":
        return x.view(np.uint8).reshape(*lead, cols * 4)
    if qtype == "F16":
        return x.astype(np.float16).view(np.uint8).reshape(*lead, cols * 2)
    out = quantize_weights(x.reshape(-1, cols), GGMLType[qtype])
    return np.ascontiguousarray(out).reshape(*lead, cols // blk * size)


# ----------------------------------------------------------------------------------------------
# the tensor plan


@dataclass(frozen=True)
class _Logical:
    """One unmerged tensor: its values depend only on (seed, name, shape, kind)."""
    name: str
    shape: tuple[int, ...]
    kind: str            # "w" (N(0, scale)) or "norm" (1 + N(0, 0.1))

    def chunks(self) -> list[int]:
        if len(self.shape) == 3:
            return list(range(self.shape[0]))            # one expert each
        if len(self.shape) == 2:
            per = max(1, _CHUNK_VALUES // self.shape[1])
            return list(range(-(-self.shape[0] // per)))
        return [0]

    def values(self, seed: int, scale: float, chunk: int, dist: str = "normal") -> np.ndarray:
        ss = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(self.name.encode()), chunk])
        rng = np.random.Generator(np.random.PCG64(ss))
        if len(self.shape) == 3:
            shape = self.shape[1:]
        elif len(self.shape) == 2:
            per = max(1, _CHUNK_VALUES // self.shape[1])
            shape = (min(per, self.shape[0] - chunk * per), self.shape[1])
        else:
            shape = self.shape
        if dist == "uniform":       # same standard deviation, ~4x faster to generate
            v = rng.random(shape, dtype=np.float32)
            v -= np.float32(0.5)
            v *= np.float32(2 * 3 ** 0.5)
        else:
            v = rng.standard_normal(shape, dtype=np.float32)
        if self.kind == "norm":
            v *= np.float32(0.1)
            v += np.float32(1.0)
        else:
            v *= np.float32(scale)
        return v


@dataclass
class _Physical:
    """One tensor of the file: NumPy-order shape, GGML type, and the (logical, chunk) pieces
    whose rows it is made of, in order."""
    name: str
    shape: tuple[int, ...]
    qtype: str
    pieces: list[tuple[_Logical, int]]

    @property
    def nbytes(self) -> int:
        blk, size = _BLOCK[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // blk) * size

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class RandomModelPlan:
    """What ``write_random_model`` writes: resolved hyper-parameters, metadata and tensors."""
    arch: str
    hparams: dict[str, Any]
    dtype: str
    metadata: list[tuple[str, Any, str]]                # (key, value, gguf value-type name)
    tensors: list[_Physical] = field(default_factory=list)
    vocab: tuple[list[str], list[int], list[str]] | None = None

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.qtype for t in self.tensors}


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's choice of the layers that get more bits in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _tensor_type(name: str, shape: tuple[int, ...], base: str, mix: str | None, n_layer: int,
                 overrides: dict[str, str] | None) -> str:
    if sum(d > 1 for d in shape) <= 1 or name.endswith(".bias") or ".ffn_gate_inp." in name:
        t = "F32"           # norms, biases, routers, the [1, n] shared gate (ggml_n_dims 1)
    elif mix == "MXFP4":    # llama-quantize's MXFP4_MOE: any 3-D tensor of several matrices
        t = "MXFP4" if len(shape) == 3 and shape[0] > 1 else base
    else:
        t = base
        if base.endswith("_K") and name == "output.weight":
            t = "Q6_K"                                 # llama-quantize's output type for K-quants
        m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down|ffn_down_exps)\.weight$", name)
        if mix == "M" and m and _use_more_bits(int(m.group(1)), n_layer):
            t = "Q6_K"                                 # (simplified) Q4_K_M / Q5_K_M rule
    for pat, ot in (overrides or {}).items():
        if fnmatch.fnmatchcase(name, pat):
            t = ot.upper()
    if t not in _BLOCK:
        raise ValueError(f"{name}: unsupported tensor type {t!r} (supported: {', '.join(_BLOCK)})")
    while shape[-1] % _BLOCK[t][0]:
        t = _FALLBACK.get(t, "F16")     # (32-blocks: F16 straight away, as llama-quantize)
    return t


def plan_random_model(arch: str = "qwen3moe", *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                      n_head_kv: int = 2, head_dim: int | None = None, n_ff: int = 128,
                      n_expert: int = 8, n_expert_used: int = 2, n_ff_exp: int = 32,
                      n_ff_shexp: int = 0, n_vocab: int = 300, n_ctx: int = 256, dtype: str = "F32",
                      tied_output: bool = False, qkv_bias: bool | None = None,
                      merged_gate_up: bool = False, fused_qkv: bool = False,
                      rope_freq_base: float = 10000.0, rms_eps: float | None = None,
                      name: str | None = None, type_overrides: dict[str, str] | None = None,
                      with_vocab: bool = True, n_swa: int = 128, kv_lora_rank: int = 512,
                      q_lora_rank: int = 0, qk_rope_dim: int = 64, qk_nope_dim: int = 128,
                      v_head_dim: int = 128, n_expert_shared: int = 2,
                      n_layer_dense_lead: int = 1) -> RandomModelPlan:
    """The tensors and metadata of a random model (nothing is generated). Arguments as for
    :func:`write_random_model`."""
    if arch in ("gpt-oss", "deepseek2"):
        return _plan_new_arch(arch, locals())
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    dtype = dtype.upper()
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    head_dim = head_dim or n_embd // n_head
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a positive multiple of n_head_kv ({n_head_kv})")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    moe = n_expert > 0
    if arch in ("qwen2moe", "qwen3moe") and not moe:
        raise ValueError(f"{arch} needs experts (n_expert > 0)")
    if moe and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used must be in 1..n_expert={n_expert}, got {n_expert_used}")
    if arch == "qwen2moe":
        if n_head * head_dim != n_embd:
            raise ValueError("qwen2moe needs n_head * head_dim == n_embd (llama.cpp's attn_q and "
                             f"attn_output are [n_embd, n_embd]); got {n_head}*{head_dim} != {n_embd}")
        n_ff_shexp = n_ff_shexp or n_ff                 # llama.cpp's default for a missing key
    elif n_ff_shexp:
        raise ValueError(f"n_ff_shexp is for qwen2moe only (llama.cpp's {arch} graph has no shared expert)")
    if qkv_bias is None:
        qkv_bias = arch == "qwen2moe"
    if rms_eps is None:
        rms_eps = 1e-5 if arch == "llama" else 1e-6
    if arch == "llama" and moe:
        n_ff = n_ff_exp          # llama.cpp's llama loader sizes the experts by feed_forward_length
    file_type, base, mix = _FILE_TYPES[dtype]

    hp = dict(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
              head_dim=head_dim, n_ff=n_ff, n_expert=n_expert if moe else 0,
              n_expert_used=n_expert_used if moe else 0, n_ff_exp=n_ff_exp if moe else 0,
              n_ff_shexp=n_ff_shexp, n_vocab=n_vocab, n_ctx=n_ctx, rope_freq_base=rope_freq_base,
              rms_eps=rms_eps, tied_output=tied_output, qkv_bias=qkv_bias,
              merged_gate_up=merged_gate_up and moe, fused_qkv=fused_qkv)

    A = arch
    md: list[tuple[str, Any, str]] = [
        ("general.name", name or f"random-{arch}-{dtype}", "STRING"),
        ("general.file_type", file_type, "UINT32"),
        ("general.quantization_version", 2, "UINT32"),
        (f"{A}.vocab_size", n_vocab, "UINT32"),
        (f"{A}.context_length", n_ctx, "UINT32"),
        (f"{A}.embedding_length", n_embd, "UINT32"),
        (f"{A}.block_count", n_layer, "UINT32"),
        (f"{A}.feed_forward_length", n_ff, "UINT32"),
        (f"{A}.attention.head_count", n_head, "UINT32"),
        (f"{A}.attention.head_count_kv", n_head_kv, "UINT32"),
        (f"{A}.attention.key_length", head_dim, "UINT32"),
        (f"{A}.attention.value_length", head_dim, "UINT32"),
        (f"{A}.rope.dimension_count", head_dim, "UINT32"),
        (f"{A}.rope.freq_base", float(rope_freq_base), "FLOAT32"),
        (f"{A}.attention.layer_norm_rms_epsilon", float(rms_eps), "FLOAT32"),
    ]
    if moe:
        md += [(f"{A}.expert_count", n_expert, "UINT32"),
               (f"{A}.expert_used_count", n_expert_used, "UINT32")]
        if arch != "llama":
            md.append((f"{A}.expert_feed_forward_length", n_ff_exp, "UINT32"))
        if arch == "qwen2moe":
            md.append((f"{A}.expert_shared_feed_forward_length", n_ff_shexp, "UINT32"))
    vocab = None
    if with_vocab:
        vocab = gpt2_byte_vocab(n_vocab)
        md += [("tokenizer.ggml.model", "gpt2", "STRING"),
               ("tokenizer.ggml.pre", "gpt-2", "STRING"),
               ("tokenizer.ggml.tokens", vocab[0], "ARRAY:STRING"),
               ("tokenizer.ggml.token_type", vocab[1], "ARRAY:INT32"),
               ("tokenizer.ggml.merges", vocab[2], "ARRAY:STRING"),
               ("tokenizer.ggml.bos_token_id", 0, "UINT32"),
               ("tokenizer.ggml.eos_token_id", 0, "UINT32"),
               ("tokenizer.ggml.add_bos_token", False, "BOOL")]

    plan = RandomModelPlan(arch, hp, dtype, md, vocab=vocab)

    def add(pname: str, parts: list[_Logical], interleave: bool = False):
        """A file tensor made of logical tensors' rows: concatenated (Q, K, V) or, for experts,
        interleaved per expert (gate_e, up_e)."""
        shape = list(parts[0].shape)
        if len(shape) == 1:
            shape[0] = sum(p.shape[0] for p in parts)
        else:
            shape[-2] = sum(p.shape[-2] for p in parts)
        shape = tuple(shape)
        if interleave:
            pieces = [(p, e) for e in range(shape[0]) for p in parts]
        else:
            pieces = [(p, c) for p in parts for c in p.chunks()]
        plan.tensors.append(_Physical(pname, shape, _tensor_type(pname, shape, base, mix, n_layer, type_overrides),
                                      pieces))

    def lw(n, *shape):
        return _Logical(n, tuple(shape), "w")

    def ln(n, *shape):
        return _Logical(n, tuple(shape), "norm")

    E, nq, nkv = n_expert, n_head * head_dim, n_head_kv * head_dim
    add("token_embd.weight", [lw("token_embd.weight", n_vocab, n_embd)])
    for il in range(n_layer):
        p = f"blk.{il}"
        add(f"{p}.attn_norm.weight", [ln(f"{p}.attn_norm.weight", n_embd)])
        q, k, v = (lw(f"{p}.attn_q.weight", nq, n_embd), lw(f"{p}.attn_k.weight", nkv, n_embd),
                   lw(f"{p}.attn_v.weight", nkv, n_embd))
        bq, bk, bv = (lw(f"{p}.attn_q.bias", nq), lw(f"{p}.attn_k.bias", nkv), lw(f"{p}.attn_v.bias", nkv))
        if fused_qkv:
            add(f"{p}.attn_qkv.weight", [q, k, v])
            if qkv_bias:
                add(f"{p}.attn_qkv.bias", [bq, bk, bv])
        else:
            for w_, b_ in ((q, bq), (k, bk), (v, bv)):
                add(w_.name, [w_])
                if qkv_bias:
                    add(b_.name, [b_])
        if arch == "qwen3moe":
            add(f"{p}.attn_q_norm.weight", [ln(f"{p}.attn_q_norm.weight", head_dim)])
            add(f"{p}.attn_k_norm.weight", [ln(f"{p}.attn_k_norm.weight", head_dim)])
        add(f"{p}.attn_output.weight", [lw(f"{p}.attn_output.weight", n_embd, nq)])
        add(f"{p}.ffn_norm.weight", [ln(f"{p}.ffn_norm.weight", n_embd)])
        if not moe:
            for nm, sh in (("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)),
                           ("ffn_down", (n_embd, n_ff))):
                add(f"{p}.{nm}.weight", [lw(f"{p}.{nm}.weight", *sh)])
            continue
        add(f"{p}.ffn_gate_inp.weight", [lw(f"{p}.ffn_gate_inp.weight", E, n_embd)])
        gate = lw(f"{p}.ffn_gate_exps.weight", E, n_ff_exp, n_embd)
        up = lw(f"{p}.ffn_up_exps.weight", E, n_ff_exp, n_embd)
        if merged_gate_up:
            add(f"{p}.ffn_gate_up_exps.weight", [gate, up], interleave=True)
        else:
            add(gate.name, [gate])
            add(up.name, [up])
        add(f"{p}.ffn_down_exps.weight", [lw(f"{p}.ffn_down_exps.weight", E, n_embd, n_ff_exp)])
        if arch == "qwen2moe":
            # [1, n_embd], as llama.cpp's converter writes it (a 1-D [n_embd] loads too)
            add(f"{p}.ffn_gate_inp_shexp.weight", [lw(f"{p}.ffn_gate_inp_shexp.weight", 1, n_embd)])
            for nm, sh in (("ffn_gate_shexp", (n_ff_shexp, n_embd)), ("ffn_up_shexp", (n_ff_shexp, n_embd)),
                           ("ffn_down_shexp", (n_embd, n_ff_shexp))):
                add(f"{p}.{nm}.weight", [lw(f"{p}.{nm}.weight", *sh)])
    add("output_norm.weight", [ln("output_norm.weight", n_embd)])
    if not tied_output:
        add("output.weight", [lw("output.weight", n_vocab, n_embd)])
    return plan


def _plan_new_arch(arch: str, a: dict) -> RandomModelPlan:
    """gpt-oss and deepseek2 (MLA) layer stacks with the tensors and keys llama.cpp's converter
    writes for them (benchmark shapes: the presets gpt-oss-20b and deepseek-v2-lite)."""
    dtype = a["dtype"].upper()
    if dtype not in _FILE_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    file_type, base, mix = _FILE_TYPES[dtype]
    L, n, V, E, k = a["n_layer"], a["n_embd"], a["n_vocab"], a["n_expert"], a["n_expert_used"]
    H, Hkv, F = a["n_head"], a["n_head_kv"], a["n_ff_exp"]
    if not 0 < k <= E:
        raise ValueError(f"n_expert_used must be in 1..n_expert={E}, got {k}")
    A = arch
    md: list[tuple[str, Any, str]] = [
        ("general.name", a["name"] or f"random-{arch}-{dtype}", "STRING"),
        ("general.file_type", file_type, "UINT32"), ("general.quantization_version", 2, "UINT32"),
        (f"{A}.context_length", a["n_ctx"], "UINT32"), (f"{A}.embedding_length", n, "UINT32"),
        (f"{A}.block_count", L, "UINT32"), (f"{A}.feed_forward_length", a["n_ff"], "UINT32"),
        (f"{A}.attention.head_count", H, "UINT32"), (f"{A}.attention.head_count_kv", Hkv, "UINT32"),
        (f"{A}.rope.freq_base", float(a["rope_freq_base"]), "FLOAT32"),
        (f"{A}.attention.layer_norm_rms_epsilon", float(a["rms_eps"] or 1e-5), "FLOAT32"),
        (f"{A}.expert_count", E, "UINT32"), (f"{A}.expert_used_count", k, "UINT32"),
        (f"{A}.expert_feed_forward_length", F, "UINT32")]
    hd = a["head_dim"] or n // H
    R, dr, dn, dv = a["kv_lora_rank"], a["qk_rope_dim"], a["qk_nope_dim"], a["v_head_dim"]
    if arch == "gpt-oss":
        md += [(f"{A}.attention.key_length", hd, "UINT32"), (f"{A}.attention.value_length", hd, "UINT32"),
               (f"{A}.rope.dimension_count", hd, "UINT32"), (f"{A}.attention.sliding_window", a["n_swa"], "UINT32")]
    else:
        md += [(f"{A}.vocab_size", V, "UINT32"), (f"{A}.leading_dense_block_count", a["n_layer_dense_lead"], "UINT32"),
               (f"{A}.attention.q_lora_rank", a["q_lora_rank"], "UINT32"),   # 0: llama.cpp then loads any depth
               (f"{A}.attention.kv_lora_rank", R, "UINT32"), (f"{A}.attention.key_length", R + dr, "UINT32"),
               (f"{A}.attention.value_length", R, "UINT32"), (f"{A}.attention.key_length_mla", dn + dr, "UINT32"),
               (f"{A}.attention.value_length_mla", dv, "UINT32"), (f"{A}.rope.dimension_count", dr, "UINT32"),
               (f"{A}.expert_shared_count", a["n_expert_shared"], "UINT32"),
               (f"{A}.expert_weights_scale", 1.0, "FLOAT32"), (f"{A}.expert_gating_func", 1, "UINT32")]
    vocab = gpt2_byte_vocab(V) if a["with_vocab"] else None
    if vocab:
        md += [("tokenizer.ggml.model", "gpt2", "STRING"), ("tokenizer.ggml.pre", "gpt-2", "STRING"),
               ("tokenizer.ggml.tokens", vocab[0], "ARRAY:STRING"), ("tokenizer.ggml.token_type", vocab[1], "ARRAY:INT32"),
               ("tokenizer.ggml.merges", vocab[2], "ARRAY:STRING"), ("tokenizer.ggml.bos_token_id", 0, "UINT32"),
               ("tokenizer.ggml.eos_token_id", 0, "UINT32"), ("tokenizer.ggml.add_bos_token", False, "BOOL")]
    hp = {key: a[key] for key in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_expert",
                                  "n_expert_used", "n_ff_exp", "n_vocab", "n_ctx")}
    hp.update(head_dim=hd, n_ff_shexp=F * a["n_expert_shared"] if arch == "deepseek2" else 0)
    plan = RandomModelPlan(arch, {"arch": arch, **hp}, dtype, md, vocab=vocab)

    def add(name: str, *shape: int, kind: str = "w"):
        shape, lg = tuple(shape), _Logical(name, tuple(shape), kind)
        plan.tensors.append(_Physical(name, shape, _tensor_type(name, shape, base, mix, L, a["type_overrides"]),
                                      [(lg, c) for c in lg.chunks()]))
    add("token_embd.weight", V, n)
    for il in range(L):
        p = f"blk.{il}"
        add(f"{p}.attn_norm.weight", n, kind="norm")
        if arch == "gpt-oss":
            for w, rows in (("attn_q", H * hd), ("attn_k", Hkv * hd), ("attn_v", Hkv * hd)):
                add(f"{p}.{w}.weight", rows, n)
                add(f"{p}.{w}.bias", rows)
            add(f"{p}.attn_output.weight", n, H * hd)
            add(f"{p}.attn_output.bias", n)
            add(f"{p}.attn_sinks.weight", H)
            add(f"{p}.post_attention_norm.weight", n, kind="norm")
            add(f"{p}.ffn_gate_inp.weight", E, n)
            add(f"{p}.ffn_gate_inp.bias", E)
            for w, shape in (("ffn_gate_exps", (E, F, n)), ("ffn_up_exps", (E, F, n)), ("ffn_down_exps", (E, n, F))):
                add(f"{p}.{w}.weight", *shape)
                add(f"{p}.{w}.bias", E, shape[1])
            continue
        add(f"{p}.attn_q.weight", H * (dn + dr), n)
        add(f"{p}.attn_kv_a_mqa.weight", R + dr, n)
        add(f"{p}.attn_kv_a_norm.weight", R, kind="norm")
        add(f"{p}.attn_k_b.weight", H, R, dn)
        add(f"{p}.attn_v_b.weight", H, dv, R)
        add(f"{p}.attn_output.weight", n, H * dv)
        add(f"{p}.ffn_norm.weight", n, kind="norm")
        if il < a["n_layer_dense_lead"]:
            for w, shape in (("ffn_gate", (a["n_ff"], n)), ("ffn_up", (a["n_ff"], n)), ("ffn_down", (n, a["n_ff"]))):
                add(f"{p}.{w}.weight", *shape)
            continue
        add(f"{p}.ffn_gate_inp.weight", E, n)
        for w, shape in (("ffn_gate_exps", (E, F, n)), ("ffn_up_exps", (E, F, n)), ("ffn_down_exps", (E, n, F))):
            add(f"{p}.{w}.weight", *shape)
        S = F * a["n_expert_shared"]
        for w, shape in (("ffn_gate_shexp", (S, n)), ("ffn_up_shexp", (S, n)), ("ffn_down_shexp", (n, S))):
            add(f"{p}.{w}.weight", *shape)
    add("output_norm.weight", n, kind="norm")
    add("output.weight", V, n)
    return plan


# ----------------------------------------------------------------------------------------------
# writing


class _StreamedTensor:
    """Stands in for a NumPy array in gguf.GGUFWriter.add_tensor: the writer only asks for
    dtype/shape/nbytes and calls tofile(); the data is generated piece by piece right then."""

    def __init__(self, t: _Physical, seed: int, scale: float, dist: str,
                 pool: ThreadPoolExecutor | None, depth: int):
        self.t, self.seed, self.scale, self.dist, self.pool, self.depth = t, seed, scale, dist, pool, depth
        self.dtype = np.dtype(np.float32)   # ignored: raw_dtype gives the type
        self.shape = t.shape
        self.nbytes = t.nbytes

    def _piece(self, item: tuple[_Logical, int]) -> np.ndarray:
        lt, chunk = item
        return quantize_rows(lt.values(self.seed, self.scale, chunk, self.dist), self.t.qtype)

    def _pieces(self) -> Iterator[np.ndarray]:
        items = self.t.pieces
        if self.pool is None or len(items) == 1:
            yield from map(self._piece, items)
            return
        it = iter(items)
        futs = deque(self.pool.submit(self._piece, x) for _, x in zip(range(self.depth), it))
        while futs:
            out = futs.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                futs.append(self.pool.submit(self._piece, nxt))
            yield out

    def tofile(self, fout) -> None:
        written = 0
        for arr in self._pieces():
            arr = np.ascontiguousarray(arr)
            fout.write(memoryview(arr.reshape(-1).view(np.uint8)))
            written += arr.nbytes
        if written != self.nbytes:
            raise AssertionError(f"{self.t.name}: wrote {written} bytes, expected {self.nbytes}")

    def byteswap(self, inplace=False):   # the writer calls this only for big-endian files
        raise NotImplementedError("random models are written little-endian")


def write_random_model(path: str | os.PathLike, arch: str = "qwen3moe", *, n_layer: int = 2,
                       n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2,
                       head_dim: int | None = None, n_ff: int = 128, n_expert: int = 8,
                       n_expert_used: int = 2, n_ff_exp: int = 32, n_ff_shexp: int = 0,
                       n_vocab: int = 300, n_ctx: int = 256, dtype: str = "F32",
                       tied_output: bool = False, qkv_bias: bool | None = None,
                       merged_gate_up: bool = False, fused_qkv: bool = False, seed: int = 0,
                       scale: float = 0.02, rope_freq_base: float = 10000.0,
                       rms_eps: float | None = None, name: str | None = None,
                       type_overrides: dict[str, str] | None = None, dist: str = "normal",
                       threads: int | None = None, progress: bool = False, **arch_kw) -> Path:
    """Writes a random model of architecture ``arch`` to ``path`` and returns the path.

    ``arch``: ``llama`` (dense when ``n_expert=0``, else Mixtral-style experts; the expert width is
    then ``n_ff_exp``, stored as ``feed_forward_length`` as llama.cpp's llama loader expects),
    ``qwen2moe`` (shared expert of width ``n_ff_shexp`` or ``n_ff``, sigmoid-gated; Q/K/V biases by
    default) or ``qwen3moe``. ``head_dim`` defaults to n_embd / n_head. ``dtype``: see
    :data:`DTYPES`; ``type_overrides`` maps tensor-name patterns (fnmatch) to a tensor type, e.g.
    ``{"*.ffn_down_exps.weight": "Q8_0"}``. ``tied_output`` leaves out ``output.weight``
    (llama.cpp's llama and qwen3moe loaders then use ``token_embd``; its qwen2moe loader requires
    ``output.weight``). ``merged_gate_up`` writes ``blk.N.ffn_gate_up_exps`` instead of the
    gate/up expert pair, ``fused_qkv`` writes ``blk.N.attn_qkv`` (and its bias) instead of Q/K/V.
    ``gpt-oss`` and ``deepseek2`` write those architectures' layer stacks (sinks, sliding window
    ``n_swa``, biases; MLA with ``kv_lora_rank``, ``qk_rope_dim``, ``qk_nope_dim``, ``v_head_dim``,
    ``n_expert_shared`` shared experts after ``n_layer_dense_lead`` dense layers), e.g. from the
    presets ``gpt-oss-20b`` (with ``dtype="MXFP4_MOE"``) and ``deepseek-v2-lite``.
    ``scale`` is the standard deviation of matrices, biases and routers; ``dist="uniform"`` draws
    them from a uniform distribution of the same deviation instead of a normal one (about 4x faster
    to generate: for multi-GB benchmark models). ``rms_eps`` defaults to
    1e-5 for llama, 1e-6 for the Qwen architectures. ``threads`` (default: up to 8 CPUs) generate
    and quantize pieces in parallel; the file is the same for any thread count. The file is
    written to a temporary name and renamed into place.
    """
    plan = plan_random_model(
        arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=n_ff, n_expert=n_expert, n_expert_used=n_expert_used, n_ff_exp=n_ff_exp,
        n_ff_shexp=n_ff_shexp, n_vocab=n_vocab, n_ctx=n_ctx, dtype=dtype, tied_output=tied_output,
        qkv_bias=qkv_bias, merged_gate_up=merged_gate_up, fused_qkv=fused_qkv,
        rope_freq_base=rope_freq_base, rms_eps=rms_eps, name=name, type_overrides=type_overrides,
        **arch_kw)
    return write_plan(path, plan, seed=seed, scale=scale, dist=dist, threads=threads,
                      progress=progress)


def write_plan(path: str | os.PathLike, plan: RandomModelPlan, *, seed: int = 0, scale: float = 0.02,
               dist: str = "normal", threads: int | None = None, progress: bool = False) -> Path:
    """Writes a (possibly edited) :class:`RandomModelPlan`: e.g. drop a metadata key from
    ``plan.metadata`` to test how a loader handles files that lack it."""
    import gguf

    if dist not in ("normal", "uniform"):
        raise ValueError(f"dist must be 'normal' or 'uniform', got {dist!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    threads = threads if threads is not None else min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    V = gguf.GGUFValueType
    try:
        w = gguf.GGUFWriter(tmp, plan.arch)
        for key, value, vt in plan.metadata:
            if vt.startswith("ARRAY:"):
                w.add_key_value(key, list(value), V.ARRAY, sub_type=V[vt[6:]])
            else:
                w.add_key_value(key, value, V[vt])
        for t in plan.tensors:
            w.add_tensor(t.name, _StreamedTensor(t, seed, scale, dist, pool, depth=2 * max(threads, 1)),
                         raw_shape=t.shape, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        os.replace(tmp, path)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if tmp.exists():
            tmp.unlink()
    return path
