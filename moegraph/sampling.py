"""Token sampling as llama.cpp chains its samplers by default (common/sampling.cpp):

    penalties -> top-k -> top-p -> min-p -> temperature -> draw

- penalties (over the last `penalty_last_n` tokens of the sequence, prompt included): a token seen
  c times has its logit divided by `repeat_penalty` (multiplied if negative), then lowered by
  c * `frequency_penalty` + `presence_penalty`;
- top-k: the k largest logits (k <= 0: all);
- top-p: the smallest set of the most likely tokens whose probabilities (softmax of the logits so
  far, before temperature) reach p;
- min-p: tokens at least min_p times as likely as the most likely one;
- temperature: logits / t, and the draw from their softmax with the sampler's own random
  generator (deterministic for a seed); t <= 0 is greedy (arg-max of the penalized logits).

Defaults are llama.cpp's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, penalties off).
`step()` also returns the chosen token's log-probability and the top alternatives under the
model's own distribution (log-softmax of the raw logits), what OpenAI's `logprobs` report.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass
class SampledToken:
    token: int
    logprob: float                                  # under the model's distribution (raw logits)
    top: list[tuple[int, float]] = field(default_factory=list)   # (token, logprob), most likely first


class Sampler:
    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, penalty_last_n: int = 64, seed: int | None = None,
                 n_probs: int = 0):
        for name, v in (("temperature", temperature), ("repeat_penalty", repeat_penalty),
                        ("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if not np.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v}")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {min_p}")
        if repeat_penalty <= 0:
            raise InputError(f"repeat_penalty must be positive, got {repeat_penalty}")
        if penalty_last_n < 0 or n_probs < 0:
            raise InputError("penalty_last_n and n_probs must not be negative")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repeat_penalty, self.frequency_penalty = repeat_penalty, frequency_penalty
        self.presence_penalty, self.n_probs = presence_penalty, n_probs
        self.history: deque[int] = deque(maxlen=penalty_last_n)     # (0: no penalties)
        self.rng = np.random.default_rng(seed)

    def accept(self, tokens) -> None:
        """Tokens of the sequence (the prompt, then each sampled one) for the penalties."""
        self.history.extend(int(t) for t in tokens)

    def _penalized(self, logits: np.ndarray) -> np.ndarray:
        if not self.history or (self.repeat_penalty == 1 and not self.frequency_penalty and not self.presence_penalty):
            return logits
        out = logits.copy()
        for tok, c in Counter(self.history).items():
            if 0 <= tok < len(out):
                v = out[tok]
                v = v / self.repeat_penalty if v > 0 else v * self.repeat_penalty
                out[tok] = v - c * self.frequency_penalty - self.presence_penalty
        return out

    def step(self, logits: np.ndarray) -> SampledToken:
        """The next token (and its log-probability), which is also accepted into the history."""
        raw = np.asarray(logits, dtype=np.float64)
        z = self._penalized(raw)
        if self.temperature <= 0:
            tok = int(np.argmax(z))
        else:
            order = np.argsort(-z, kind="stable")
            if self.top_k and self.top_k > 0:
                order = order[: self.top_k]
            if self.top_p < 1.0:     # the smallest prefix whose probability reaches top_p
                p = _softmax(z[order])
                order = order[: int(np.searchsorted(np.cumsum(p), self.top_p) + 1)]
            if self.min_p > 0:       # (order is sorted: its first is the most likely)
                order = order[z[order] >= z[order[0]] + np.log(self.min_p)]
            p = _softmax(z[order] / self.temperature)
            tok = int(order[self.rng.choice(len(order), p=p)])
        lp = raw - raw.max()
        lp = lp - np.log(np.exp(lp).sum())
        top = []
        if self.n_probs:
            best = np.argsort(-lp, kind="stable")[: self.n_probs]
            top = [(int(i), float(lp[i])) for i in best]
        self.accept([tok])
        return SampledToken(tok, float(lp[tok]), top)

    def __call__(self, logits: np.ndarray) -> int:
        return self.step(logits).token


def _softmax(z: np.ndarray) -> np.ndarray:
    p = np.exp(z - z.max())
    return p / p.sum()
