"""Makes tests/chat/templates.json: chat templates of the MoE families moegraph runs (their text
as llama.cpp keeps them in models/templates/, from the models' tokenizer_config.json) and, for a
few conversations, what Hugging Face transformers' renderer (`render_jinja_template`, what
`apply_chat_template` calls) makes of them. Run in the test-time environment with transformers:

    .venv-hf/bin/python tests/chat/make_fixtures.py --templates llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TEMPLATES = {   # family -> (file in llama.cpp's models/templates, bos text, eos text)
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "", "<|im_end|>"),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>"),
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    "gpt-oss": ("openai-gpt-oss-120b.jinja", "<|startoftext|>", "<|return|>"),
    "deepseek-v3.1": ("deepseek-ai-DeepSeek-V3.1.jinja", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "glm-4.6": ("GLM-4.6.jinja", "", "<|endoftext|>"),
    "glm-4.7-flash": ("GLM-4.7-Flash.jinja", "", "<|endoftext|>"),
    "kimi-k2": ("moonshotai-Kimi-K2.jinja", "", "[EOS]"),
    "granite-3.3": ("ibm-granite-granite-3.3-2B-Instruct.jinja", "", "<|end_of_text|>"),
    "smollm3": ("HuggingFaceTB-SmolLM3-3B.jinja", "", "<|im_end|>"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Name two MoE models, \"quoted\" & <tagged>."}],
]
KWARGS = {"date_string": "26 Jul 2024"}      # Llama 3.1 and others would print today's date


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "templates.json")
    args = ap.parse_args()
    from transformers.utils.chat_template_utils import render_jinja_template
    cases = []
    for family, (fname, bos, eos) in TEMPLATES.items():
        text = (args.templates / fname).read_text()
        for messages in CONVERSATIONS:
            for add_gen in (True, False):
                out, _ = render_jinja_template(conversations=[messages], chat_template=text,
                                               add_generation_prompt=add_gen, bos_token=bos,
                                               eos_token=eos, **KWARGS)
                cases.append({"family": family, "messages": messages, "add_generation_prompt": add_gen,
                              "expected": out[0]})
    templates = {f: {"file": fn, "bos": b, "eos": e, "text": (args.templates / fn).read_text()}
                 for f, (fn, b, e) in TEMPLATES.items()}
    args.out.write_text(json.dumps({"kwargs": KWARGS, "templates": templates, "cases": cases},
                                   ensure_ascii=False, indent=1))
    print(f"{len(cases)} cases, {len(templates)} templates -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
