"""Chat templates: a GGUF's `tokenizer.chat_template` (Jinja) rendered the way Hugging Face
transformers' `apply_chat_template` renders it (the reference the templates are written for): a
sandboxed environment with trim_blocks and lstrip_blocks, loop controls, the `tojson` filter
without HTML escaping, `raise_exception`, `strftime_now`, `{% generation %}` blocks, and the
reasoning fields aliased (`reasoning_content` / `thinking`). The special tokens' texts come from
the GGUF's vocabulary. jinja2 is an optional dependency (`pip install moegraph[chat]`); templates
from files are untrusted code, hence the sandbox.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .errors import InputError, ModelError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ModelError("chat templates need jinja2: pip install 'moegraph[chat]' (or jinja2)") from None

    class Generation(jinja2.ext.Extension):   # {% generation %}...{% endgeneration %}: the body as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2


class ChatTemplate:
    """One chat template with the special tokens' texts it may refer to."""

    def __init__(self, text: str, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        env, self._jinja2 = _environment()
        try:
            self.template = env.from_string(text)
        except self._jinja2.exceptions.TemplateSyntaxError as e:
            raise ModelError(f"the chat template does not parse: {e} (line {e.lineno})") from None
        self.text = text
        self.special = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               tools: Sequence[dict] | None = None, **kwargs: Any) -> str:
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise InputError("messages must be a list of dicts such as {'role': 'user', 'content': '...'}")
        chat = []
        for m in messages:
            if "role" not in m:
                raise InputError(f"a message has no role: {m!r}")
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            chat.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None
                        else dict(m))
        try:
            return self.template.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt,
                                        **self.special, **kwargs)
        except self._jinja2.exceptions.TemplateError as e:
            raise InputError(f"the chat template refused the messages: {e}") from None


def model_chat_template(model, override: str | None = None) -> ChatTemplate:
    """The model's template (or `override`, a template's text) with its BOS/EOS texts."""
    text = override if override is not None else model.file.metadata.get("tokenizer.chat_template")
    if not text:
        raise ModelError(f"{model.path}: the GGUF has no tokenizer.chat_template (give one with --chat-template-file)")
    tok = model.tokenizer
    name = lambda i: tok.tokens[i] if i is not None else ""   # (llama.cpp's token text)
    return ChatTemplate(str(text), bos_token=name(tok.bos_id), eos_token=name(tok.eos_id))
