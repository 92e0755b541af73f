"""Model graph builders, one per GGUF architecture, from GGUF metadata alone.

A builder turns a ModelConfig and the file's tensors into one Graph for a forward step of T
tokens (T is a symbol: the same graph serves the prompt and each generated token):
inputs `tokens` [T], `pos` [T], `kq_mask` [T, KV], `out_rows` [O]; states `cache_k.i`/`cache_v.i`
[n_ctx, n_head_kv, head_dim]; output `logits` [O, n_vocab] for the token positions in `out_rows`
(all of them for perplexity; only the last when a prompt is processed for generation, as
llama.cpp does: the LM head is the largest single product). The MoE FFN is one builder
parameterised as llama.cpp's build_moe_ffn is.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from .errors import ModelError
from .gguf_file import GGUFFile, WeightData
from .ir import F16, F32, I32, ROPE_NEOX, ROPE_NORM, DType, Graph, Node

T = "T"    # the symbolic number of tokens in a step
KV = "KV"  # the symbolic number of KV-cache cells a step attends to (n_past + T)
O = "O"    # the symbolic number of token positions whose logits a step computes


@dataclass
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ctx_train: int
    rms_eps: float
    rope_dims: int
    rope_mode: int
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    rope_ext_factor: float = 0.0       # YaRN's mix (1 with rope.scaling.type yarn)
    rope_attn_factor: float = 1.0      # on cos/sin (ROPE's attn_factor), YaRN's magnitude scaling
    rope_n_ctx_orig: int = 0           # YaRN: the context the model was trained with before scaling
    n_ff: int = 0                      # dense FFN width (0 = none)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    # "softmax" or "sigmoid" over the router logits; "softmax_weight": softmax over the k chosen
    # logits (llama.cpp's expert_gating_func 1, 2, 3)
    expert_gating: str = "softmax"
    expert_weights_norm: bool = False  # renormalize the k selected weights to sum 1
    expert_weights_scale: float = 1.0
    n_expert_groups: int = 0           # > 1: group-limited selection (DeepSeek-V3): experts of the
    n_group_used: int = 0              # n_group_used best groups only (GROUP_MASK)
    n_layer_dense_lead: int = 0        # the first layers have a dense FFN (DeepSeek, GLM)
    moe_layer_step: int = 1            # after them, layer il is MoE where (il + 1) % step == 0 (ERNIE)
    n_layer_nextn: int = 0             # multi-token-prediction layers after the n_layer (unused)
    # MLA (DeepSeek-V2/V3): q and kv go through low-rank projections; the cache holds the
    # compressed kv (kv_lora_rank) and the roped key part, one "head" shared by all heads.
    q_lora_rank: int = 0               # 0: q is one projection (the Lite models)
    kv_lora_rank: int = 0              # > 0: the model uses MLA
    head_dim_mla: int = 0              # q.k head size before absorption (nope + rope dims)
    head_dim_v_mla: int = 0            # value head size after decompression
    rope_yarn_log_mul: float = 0.0     # DeepSeek's mscale_all_dim (as llama.cpp reads it)
    # sliding-window attention (gpt-oss): layer il attends to the last n_swa positions only where
    # il % swa_pattern < swa_pattern - 1 (llama.cpp's set_swa_pattern; pattern 0: every layer),
    # with RoPE base rope_freq_base_swa (0: the same base)
    n_swa: int = 0
    swa_pattern: int = 2
    rope_freq_base_swa: float = 0.0
    qk_norm: str = ""                  # RMS norm of q and k: "head" (qwen3: per head), "full" (olmoe: the whole projection)
    # granite's multipliers (0 = none): embeddings, each block's output before its residual add,
    # the attention's kq scale (instead of 1/sqrt(head_dim)), and the logits (divided by it)
    embedding_scale: float = 0.0
    residual_scale: float = 0.0
    attention_scale: float = 0.0
    logit_scale: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def is_swa(self, il: int) -> bool:
        p = self.swa_pattern
        return bool(self.n_swa) and (p == 0 or il % p < p - 1)

    def summary(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}


@dataclass(frozen=True)
class Arch:
    name: str
    rope_mode: int
    expert_weights_norm: bool          # llama.cpp's norm_w argument for this architecture
    qk_norm: str = ""                  # "head" or "full" (see ModelConfig)
    shared_expert: bool = False
    rope_freqs: bool = False           # reads rope_freqs.weight (Llama 3.1's frequency factors)
    experts_n_ff: bool = False         # experts are feed_forward_length wide (llama, olmoe loaders)
    gating: str = "softmax"            # the expert gating when the file does not say ("": it must)
    ffn_norm: str = "ffn_norm"         # the FFN's pre-norm tensor (GLM: post_attention_norm)
    sinks: bool = False                # attention sinks, one logit per head (gpt-oss)
    # the experts' activation: "swiglu", or gpt-oss's clamped one (llama.cpp's swiglu_oai with
    # its fixed alpha 1.702 and limit 7: (min(g, 7) sigmoid(1.702 min(g, 7))) (clamp(u, -7, 7) + 1))
    expert_act: str = "swiglu"
    # (ARCH.* key, ModelConfig field[, kind]) read beyond KNOWN_KEYS; kind float unless given
    keys: tuple = ()


# The keys of llama.cpp's DeepSeek-style MoE loaders (deepseek2, glm4moe): leading dense layers,
# shared experts counted in experts' widths, the gating function and the renormalization.
DEEPSEEK_MOE_KEYS = (("leading_dense_block_count", "n_layer_dense_lead", int),
                     ("expert_shared_count", "n_shared", int),
                     ("expert_weights_norm", "expert_weights_norm", bool),
                     ("expert_gating_func", "expert_gating", int))
GATING_FUNCS = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}   # llama.cpp's enum; 0 = default


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", ROPE_NORM, expert_weights_norm=True, rope_freqs=True, experts_n_ff=True),  # + Mixtral
    Arch("qwen2moe", ROPE_NEOX, expert_weights_norm=False, shared_expert=True),
    Arch("qwen3moe", ROPE_NEOX, expert_weights_norm=True, qk_norm="head"),
    Arch("olmoe", ROPE_NEOX, expert_weights_norm=False, qk_norm="full", experts_n_ff=True),
    Arch("granitemoe", ROPE_NORM, expert_weights_norm=True, rope_freqs=True, experts_n_ff=True,
         keys=(("embedding_scale", "embedding_scale"), ("residual_scale", "residual_scale"),
               ("attention.scale", "attention_scale"), ("logit_scale", "logit_scale"))),
    # GLM-4.5/4.6 (and Air): sigmoid routing with a selection bias, partial RoPE, q/k norm in some
    Arch("glm4moe", ROPE_NEOX, expert_weights_norm=False, qk_norm="head?", gating="sigmoid",
         ffn_norm="post_attention_norm", keys=DEEPSEEK_MOE_KEYS),
    # DeepSeek-V2/V2-Lite/V3/R1, Kimi-K2, GLM-4.7-Flash: MLA attention
    Arch("deepseek2", ROPE_NORM, expert_weights_norm=False,
         keys=DEEPSEEK_MOE_KEYS + (("attention.q_lora_rank", "q_lora_rank", int),
                                   ("attention.kv_lora_rank", "kv_lora_rank", int),
                                   ("attention.key_length_mla", "head_dim_mla", int),
                                   ("attention.value_length_mla", "head_dim_v_mla", int),
                                   ("rope.scaling.yarn_log_multiplier", "rope_yarn_log_mul", float))),
    # dots.llm1: per-head Q/K norm, sigmoid routing with a selection bias, shared experts
    Arch("dots1", ROPE_NEOX, expert_weights_norm=False, qk_norm="head", gating="", keys=DEEPSEEK_MOE_KEYS),
    # ERNIE-4.5 MoE: softmax routing with a selection bias, renormalized, shared experts
    Arch("ernie4_5-moe", ROPE_NORM, expert_weights_norm=True,
         keys=(("interleave_moe_layer_step", "moe_layer_step", int),
               ("leading_dense_block_count", "n_layer_dense_lead", int),
               ("expert_shared_count", "n_shared", int))),     # (its width is in the shexp length key)
    # gpt-oss-20b/120b: sinks, sliding-window layers, biases everywhere, softmax over the chosen
    Arch("gpt-oss", ROPE_NEOX, expert_weights_norm=False, gating="softmax_weight",
         ffn_norm="post_attention_norm", sinks=True, expert_act="swiglu_oai",
         keys=(("attention.sliding_window", "n_swa", int),
               ("attention.sliding_window_pattern", "swa_pattern", int),
               ("rope.freq_base_swa", "rope_freq_base_swa", float))),
)}

# The ARCH.* metadata keys the builders understand. Any other ARCH.* key is refused with its
# name: a setting we would ignore could change what the model computes (never silently wrong).
KNOWN_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "attention.layer_norm_rms_epsilon",
    "rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scale_linear", "rope.scaling.original_context_length", "rope.scaling.attn_factor",
    "rope.scaling.finetuned",          # informational
    "expert_count", "expert_used_count", "expert_feed_forward_length",
    "expert_shared_feed_forward_length", "expert_weights_scale",
    "nextn_predict_layers",            # multi-token-prediction layers: skipped, as llama.cpp does
    "expert_group_count", "expert_group_used_count",   # group-limited routing: 1 group only
}
# Keys llama.cpp does not read for these architectures: accepted only with the value llama.cpp
# then uses (another value would make llama.cpp and the model's own code disagree).
FIXED_KEYS = {"rope.scaling.yarn_beta_fast": 32.0, "rope.scaling.yarn_beta_slow": 1.0,
              "rope.scaling.yarn_ext_factor": 1.0, "expert_gating_func": 1}   # 1 = softmax


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    arch = f.architecture
    if arch is None:
        raise ModelError(f"{f.path}: no general.architecture in the metadata")
    if arch not in ARCHS:
        raise ModelError(f"{f.path}: architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHS))}")
    a = ARCHS[arch]

    def key(name, default=ModelError, lo: float | None = 1, kind=int):
        """The value of ARCH.name checked: an int (or a finite float) >= lo; a missing key is the
        default, or an error where there is none. A file with n_head 0, a negative count or a
        per-layer array where one value is expected must not reach the builder."""
        full = f"{arch}.{name}"
        v = f.get(full, None)
        if v is None:
            if default is ModelError:
                raise ModelError(f"{f.path}: missing metadata key {full}")
            return default
        if isinstance(v, (list, tuple)):
            raise ModelError(f"{f.path}: metadata key {full} holds {len(v)} values (one per layer?); "
                             "moegraph supports one value here")
        if kind is int:
            ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
                and math.isfinite(float(v))
        if not ok or (lo is not None and v < lo):
            want = "an integer" if kind is int else "a finite number"
            raise ModelError(f"{f.path}: metadata key {full} = {v!r} is not {want}"
                             + (f" >= {lo}" if lo is not None else ""))
        return kind(v)

    n_embd, n_head = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", n_embd // n_head)
    tokens = f.get("tokenizer.ggml.tokens")
    n_vocab = key("vocab_size", len(tokens) if tokens else 0)
    if not n_vocab:
        raise ModelError(f"{f.path}: cannot tell the vocabulary size (no tokenizer.ggml.tokens)")
    arch_keys = {k[0] for k in a.keys}
    unknown = sorted(k for k in f.metadata if k.startswith(f"{arch}.")
                     and k[len(arch) + 1:] not in KNOWN_KEYS | set(FIXED_KEYS) | arch_keys)
    if unknown:
        raise ModelError(f"{f.path}: metadata key(s) {', '.join(unknown)} not understood by moegraph's "
                         f"{arch} builder (refused rather than ignored: they may change what the model "
                         "computes)")
    for name, want in FIXED_KEYS.items():
        if name in arch_keys:
            continue
        if name == "expert_gating_func":   # not read: llama.cpp uses the architecture's own
            want = {v: k for k, v in GATING_FUNCS.items()}[a.gating]
        v = f.get(f"{arch}.{name}", None)
        if v is not None and v != want:
            raise ModelError(f"{f.path}: {arch}.{name} = {v!r}: llama.cpp does not read this key for "
                             f"{arch} (it uses {want}); moegraph refuses the file rather than pick one")
    extra = _arch_keys(f, a, key)
    if "rope_yarn_log_mul" in extra:   # llama.cpp cancels the converter's factor 0.1 (its PR 17945)
        extra["rope_yarn_log_mul"] = float(np.float32(extra["rope_yarn_log_mul"]) / np.float32(0.1))
    rope = _rope_scaling(f, arch, key, n_ctx_train=key("context_length"),
                         log_mul=extra.get("rope_yarn_log_mul", 0.0))
    n_expert = key("expert_count", 0, lo=0)
    n_ff = key("feed_forward_length", 0, lo=0)
    n_used = key("expert_used_count", 0, lo=0)
    n_head_kv = key("attention.head_count_kv", n_head)
    if n_head % n_head_kv:
        raise ModelError(f"{f.path}: {arch}.attention.head_count {n_head} is not a multiple of "
                         f"attention.head_count_kv {n_head_kv}")
    if n_expert and not 1 <= n_used <= n_expert:
        raise ModelError(f"{f.path}: {arch}.expert_used_count {n_used} must be in 1..expert_count "
                         f"({n_expert})")
    n_groups, n_group_used = key("expert_group_count", 0, lo=0), key("expert_group_used_count", 0, lo=0)
    if n_groups > 1 and not (n_expert % n_groups == 0 and n_expert // n_groups >= 2 and 1 <= n_group_used < n_groups):
        raise ModelError(f"{f.path}: {arch}.expert_group_count {n_groups} / expert_group_used_count "
                         f"{n_group_used} do not group expert_count {n_expert} (llama.cpp's conditions)")
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims % 2 or rope_dims > head_dim:
        raise ModelError(f"{f.path}: {arch}.rope.dimension_count {rope_dims} must be even and at most "
                         f"the head size {head_dim}")
    n_block, n_nextn = key("block_count"), key("nextn_predict_layers", 0, lo=0)
    if n_nextn >= n_block:
        raise ModelError(f"{f.path}: {arch}.nextn_predict_layers {n_nextn} leaves no layers of the "
                         f"{n_block} in block_count")
    # llama.cpp's defaults: llama and olmoe size experts by feed_forward_length; the qwen MoEs use
    # n_ff / n_expert_used when expert_feed_forward_length is absent, and a shared expert of n_ff;
    # the DeepSeek-style loaders count shared experts of the experts' width.
    if a.experts_n_ff:
        n_ff_exp = n_ff if n_expert else 0
    else:
        n_ff_exp = key("expert_feed_forward_length", 0, lo=0) or (n_ff // n_used if n_used else 0)
    n_shared = extra.pop("n_shared", None)
    n_ff_shexp = key("expert_shared_feed_forward_length", 0, lo=0) or (
        n_ff_exp * n_shared if n_shared is not None else n_ff if a.shared_expert else 0)
    gating = extra.pop("expert_gating", 0)
    if gating == 0:   # not in the file: the architecture's default (llama.cpp's heuristics)
        gating = a.gating
        if not gating and n_expert:     # llama.cpp aborts in build_moe_ffn
            raise ModelError(f"{f.path}: missing metadata key {arch}.expert_gating_func")
        if arch == "deepseek2" and n_block - n_nextn in (47, 48) and n_vocab == 154880:
            gating = "sigmoid"   # GLM-4.7-Flash files written before the key existed
    elif gating in GATING_FUNCS:
        gating = GATING_FUNCS[gating]
    else:
        raise ModelError(f"{f.path}: {arch}.expert_gating_func {gating} is not supported "
                         f"(1 softmax, 2 sigmoid, 3 softmax over the chosen experts)")
    if extra.get("moe_layer_step", 1) < 1:
        raise ModelError(f"{f.path}: {arch}.interleave_moe_layer_step must be at least 1")
    if a.sinks and not extra.get("n_swa"):    # llama.cpp requires it for gpt-oss
        raise ModelError(f"{f.path}: missing metadata key {arch}.attention.sliding_window")
    if a.qk_norm.endswith("?"):   # optional: used where the file has the norms
        extra["qk_norm"] = a.qk_norm[:-1] if "blk.0.attn_q_norm.weight" in f else ""
    fields_ = dict(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_block - n_nextn, n_layer_nextn=n_nextn,
        n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, head_dim_v=key("attention.value_length", head_dim),
        n_ctx_train=key("context_length"),
        rms_eps=key("attention.layer_norm_rms_epsilon", 1e-5, lo=0, kind=float),
        rope_dims=rope_dims, rope_mode=a.rope_mode,
        rope_freq_base=key("rope.freq_base", 10000.0, lo=1e-6, kind=float), **rope,
        n_ff=n_ff, n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp, n_ff_shexp=n_ff_shexp,
        n_expert_groups=n_groups if n_groups > 1 else 0, n_group_used=n_group_used if n_groups > 1 else 0,
        expert_gating=gating, expert_weights_norm=a.expert_weights_norm,
        expert_weights_scale=key("expert_weights_scale", 1.0, lo=None, kind=float) or 1.0,
        qk_norm=a.qk_norm)
    cfg = ModelConfig(**{**fields_, **extra})
    if cfg.kv_lora_rank:
        _check_mla(f, cfg)
    return cfg


def _arch_keys(f: GGUFFile, a: Arch, key) -> dict:
    """The architecture's own keys (Arch.keys), checked, as ModelConfig fields."""
    out = {}
    for name, field_, *kind in a.keys:
        kind = kind[0] if kind else float
        if kind is bool:
            v = f.get(f"{a.name}.{name}", None)
            if v is not None and not isinstance(v, (bool, np.bool_)):
                raise ModelError(f"{f.path}: metadata key {a.name}.{name} = {v!r} is not a bool")
            if v is not None:
                out[field_] = bool(v)
        elif f.get(f"{a.name}.{name}", None) is not None:
            out[field_] = key(name, 0, lo=0, kind=kind)
    return out


