"""Models and sessions: `load(path)` -> Model; `model.compile(...)` -> Session, which owns a
compiled graph, its KV cache and the position of the next token."""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import InputError, ModelError, MoeGraphError, NumericalError, SessionBusyError
from .gguf_file import GGUFFile
from .ir import F16, F32, Graph
from .models import build_graph, config_from_gguf
from .sampling import Sampler

KV_TYPES = {"f16": F16, "f32": F32}


# Tensors up to this many elements (norms, biases, routers, small projections) are scanned for
# NaN/Inf at every load; check_tensors=True scans all of them (llama.cpp's --check-tensors).
ALWAYS_CHECKED_ELEMENTS = 1 << 20


class Model:
    """A GGUF model: its metadata, hyper-parameters, tensors (memory-mapped) and tokenizer.

    Non-finite numbers: the small tensors are always scanned, and with `check_tensors` every
    tensor (all values of float tensors, every block's scales of quantized ones) before anything
    runs; a NaN or Inf is a ModelError naming the tensor. What slips through (a NaN scale in a
    big unchecked tensor, an overflow) is caught at the output: non-finite logits raise
    NumericalError on every backend, never garbage."""

    def __init__(self, path: str | Path, check_tensors: bool = False):
        self.file = GGUFFile(path)
        self.config = config_from_gguf(self.file)
        self._tokenizer = None
        self.check_finite(everything=check_tensors)

    def check_finite(self, everything: bool = True) -> None:
        """Raises ModelError naming the first tensor holding NaN or Inf (see the class doc)."""
        from concurrent.futures import ThreadPoolExecutor

        from .quants import first_nonfinite, is_quantized
        todo = [w for w in self.file.tensors.values()
                if everything or w.n_elements <= ALWAYS_CHECKED_ELEMENTS]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:   # NumPy releases the GIL
            for w, i in zip(todo, pool.map(lambda w: first_nonfinite(w.raw, w.dtype), todo)):
                if i is not None:
                    where = f"block {i} (a scale)" if is_quantized(w.dtype) else f"element {i}"
                    raise ModelError(f"{self.path}: tensor {w.name} ({w.dtype.name}) holds NaN or Inf "
                                     f"at {where}: the file is corrupt")

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            try:
                self._tokenizer = Tokenizer.from_metadata(self.file.metadata)
            except ValueError as e:
                raise ModelError(f"{self.path}: cannot build the tokenizer: {e}") from None
        return self._tokenizer

    def default_n_ctx(self) -> int:
        return min(self.config.n_ctx_train, 4096)

    def graph(self, n_ctx: int | None = None, kv_type: str = "f16") -> Graph:
        """The model's forward-step graph before any pass."""
        if kv_type not in KV_TYPES:
            raise MoeGraphError(f"kv_type must be one of {list(KV_TYPES)}, got {kv_type!r}")
        n_ctx = n_ctx or self.default_n_ctx()
        if not (isinstance(n_ctx, int) and n_ctx >= 1):
            raise MoeGraphError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        return build_graph(self.file, self.config, n_ctx, KV_TYPES[kv_type])

    def compile(self, backend: str | None = None, passes: Sequence = (), n_ctx: int | None = None,
                kv_type: str = "f16", n_expert_used=None, slice_mode: str = "soft",
                **backend_options) -> "Session":
        """Builds the graph, runs the passes (names, functions, or (name, options) pairs) and
        compiles it. `n_expert_used` (an int, or one per layer) with `slice_mode` "soft" or "hard"
        appends the slice_experts pass."""
        from moegraph.backends import default_backend, get_backend
        _check_compile_options(n_ctx, n_expert_used, slice_mode, backend_options)
        graph = self.graph(n_ctx, kv_type)
        from moegraph.backends.lower import elem_size, require_memory
        kv_bytes = sum(int(np.prod(n.shape)) * elem_size(n.dtype) for n in graph.states().values())
        require_memory(kv_bytes, f"the KV cache for n_ctx={graph.meta['n_ctx']} ({kv_type})",
                       "use a smaller n_ctx (-c)")
        passes = list(passes)
        if n_expert_used is not None:
            passes.append(("slice_experts", {"n_expert_used": n_expert_used, "mode": slice_mode}))
        if passes:
            from moegraph.passes import run_passes
            graph = run_passes(graph, passes)
        name = backend or default_backend()
        t0 = time.perf_counter()
        executable = get_backend(name, **backend_options).compile(graph)
        return Session(self, graph, executable, name, compile_s=time.perf_counter() - t0)


