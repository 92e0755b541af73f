"""Token sampling in llama.cpp's usual order: top-k, then top-p (on the untempered
distribution), then temperature; greedy when temperature <= 0. Deterministic for a given seed."""
from __future__ import annotations

import numpy as np

from .errors import InputError


class Sampler:
    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 seed: int | None = None):
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if not np.isfinite(temperature):
            raise InputError(f"temperature must be a finite number, got {temperature}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)
        if self.temperature <= 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if self.top_k and self.top_k > 0:
            order = order[: self.top_k]
        if self.top_p < 1.0:     # the smallest prefix whose probability reaches top_p
            p = _softmax(logits[order])
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            order = order[:keep]
        p = _softmax(logits[order] / self.temperature)
        return int(order[self.rng.choice(len(order), p=p)])


def _softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max())
    return p / p.sum()
