"""Tokenizer built from GGUF metadata, matching llama.cpp's ``llama_tokenize``.

Two vocabulary kinds are supported, chosen by ``tokenizer.ggml.model``:

``gpt2`` (byte-level BPE)
    Built on HuggingFace ``tokenizers``: ``models.BPE(vocab, merges)`` with a
    pre-tokenizer made of the regular expressions that llama.cpp
    (``src/llama-vocab.cpp``) uses for the file's ``tokenizer.ggml.pre`` type,
    each applied as an "isolated" split (llama.cpp keeps both the matches and
    the gaps between them as words), followed by the GPT-2 byte-to-unicode
    mapping.  BPE merging (lowest rank first, leftmost on ties) is the same
    algorithm as llama.cpp's ``llm_tokenizer_bpe_session``.

``llama`` (SentencePiece-style, "SPM")
    A direct implementation of llama.cpp's SPM algorithm (``llm_tokenizer_spm``):
    spaces become U+2581, a space is prepended when ``add_space_prefix`` holds
    and the text starts the prompt or follows a special token, then adjacent
    symbols are merged greedily by the *score* of the merged token (highest
    first, leftmost on ties) as long as the concatenation is in the vocabulary;
    characters that end up outside the vocabulary become ``<0xXX>`` byte tokens.
    We do not use ``tokenizers.models.BPE`` with merges derived from the scores
    (what HF's ``LlamaTokenizerFast`` does) because its merge ranks order ties
    differently and it cannot merge into non-normal tokens the way llama.cpp
    does; the pure-Python loop is exact and fast enough for prompts.

Special tokens are handled as in llama.cpp's ``tokenizer_st_partition``:
control / user-defined / unknown tokens are cut out of the raw text before the
pre-tokenizer runs, longest token text first.  With ``special=False`` only
user-defined tokens are cut out; control tokens written in the text are
tokenized as plain text.

Decoding follows ``llama_token_to_piece``: control and unknown tokens decode to
nothing unless ``special=True``; user-defined tokens decode to their text;
normal BPE tokens go through the byte-level map; SPM byte tokens give their
byte.
"""

from __future__ import annotations

import codecs
import heapq
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["StreamDecoder", "TokenType", "Tokenizer", "UnsupportedPreTokenizerWarning"]

log = logging.getLogger(__name__)


class TokenType:
    """GGUF ``tokenizer.ggml.token_type`` values (llama.cpp ``llama_token_type``)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class UnsupportedPreTokenizerWarning(UserWarning):
    """The file's ``tokenizer.ggml.pre`` is not implemented; GPT-2 splitting is used."""


# --------------------------------------------------------------------------------------
# Pre-tokenizer regular expressions, per llama.cpp pre-tokenizer type (llama-vocab.cpp).
# Each entry is a sequence of patterns applied one after the other; every pattern splits
# every current piece into matches and the gaps between them.
# --------------------------------------------------------------------------------------

_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_LLAMA3 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN2 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN35 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    + r"|\s+(?!\S)|\s+"
)
_RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + _CONTRACTIONS_CI + "?"
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + _CONTRACTIONS_CI + "?"
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
def _char_class(ranges: Iterable[tuple[int, int] | int]) -> str:
    """Regex character-class body from code points / inclusive code point ranges (written
    as numbers so that no Unicode normalization of this source file can alter them)."""
    parts = []
    for r in ranges:
        lo, hi = (r, r) if isinstance(r, int) else r
        parts.append(chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}")
    return "".join(parts)


# DeepSeek LLM: the cased letters of many scripts, as in its tokenizer.json.
_DEEPSEEK_LETTERS = _char_class([
    0xB5, (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF), (0x1C4, 0x293),
    (0x295, 0x2AF), (0x370, 0x373), 0x376, 0x377, (0x37B, 0x37D), 0x37F, 0x386,
    (0x388, 0x38A), 0x38C, (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F),
    (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15),
    (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), 0x1F59, 0x1F5B,
    0x1F5D, (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), 0x1FBE, (0x1FC2, 0x1FC4),
    (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4),
    (0x1FF6, 0x1FFC), 0x2102, 0x2107, (0x210A, 0x2113), 0x2115, (0x2119, 0x211D), 0x2124,
    0x2126, 0x2128, (0x212A, 0x212D), (0x212F, 0x2134), 0x2139, (0x213C, 0x213F),
    (0x2145, 0x2149), 0x214E, 0x2183, 0x2184, (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4),
    (0x2CEB, 0x2CEE), 0x2CF2, 0x2CF3, (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F),
    (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17),
    (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3),
    (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943),
])
_DEEPSEEK_PUNCT = _char_class([(0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E),
                               (0x2018, 0x201F), (0x3000, 0x3002)])