# options any backend takes (a backend ignores those of the others: one call serves every backend)
BACKEND_OPTIONS = {"n_threads": "llvm", "max_tokens": "llvm, cuda", "use_cache": "llvm, cuda",
                   "repack": "llvm", "emulate_ggml_rounding": "numpy", "device": "cuda",
                   "cuda_graphs": "cuda", "arch": "cuda"}


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f"{name} must be a positive integer, got {v!r}")


def _check_compile_options(n_ctx, n_expert_used, slice_mode, options: dict) -> None:
    """Refuses what compile() would otherwise ignore or fail on late: unknown options (a typo
    such as n_thread=2 did nothing), non-positive sizes and thread counts, a bogus slice mode."""
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown:
        raise InputError(f"compile() got unknown option(s) {unknown}; options: "
                         + ", ".join(f"{k} ({v})" for k, v in BACKEND_OPTIONS.items()))
    if n_ctx is not None:
        _positive_int("n_ctx", n_ctx)
    for k in ("n_threads", "max_tokens"):
        if options.get(k) is not None:
            _positive_int(k, options[k])
    if slice_mode not in ("soft", "hard"):
        raise InputError(f"slice_mode must be 'soft' or 'hard', got {slice_mode!r}")
    if n_expert_used is not None:
        for k in (n_expert_used if isinstance(n_expert_used, (list, tuple)) else [n_expert_used]):
            _positive_int("n_expert_used", k)


def token_ids(tokens, n_vocab: int) -> np.ndarray:
    """The tokens as a 1-D int64 array, or an InputError naming what is wrong: not integers
    (a float was silently truncated, 'abc' or 2**64 raised numpy's errors), not one sequence
    (a 2-D array was silently flattened), empty, or out of the vocabulary's range."""
    if isinstance(tokens, (str, bytes)):
        raise InputError(f"tokens must be a sequence of integer ids, got a string {tokens[:40]!r} "
                         "(encode text with session.tokenizer.encode first)")
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1:
            raise InputError(f"tokens must be one sequence (a 1-D array), got shape {tokens.shape}")
        if tokens.size and tokens.dtype.kind not in "iu":
            raise InputError(f"token ids must be integers, got an array of {tokens.dtype}")
        bad = tokens[(tokens < 0) | (tokens >= n_vocab)]
    else:
        tokens = [tokens] if isinstance(tokens, (int, np.integer)) else list(tokens)
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InputError(f"token ids must be integers, got {t!r} ({type(t).__name__})")
        bad = [t for t in tokens if not 0 <= t < n_vocab]     # Python ints: 2**64 too
    if len(tokens) == 0:
        raise InputError("no tokens given: forward() needs at least one")
    if len(bad):
        raise InputError(f"token id {int(bad[0])} is out of range: the vocabulary has "
                         f"{n_vocab} tokens (0..{n_vocab - 1})")
    return np.asarray(tokens, dtype=np.int64)


def _prompt_ids(tokens, n_vocab: int) -> list[int]:
    return [] if not isinstance(tokens, np.ndarray) and len(tokens) == 0 else token_ids(tokens, n_vocab).tolist()


def load(path: str | Path, check_tensors: bool = False) -> Model:
    """Opens a GGUF (memory-mapped). check_tensors: scan every tensor for NaN/Inf first."""
    return Model(path, check_tensors=check_tensors)