def _check_mla(f: GGUFFile, c: ModelConfig) -> None:
    """MLA as the current converter writes it (llama.cpp's is_mla): the cached key is the
    compressed kv plus the roped part, the value the compressed kv."""
    if not (c.head_dim_mla and c.head_dim_v_mla):
        raise ModelError(f"{f.path}: {c.arch} without attention.key_length_mla/value_length_mla (a file "
                         "converted before MLA was split into k_b/v_b) is not supported; reconvert it")
    if c.head_dim != c.kv_lora_rank + c.rope_dims or c.head_dim_v != c.kv_lora_rank:
        raise ModelError(f"{f.path}: {c.arch}: attention.key_length {c.head_dim} / value_length "
                         f"{c.head_dim_v} should be kv_lora_rank + rope dims ({c.kv_lora_rank} + "
                         f"{c.rope_dims}) / kv_lora_rank for MLA")
    if c.head_dim_mla <= c.rope_dims or c.n_head_kv != 1:
        raise ModelError(f"{f.path}: {c.arch}: MLA needs key_length_mla {c.head_dim_mla} > rope dims "
                         f"{c.rope_dims} and one KV head (head_count_kv {c.n_head_kv})")


def _rope_scaling(f: GGUFFile, arch: str, key, n_ctx_train: int, log_mul: float = 0.0) -> dict:
    """RoPE scaling as llama.cpp reads it (llama-model.cpp, llama-context.cpp): the type defaults
    to linear, the factor to none; YaRN mixes in the unscaled angles (ext_factor 1) and scales
    cos/sin by 0.1 ln(factor) + 1 (llama.cpp's attn_factor, times rope.scaling.attn_factor), or
    with DeepSeek's mscale_all_dim (log_mul) by the ratio of its two mscales."""
    f32 = np.float32
    kind = f.get(f"{arch}.rope.scaling.type", "linear")
    if kind not in ("none", "linear", "yarn"):
        raise ModelError(f"{f.path}: {arch}.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")
    factor = key("rope.scaling.factor", 0.0, lo=0, kind=float) or key("rope.scale_linear", 0.0, lo=0, kind=float)
    scale = 1.0 if kind == "none" or factor == 0 else float(f32(1) / f32(factor))
    attn = float(f32(key("rope.scaling.attn_factor", 1.0, lo=0, kind=float)))
    out = {"rope_freq_scale": scale, "rope_ext_factor": 0.0, "rope_attn_factor": attn,
           "rope_n_ctx_orig": key("rope.scaling.original_context_length", n_ctx_train)}
    if kind == "yarn":
        fac = f32(1) / f32(scale)

        def get_mscale(m):
            return f32(1) if fac <= 1 else f32(0.1) * f32(m) * f32(np.log(fac)) + f32(1)
        if log_mul:   # llama.cpp assumes mscale 1, except deepseek2 where it is mscale_all_dim
            m = log_mul if arch == "deepseek2" and log_mul != 1 else 1.0
            mscale = get_mscale(m) / get_mscale(log_mul)
        else:
            mscale = get_mscale(1.0)
        # llama.cpp divides by the factor ggml's YaRN path multiplies back in (its PR 17945)
        out["rope_attn_factor"] = float(mscale * (f32(1) / (f32(1) + f32(0.1) * f32(np.log(fac)))) * f32(attn))
        out["rope_ext_factor"] = 1.0
    return out


