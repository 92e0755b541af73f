"""A llama-cpp-python-shaped API on one session: `Llama(path)(prompt, ...)` for completions and
`create_chat_completion(messages, ...)` for chats, returning OpenAI-style dicts (or, with
stream=True, an iterator of chunks), so code written for llama_cpp.Llama runs with few changes.

    from moegraph import Llama
    llm = Llama("model.gguf", n_ctx=2048)
    llm("The capital of France is", max_tokens=16, stop=["."])["choices"][0]["text"]
    llm.create_chat_completion([{"role": "user", "content": "Hi"}])["choices"][0]["message"]["content"]

One sequence at a time (a call from a second thread while one runs is refused, as the session's).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import InputError

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class Llama:
    def __init__(self, model_path: str, n_ctx: int = 512, n_threads: int | None = None,
                 backend: str | None = None, seed: int | None = None, chat_template: str | None = None,
                 verbose: bool = False, **backend_options: Any):
        from . import load
        self.model = load(model_path)
        if n_threads is not None:
            backend_options["n_threads"] = n_threads
        self.session = self.model.compile(backend=backend, n_ctx=n_ctx, **backend_options)
        self.model_path, self.seed, self.chat_template = str(model_path), seed, chat_template

    def _sampling(self, temperature, top_p, top_k, min_p, repeat_penalty, frequency_penalty,
                  presence_penalty, seed) -> dict:
        return dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                    repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                    presence_penalty=presence_penalty, seed=self.seed if seed is None else seed)

    def _run(self, pieces: Iterator[str], kind: str, stream: bool, wrap):
        created, rid = int(time.time()), f"{kind}-{uuid.uuid4().hex[:16]}"
        if stream:
            def chunks():
                for piece in pieces:
                    yield {"id": rid, "object": f"{kind}.chunk", "created": created, "model": self.model_path,
                           "choices": [{"index": 0, **wrap(piece, True), "finish_reason": None}]}
                yield {"id": rid, "object": f"{kind}.chunk", "created": created, "model": self.model_path,
                       "choices": [{"index": 0, **wrap("", True),
                                    "finish_reason": _FINISH.get(self.session.stats.stop_reason, "stop")}]}
            return chunks()
        text = "".join(pieces)
        st = self.session.stats
        return {"id": rid, "object": kind, "created": created, "model": self.model_path,
                "choices": [{"index": 0, **wrap(text, False), "finish_reason": _FINISH.get(st.stop_reason, "stop")}],
                "usage": {"prompt_tokens": st.n_prompt, "completion_tokens": st.n_generated,
                          "total_tokens": st.n_prompt + st.n_generated}}

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          stop: str | Sequence[str] | None = None, repeat_penalty: float = 1.0,
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                          seed: int | None = None, stream: bool = False, echo: bool = False):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        n = self.session.n_ctx if max_tokens is None or max_tokens <= 0 else max_tokens
        pieces = self.session.generate(prompt, max_tokens=n, stop=stops, **self._sampling(
            temperature, top_p, top_k, min_p, repeat_penalty, frequency_penalty, presence_penalty, seed))
        if echo:
            if not isinstance(prompt, str):
                raise InputError("echo needs a text prompt")
            pieces = _prefixed(prompt, pieces)
        return self._run(pieces, "text_completion", stream, lambda t, _: {"text": t, "logprobs": None})

    __call__ = create_completion

    def create_chat_completion(self, messages: Sequence[dict], max_tokens: int | None = None,
                               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, stop: str | Sequence[str] | None = None,
                               repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                               presence_penalty: float = 0.0, seed: int | None = None, stream: bool = False):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        n = self.session.n_ctx if max_tokens is None or max_tokens <= 0 else max_tokens
        pieces = self.session.chat(messages, max_tokens=n, chat_template=self.chat_template, stop=stops,
                                   **self._sampling(temperature, top_p, top_k, min_p, repeat_penalty,
                                                    frequency_penalty, presence_penalty, seed))

        def wrap(text, delta):
            msg = {"role": "assistant", "content": text}
            return {"delta": {"content": text} if text else {}} if delta else {"message": msg}
        return self._run(pieces, "chat.completion", stream, wrap)


def _prefixed(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