_CJK_HANGUL = _char_class([(0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)])
_CJK_KANA = _char_class([(0x4E00, 0x9FA5), (0x3040, 0x309F), (0x30A0, 0x30FF)])


_PRE_PATTERNS: dict[str, tuple[str, ...]] = {
    "gpt2": (_RE_GPT2,),
    # llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when the key is missing)
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_RE_LLAMA3,),
    "smollm": (r"\p{N}", _RE_GPT2),
    "qwen2": (_RE_QWEN2,),
    "qwen35": (_RE_QWEN35,),
    "deepseek-llm": (
        r"[\r\n]",
        r"\s?[" + _DEEPSEEK_LETTERS + "A-Za-z]+",
        r"\s?[" + _DEEPSEEK_PUNCT + "]+",
        r"\s+\z",  # llama.cpp's "\s+$" (ECMAScript: end of input only)
        "[" + _CJK_HANGUL + "]+",
        r"\p{N}+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[" + _CJK_HANGUL + "]+", r"\p{N}"),
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[" + _CJK_KANA + "]+",
        (
            r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
            r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
    ),
    "falcon": (
        r"[\p{P}\$\+<=>\^~\|`]+",
        _RE_GPT2,
        r"[0-9][0-9][0-9]",
    ),
    "gpt4o": (_RE_GPT4O,),
}


@dataclass(frozen=True)
class _PreSpec:
    patterns: str  # key into _PRE_PATTERNS
    ignore_merges: bool = False  # whole word in vocab -> use it directly
    add_bos: bool = False  # llama.cpp's default add_bos for this type (file key overrides)
    null_bos: bool = False  # chatglm: default BOS is "none"


_PRE_TYPES: dict[str, _PreSpec] = {}


def _register(names: Iterable[str], spec: _PreSpec) -> None:
    for name in names:
        _PRE_TYPES[name] = spec


_register(["default"], _PreSpec("default"))
_register(
    ["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo",
     "jais", "trillion", "granite-docling", "exaone4"],
    _PreSpec("gpt2"),
)
_register(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano"],
    _PreSpec("llama3", ignore_merges=True, add_bos=True),
)
_register(["dbrx", "smaug-bpe"], _PreSpec("llama3"))
_register(["glm4", "chatglm-bpe"], _PreSpec("llama3", null_bos=True))
_register(
    ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"],
    _PreSpec("smollm"),
)
_register(
    ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2", "hunyuan", "solar-open", "megrez"],
    _PreSpec("qwen2"),
)
_register(["qwen35"], _PreSpec("qwen35"))
_register(["deepseek-llm"], _PreSpec("deepseek-llm"))
_register(["deepseek-coder"], _PreSpec("deepseek-coder"))
_register(["deepseek-v3"], _PreSpec("deepseek-v3"))
_register(["falcon"], _PreSpec("falcon"))
_register(["gpt-4o", "llama4", "kanana2", "talkie"], _PreSpec("gpt4o"))

SUPPORTED_PRE_TYPES = frozenset(_PRE_TYPES)

# Token texts that llama.cpp treats as end-of-generation (and forces to CONTROL).
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_ALWAYS_RENDER_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

_SPM_SPACE = "\u2581"  # '▁'


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(0xA1, 0xAC + 1))
        + list(range(0xAE, 0xFF + 1))
    )
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


# --------------------------------------------------------------------------------------
# metadata helpers (tolerant of numpy scalars/arrays and bytes)
# --------------------------------------------------------------------------------------

