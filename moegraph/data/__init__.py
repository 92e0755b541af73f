"""Bundled data: the default model, a quantized copy (Q8_0, made by llama.cpp's quantizer) of the
tiny MoE trained on the King James Bible (../shared/fixtures/models), so the first command works
on a fresh clone with no network."""
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = DATA_DIR / "tiny-qwen3moe-kjv-Q8_0.gguf"