@dataclass
class GenerationStats:
    n_prompt: int = 0
    n_generated: int = 0
    prompt_s: float = 0.0
    generate_s: float = 0.0
    stop_reason: str = ""     # "eos" (an end-of-generation token), "length" (max_tokens), "context" (n_ctx full)

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_s if self.prompt_s else 0.0

    @property
    def generate_tps(self) -> float:
        return self.n_generated / self.generate_s if self.generate_s else 0.0


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    n_predictions: int
    chunk_nll: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Session:
    """A compiled model with its KV cache. `forward` appends tokens to the sequence and returns
    the logits at every new position."""

    def __init__(self, model: Model, graph: Graph, executable, backend: str, compile_s: float = 0.0):
        self.model, self.graph, self.executable, self.backend = model, graph, executable, backend
        self.n_ctx: int = graph.meta["n_ctx"]
        self.n_past = 0
        self.compile_s = compile_s
        self.stats = GenerationStats()
        self._busy = threading.Lock()     # one call at a time: the KV cache and n_past are shared

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise SessionBusyError(f"Session.{what}() was called while another call is running on this "
                                   "session (from another thread): a session holds one sequence; use one "
                                   "session per thread, or serialize the calls")
        try:
            yield
        finally:
            self._busy.release()

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def reset(self) -> None:
        with self._exclusive("reset"):
            self.n_past = 0
            self.executable.reset_state()

    def forward(self, tokens: Sequence[int] | np.ndarray, last_only: bool = False) -> np.ndarray:
        """Appends tokens to the sequence; returns the logits [n_tokens, n_vocab] (float32), or
        with last_only only the last position's [1, n_vocab]: all that generation needs, and the
        LM head then runs for one row instead of n_tokens (llama.cpp's default too)."""
        return self.run(tokens, last_only)["logits"]

    def run(self, tokens: Sequence[int] | np.ndarray, last_only: bool = False) -> dict[str, np.ndarray]:
        """Like forward, but returns every output of the graph (passes and analyses may add some,
        e.g. the chosen experts). Longer inputs than the backend takes at once are split into
        batches (like llama.cpp's ubatches)."""
        ids = token_ids(tokens, self.model.config.n_vocab)
        n = len(ids)
        step = getattr(self.executable, "max_tokens", None) or n
        with self._exclusive("forward"):
            if self.n_past + n > self.n_ctx:
                raise InputError(f"{self.n_past} tokens in the context + {n} new ones exceed the "
                                 f"context size n_ctx={self.n_ctx} (reset() the session or use a larger n_ctx)")
            parts = [self._run_batch(ids[i:i + step], last_only) for i in range(0, n, step)]
        if len(parts) == 1:
            return parts[0]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if last_only:
            out["logits"] = parts[-1]["logits"]
        return out

    def _run_batch(self, ids: np.ndarray, last_only: bool = False) -> dict[str, np.ndarray]:
        n = len(ids)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        n_kv = self.n_past + n
        cells = np.arange(n_kv)[None, :]
        mask = np.where(cells <= pos[:, None], 0.0, -np.inf).astype(np.float32)
        rows = np.array([n - 1], np.int32) if last_only else np.arange(n, dtype=np.int32)
        inputs = {"tokens": ids.astype(np.int32), "pos": pos, "kq_mask": mask, "out_rows": rows}
        n_swa = self.graph.meta.get("n_swa")
        if n_swa:   # sliding-window layers also hide cells n_swa or more positions back (llama.cpp's standard SWA)
            inputs["kq_mask_swa"] = np.where(pos[:, None] - cells >= n_swa, -np.inf, mask).astype(np.float32)
        out = self.executable.run(inputs)
        self.n_past += n
        logits = out.get("logits")
        if logits is not None and not np.isfinite(logits).all():
            row = int(np.argmax(~np.isfinite(logits).all(axis=-1)))
            raise NumericalError(f"the logits at position {int(pos[rows[row]])} are NaN or Inf: the model "
                                 "holds non-finite weights (load it with check_tensors=True, or "
                                 "--check-tensors, to find them) or the computation overflowed; "
                                 "reset() the session before using it again")
        return out

    # -- text in, text out
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, seed: int | None = None,
                 stop_at_eos: bool = True, *, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, penalty_last_n: int = 64,
                 stop: Sequence[str] = (), special: bool = False, add_bos: bool | None = None,
                 sampler: Sampler | None = None) -> Iterator[str]:
        """Streams text pieces. Starts from an empty context; `self.stats` has the timings.
        Sampling as llama.cpp chains it (moegraph.sampling); generation ends at an
        end-of-generation token (the vocabulary's EOG set), after `max_tokens`, or where the text
        reaches one of the `stop` strings (not included). `special`: control tokens written in a
        str prompt are parsed as tokens (chat-rendered prompts), as llama.cpp's parse_special."""
        tok = self.tokenizer
        ids = tok.encode(prompt, add_bos=add_bos, special=special) if isinstance(prompt, str) \
            else _prompt_ids(prompt, self.model.config.n_vocab)
        if not ids:
            raise InputError("the prompt is empty (and the model adds no BOS token)")
        if len(ids) > self.n_ctx:
            raise InputError(f"the prompt has {len(ids)} tokens, more than the context size "
                             f"n_ctx={self.n_ctx}")
        if max_tokens < 0:
            raise InputError(f"max_tokens must not be negative, got {max_tokens}")
        stops = [s for s in stop if s]
        sampler = sampler or Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                     repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                                     presence_penalty=presence_penalty, penalty_last_n=penalty_last_n, seed=seed)
        sampler.accept(ids)
        decoder = tok.stream_decoder()
        self.reset()
        self.stats = st = GenerationStats(n_prompt=len(ids))
        t0 = time.perf_counter()
        logits = self.forward(ids, last_only=True)[-1]
        st.prompt_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.stop_reason = "length"
        held = ""        # text that may be the start of a stop string, not yet given out
        for _ in range(max_tokens):
            nxt = sampler(logits)
            st.n_generated += 1
            if stop_at_eos and nxt in tok.eos_ids:
                st.stop_reason = "eos"
                break
            held += decoder.push(nxt)
            if stops:
                hit = min((held.find(s) for s in stops if s in held), default=-1)
                if hit >= 0:
                    held = held[:hit]
                    st.stop_reason = "stop"
                    break
                keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
                out, held = held[:len(held) - keep], held[len(held) - keep:]
            else:
                out, held = held, ""
            if out:
                yield out
            if self.n_past >= self.n_ctx:
                if st.n_generated < max_tokens:
                    st.stop_reason = "context"
                break
            logits = self.forward([nxt])[-1]
            st.generate_s = time.perf_counter() - t0
        st.generate_s = time.perf_counter() - t0
        tail = held + (decoder.flush() if st.stop_reason != "stop" else "")
        if tail:
            yield tail

    def chat(self, messages: Sequence[dict], max_tokens: int = 256, *, chat_template: str | None = None,
             stop: Sequence[str] = (), **sampling) -> Iterator[str]:
        """Streams the assistant's reply to `messages` ([{'role': ..., 'content': ...}, ...]):
        the model's chat template rendered with add_generation_prompt (moegraph.chat), its
        special tokens parsed, then `generate` (sampling options as there)."""
        from .chat import model_chat_template
        text = model_chat_template(self.model, chat_template).render(messages, add_generation_prompt=True)
        tok = self.tokenizer
        bos_text = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
        add_bos = None if not (bos_text and text.startswith(bos_text)) else False   # no second BOS
        yield from self.generate(text, max_tokens, stop=stop, special=True, add_bos=add_bos, **sampling)

    def perplexity(self, text: str | Sequence[int], ctx: int = 128, n_chunks: int | None = None,
                   score_from: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
        """llama-perplexity's protocol: non-overlapping chunks of `ctx` tokens (remainder dropped),
        each evaluated from an empty cache; tokens score_from+1 .. ctx-1 of each chunk are scored
        from the logits before them (score_from defaults to ctx/2). NLL in float64.
        `progress(done, total, chunk_nll)` is called after each chunk."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else _prompt_ids(text, self.model.config.n_vocab)
        score_from = ctx // 2 if score_from is None else score_from
        if ctx < 2 or not (0 <= score_from < ctx - 1):
            raise InputError(f"perplexity needs ctx >= 2 and 0 <= score_from < ctx - 1, got "
                             f"ctx={ctx}, score_from={score_from}")
        if ctx > self.n_ctx:
            raise InputError(f"perplexity chunk size {ctx} exceeds n_ctx={self.n_ctx}")
        total = len(ids) // ctx
        if total == 0:
            raise InputError(f"the text has {len(ids)} tokens, fewer than one chunk of {ctx}")
        n_chunks = total if n_chunks is None else min(n_chunks, total)
        chunk_nll, t0 = [], time.perf_counter()
        for c in range(n_chunks):
            chunk = np.asarray(ids[c * ctx:(c + 1) * ctx])
            self.reset()
            logits = self.forward(chunk).astype(np.float64)[score_from:ctx - 1]
            targets = chunk[score_from + 1:]
            m = logits.max(axis=1)
            lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
            chunk_nll.append(float(np.mean(lse - logits[np.arange(len(targets)), targets])))
            if progress:
                progress(c + 1, n_chunks, chunk_nll)
        self.reset()
        mean = float(np.mean(chunk_nll))   # equal-sized chunks: mean of means = overall mean
        return PerplexityResult(math.exp(mean), mean, n_chunks * (ctx - 1 - score_from),
                                chunk_nll, time.perf_counter() - t0)