def _as_str(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8")
    return str(v)


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return list(v)


def _as_bool(v: Any) -> bool:
    if hasattr(v, "item"):
        v = v.item()
    return bool(v)


def _as_int(v: Any) -> int:
    if hasattr(v, "item"):
        v = v.item()
    return int(v)


class Tokenizer:
    """GGUF tokenizer (``gpt2`` byte-level BPE or ``llama`` SPM) matching llama.cpp.

    Build it with :meth:`from_metadata`.  Main entry points: :meth:`encode`,
    :meth:`decode`, :meth:`token_to_bytes`, :meth:`stream_decoder`.
    """

    # ------------------------------------------------------------------ construction

    def __init__(self, meta: Mapping[str, Any]):
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError(
                "GGUF metadata has no 'tokenizer.ggml.model': this file carries no tokenizer "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
            )
        model = _as_str(model)
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"unsupported tokenizer.ggml.model {model!r}: moegraph supports 'gpt2' "
                "(byte-level BPE) and 'llama' (SentencePiece)"
            )
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError("GGUF metadata has no 'tokenizer.ggml.tokens' (the vocabulary)")
        self.model: str = model

        tokens = [_as_str(t) for t in _as_list(meta["tokenizer.ggml.tokens"])]
        n = len(tokens)
        for i, t in enumerate(tokens):
            if not t:  # llama.cpp renames empty tokens
                tokens[i] = f"[EMPTY_{i}]"
        token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            j = token_to_id.setdefault(t, i)
            if j != i:
                raise ValueError(f"duplicate token in vocabulary: {t!r} has ids {j} and {i}")
        self._tokens = tokens
        self._token_to_id = token_to_id

        types = _as_list(meta.get("tokenizer.ggml.token_type"))
        if types and len(types) < n:
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries < {n} tokens")
        self._types: list[int] = [int(t) for t in types[:n]] if types else [TokenType.NORMAL] * n
        scores = _as_list(meta.get("tokenizer.ggml.scores"))
        if scores and len(scores) < n:
            raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries < {n} tokens")
        self._scores: list[float] = [float(s) for s in scores[:n]] if scores else [0.0] * n
        # tokens llama.cpp flags as CONTROL although the file does not (EOG-looking texts)
        self._forced_control: set[int] = set()

        # --- type-specific defaults (llama_vocab::impl::load) ---
        self.pre: str | None = None
        spec: _PreSpec | None = None
        if model == "gpt2":
            bos, eos, unk = 11, 11, None
            pre = meta.get("tokenizer.ggml.pre")
            if pre is None:
                warnings.warn(
                    "GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer "
                    "(generation quality may be degraded)",
                    UnsupportedPreTokenizerWarning, stacklevel=3,
                )
                spec = _PRE_TYPES["default"]
            else:
                pre = _as_str(pre)
                spec = _PRE_TYPES.get(pre)
                if spec is None:
                    warnings.warn(
                        f"tokenizer.ggml.pre {pre!r} is not implemented; falling back to the "
                        "GPT-2 pre-tokenizer regex (token ids may differ from llama.cpp)",
                        UnsupportedPreTokenizerWarning, stacklevel=3,
                    )
                    spec = _PRE_TYPES["gpt-2"]
            self.pre = pre
            add_bos = spec.add_bos
            if spec.null_bos:
                bos = None
            self.add_space_prefix = False
        else:  # llama / SPM: no pre-tokenizer (tokenizer.ggml.pre is informational)
            if meta.get("tokenizer.ggml.pre") is not None:
                self.pre = _as_str(meta["tokenizer.ggml.pre"])
            bos, eos, unk = 1, 2, 0
            add_bos = True
            self.add_space_prefix = True
        add_eos = False
        if "tokenizer.ggml.add_space_prefix" in meta:
            self.add_space_prefix = _as_bool(meta["tokenizer.ggml.add_space_prefix"])

        def in_range(i):
            return i if (i is not None and 0 <= i < n) else None

        def special_id(key: str, default):
            default = in_range(default)
            if key in meta:
                v = _as_int(meta[key])
                if 0 <= v < n:
                    return v
                log.warning("bad special token %s = %d (vocab %d), using %s", key, v, n, default)
            return default

        self._bos_id = special_id("tokenizer.ggml.bos_token_id", bos)
        self._eos_id = special_id("tokenizer.ggml.eos_token_id", eos)
        self._unk_id = special_id("tokenizer.ggml.unknown_token_id", unk)
        self._eot_id = special_id("tokenizer.ggml.eot_token_id", None)
        self._eom_id = special_id("tokenizer.ggml.eom_token_id", None)
        self.pad_id = special_id("tokenizer.ggml.padding_token_id", None)
        self.sep_id = special_id("tokenizer.ggml.seperator_token_id", None)
        fim_pad = special_id("tokenizer.ggml.fim_pad_token_id", None)
        fim_rep = special_id("tokenizer.ggml.fim_rep_token_id", None)
        fim_sep = special_id("tokenizer.ggml.fim_sep_token_id", None)

        if "tokenizer.ggml.add_bos_token" in meta:
            add_bos = _as_bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in meta:
            add_eos = _as_bool(meta["tokenizer.ggml.add_eos_token"])
        if add_bos and self._bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true, but no BOS token id is set")
        if add_eos and self._eos_id is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true, but no EOS token id is set")
        self.add_bos: bool = add_bos
        self.add_eos: bool = add_eos

        # --- auto-detection by token text, as llama.cpp does ---
        def find_first(texts):
            for t in texts:
                i = token_to_id.get(t)
                if i is not None:
                    return i
            return None

        def force_control(i):
            if self._types[i] != TokenType.CONTROL:
                self._forced_control.add(i)

        if self._eot_id is None:
            self._eot_id = find_first(_EOT_TEXTS)
            if self._eot_id is not None:
                force_control(self._eot_id)
        if self._eom_id is None:
            self._eom_id = token_to_id.get("<|eom_id|>")
            if self._eom_id is not None:
                force_control(self._eom_id)
        if fim_pad is None:
            fim_pad = find_first(_FIM_PAD_TEXTS)
        if fim_rep is None:
            fim_rep = find_first(_FIM_REP_TEXTS)
        if fim_sep is None:
            fim_sep = find_first(_FIM_SEP_TEXTS)
        for i in (fim_pad, fim_rep, fim_sep):
            if i is not None:
                force_control(i)

        eog: set[int] = {i for i in (fim_pad, fim_rep, fim_sep) if i is not None}
        for t in _EOG_TEXTS:
            i = token_to_id.get(t)
            if i is not None:
                eog.add(i)
                force_control(i)
        for i in (self._eos_id, self._eot_id, self._eom_id):
            if i is not None:
                eog.add(i)
        for t in _ALWAYS_RENDER_TEXTS:  # gpt-oss: always rendered, user-defined
            i = token_to_id.get(t)
            if i is not None:
                self._types[i] = TokenType.USER_DEFINED
                self._forced_control.discard(i)
        # o200k_harmony / solar-open: "<|end|>" is not end-of-generation there
        texts_eog = {tokens[i] for i in eog}
        end_id = token_to_id.get("<|end|>")
        has_call = bool({"<|call|>", "<|calls|>"} & texts_eog)
        if end_id is not None and end_id in eog and has_call and (
            "<|return|>" in texts_eog or "<|flush|>" in texts_eog
        ):
            eog.discard(end_id)
            self._types[end_id] = TokenType.USER_DEFINED
            self._forced_control.discard(end_id)
        self._eog_ids = frozenset(eog)

        # --- special-token cache for tokenizer_st_partition: longest text first ---
        special = []
        for i in range(n):
            ty = self._types[i]
            if ty in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN) or (
                i in self._forced_control
            ):
                special.append(i)
        special.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))  # byte length
        self._special_all = [(i, tokens[i]) for i in special]
        self._special_user = [
            (i, tokens[i]) for i in special
            if self._types[i] == TokenType.USER_DEFINED and i not in self._forced_control
        ]

        self._piece_cache: dict[tuple[int, bool], bytes] = {}

        if model == "gpt2":
            self._hf = self._build_bpe(meta, spec)
            self._ignore_merges = spec.ignore_merges
        else:
            self._hf = None
            self._ignore_merges = False

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from a mapping of GGUF keys to Python values.

        ``meta["tokenizer.ggml.tokens"]`` is a list of str, ``tokenizer.ggml.merges`` a list
        of ``"a b"`` strings, ``tokenizer.ggml.token_type`` a list of ints, etc.  Raises
        ``ValueError`` when the tokenizer model is missing or unsupported.
        """
        return cls(meta)

    def _build_bpe(self, meta: Mapping[str, Any], spec: _PreSpec):
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if "tokenizer.ggml.merges" not in meta:
            raise ValueError("gpt2 tokenizer without 'tokenizer.ggml.merges' in the metadata")
        vocab = self._token_to_id
        merges = []
        n_bad = 0
        for m in _as_list(meta["tokenizer.ggml.merges"]):
            m = _as_str(m)
            pos = m.find(" ", 1)  # as llama.cpp: the first space after position 0
            if pos < 0:
                n_bad += 1
                continue
            a, b = m[:pos], m[pos + 1:]
            # tokenizers refuses merges whose parts or result are not in the vocabulary;
            # llama.cpp would fall back to byte tokens for such results anyway.
            if a in vocab and b in vocab and (a + b) in vocab:
                merges.append((a, b))
            else:
                n_bad += 1
        if n_bad:
            log.warning("ignored %d BPE merges that do not map into the vocabulary", n_bad)
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges)
        tk = HFTokenizer(bpe)
        steps = [
            pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False)
            for p in _PRE_PATTERNS[spec.patterns]
        ]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
        return tk

    # ------------------------------------------------------------------ properties

    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eot_id(self) -> int | None:
        return self._eot_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every end-of-generation id (llama.cpp's EOG set: eos, eot, eom, and the
        tokens it recognises by text, e.g. ``<|im_end|>``, ``<|endoftext|>``)."""
        return self._eog_ids

    @property
    def tokens(self) -> Sequence[str]:
        """Token texts as stored in the file (byte-level, or with U+2581 for spaces in SPM)."""
        return self._tokens

    def token_type(self, token_id: int) -> int:
        """The GGUF token type; EOG-looking tokens that llama.cpp forces to CONTROL
        report ``TokenType.CONTROL``."""
        if token_id in self._forced_control:
            return TokenType.CONTROL
        return self._types[token_id]

    def is_control(self, token_id: int) -> bool:
        return self.token_type(token_id) == TokenType.CONTROL

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._eog_ids

    def token_to_id(self, text: str) -> int | None:
        """Id of the token whose stored text is ``text`` (None when absent)."""
        return self._token_to_id.get(text)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self._bos_id}, eos={self._eos_id}, add_bos={self.add_bos})")

    # ------------------------------------------------------------------ encoding

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        special: bool = False,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(text, add_special, parse_special=special)``.

        ``add_bos=None`` follows the file (``tokenizer.ggml.add_bos_token`` and
        ``add_eos_token``; this is llama.cpp's ``add_special=True``). ``add_bos=False`` adds
        neither BOS nor EOS (``add_special=False``). ``add_bos=True`` always prepends BOS,
        even when the file says not to. ``add_eos`` overrides the EOS choice.
        With ``special=False`` control tokens written in ``text`` are tokenized as plain
        text; with ``special=True`` they become their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        want_bos = self.add_bos if add_bos is None else bool(add_bos)
        if add_eos is None:
            want_eos = self.add_eos and add_bos is not False
        else:
            want_eos = bool(add_eos)
        out: list[int] = []
        if want_bos:
            if self._bos_id is None:
                raise ValueError("this vocabulary has no BOS token")
            out.append(self._bos_id)
        frags = self._partition(text, special) if text else []
        if self.model == "gpt2":
            hf = self._hf
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out.extend(hf.encode(f, add_special_tokens=False).ids)
        else:
            prev_special = True  # llama.cpp prefixes a space at the start and after specials
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    self._spm_tokenize(f.replace(" ", _SPM_SPACE), out)
                    prev_special = False
        if want_eos:
            if self._eos_id is None:
                raise ValueError("this vocabulary has no EOS token")
            out.append(self._eos_id)
        return out

    def __call__(self, text: str, **kw) -> list[int]:
        return self.encode(text, **kw)

    def pre_tokenize(self, text: str) -> list[str]:
        """The words the pre-tokenizer cuts ``text`` into before BPE, as plain text (for
        inspection; special tokens are not cut out here).  SPM has no pre-tokenizer: the
        whole (space-escaped) text is one word."""
        if self._hf is None:
            t = (" " + text) if self.add_space_prefix else text
            return [t.replace(" ", _SPM_SPACE)] if t else []
        words = self._hf.pre_tokenizer.pre_tokenize_str(text)
        return [bytes(_CHAR_TO_BYTE[c] for c in w).decode("utf-8", errors="replace")
                for w, _ in words]

    def _partition(self, text: str, special: bool) -> list:
        """Split ``text`` into raw-text pieces (str) and special token ids (int)."""
        frags: list = [text]
        for tid, ttext in (self._special_all if special else self._special_user):
            if ttext not in text:
                continue
            new: list = []
            for f in frags:
                if not isinstance(f, str) or ttext not in f:
                    new.append(f)
                    continue
                start = 0
                while True:
                    hit = f.find(ttext, start)
                    if hit < 0:
                        break
                    if hit > start:
                        new.append(f[start:hit])
                    new.append(tid)
                    start = hit + len(ttext)
                if start < len(f):
                    new.append(f[start:])
            frags = new
        return frags

    def _spm_tokenize(self, text: str, out: list[int]) -> None:
        """llama.cpp's SPM merge loop on already-escaped text (spaces are U+2581)."""
        if not text:
            return
        vocab = self._token_to_id
        scores = self._scores
        sym = list(text)  # one symbol per code point; merged text lives in the left symbol
        n = len(sym)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = sym[left] + sym[right]
            tid = vocab.get(merged)
            if tid is not None:
                # highest score first, then leftmost; length detects stale entries
                heapq.heappush(heap, (-scores[tid], left, right, len(merged)))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue
            sym[left] = ls + rs
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            add(prv[left], left)
            add(left, nxt[left])

        i = 0
        while i != -1:
            s = sym[i]
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for byte in s.encode("utf-8"):
                    out.append(self._spm_byte_token(byte))
            i = nxt[i]

    def _spm_byte_token(self, byte: int) -> int:
        tid = self._token_to_id.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self._token_to_id.get(chr(byte))
        if tid is None:
            if self._unk_id is None:
                raise ValueError(f"SPM vocabulary has no byte token for 0x{byte:02X} and no <unk>")
            tid = self._unk_id
        return tid

    # ------------------------------------------------------------------ decoding

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token stands for (``llama_token_to_piece`` with lstrip 0).

        Control and unknown tokens give ``b""`` unless ``special=True``; unused and
        undefined tokens always give ``b""``.
        """
        key = (token_id, special)
        piece = self._piece_cache.get(key)
        if piece is None:
            piece = self._piece_cache[key] = self._token_to_bytes(token_id, special)
        return piece

    def _token_to_bytes(self, token_id: int, special: bool) -> bytes:
        if not 0 <= token_id < len(self._tokens):
            raise IndexError(f"token id {token_id} out of range [0, {len(self._tokens)})")
        text = self._tokens[token_id]
        ty = self.token_type(token_id)
        if ty in (TokenType.CONTROL, TokenType.UNKNOWN):
            return text.encode("utf-8") if special else b""
        if ty == TokenType.USER_DEFINED:
            return text.encode("utf-8")
        if ty == TokenType.NORMAL:
            if self.model == "llama":
                return text.replace(_SPM_SPACE, " ").encode("utf-8")
            table = _CHAR_TO_BYTE
            try:
                return bytes(table[c] for c in text)
            except KeyError:  # a char outside the byte map: keep its UTF-8 (llama.cpp: [UNK_BYTE])
                return b"".join(
                    bytes((table[c],)) if c in table else c.encode("utf-8") for c in text
                )
        if ty == TokenType.BYTE:
            try:
                return bytes((int(text[3:5], 16),))
            except ValueError:
                return b""
        return b""  # unused / undefined

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Concatenated bytes of ``ids``; for SPM with ``add_space_prefix`` the space added
        in front of the first word is removed again."""
        pieces = [self.token_to_bytes(int(i), special) for i in ids]
        if self.model == "llama" and self.add_space_prefix:
            for k, p in enumerate(pieces):
                if p:
                    if p[:1] == b" ":
                        pieces[k] = p[1:]
                    break
        return b"".join(pieces)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 is replaced by U+FFFD)."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special=special)


class StreamDecoder:
    """Turns a stream of token ids into text pieces without splitting UTF-8 characters.

    >>> sd = tok.stream_decoder()
    >>> for t in ids: print(sd.push(t), end="")
    >>> print(sd.flush())

    ``push`` returns the text completed so far (possibly ``""`` while a multi-byte
    character is incomplete); ``flush`` returns what is left (incomplete bytes become
    U+FFFD).  The concatenation of all pieces equals ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer.model == "llama" and tokenizer.add_space_prefix

    def push(self, token_id: int) -> str:
        piece = self.tokenizer.token_to_bytes(int(token_id), self.special)
        if self._strip_space and piece:
            self._strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        return self._dec.decode(piece)

    def extend(self, ids: Iterable[int]) -> Iterator[str]:
        for t in ids:
            s = self.push(t)
            if s:
                yield s

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)

    def reset(self) -> None:
        self._dec.reset()
        self._strip_space = self.tokenizer.model == "llama" and self.tokenizer.add_space_prefix
