"""Makes tests/converted/*.gguf: tiny random models built with Hugging Face transformers' own
classes, converted by llama.cpp's converter, and transformers' float64 logits on them.

Run in an environment of its own (torch and transformers are test-time tools, never moegraph
dependencies), with the llama.cpp tree of llama-cpp-python's source distribution:

    python -m venv .venv-hf && .venv-hf/bin/pip install torch transformers sentencepiece
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-*.tar.gz
    .venv-hf/bin/pip install llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
    .venv-hf/bin/python tests/converted/make_fixtures.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp

Each model gets: NAME.gguf (F32, as the converter writes it) and NAME.npz (tokens, and the
logits of transformers' forward in float64 over all of them). The tokenizer is a byte-level BPE
trained here on a few sentences; the converter does not know its pre-tokenizer hash, so it is
told 'gpt-2' (the only patch). Weights: std 1/sqrt(fan_in), so attention and routing are not
flat; norm weights 1 + N(0, 0.2); biases N(0, 0.1). Positions go past the original context of
the rope-scaled models, where llama3 frequency factors and YaRN change the result."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, "
        "and void; and darkness was upon the face of the deep. And the Spirit of God moved upon "
        "the face of the waters. And God said, Let there be light: and there was light. ") * 4
N_TOKENS = 100        # past original_max_position_embeddings (48) of the rope-scaled models

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
DEEPSEEK3 = dict(
    intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    n_group=1, topk_group=1, scoring_func="sigmoid", topk_method="noaux_tc", q_lora_rank=24,
    kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    num_key_value_heads=4, num_hidden_layers=3, num_nextn_predict_layers=0,
    max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MODELS = {
    # Llama 3.1-style rope scaling: the converter writes rope_freqs.weight
    "llama3-ropefreqs": ("LlamaForCausalLM", "LlamaConfig", dict(
        intermediate_size=96, max_position_embeddings=384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 48})),
    "llama-yarn": ("LlamaForCausalLM", "LlamaConfig", dict(
        intermediate_size=96, max_position_embeddings=192,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 48})),
    "llama-linear": ("LlamaForCausalLM", "LlamaConfig", dict(
        intermediate_size=96, max_position_embeddings=192,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, decoder_sparse_step=1)),
    "qwen3moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=24, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, decoder_sparse_step=1)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        num_key_value_heads=4, max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "granitemoe": ("GraniteMoeForCausalLM", "GraniteMoeConfig", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48,
        max_position_embeddings=256, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=4.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # GLM-4.5-Air-like: a dense first layer, sigmoid routing with a selection bias, a shared
    # expert, partial RoPE (half the head), attention biases; and GLM-4.5-like q/k norms
    "glm4moe": ("Glm4MoeForCausalLM", "Glm4MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        n_group=1, topk_group=1, attention_bias=True, use_qk_norm=False, head_dim=16,
        num_hidden_layers=3, num_nextn_predict_layers=1, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "glm4moe-qknorm": ("Glm4MoeForCausalLM", "Glm4MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
        n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        n_group=1, topk_group=1, attention_bias=False, use_qk_norm=True, head_dim=24,
        num_hidden_layers=3, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # DeepSeek-V2-Lite-like: MLA without a q low-rank, softmax routing, two shared experts, YaRN
    # with mscale_all_dim (the kq scale and cos/sin factors llama.cpp special-cases)
    "deepseek2-lite": ("DeepseekV2ForCausalLM", "DeepseekV2Config", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        topk_method="greedy", q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, num_key_value_heads=4, num_hidden_layers=3,
        max_position_embeddings=192,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 48, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0})),
    # DeepSeek-V3-like: q low-rank, sigmoid routing with a selection bias, renormalized and scaled
    "deepseek3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", DEEPSEEK3),
    # gpt-oss: attention sinks, sliding-window layers (window 8 < the 100 tokens), YaRN, Q/K/V/O
    # and router and expert biases, the clamped SwiGLU, softmax over the chosen experts' logits
    "gpt-oss": ("GptOssForCausalLM", "GptOssConfig", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        num_hidden_layers=3, sliding_window=8, max_position_embeddings=192,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 48, "beta_fast": 32.0, "beta_slow": 1.0})),
    # DeepSeek-V3's group-limited routing: 8 experts in 4 groups, the best 2 groups compete
    "deepseek3-groups": ("DeepseekV3ForCausalLM", "DeepseekV3Config", {**DEEPSEEK3, "n_group": 4, "topk_group": 2}),
    # GLM-4.7-Flash: GLM's MLA model, converted as deepseek2 (sigmoid + bias, a dense first layer)
    "glm4moe-lite": ("Glm4MoeLiteForCausalLM", "Glm4MoeLiteConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=1.8, n_group=1, topk_group=1,
        scoring_func="sigmoid", q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, num_key_value_heads=4, num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
        first_k_dense_replace=1,     # (the released config.json has it; the converter reads it)
        num_nextn_predict_layers=1, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # dots.llm1: per-head Q/K norm, sigmoid + selection bias, shared experts, a dense first layer
    "dots1": ("Dots1ForCausalLM", "Dots1Config", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        n_group=1, topk_group=1, scoring_func="sigmoid", head_dim=16, num_hidden_layers=3,
        num_key_value_heads=4,           # (llama.cpp sizes dots1's K and V by n_head)
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # ERNIE-4.5-21B-A3B-like: softmax routing with a selection bias (moe_statics), renormalized,
    # shared experts (the converter sizes them intermediate_size / num_key_value_heads), a dense
    # first layer, interleaved RoPE; a sentencepiece vocabulary (the converter's only choice)
    "ernie4_5-moe": ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeConfig", dict(
        intermediate_size=128, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1,
        num_hidden_layers=3, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")
    # the special tokens the GLM vocabulary writer looks up, after the trained ids
    fast.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<|user|>", "<|observation|>"]})
    fast.save_pretrained(folder)
    return fast


def randomize(model, seed: int) -> None:
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():   # DeepSeek-V3/GLM's selection bias starts at 0
            if "e_score_correction_bias" in name:   # >= 0 with groups: transformers masks
                b.copy_(0.1 * torch.randn(b.shape, generator=g))   # other groups with 0, llama.cpp with -inf
                if getattr(model.config, "n_group", 1) not in (None, 1):
                    b.abs_()
        for name, p in model.named_parameters():
            if "sinks" in name:                     # gpt-oss's sinks: logits of O(1)
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree (the converter)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--only", nargs="*", help="model names (default: all)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    import torch
    import transformers
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = make_tokenizer(tmp / "tok")
        ids = tok(TEXT)["input_ids"][:N_TOKENS]
        assert len(ids) == N_TOKENS, len(ids)
        for i, (name, (cls, cfg_cls, kw)) in enumerate(MODELS.items()):
            if args.only and name not in args.only:
                continue
            cfg = getattr(transformers, cfg_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id, **{**COMMON, **kw})
            model = getattr(transformers, cls)(cfg)
            randomize(model, args.seed + i)
            hf = tmp / name
            model.save_pretrained(hf)
            tok.save_pretrained(hf)
            if name.startswith("ernie"):        # its converter reads a sentencepiece model only
                import sentencepiece as spm
                spm.SentencePieceTrainer.train(sentence_iterator=iter([TEXT]), model_prefix=str(hf / "tokenizer"),
                                               vocab_size=200, model_type="bpe", minloglevel=2)
            gguf = args.out / f"{name}.gguf"
            # the converter, told the test tokenizer's pre-tokenizer (its hash is not in its table)
            code = ("import sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]; "
                    "import convert_hf_to_gguf as c; from conversion import base; "
                    "base.TextModel.get_vocab_base_pre = lambda self, t: 'gpt-2'; c.main()")
            subprocess.run([sys.executable, "-c", code, str(args.llama_cpp), str(hf), "--outtype", "f32",
                            "--outfile", str(gguf)], check=True, capture_output=True)
            model.config._experts_implementation = "eager"     # float64: no grouped_mm
            model = model.double().eval()
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].numpy()
            np.savez_compressed(args.out / f"{name}.npz", tokens=np.array(ids, np.int32), logits=logits.astype(np.float32),
                                config=json.dumps(cfg.to_dict(), default=str))
            print(f"{name}: {gguf.stat().st_size / 1024:.0f} KiB, logits {logits.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