class GraphBuilder:
    """Shared machinery of the architecture builders: weight nodes with shape checks, and the
    attention and FFN blocks every architecture here is made of."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig, n_ctx: int, kv_dtype: DType):
        self.f, self.cfg, self.n_ctx, self.kv_dtype = f, cfg, n_ctx, kv_dtype
        self.g = Graph(f"{cfg.arch}:{f.path.name}")
        self.g.meta.update(arch=cfg.arch, config=cfg, n_ctx=n_ctx, kv_dtype=kv_dtype.name,
                           file=str(f.path))
        self._weights: dict[str, Node] = {}
        g = self.g
        self.tokens = g.input("tokens", (T,), I32)
        self.pos = g.input("pos", (T,), I32)
        self.kq_mask = g.input("kq_mask", (T, KV), F32)
        if cfg.n_swa:   # the sliding-window layers' mask (the session fills it from meta n_swa)
            self.kq_mask_swa = g.input("kq_mask_swa", (T, KV), F32)
            self.g.meta["n_swa"] = cfg.n_swa
        self.out_rows = g.input("out_rows", (O,), I32)

    # -- weights
    def has(self, name: str) -> bool:
        return name in self.f

    def w(self, name: str, shape: tuple) -> Node:
        if name in self._weights:
            return self._weights[name]
        if name not in self.f:
            raise ModelError(f"{self.f.path}: missing tensor {name} (architecture {self.cfg.arch})")
        data = self.f.tensor(name)
        have = tuple(data.shape)
        while len(have) > len(shape) and have[0] == 1:   # leading 1s, as llama.cpp's dims check allows
            have = have[1:]                              # (ERNIE's exp_probs_b is [1, E])
        if have != tuple(shape):
            raise ModelError(f"{self.f.path}: tensor {name} has shape {list(data.shape)} but the "
                             f"model's hyper-parameters need {list(shape)}")
        if have != tuple(data.shape):
            data = WeightData(data.name, data.dtype, have, data.raw)
        node = self._weights[name] = self.g.weight(data)
        return node

    def opt(self, name: str, shape: tuple) -> Node | None:
        return self.w(name, shape) if self.has(name) else None

    # -- blocks
    def linear(self, x: Node, wname: str, n_out: int, n_in: int, bias: bool = True) -> Node:
        g = self.g
        y = g.mul_mat(self.w(f"{wname}.weight", (n_out, n_in)), x)
        b = self.opt(f"{wname}.bias", (n_out,)) if bias else None
        return g.add(y, b) if b is not None else y

    def norm(self, x: Node, wname: str) -> Node:
        g = self.g
        return g.mul(g.rms_norm(x, eps=self.cfg.rms_eps), self.w(wname, (x.shape[-1],)))

    def attention(self, x: Node, il: int) -> Node:
        g, c = self.g, self.cfg
        p = f"blk.{il}"
        nq, nk, nv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.head_dim_v
        if self.has(f"{p}.attn_qkv.weight"):         # fused ahead of time: rows Q, K, V
            qkv = self.linear(x, f"{p}.attn_qkv", nq + nk + nv, c.n_embd)
            q = g.slice(qkv, axis=-1, start=0, stop=nq)
            k = g.slice(qkv, axis=-1, start=nq, stop=nq + nk)
            v = g.slice(qkv, axis=-1, start=nq + nk, stop=nq + nk + nv)
        else:
            q = self.linear(x, f"{p}.attn_q", nq, c.n_embd)
            k = self.linear(x, f"{p}.attn_k", nk, c.n_embd)
            v = self.linear(x, f"{p}.attn_v", nv, c.n_embd)
        if c.qk_norm == "full":                     # olmoe: over the whole projection
            q = self.norm(q, f"{p}.attn_q_norm.weight")
            k = self.norm(k, f"{p}.attn_k_norm.weight")
        q = g.reshape(q, shape=(T, c.n_head, c.head_dim))
        k = g.reshape(k, shape=(T, c.n_head_kv, c.head_dim))
        v = g.reshape(v, shape=(T, c.n_head_kv, c.head_dim_v))
        if c.qk_norm == "head":                     # qwen3: each head
            q = self.norm(q, f"{p}.attn_q_norm.weight")
            k = self.norm(k, f"{p}.attn_k_norm.weight")
        swa = c.is_swa(il)
        base = c.rope_freq_base_swa if swa and c.rope_freq_base_swa else None
        q, k = self.rope(q, base), self.rope(k, base)
        # KV cache: cell = position (one sequence); attention reads cells [0, KV) and the mask
        # hides those in each token's future (and, in a sliding-window layer, its far past).
        kc = g.set_rows(g.state(f"cache_k.{il}", (self.n_ctx, c.n_head_kv, c.head_dim), self.kv_dtype), k, self.pos)
        vc = g.set_rows(g.state(f"cache_v.{il}", (self.n_ctx, c.n_head_kv, c.head_dim_v), self.kv_dtype), v, self.pos)
        kc, vc = (g.slice(kc, axis=0, start=0, stop=KV), g.slice(vc, axis=0, start=0, stop=KV))
        sinks = self.w(f"{p}.attn_sinks.weight", (c.n_head,)) if ARCHS[c.arch].sinks else None
        o = self.attend(q, kc, vc, c.attention_scale or c.head_dim ** -0.5,
                        self.kq_mask_swa if swa else self.kq_mask, sinks)            # [H, T, Dv]
        o = g.reshape(g.cont(g.permute(o, axes=(1, 0, 2))), shape=(T, c.n_head * c.head_dim_v))
        return self.linear(o, f"{p}.attn_output", c.n_embd, c.n_head * c.head_dim_v)

    def rope(self, x: Node, freq_base: float | None = None) -> Node:
        c = self.cfg
        attrs = dict(n_dims=c.rope_dims, mode=c.rope_mode, freq_base=freq_base or c.rope_freq_base,
                     freq_scale=c.rope_freq_scale, attn_factor=c.rope_attn_factor)
        if c.rope_ext_factor:
            attrs.update(ext_factor=c.rope_ext_factor, n_ctx_orig=c.rope_n_ctx_orig)
        ff = self.opt("rope_freqs.weight", (c.rope_dims // 2,)) if ARCHS[c.arch].rope_freqs else None
        return self.g.rope(x, self.pos, ff, **attrs)

    def attend(self, q: Node, kc: Node, vc: Node, scale: float, mask: Node | None = None,
               sinks: Node | None = None) -> Node:
        """softmax(scale q k^T + mask) v per head: q [T, H, D], the cache's k [KV, Hkv, D] and
        v [KV, Hkv, Dv] -> [H, T, Dv]."""
        g = self.g
        kq = g.mul_mat(g.permute(kc, axes=(1, 0, 2)), g.permute(q, axes=(1, 0, 2)))  # [H, T, KV]
        kq = g.soft_max(kq, self.kq_mask if mask is None else mask, sinks, scale=scale)
        return g.mul_mat(g.permute(vc, axes=(1, 2, 0)), kq)

    def attention_mla(self, x: Node, il: int) -> Node:
        """DeepSeek's multi-head latent attention in llama.cpp's absorbed form: k_b is folded into
        q, so attention runs against the cached compressed kv (one head of kv_lora_rank + rope
        dims, shared by all heads); its value part is the same cache's first kv_lora_rank
        columns, decompressed per head by v_b after attention."""
        g, c = self.g, self.cfg
        p, H, R, dr = f"blk.{il}", c.n_head, c.kv_lora_rank, c.rope_dims
        dk, dv = c.head_dim_mla, c.head_dim_v_mla
        dn = dk - dr                                                        # the un-roped part
        if c.q_lora_rank:
            q = self.linear(x, f"{p}.attn_q_a", c.q_lora_rank, c.n_embd, bias=False)
            q = self.linear(self.norm(q, f"{p}.attn_q_a_norm.weight"), f"{p}.attn_q_b", H * dk,
                            c.q_lora_rank, bias=False)
        else:
            q = self.linear(x, f"{p}.attn_q", H * dk, c.n_embd, bias=False)
        q = g.reshape(q, shape=(T, H, dk))
        q_pe = self.rope(g.cont(g.slice(q, axis=-1, start=dn, stop=dk)))
        kv = self.linear(x, f"{p}.attn_kv_a_mqa", R + dr, c.n_embd, bias=False)     # [T, R + dr]
        kv_c = self.norm(g.slice(kv, axis=-1, start=0, stop=R), f"{p}.attn_kv_a_norm.weight")
        k_pe = self.rope(g.reshape(g.cont(g.slice(kv, axis=-1, start=R, stop=R + dr)), shape=(T, 1, dr)))
        q_nope = g.permute(g.slice(q, axis=-1, start=0, stop=dn), axes=(1, 0, 2))     # [H, T, dn]
        q_abs = g.mul_mat(self.w(f"{p}.attn_k_b.weight", (H, R, dn)), q_nope)        # [H, T, R]
        q = g.concat(g.permute(q_abs, axes=(1, 0, 2)), q_pe, axis=-1)                 # [T, H, R+dr]
        k = g.concat(g.reshape(kv_c, shape=(T, 1, R)), k_pe, axis=-1)                # [T, 1, R+dr]
        kc = g.set_rows(g.state(f"cache_k.{il}", (self.n_ctx, 1, R + dr), self.kv_dtype), k, self.pos)
        kc = g.slice(kc, axis=0, start=0, stop=KV)
        vc = g.slice(kc, axis=-1, start=0, stop=R)
        # llama.cpp's kq scale: YaRN's mscale (with DeepSeek's mscale_all_dim) squared
        f32 = np.float32
        ln = f32(np.log(f32(1) / f32(c.rope_freq_scale)))
        mscale = f32(c.rope_attn_factor) * (f32(1) + f32(0.1) * ln) * (f32(1) + f32(0.1) * f32(c.rope_yarn_log_mul) * ln)
        o = self.attend(q, kc, vc, float(mscale * mscale / f32(np.sqrt(f32(dk)))))    # [H, T, R]
        o = g.mul_mat(self.w(f"{p}.attn_v_b.weight", (H, dv, R)), o)                  # [H, T, dv]
        o = g.reshape(g.cont(g.permute(o, axes=(1, 0, 2))), shape=(T, H * dv))
        return self.linear(o, f"{p}.attn_output", c.n_embd, H * dv, bias=False)

    def dense_ffn(self, x: Node, p: str, n_ff: int, suffix: str = "") -> Node:
        """down(silu(gate x) * up x), from a merged [gate; up] tensor when the file has one."""
        g, n = self.g, self.cfg.n_embd
        if self.has(f"{p}.ffn_gate_up{suffix}.weight"):
            par = g.swiglu(self.linear(x, f"{p}.ffn_gate_up{suffix}", 2 * n_ff, n))
        else:
            par = g.swiglu(self.linear(x, f"{p}.ffn_gate{suffix}", n_ff, n),
                           self.linear(x, f"{p}.ffn_up{suffix}", n_ff, n))
        return self.linear(par, f"{p}.ffn_down{suffix}", n, n_ff)

    def moe_ffn(self, x: Node, il: int, n_expert_used: int | None = None) -> Node:
        """llama.cpp's build_moe_ffn: route, pick top-k, weight, run the chosen experts, sum."""
        g, c = self.g, self.cfg
        p, E, n, nf = f"blk.{il}", c.n_expert, c.n_embd, c.n_ff_exp
        k = n_expert_used or c.n_expert_used
        logits = g.mul_mat(self.w(f"{p}.ffn_gate_inp.weight", (E, n)), x)           # [T, E]
        router_b = self.opt(f"{p}.ffn_gate_inp.bias", (E,))
        if router_b is not None:
            logits = g.add(logits, router_b)
        probs = {"softmax": g.soft_max, "sigmoid": g.sigmoid}.get(c.expert_gating, lambda l: l)(logits)
        # DeepSeek-V3's selection bias: it picks the experts, the unbiased probs weight them
        bias = self.opt(f"{p}.exp_probs_b.bias", (E,))
        selection = g.add(probs, bias) if bias is not None else probs
        if c.n_expert_groups:       # only the experts of the best groups compete
            selection = g.group_mask(selection, n_groups=c.n_expert_groups, n_used=c.n_group_used)
        ids = g.top_k(selection, k=k, name=f"{p}.expert_ids")
        weights = g.get_rows(g.reshape(probs, shape=(T, -1, 1)), ids)             # [T, k, 1]
        if c.expert_gating == "softmax_weight":   # softmax over the chosen experts' logits
            weights = g.reshape(g.soft_max(g.reshape(weights, shape=(T, -1))), shape=(T, -1, 1))   # (-1: k may be sliced)
        if c.expert_weights_norm:   # llama.cpp clamps the sum at 2^-14 before dividing
            total = g.reshape(g.sum(weights, axis=1), shape=(T, 1, 1))
            weights = g.div(weights, g.clamp(total, min=6.103515625e-5))
        if c.expert_weights_scale != 1.0:
            weights = g.scale(weights, scale=c.expert_weights_scale)
        xe = g.reshape(x, shape=(T, 1, n))

        def biased(y: Node, name: str, width: int) -> Node:   # + the chosen experts' biases (ggml's add_id)
            b = self.opt(f"{p}.{name}.bias", (E, width))
            return g.add(y, g.get_rows(b, ids)) if b is not None else y
        oai = ARCHS[c.arch].expert_act == "swiglu_oai"
        if self.has(f"{p}.ffn_gate_up_exps.weight"):  # merged ahead of time: gate rows, then up
            gu = biased(g.mul_mat_id(self.w(f"{p}.ffn_gate_up_exps.weight", (E, 2 * nf, n)), xe, ids),
                        "ffn_gate_up_exps", 2 * nf)
            par = self.swiglu_oai(g.slice(gu, axis=-1, start=0, stop=nf),
                                  g.slice(gu, axis=-1, start=nf, stop=2 * nf)) if oai else g.swiglu(gu)
        else:
            gate = biased(g.mul_mat_id(self.w(f"{p}.ffn_gate_exps.weight", (E, nf, n)), xe, ids), "ffn_gate_exps", nf)
            up = biased(g.mul_mat_id(self.w(f"{p}.ffn_up_exps.weight", (E, nf, n)), xe, ids), "ffn_up_exps", nf)
            par = self.swiglu_oai(gate, up) if oai else g.swiglu(gate, up)
        experts = biased(g.mul_mat_id(self.w(f"{p}.ffn_down_exps.weight", (E, n, nf)), par, ids), "ffn_down_exps", n)
        out = g.sum(g.mul(experts, weights), axis=1)                                # [T, n]
        if c.n_ff_shexp:
            shared = self.dense_ffn(x, p, c.n_ff_shexp, suffix="_shexp")
            gname = f"{p}.ffn_gate_inp_shexp.weight"
            if self.has(gname):   # [n_embd] or, as llama.cpp's converter writes it, [1, n_embd] (w() takes both)
                gate_w = g.reshape(self.w(gname, (n,)), shape=(1, n))
                shared = g.mul(shared, g.sigmoid(g.mul_mat(gate_w, x)))           # [T,n]*[T,1]
            out = g.add(out, shared)
        return out

    def swiglu_oai(self, gate: Node, up: Node, alpha: float = 1.702, limit: float = 7.0) -> Node:
        """gpt-oss's clamped SwiGLU (ggml_swiglu_oai): x = min(gate, limit), y = clamp(up, -limit,
        limit), x sigmoid(alpha x) (y + 1); made of elementwise ops the lowering fuses."""
        g = self.g
        x = g.clamp(gate, max=limit)
        y = g.scale(g.clamp(up, min=-limit, max=limit), scale=1.0, bias=1.0)
        return g.mul(g.mul(x, g.sigmoid(g.scale(x, scale=alpha))), y)

    def output(self, x: Node) -> Node:
        g, c = self.g, self.cfg
        x = self.norm(g.get_rows(x, self.out_rows), "output_norm.weight")
        name = "output.weight" if self.has("output.weight") else "token_embd.weight"  # tied
        logits = g.mul_mat(self.w(name, (c.n_vocab, c.n_embd)), x)
        return g.scale(logits, scale=1.0 / c.logit_scale) if c.logit_scale else logits

    def residual(self, x: Node, block: Node, name: str) -> Node:
        """x + block, the block scaled first where the model says so (granite)."""
        g, c = self.g, self.cfg
        if c.residual_scale:
            block = g.scale(block, scale=c.residual_scale)
        return g.add(x, block, name=name)


