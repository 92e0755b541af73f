"""moegraph.quants: type table, bit-exact dequantization, ggml-cpu x86 AVX2 activation rounding."""

from __future__ import annotations

import os
import tracemalloc
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest

from moegraph.quants import (
    ACTIVATION_TYPES, SUPPORTED_DEQUANT, GGMLType, block_size, dequantize, is_quantized,
    quantize_activations, quantize_roundtrip, row_bytes, type_size, vec_dot_type,
)

T = GGMLType
GQ = gguf.GGMLQuantizationType
QUANTIZED = [t for t in SUPPORTED_DEQUANT if is_quantized(t)]

FIXTURES = Path(os.environ.get("MOEGRAPH_FIXTURES")
                or Path(__file__).resolve().parents[2] / "shared" / "fixtures")
MODELS = FIXTURES / "models"

# byte offsets of the ggml_half scale fields in each block (ggml-common.h); everything else
# in a block may be arbitrary bits
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.MXFP4: [],   # MXFP4: every E8M0 exponent, denormal scales included
}


def random_raw(t: GGMLType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random NaN-free data of type t for a tensor of `shape`, as uint8 [rows, row_bytes]."""
    n_rows = int(np.prod(shape[:-1]))
    nbytes = n_rows * row_bytes(t, shape[-1])
    if t == T.F32:
        vals = rng.standard_normal(nbytes // 4).astype(np.float32)
        return vals.view(np.uint8).reshape(n_rows, -1)
    if t in (T.F16, T.BF16):
        vals = rng.standard_normal(nbytes // 2).astype(np.float32) * 100
        bits = vals.astype(np.float16).view(np.uint16) if t == T.F16 else \
            (vals.view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(n_rows, -1)
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8).reshape(-1, type_size(t))
    for off in F16_FIELDS[t]:  # finite scales of varied magnitude and sign
        scale = rng.standard_normal(len(raw)) * np.exp2(rng.integers(-14, 8, len(raw)))
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_rows, -1)


def assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape
    mism = a.view(np.uint32) != b.view(np.uint32)
    assert not mism.any(), f"{mism.sum()} of {a.size} values differ, first at " \
        f"{np.argwhere(mism)[0]}: {a[mism][0]!r} vs {b[mism][0]!r}"


# ---------------------------------------------------------------- type table

def test_type_table_matches_gguf():
    for t in GGMLType:
        assert GQ[t.name] == t.value
        if t == T.Q8_1:  # gguf-py still lists the old float d/s block (40); ggml's is 2 halves + 32
            assert (block_size(t), type_size(t)) == (32, 36)
            continue
        assert (block_size(t), type_size(t)) == gguf.GGML_QUANT_SIZES[GQ[t.name]], t.name
        assert is_quantized(t) == (block_size(t) > 1)
    assert block_size(GQ.Q4_K) == 256 and type_size(3) == 20 and type_size("Q6_K") == 210
    with pytest.raises(ValueError, match="IQ2_XXS"):  # a ggml type moegraph does not know yet
        block_size(GQ.IQ2_XXS)
    assert row_bytes(T.Q4_K, 512) == 288 and row_bytes(T.F16, 3) == 6


def test_row_bytes_rejects_partial_block():
    with pytest.raises(ValueError, match="Q4_0.*33"):
        row_bytes(T.Q4_0, 33)


def test_vec_dot_type():
    expected = {T.F32: T.F32, T.F16: T.F16, T.BF16: T.BF16,
                T.Q4_0: T.Q8_0, T.Q5_0: T.Q8_0, T.Q8_0: T.Q8_0, T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1,
                T.Q2_K: T.Q8_K, T.Q3_K: T.Q8_K, T.Q4_K: T.Q8_K, T.Q5_K: T.Q8_K, T.Q6_K: T.Q8_K, T.MXFP4: T.Q8_0}
    assert {t: vec_dot_type(t) for t in expected} == expected
    with pytest.raises(NotImplementedError, match="I32"):
        vec_dot_type(T.I32)


# ---------------------------------------------------------------- dequantization

@pytest.mark.parametrize("t", SUPPORTED_DEQUANT, ids=lambda t: t.name)
def test_dequantize_matches_gguf(t):
    rng = np.random.default_rng(int(t) + 1)
    shape = (2, 3, 4 * block_size(t) if is_quantized(t) else 40)
    raw = random_raw(t, shape, rng)
    ref = gguf.quants.dequantize(raw, GQ(int(t))).reshape(shape)
    assert_bits_equal(dequantize(raw, t, shape), ref)
    assert_bits_equal(dequantize(raw.reshape(-1), t, shape), ref)  # flat bytes
    if not is_quantized(t):  # the type's own dtype
        own = raw.view({T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[t])
        assert_bits_equal(dequantize(own.reshape(shape), t, shape), ref)


@pytest.mark.parametrize("t", QUANTIZED, ids=lambda t: t.name)
def test_dequantize_many_blocks_across_chunks(t):
    # more blocks than one internal chunk, so chunk boundaries are exercised
    rng = np.random.default_rng(100 + int(t))
    shape = (70, 4096)
    raw = random_raw(t, shape, rng)
    assert_bits_equal(dequantize(raw, t, shape), gguf.quants.dequantize(raw, GQ(int(t))))


def test_dequantize_memmap_slice(tmp_path):
    rng = np.random.default_rng(7)
    shape = (8, 512)
    raw = random_raw(T.Q4_K, shape, rng)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\0" * 96 + raw.tobytes() + b"\0" * 64)  # tensor in the middle of a file
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    part = mm[96 + 2 * raw.shape[1]: 96 + 5 * raw.shape[1]]  # rows 2..4 only
    got = dequantize(part, T.Q4_K, (3, 512))
    assert_bits_equal(got, dequantize(raw, T.Q4_K, shape)[2:5])
    # F32 is returned without copying
    f = np.memmap(path, dtype=np.uint8, mode="r")[96:96 + 4 * 64]
    assert np.shares_memory(dequantize(f, T.F32, (4, 16)), f)


def test_dequantize_memory_is_bounded():
    rng = np.random.default_rng(3)
    shape = (16, 256, 256)
    raw = random_raw(T.Q4_K, shape, rng)
    tracemalloc.start()
    try:
        out = dequantize(raw, T.Q4_K, shape)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == shape and out.dtype == np.float32
    assert peak < 2 * out.nbytes, f"peak {peak / out.nbytes:.2f}x the float32 output"


def test_dequantize_errors():
    raw = np.zeros(36, dtype=np.uint8)
    for t in (T.Q8_1, T.Q8_K, T.I32, GQ.IQ2_XXS):
        with pytest.raises(NotImplementedError, match=r"(?s)%s.*Q4_K" % GQ(int(t)).name):
            dequantize(raw, t, (1, 32))
    with pytest.raises(ValueError, match="Q4_0.*48"):
        dequantize(np.zeros(36, dtype=np.uint8), T.Q4_0, (1, 48))
    with pytest.raises(ValueError, match="expected 36 bytes"):
        dequantize(np.zeros(35, dtype=np.uint8), T.Q4_0, (2, 32))


# ---------------------------------------------------------------- real GGUF fixtures

FIXTURE_FILES = ["tiny-qwen3moe-kjv-Q4_0.gguf", "tiny-qwen3moe-kjv-Q4_K_M.gguf",
                 "tiny-qwen3moe-kjv-Q8_0.gguf", "tiny-qwen3moe-kjv-F16.gguf"]


@pytest.mark.parametrize("fname", FIXTURE_FILES)
def test_dequantize_fixture_tensors(fname):
    path = MODELS / fname
    if not path.exists():
        pytest.skip(f"fixture {path} not found (set MOEGRAPH_FIXTURES to the fixtures directory)")
    reader = gguf.GGUFReader(path)
    picked, seen = [], set()
    for t in reader.tensors:  # every type once, plus the first 3-D (expert) tensor
        key = (t.tensor_type, len(t.shape) == 3)
        if key not in seen:
            seen.add(key)
            picked.append(t)
    types = {t.tensor_type.name for t in picked}
    want = {"Q4_0.gguf": {"Q4_0"}, "Q4_K_M.gguf": {"Q4_K", "Q6_K"},
            "Q8_0.gguf": {"Q8_0"}, "F16.gguf": {"F16"}}[fname.rsplit("-", 1)[1]]
    assert want <= types
    for t in picked:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        got = dequantize(t.data, GGMLType(int(t.tensor_type)), shape)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert_bits_equal(got, ref)


# ---------------------------------------------------------------- activation quantization

def avx2_q8_0_block(x: np.ndarray):
    """Scalar transcription of ggml-cpu arch/x86/quants.c quantize_row_q8_0 / q8_1 (one block)."""
    f32 = np.float32
    amax = max(abs(f32(v)) for v in x)
    d = f32(amax / f32(127))
    mul = f32(f32(127) / amax) if amax != 0 else f32(0)
    q = [max(-128, min(127, int(round(float(f32(f32(v) * mul)))))) for v in x]  # round = half-even
    s = f32(d * f32(sum(q)))
    return np.float16(d), q, np.float16(s)


def ref_q8_k_block(x: np.ndarray):
    """Scalar transcription of ggml-quants.c quantize_row_q8_K_ref (one block)."""
    f32 = np.float32
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(f32(v)) > amax:
            amax, mx = abs(f32(v)), f32(v)
    if amax == 0:
        return f32(0), [0] * len(x), [0] * (len(x) // 16)
    iscale = f32(f32(-127) / mx)
    q = [min(127, int(round(float(f32(iscale * f32(v)))))) for v in x]
    return f32(f32(1) / iscale), q, [sum(q[i:i + 16]) for i in range(0, len(x), 16)]


def tie_heavy(rng, rows, n):
    """Rows of halves (k/2) with |max| = 127 so x*127/amax lands exactly on .5 ties."""
    x = rng.integers(-254, 255, (rows, n)).astype(np.float32) / 2
    x[:, ::32] = 127 * rng.choice([-1, 1], (rows, n // 32))
    return x


@pytest.mark.parametrize("t", [T.Q8_0, T.Q8_1], ids=lambda t: t.name)
def test_q8_0_q8_1_match_avx2_transcription(t):
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_normal((4, 64)).astype(np.float32) * 3,
                        tie_heavy(rng, 2, 64), np.zeros((1, 64), np.float32)])
    ab = quantize_activations(x, t)
    assert ab.d.shape == (7, 2) and ab.qs.shape == (7, 2, 32) and ab.qs.dtype == np.int8
    for r in range(len(x)):
        for b in range(2):
            d, q, s = avx2_q8_0_block(x[r, 32 * b: 32 * b + 32])
            assert ab.d[r, b] == d and ab.qs[r, b].tolist() == q
            if t == T.Q8_1:
                assert ab.s[r, b] == s
    assert (ab.s is None) == (t == T.Q8_0)


def test_q8_k_matches_reference_transcription():
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.standard_normal((3, 512)).astype(np.float32),
                        tie_heavy(rng, 2, 512) / 3, np.zeros((1, 512), np.float32)])
    ab = quantize_activations(x, T.Q8_K)
    assert ab.d.dtype == np.float32 and ab.bsums.shape == (6, 2, 16)
    for r in range(len(x)):
        for b in range(2):
            d, q, bsums = ref_q8_k_block(x[r, 256 * b: 256 * b + 256])
            assert ab.d[r, b] == d and ab.qs[r, b].tolist() == q
            assert ab.bsums[r, b].tolist() == bsums


def test_q8_handcrafted_block():
    x = np.zeros(32, np.float32)
    x[:8] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]
    ab = quantize_activations(x, T.Q8_0)
    assert ab.d.tolist() == [1.0]  # fp16(127/127)
    # AVX2 rounds half to even (roundf in the scalar reference would give 1, 2, 3, -1, -2, -3)
    assert ab.qs[0, :8].tolist() == [127, 0, 2, 2, 0, -2, -2, 3]
    assert quantize_roundtrip(x, T.Q8_0)[:8].tolist() == [127, 0, 2, 2, 0, -2, -2, 3]
    q81 = quantize_activations(x, T.Q8_1)
    assert q81.s.tolist() == [float(np.float16(np.float32(1) * 130))]

    # Q8_K: the first element of largest |x| fixes the sign of d
    xk = np.zeros(256, np.float32)
    xk[:4] = [2.5, 127, -127, -0.5]
    ak = quantize_activations(xk, T.Q8_K)
    assert ak.d.tolist() == [-1.0] and ak.qs[0, :4].tolist() == [-2, -127, 127, 0]
    assert ak.bsums[0, 0] == -2
    assert quantize_roundtrip(xk, T.Q8_K)[:4].tolist() == [2, 127, -127, 0]
    xk[1] = -127  # now the first extreme is negative: d > 0
    assert quantize_activations(xk, T.Q8_K).d.tolist() == [1.0]


@pytest.mark.parametrize("t", [T.Q8_0, T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_q8_roundtrip_error_bound_sign_and_zero(t):
    rng = np.random.default_rng(13)
    n = 1024
    x = (rng.standard_normal((16, n)) * np.exp2(rng.integers(-20, 12, (16, 1)))).astype(np.float32)
    x[3] = 0  # all-zero row: zero blocks
    x[4, :256] = -0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt = quantize_roundtrip(x, t)
        ab = quantize_activations(x, t)
    assert rt.dtype == np.float64 and rt.shape == x.shape and np.isfinite(rt).all()
    assert not rt[3].any() and not rt[4, :256].any() and not ab.d[3].any()
    bs = block_size(t)
    xb = x.reshape(16, -1, bs).astype(np.float64)
    err = np.abs(xb - rt.reshape(xb.shape)).max(axis=-1)
    d = np.abs(ab.d.astype(np.float64))
    if t == T.Q8_K:  # d is the exact float32 step
        bound = d / 2 * (1 + 1e-6)
    else:  # q was rounded with amax/127 but is scaled by its fp16 rounding
        d32 = np.abs(xb).max(axis=-1) / 127
        bound = d32 / 2 * (1 + 1e-6) + 127 * np.abs(d - d32)
    assert (err <= bound).all()
    np.testing.assert_array_equal(quantize_roundtrip(-x, t), -rt)  # rounding is sign-symmetric


def test_q8_0_vs_gguf_reference_quantizer():
    """gguf.quants.quantize is ggml's scalar quantize_row_q8_0_ref (1/d multiplier, roundf); the
    AVX2 path differs only where x*id sits on (or within an ulp of) a .5 tie."""
    rng = np.random.default_rng(14)
    for x, must_differ in [(rng.standard_normal((64, 1024)).astype(np.float32), False),
                           (tie_heavy(rng, 8, 256), True)]:
        ours = quantize_activations(x, T.Q8_0)
        raw = gguf.quants.quantize(x, GQ.Q8_0).reshape(-1, 34)
        assert np.array_equal(raw[:, :2].copy().view(np.float16).ravel(), ours.d.ravel())
        ref_q = raw[:, 2:].view(np.int8).reshape(ours.qs.shape).astype(np.int64)
        diff = ref_q != ours.qs
        if must_differ:  # exact ties: roundf goes away from zero, AVX2 to even
            assert diff.any() and (ours.qs[diff] % 2 == 0).all()
        # where they differ: one step apart, and x*127/amax is a (near-)tie
        assert (np.abs(ref_q - ours.qs)[diff] == 1).all()
        xb = x.reshape(ours.qs.shape).astype(np.float64)
        v = xb * 127 / np.abs(xb).max(axis=-1, keepdims=True)
        assert (np.abs(np.abs(v - np.trunc(v)) - 0.5)[diff] < 1e-4).all()
        # and everywhere else the dequantized values agree
        ref_rt = gguf.quants.dequantize(raw.reshape(x.shape[0], -1), GQ.Q8_0).astype(np.float64)
        keep = ~diff.reshape(x.shape)
        assert np.array_equal(ref_rt[keep], quantize_roundtrip(x, T.Q8_0)[keep])


def test_to_bytes_is_ggml_layout():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for t in (T.Q8_0, T.Q8_1, T.Q8_K):
        raw = quantize_activations(x, t).to_bytes()
        assert raw.shape == (3, row_bytes(t, 256)) and raw.dtype == np.uint8
    raw = quantize_activations(x, T.Q8_0).to_bytes()
    assert np.array_equal(gguf.quants.dequantize(raw, GQ.Q8_0).astype(np.float64),
                          quantize_roundtrip(x, T.Q8_0))


def test_float_roundtrips():
    rng = np.random.default_rng(16)
    x = (rng.standard_normal((4, 64)) * 1e3).astype(np.float32)
    assert np.array_equal(quantize_roundtrip(x, T.F32), x.astype(np.float64))
    assert np.array_equal(quantize_roundtrip(x, T.F16), x.astype(np.float16).astype(np.float64))
    special = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4028235e38, np.inf, -np.inf,
                        np.nan, 1e-40, -0.0, 0.0, 2**-130 * 3, 65504], dtype=np.float32)
    bf = quantize_roundtrip(special, T.BF16)
    assert bf[:3].tolist() == [1.0, 1 + 2**-6, -1.0]  # ties to even
    assert bf[3] == np.inf and bf[4] == np.inf and bf[5] == -np.inf and np.isnan(bf[6])
    # bit-identical with gguf's port of ggml_compute_fp32_to_bf16 (NaN quieting included)
    snan = np.array([0x7F800001, 0xFFA00000], dtype=np.uint32).view(np.float32)  # signalling NaNs
    xs = np.concatenate([special, x.ravel(), snan])
    ref = gguf.quants.dequantize(gguf.quants.quantize(xs, GQ.BF16), GQ.BF16)
    ours = quantize_roundtrip(xs, T.BF16).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_activation_errors():
    with pytest.raises(ValueError, match="Q8_0.*33"):
        quantize_roundtrip(np.zeros((2, 33), np.float32), T.Q8_0)
    with pytest.raises(ValueError, match="Q8_K.*32"):
        quantize_roundtrip(np.zeros(32, np.float32), T.Q8_K)
    with pytest.raises(NotImplementedError, match=r"(?s)Q4_0.*Q8_K"):
        quantize_roundtrip(np.zeros(32, np.float32), T.Q4_0)
    with pytest.raises(NotImplementedError, match="F16"):
        quantize_activations(np.zeros(32, np.float32), T.F16)
    with pytest.raises(ValueError):
        quantize_roundtrip(np.float32(1), T.F32)
    assert set(ACTIVATION_TYPES) == {T.F32, T.F16, T.BF16, T.Q8_0, T.Q8_1, T.Q8_K}


def test_mxfp4_quantizer_matches_gguf_py():
    """MXFP4 blocks as ggml's quantize_row_mxfp4_ref writes them (gguf-py transcribes it): the
    exponent from floor(log2 amax) - 2 (amax just under a power of two included, where float32
    log2 rounds up), the nearest table entry with the first of equals (halfway values), zeros,
    denormals and huge values."""
    from moegraph.quants import quantize_weights
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 64)).astype(np.float32) * np.exp2(rng.integers(-30, 30, (64, 1))).astype(np.float32)
    x[0] = 0
    x[1, :32] = np.float32(4.0) * (1 - np.float32(2) ** -24)     # amax just below 4
    x[2] = np.arange(64, dtype=np.float32) * 0.25                 # many exact halfway points
    x[3] = np.float32(1e-40) * np.arange(64)                      # denormals
    x[4] = np.float32(3e38) * np.sign(rng.standard_normal(64))
    ref = gguf.quants.quantize(x, GQ.MXFP4)
    assert np.array_equal(quantize_weights(x, T.MXFP4), ref)
    assert_bits_equal(dequantize(ref, T.MXFP4, x.shape), gguf.quants.dequantize(ref, GQ.MXFP4))
