"""PyTorch eager on the same GPU and weights (dequantized): the forward pass moegraph builds
(models.py), written as a Hugging Face transformers-style model would be, as a speed peer. Not
tuned: F.linear per projection, SDPA attention over a preallocated KV cache, and the usual HF
MoE loop over the experts that received tokens. Architectures: llama (dense, Mixtral-style MoE)
and qwen3moe. PyTorch is not a moegraph dependency, so it is imported inside functions only.

    python bench/torch_peer.py MODEL.gguf [-p 512] [-n 128] [--dtype bfloat16] [--check]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SUPPORTED = ("llama", "qwen3moe")


def _rope_table(cfg, n_ctx: int):
    """cos/sin [n_ctx, rope_dims/2] with ggml's float32 angle recurrence (as moegraph's numpy
    backend computes it): theta_{i+1} = theta_i * base^(-2/n_dims), times freq_scale."""
    half = cfg.rope_dims // 2
    step = np.float32(cfg.rope_freq_base) ** np.float32(-2.0 / cfg.rope_dims)
    theta, th = np.empty((n_ctx, half), np.float32), np.arange(n_ctx, dtype=np.float32)
    for i in range(half):
        theta[:, i] = th
        th = (th * step).astype(np.float32)
    theta *= np.float32(cfg.rope_freq_scale)
    return np.cos(theta), np.sin(theta)


class TorchModel:
    def __init__(self, m, dtype: str = "bfloat16", device: str = "cuda", n_ctx: int | None = None):
        import torch
        c = self.cfg = m.config
        if c.arch not in SUPPORTED or c.n_ff_shexp:
            raise ValueError(f"torch peer: architecture {c.arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED)}, without shared experts)")
        self.dtype, self.device = getattr(torch, dtype), torch.device(device)
        self.n_ctx = n_ctx or min(c.n_ctx_train, 4096)

        def load(name):   # dequantize (numpy releases the GIL), move, cast; norms stay float32
            a = m.file.tensor(name).dequantize()
            t = torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device)   # F32: mmap view
            return t if name.endswith("norm.weight") else t.to(self.dtype)
        with ThreadPoolExecutor(min(16, os.cpu_count() or 4)) as ex:
            names = list(m.file.tensors)
            self.w = dict(zip(names, ex.map(load, names)))
        nq, nk = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        for il in range(c.n_layer):   # pre-merged tensors -> views of the usual parts
            p = f"blk.{il}."
            if p + "attn_qkv.weight" in self.w:
                for s in ("weight", "bias"):
                    if f"{p}attn_qkv.{s}" in self.w:
                        qkv = self.w[f"{p}attn_qkv.{s}"]
                        self.w[f"{p}attn_q.{s}"], self.w[f"{p}attn_k.{s}"], self.w[f"{p}attn_v.{s}"] = (
                            qkv[:nq], qkv[nq:nq + nk], qkv[nq + nk:])
            for merged, axis in (("ffn_gate_up_exps", 1), ("ffn_gate_up", 0)):
                if f"{p}{merged}.weight" in self.w:
                    gate, up = self.w[f"{p}{merged}.weight"].chunk(2, dim=axis)
                    self.w[f"{p}{merged.replace('gate_up', 'gate')}.weight"] = gate
                    self.w[f"{p}{merged.replace('gate_up', 'up')}.weight"] = up
        cos, sin = _rope_table(c, self.n_ctx)
        self.cos = torch.from_numpy(cos).to(self.device, self.dtype)[:, None, :]   # [n_ctx, 1, half]
        self.sin = torch.from_numpy(sin).to(self.device, self.dtype)[:, None, :]
        kv = dict(device=self.device, dtype=self.dtype)
        self.k_cache = [torch.zeros(self.n_ctx, c.n_head_kv, c.head_dim, **kv) for _ in range(c.n_layer)]
        self.v_cache = [torch.zeros(self.n_ctx, c.n_head_kv, c.head_dim_v, **kv) for _ in range(c.n_layer)]
        self.gqa = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)
        # SDPA without its cuDNN backend: that one builds a new plan for every KV length, which
        # makes each decode step pay a plan build (about 5x slower decoding on an H100, torch 2.11)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            self.sdpa_kernel = lambda: sdpa_kernel(backends)
        except ImportError:
            self.sdpa_kernel = contextlib.nullcontext
        self.n_past = 0

    def reset(self):
        self.n_past = 0

    def W(self, name):
        if name not in self.w:
            raise ValueError(f"torch peer: missing tensor {name} ({self.cfg.arch})")
        return self.w[name]

    def linear(self, x, name):
        import torch.nn.functional as F
        return F.linear(x, self.W(name + ".weight"), self.w.get(name + ".bias"))

    def rms_norm(self, x, name):
        import torch
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps)
        return (h * self.W(name)).to(x.dtype)

    def rope(self, x, pos):   # x [T, H, D]; mode 0: pairs (2i, 2i+1), mode 2 (NEOX): halves
        import torch
        nd, half = self.cfg.rope_dims, self.cfg.rope_dims // 2
        cos, sin = self.cos[pos], self.sin[pos]
        if self.cfg.rope_mode == 0:
            x0, x1 = x[..., 0:nd:2], x[..., 1:nd:2]
            rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        else:
            x0, x1 = x[..., :half], x[..., half:nd]
            rot = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return torch.cat((rot, x[..., nd:]), dim=-1) if nd < x.shape[-1] else rot

    def attention(self, x, il, pos):
        import torch
        import torch.nn.functional as F
        c, p, T = self.cfg, f"blk.{il}", x.shape[0]
        q = self.linear(x, f"{p}.attn_q").view(T, c.n_head, c.head_dim)
        k = self.linear(x, f"{p}.attn_k").view(T, c.n_head_kv, c.head_dim)
        v = self.linear(x, f"{p}.attn_v").view(T, c.n_head_kv, c.head_dim_v)
        if c.qk_norm == "full":
            raise NotImplementedError("torch_peer: Q/K norms over the whole projection (olmoe)")
        if c.qk_norm == "head":
            q, k = self.rms_norm(q, f"{p}.attn_q_norm.weight"), self.rms_norm(k, f"{p}.attn_k_norm.weight")
        q, k = self.rope(q, pos), self.rope(k, pos)
        n0, n_kv = self.n_past, self.n_past + T
        self.k_cache[il][n0:n_kv], self.v_cache[il][n0:n_kv] = k, v
        q = q.transpose(0, 1)[None]                                  # [1, H, T, D]
        kc = self.k_cache[il][:n_kv].transpose(0, 1)[None]           # [1, Hkv, KV, D]
        vc = self.v_cache[il][:n_kv].transpose(0, 1)[None]
        extra = {}
        if self.gqa:
            extra["enable_gqa"] = True
        elif c.n_head != c.n_head_kv:
            rep = c.n_head // c.n_head_kv
            kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
        mask, causal = None, False
        if T > 1 and n0 == 0:
            causal = True
        elif T > 1:   # new tokens after a cached prefix: token t sees cells [0, n0 + t]
            mask = torch.arange(n_kv, device=x.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, is_causal=causal,
                                           scale=c.head_dim ** -0.5, **extra)
        o = o[0].transpose(0, 1).reshape(T, c.n_head * c.head_dim_v)
        return self.linear(o, f"{p}.attn_output")

    def mlp(self, x, p, suffix=""):
        import torch.nn.functional as F
        gate, up = self.linear(x, f"{p}.ffn_gate{suffix}"), self.linear(x, f"{p}.ffn_up{suffix}")
        return self.linear(F.silu(gate) * up, f"{p}.ffn_down{suffix}")

    def moe(self, x, il):
        import torch
        import torch.nn.functional as F
        c, p = self.cfg, f"blk.{il}"
        router_logits = self.linear(x, f"{p}.ffn_gate_inp")                     # [T, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, c.n_expert_used, dim=-1)         # [T, k]
        if c.expert_weights_norm:   # llama.cpp clamps the sum at 2^-14
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=6.103515625e-5)
        weights = (weights * c.expert_weights_scale).to(x.dtype)
        wg, wu, wd = (self.W(f"{p}.ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=c.n_expert).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            slot, tok = torch.where(expert_mask[e])
            h = x[tok]
            y = F.linear(F.silu(F.linear(h, wg[e])) * F.linear(h, wu[e]), wd[e])
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out

    def forward(self, ids):
        """ids LongTensor [T] (or a sequence of ints); appends to the KV cache; float32 logits."""
        import torch
        import torch.nn.functional as F
        c = self.cfg
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        T = ids.shape[0]
        if self.n_past + T > self.n_ctx:
            raise ValueError(f"context overflow: {self.n_past} + {T} > n_ctx={self.n_ctx}")
        pos = torch.arange(self.n_past, self.n_past + T, device=self.device)
        x = F.embedding(ids, self.W("token_embd.weight"))
        with self.sdpa_kernel():
            for il in range(c.n_layer):
                p = f"blk.{il}"
                x = x + self.attention(self.rms_norm(x, f"{p}.attn_norm.weight"), il, pos)
                h = self.rms_norm(x, f"{p}.ffn_norm.weight")
                x = x + (self.moe(h, il) if c.is_moe else self.mlp(h, p))
        self.n_past += T
        x = self.rms_norm(x, "output_norm.weight")
        head = self.w.get("output.weight", self.W("token_embd.weight"))        # tied when absent
        return F.linear(x, head).float()


def build(path, dtype: str = "bfloat16", device: str = "cuda", n_ctx: int | None = None) -> TorchModel:
    import moegraph
    return TorchModel(moegraph.load(path), dtype, device, n_ctx)


def _sync(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_torch(path: str, n_pp: int = 512, n_tg: int = 128, reps: int = 3, dtype: str = "bfloat16",
                device: str = "cuda") -> dict:
    import torch
    t0 = time.perf_counter()
    model = build(path, dtype, device, n_ctx=n_pp + n_tg + 16)
    _sync(device)
    load_s = time.perf_counter() - t0
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.cfg.n_vocab, n_pp + n_tg + 1)).to(device)
    with torch.inference_mode():
        model.forward(ids[:8])
        model.reset()
        pp = []
        for _ in range(reps):
            model.reset()
            _sync(device)
            t = time.perf_counter()
            model.forward(ids[:n_pp])
            _sync(device)
            pp.append(time.perf_counter() - t)
        model.reset()
        model.forward(ids[:1])
        _sync(device)
        t = time.perf_counter()
        for i in range(n_tg):
            model.forward(ids[1 + i:2 + i])
        _sync(device)
        tg = time.perf_counter() - t
    return {"engine": "torch-eager", "torch": torch.__version__, "dtype": dtype, "model": Path(path).name,
            "pp_tokens": n_pp, "pp_tps": n_pp / statistics.median(pp), "tg_tokens": n_tg,
            "tg_tps": n_tg / tg, "load_s": load_s}


def check_against_numpy(path, n_tokens: int = 16, device: str | None = None,
                        emulate_ggml_rounding: bool = True) -> float:
    """Max |torch - numpy| / max |numpy| over the logits, torch in float32 against moegraph's
    numpy backend (F32 KV cache), both fed a prompt, a continuation chunk and single tokens.
    With the backend's 8-bit activation rounding (llama.cpp's) quantized models agree to ~1e-2;
    with emulate_ggml_rounding=False, or on F32 models, to ~1e-6."""
    import torch
    import moegraph
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = moegraph.load(path)
    n_ctx = max(64, n_tokens)
    ids = np.random.default_rng(0).integers(0, m.config.n_vocab, n_tokens)
    a, b = n_tokens // 2, max(n_tokens // 2, n_tokens - 2)
    chunks = [c for c in (ids[:a], ids[a:b], *(ids[i:i + 1] for i in range(b, n_tokens))) if len(c)]
    ref = m.compile(backend="numpy", n_ctx=n_ctx, kv_type="f32", emulate_ggml_rounding=emulate_ggml_rounding)
    want = np.concatenate([ref.forward(c) for c in chunks])
    tm = TorchModel(m, "float32", device, n_ctx)
    with torch.inference_mode():
        got = np.concatenate([tm.forward(torch.from_numpy(c)).cpu().numpy() for c in chunks])
    return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check", action="store_true", help="also compare float32 logits with moegraph's numpy backend")
    args = ap.parse_args(argv)
    r = bench_torch(args.model, args.n_prompt, args.n_gen, args.reps, args.dtype, args.device)
    if args.check:
        r["max_rel_diff_vs_numpy"] = check_against_numpy(args.model, device=args.device)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