def build_decoder(b: GraphBuilder) -> Graph:
    """The decoder every supported architecture shares: pre-norm attention and FFN blocks with
    residuals; the FFN is MoE where the model has experts, dense otherwise."""
    g, c = b.g, b.cfg
    x = g.get_rows(b.w("token_embd.weight", (c.n_vocab, c.n_embd)), b.tokens)
    if c.embedding_scale:
        x = g.scale(x, scale=c.embedding_scale)
    attention = b.attention_mla if c.kv_lora_rank else b.attention
    for il in range(c.n_layer):
        x = b.residual(x, attention(b.norm(x, f"blk.{il}.attn_norm.weight"), il), f"blk.{il}.attn_out")
        h = b.norm(x, f"blk.{il}.{ARCHS[c.arch].ffn_norm}.weight")
        moe = c.is_moe and il >= c.n_layer_dense_lead and (il + 1) % c.moe_layer_step == 0
        ffn = b.moe_ffn(h, il) if moe else b.dense_ffn(h, f"blk.{il}", c.n_ff)
        x = b.residual(x, ffn, f"blk.{il}.out")
    g.outputs["logits"] = b.output(x)
    return g


BUILDERS: dict[str, Callable[[GraphBuilder], Graph]] = {name: build_decoder for name in ARCHS}


def build_graph(f: GGUFFile, cfg: ModelConfig, n_ctx: int, kv_dtype: DType = F16) -> Graph:
    b = GraphBuilder(f, cfg, n_ctx, kv_dtype)
    g = BUILDERS[cfg.arch](b)
    # multi-token-prediction layers (after the n_layer) serve speculative decoding, which
    # moegraph does not do; llama.cpp skips them the same way
    mtp = re.compile(r"blk\.(\d+)\.")
    unused = sorted(t for t in set(f.tensor_types) - set(b._weights)
                    if not (cfg.n_layer_nextn and (m := mtp.match(t)) and int(m.group(1)) >= cfg.n_layer))
    if unused:   # a tensor the builder does not know would be silently ignored: refuse
        more = f" and {len(unused) - 6} more" if len(unused) > 6 else ""
        raise ModelError(f"{f.path}: tensor(s) {', '.join(unused[:6])}{more} not used by moegraph's "
                         f"{cfg.arch} builder (refused rather than ignored: the model may need them)")
    g.verify()
    return g
