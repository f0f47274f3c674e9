"""Tests of detar_cupy.reference, the bit-exact CPU model of the collectives.

Expected values are derived by hand (bits asserted exactly, never with tolerances) or by an
independent scalar model written here from the contract, not from the implementation.
"""
from __future__ import annotations

import math
import struct
import zlib
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from detar_cupy import reference as R
from detar_cupy.dtypes import DTYPES, numpy_dtype

# The reference must silence the warnings its intended behaviour triggers (wrap, inf - inf,
# overflow): any warning escaping it is a failure.
pytestmark = pytest.mark.filterwarnings("error")

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
FLOATS = ["float16", "bfloat16", "float32", "float64"]
COMPLEX = ["complex64", "complex128"]
INTS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
BF16 = np.dtype(ml_dtypes.bfloat16)


def ranks(dtype: str, *rows) -> list[np.ndarray]:
    """One array per rank from per-rank value lists (values exact in ``dtype``)."""
    return [np.array(row, dtype=numpy_dtype(dtype)) for row in rows]


def from_bits(dtype: str, *rows) -> list[np.ndarray]:
    """One array per rank from per-rank lists of raw bit patterns."""
    dt = numpy_dtype(dtype)
    return [np.array(row, dtype=UINT[dt.itemsize]).view(dt) for row in rows]


def bits(a: np.ndarray) -> list[int]:
    """The raw bits of ``a`` (complex: interleaved real/imaginary component bits)."""
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype.kind == "c":
        a = a.view(np.float32 if a.dtype == np.complex64 else np.float64)
    return a.view(UINT[a.dtype.itemsize]).tolist()


def f32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f64(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def c64_from_bits(re: int, im: int) -> np.ndarray:
    return np.array([re, im], np.uint32).view(np.complex64)


# --------------------------------------------------------------------------- independent RNE

def rne_to_16(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 → float16/bfloat16 bits by round-to-nearest-even, found by nearest-value search.

    Independent of numpy's and ml_dtypes' converters: every non-negative finite value of the
    format is listed in increasing order, with the position of inf taken by max + one ulp (where
    rounding with an unbounded exponent would land; IEEE overflows everything from the midpoint
    up to inf). ``|x|`` goes to the nearer neighbour, ties to the even bit pattern.
    """
    inf_bits = 0x7C00 if fmt == "float16" else 0x7F80
    pos = np.arange(inf_bits + 1, dtype=np.uint16)
    vals = pos.view(numpy_dtype(fmt)).astype(np.float64)
    vals[-1] = 2.0 ** (16 if fmt == "float16" else 128)
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaNs; NaNs are handled at the end
        mag = np.abs(x.astype(np.float64))
    hi = np.minimum(np.searchsorted(vals, mag, side="left"), len(vals) - 1)
    lo = np.maximum(hi - 1, 0)
    mid = (vals[lo] + vals[hi]) / 2  # exact: vals have at most 11 significant bits
    take_hi = (vals[hi] == mag) | (mag > mid) | ((mag == mid) & (pos[hi] % 2 == 0))
    out = np.where(take_hi, pos[hi], pos[lo])
    out = np.where(mag >= vals[-1], inf_bits, out)
    out |= ((x.view(np.uint32) >> 16) & 0x8000).astype(np.uint16)
    quiet_nan = 0x7E00 if fmt == "float16" else 0x7FC0
    return np.where(np.isnan(x), quiet_nan, out)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_library_float32_to_16bit_conversion_is_rne(fmt):
    """numpy's float16 and ml_dtypes' bfloat16 casts, which cast_out uses, are RNE everywhere."""
    inf_bits = 0x7C00 if fmt == "float16" else 0x7F80
    vals = np.arange(inf_bits, dtype=np.uint16).view(numpy_dtype(fmt)).astype(np.float64)
    vals = np.append(vals, 2.0 ** (16 if fmt == "float16" else 128))
    mids64 = (vals[:-1] + vals[1:]) / 2  # every tie, subnormal range and overflow edge included
    mids = mids64.astype(np.float32)
    assert (mids.astype(np.float64) == mids64).all()  # the ties are float32-exact
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)),
                             np.nextafter(mids, np.float32(0))])
    rng = np.random.default_rng(1234)
    random = np.frombuffer(rng.bytes(4 * 200_000), np.uint32).view(np.float32)
    x = np.concatenate([around, -around, random, np.float32([0.0, -0.0, np.inf, -np.inf])])
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf, signalling NaNs
        got = x.astype(numpy_dtype(fmt)).view(np.uint16)
    nan = np.isnan(x)
    expect = rne_to_16(x, fmt)
    assert (got[~nan] == expect[~nan]).all()
    assert np.isnan(got[nan].view(numpy_dtype(fmt))).all()


# --------------------------------------------------------------------------- order of the fold

def test_float32_left_fold_in_rank_order():
    xs = ranks("float32", [1e8, 1.0], [1.0, 1e8], [-1e8, -1e8])
    assert bits(R.all_reduce(xs)) == [0, 0]  # (1e8 + 1) rounds back to 1e8 (ulp 8)
    # any other order gives other bits: (1e8 - 1e8) + 1 and (1 - 1e8) + 1e8 are both 1
    assert bits(R.all_reduce([xs[0], xs[2], xs[1]]))[0] == f32(1.0)
    assert bits(R.all_reduce([xs[1], xs[2], xs[0]]))[1] == f32(1.0)


def test_float16_accumulates_in_float32():
    xs = ranks("float16", [2048], [1], [1])
    assert bits(R.all_reduce(xs)) == [0x6801]  # 2050; float16 ulp at 2048 is 2
    f16 = np.float16
    in_f16 = (f16(2048) + f16(1)) + f16(1)  # each 2049 ties to even 2048
    assert bits(np.array([in_f16])) == [0x6800]


def test_bfloat16_accumulates_in_float32():
    xs = ranks("bfloat16", [256], [1], [1])
    assert bits(R.all_reduce(xs)) == [0x4381]  # 258; bfloat16 ulp at 256 is 2
    b = ml_dtypes.bfloat16
    in_bf16 = (b(256) + b(1)) + b(1)
    assert bits(np.array([in_bf16], BF16)) == [0x4380]


# --------------------------------------------------------------------------- 16-bit rounding

def test_float16_cast_ties_to_even():
    xs = ranks("float16", [2048, -2048, 2048, -2048, 1.0, 1 + 2**-10],
               [1, -1, 3, -3, 2**-11, 2**-11])
    # 2049 → 2048 (0x6800, even) not 2050; 2051 → 2052 (0x6802, even) not 2050;
    # 1 + 2^-11 → 1 (0x3C00); 1 + 3·2^-11 → 1 + 2^-9 (0x3C02)
    assert bits(R.all_reduce(xs)) == [0x6800, 0xE800, 0x6802, 0xE802, 0x3C00, 0x3C02]


def test_bfloat16_cast_ties_to_even():
    xs = ranks("bfloat16", [256, -256, 256, -256, 1.0], [1, -1, 3, -3, 2**-8])
    # 257 → 256 (0x4380); 259 → 260 (0x4382); 1 + 2^-8 → 1 (0x3F80)
    assert bits(R.all_reduce(xs)) == [0x4380, 0xC380, 0x4382, 0xC382, 0x3F80]


def test_16bit_cast_just_above_a_tie_rounds_up_and_overflow_gives_inf():
    xs = ranks("float16", [2048, 60000, 32768], [1 + 2**-2, 60000, 32752])
    # 2049.25 → 2050; 120000 → inf; 65520 (max + half ulp) → inf
    assert bits(R.all_reduce(xs)) == [0x6801, 0x7C00, 0x7C00]
    xs = ranks("bfloat16", [3.0e38, 256], [3.0e38, 1.5])
    assert bits(R.all_reduce(xs)) == [0x7F80, 0x4381]


# --------------------------------------------------------------------------- signed zeros

@pytest.mark.parametrize("dtype", FLOATS)
def test_signed_zeros(dtype):
    z, nz = 0.0, -0.0
    sign = {"float16": 0x8000, "bfloat16": 0x8000, "float32": 0x80000000,
            "float64": 0x8000000000000000}[dtype]
    a, b = ranks(dtype, [nz, nz, z, z, 1.0], [nz, z, nz, z, -1.0])
    assert bits(R.all_reduce([a, b])) == [sign, 0, 0, 0, 0]  # x + -x is +0 in RNE
    assert bits(R.all_reduce([a[:4], b[:4]], "min")) == [sign, sign, sign, 0]
    assert bits(R.all_reduce([a[:4], b[:4]], "max")) == [sign, 0, 0, 0]
    assert bits(R.all_reduce(ranks(dtype, [z], [z], [nz]), "min")) == [sign]
    assert bits(R.all_reduce(ranks(dtype, [nz], [nz], [z]), "max")) == [0]
    p = R.all_reduce(ranks(dtype, [-1, nz, nz, 1], [z, nz, z, nz]), "prod")
    assert bits(p) == [sign, 0, sign, sign]
    assert bits(R.all_reduce(ranks(dtype, [nz], [nz]), "avg")) == [sign]


@pytest.mark.parametrize("dtype", COMPLEX)
def test_complex_signed_zeros(dtype):
    sign = 0x80000000 if dtype == "complex64" else 0x8000000000000000
    a, b = ranks(dtype, [complex(-0.0, -0.0), complex(-0.0, 0.0)],
                 [complex(-0.0, -0.0), complex(0.0, -0.0)])
    assert bits(R.all_reduce([a, b])) == [sign, sign, 0, 0]


# --------------------------------------------------------------------------- NaN and inf

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg"])
def test_nan_propagates_from_any_rank(dtype, op):
    for where in range(3):
        rows = [[1.5, -0.0, 0.0, np.inf] for _ in range(3)]
        rows[where] = [np.nan] * 4
        out = R.all_reduce(ranks(dtype, *rows), op)
        assert np.isnan(out.astype(np.float64)).all(), (op, where, out)


@pytest.mark.parametrize("dtype", FLOATS)
def test_min_max_nan_in_either_position(dtype):
    nan, inf = np.nan, np.inf
    a, b = ranks(dtype, [nan, 1, nan, -inf, nan, -0.0], [1, nan, nan, nan, -0.0, nan])
    for op in ("min", "max"):
        # max(NaN, -0) would be +0 if the equal-operands AND were applied to the NaN
        assert np.isnan(R.all_reduce([a, b], op).astype(np.float64)).all(), op


@pytest.mark.parametrize("dtype", FLOATS)
def test_inf_arithmetic(dtype):
    inf = np.inf
    a, b = ranks(dtype, [inf, inf, -inf, inf, -inf], [1, inf, inf, -inf, -inf])
    s = R.all_reduce([a, b]).astype(np.float64)
    assert s[0] == inf and s[1] == inf and s[4] == -inf and np.isnan(s[2:4]).all()
    a, b = ranks(dtype, [inf, inf, -inf, 0], [-1, 0, -inf, -inf])
    p = R.all_reduce([a, b], "prod").astype(np.float64)
    assert p[0] == -inf and p[2] == inf and np.isnan(p[[1, 3]]).all()
    a, b = ranks(dtype, [inf, -inf], [-inf, 5])
    assert R.all_reduce([a, b], "min").astype(np.float64).tolist() == [-inf, -inf]
    assert R.all_reduce([a, b], "max").astype(np.float64).tolist() == [inf, 5]
    assert R.all_reduce(ranks(dtype, [inf], [1]), "avg").astype(np.float64)[0] == inf


def test_float_overflow():
    assert bits(R.all_reduce(ranks("float32", [3e38], [3e38]))) == [0x7F800000]
    assert bits(R.all_reduce(ranks("float32", [3e38], [-3e38], [3e38]))) == [f32(3e38)]
    # float16: the float32 accumulator holds 120000; only the final cast overflows
    assert bits(R.all_reduce(ranks("float16", [60000], [60000]))) == [0x7C00]
    assert bits(R.all_reduce(ranks("float16", [60000], [60000]), "avg")) == [0x7B53]


def test_complex_inf_is_plain_ieee_arithmetic():
    # No C99 Annex G recovery: (inf + 0i)(1 + 0i) has im = inf*0 + 0*1 = NaN.
    out = R.all_reduce(ranks("complex64", [complex(np.inf, 0)], [complex(1, 0)]), "prod")
    assert out.real[0] == np.inf and np.isnan(out.imag[0])
    out = R.all_reduce(ranks("complex128", [complex(np.inf, 1)], [complex(-np.inf, 2)]))
    assert np.isnan(out.real[0]) and out.imag[0] == 3


# --------------------------------------------------------------------------- integers

def wrap(v: int, dtype: str) -> int:
    info = np.iinfo(dtype)
    return (v - int(info.min)) % 2 ** info.bits + int(info.min)


@pytest.mark.parametrize("dtype", INTS)
def test_integer_sum_and_prod_wrap(dtype):
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    top = 2 ** (info.bits - 1)  # 2^(bits-1): min of the signed type, top bit of the unsigned one
    rows = [[hi, lo, hi, hi, wrap(top, dtype), 3],
            [1, wrap(-1, dtype), hi, 2, 2, 5],
            [0, 0, 2, hi, 1, wrap(-7, dtype)]]
    xs = ranks(dtype, *rows)
    exp_sum = [wrap(a + b + c, dtype) for a, b, c in zip(*rows)]
    exp_prod = [wrap(a * b * c, dtype) for a, b, c in zip(*rows)]
    assert R.all_reduce(xs).tolist() == exp_sum
    assert R.all_reduce(xs, "prod").tolist() == exp_prod
    assert exp_sum[0] == lo  # max + 1 wraps to min
    assert exp_prod[4] == 0  # 2^(bits-1) · 2 wraps to 0
    assert R.all_reduce(ranks(dtype, [hi], [hi]), "prod").tolist() == [1]  # (2^b - 1)^2 ≡ 1


def test_integer_wrap_examples():
    assert R.all_reduce(ranks("int8", [127, 100, -128], [1, 3, -1]), "sum").tolist() == \
        [-128, 103, 127]
    assert R.all_reduce(ranks("int8", [127, 100, -128], [1, 3, -1]), "prod").tolist() == \
        [127, 44, -128]
    assert R.all_reduce(ranks("uint8", [255, 16], [1, 16])).tolist() == [0, 32]
    assert R.all_reduce(ranks("uint8", [255, 16], [1, 16]), "prod").tolist() == [255, 0]


@pytest.mark.parametrize("dtype", INTS)
def test_integer_min_max(dtype):
    info = np.iinfo(dtype)
    lo, hi = int(info.min), int(info.max)
    rows = [[lo, hi, 5, 0], [hi, lo, 7, 1], [3, 3, 6, 0]]
    xs = ranks(dtype, *rows)
    assert R.all_reduce(xs, "min").tolist() == [min(c) for c in zip(*rows)]
    assert R.all_reduce(xs, "max").tolist() == [max(c) for c in zip(*rows)]


# --------------------------------------------------------------------------- denormals

@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg"])
def test_bfloat16_subnormal_inputs_are_flushed(op):
    xs = from_bits("bfloat16", [0x0001, 0x8001, 0x007F, 0x807F, 0x0080, 0x8080, 0x3F80])
    assert bits(R.all_reduce(xs, op)) == [0, 0x8000, 0, 0x8000, 0x0080, 0x8080, 0x3F80]


def test_bfloat16_subnormals_flushed_before_use():
    # unflushed, 0x0040 + 0x0040 would be the normal 0x0080 and max(2^-133, +0) would be 2^-133
    xs = from_bits("bfloat16", [0x0040, 0x0001, 0x8001], [0x0040, 0x0000, 0x0000])
    assert bits(R.all_reduce(xs)) == [0, 0, 0]
    assert bits(R.all_reduce(xs, "max")) == [0, 0, 0]
    assert bits(R.all_reduce(xs, "min")) == [0, 0, 0x8000]  # min(-0, +0) = -0


@pytest.mark.parametrize("op", ["sum", "prod", "min", "max", "avg"])
def test_float32_subnormal_inputs_flushed_at_world_size_1(op):
    xs = from_bits("float32", [0x00000001, 0x807FFFFF, 0x00400000, 0x00800000, 0x80800000])
    assert bits(R.all_reduce(xs, op)) == [0, 0x80000000, 0, 0x00800000, 0x80800000]


def test_float32_subnormal_results_flushed_to_signed_zero():
    # ±(1.5 - 1.25)·2^-126 = ±2^-128 is subnormal
    xs = from_bits("float32", [0x00C00000, 0x80C00000], [0x80A00000, 0x00A00000])
    assert bits(R.all_reduce(xs)) == [0, 0x80000000]
    xs = ranks("float32", [2.0**-100, -2.0**-100], [2.0**-30, 2.0**-30])  # product 2^-130
    assert bits(R.all_reduce(xs, "prod")) == [0, 0x80000000]
    xs = ranks("float32", [2.0**-126, -2.0**-126], [0, 0])  # the avg's quotient 2^-127
    assert bits(R.all_reduce(xs, "avg")) == [0, 0x80000000]
    # an intermediate subnormal is flushed before the next step: unflushed, 2^-128 + 2^-126
    # would give 1.25·2^-126 (0x00A00000)
    xs = from_bits("float32", [0x00C00000], [0x80A00000], [0x00800000])
    assert bits(R.all_reduce(xs)) == [0x00800000]


def test_float16_inputs_never_subnormal_in_float32_and_16bit_subnormal_outputs_round():
    assert bits(R.all_reduce(from_bits("float16", [0x0001, 0x83FF]))) == [0x0001, 0x83FF]
    assert bits(R.all_reduce(from_bits("float16", [0x0001], [0x0001]))) == [0x0002]
    xs = from_bits("float16", [0x0001, 0x0003, 0x8003], [0x0000, 0x0000, 0x0000])
    # 2^-25 ties to 0; 1.5·2^-24 ties to 2·2^-24 (even), sign kept
    assert bits(R.all_reduce(xs, "avg")) == [0x0000, 0x0002, 0x8002]
    xs = from_bits("float16", [0x0001, 0x0002], [0x0000, 0x0000], [0x0000, 0x0000])
    # 2^-24/3 → 0; 2^-23/3 ≈ 0.67·2^-24 → 0x0001
    assert bits(R.all_reduce(xs, "avg")) == [0x0000, 0x0001]
    xs = ranks("float16", [2.0**-14, 2.0**-14], [0.5, 2.0**-11])
    assert bits(R.all_reduce(xs, "prod")) == [0x0200, 0x0000]  # 2^-15; 2^-25 ties to 0


def test_float64_subnormals_preserved():
    xs = from_bits("float64", [1, 0x800FFFFFFFFFFFFF])
    for op in ("sum", "prod", "min", "max", "avg"):
        assert bits(R.all_reduce(xs, op)) == [1, 0x800FFFFFFFFFFFFF], op
    xs = ranks("float64", [1.5 * 2.0**-1022, 2.0**-1000, 2.0**-1022],
               [-1.25 * 2.0**-1022, 2.0**-70, 0.0])
    # 2^-1024 (subnormal) is exact; 2^-70 + 2^-1000 rounds to 2^-70
    assert bits(R.all_reduce(xs)) == [0x0004000000000000, f64(2.0**-70), 0x0010000000000000]
    assert bits(R.all_reduce(xs, "prod"))[1] == 16  # 2^-1070 = 16 · 2^-1074
    assert bits(R.all_reduce(xs, "avg"))[2] == 0x0008000000000000  # 2^-1023


def test_complex64_components_flushed():
    x = c64_from_bits(0x00000005, 0x80000007)  # both components subnormal
    y = c64_from_bits(0x80012345, 0x3F800000)
    assert bits(R.all_reduce([x])) == [0, 0x80000000]
    assert bits(R.all_reduce([y], "avg")) == [0x80000000, 0x3F800000]
    # (2^-100 + i)(2^-30 + 0i): a·c = 2^-130 is flushed, so re = +0; im = 2^-30
    xs = ranks("complex64", [complex(2.0**-100, 1)], [complex(2.0**-30, 0)])
    assert bits(R.all_reduce(xs, "prod")) == [0, f32(2.0**-30)]
    # component sums whose exact value is subnormal
    xs = [c64_from_bits(0x00C00000, 0x80C00000), c64_from_bits(0x80A00000, 0x00A00000)]
    assert bits(R.all_reduce(xs)) == [0, 0x80000000]


def test_complex128_subnormals_preserved():
    x = np.array([1, 0x8000000000000003], np.uint64).view(np.complex128)
    assert bits(R.all_reduce([x, np.zeros(1, np.complex128)])) == [1, 0x8000000000000003]


def test_flush_denormals_f32():
    pats = [0, 0x80000000, 1, 0x807FFFFF, 0x00400000, 0x00800000, 0x80800000,
            0x3F800000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001]
    expect = [0, 0x80000000, 0, 0x80000000, 0, 0x00800000, 0x80800000,
              0x3F800000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001]
    x = np.array(pats, np.uint32).view(np.float32)
    before = x.copy()
    assert bits(R.flush_denormals_f32(x)) == expect
    assert bits(x) == bits(before)  # the input is not modified
    assert bits(R.flush_denormals_f32(x[::2])) == expect[::2]  # strided input
    c = np.array(pats, np.uint32).view(np.complex64)
    assert bits(R.flush_denormals_f32(c)) == expect
    with pytest.raises(TypeError):
        R.flush_denormals_f32(np.zeros(2, np.float64))


# --------------------------------------------------------------------------- complex prod

def test_complex64_prod_has_no_fused_multiply_add():
    a = c = 1 + 2.0**-12
    b, d = 1 + 2.0**-11, 1.0
    # a·c = 1 + 2^-11 + 2^-24 exactly; rounded to float32 it ties to 1 + 2^-11 = b·d
    fused_re = np.float32(Fraction(a) * Fraction(c) - Fraction(b) * Fraction(d))
    assert f32(fused_re) == 0x33800000  # 2^-24: what a·c - b·d with one rounding gives
    out = R.all_reduce(ranks("complex64", [complex(a, b)], [complex(c, d)]), "prod")
    # unfused: re = fl(a·c) - b·d = +0; im = a·d + fl(b·c) = 2 + 2^-10 + 2^-23 ties to 2 + 2^-10
    assert bits(out) == [0, f32(2 + 2.0**-10)]


def test_complex128_prod_has_no_fused_multiply_add():
    a = c = 1 + 2.0**-27
    b, d = 1 + 2.0**-26, 1.0
    fused_re = float(Fraction(a) * Fraction(c) - Fraction(b) * Fraction(d))
    assert fused_re == 2.0**-54
    out = R.all_reduce(ranks("complex128", [complex(a, b)], [complex(c, d)]), "prod")
    # fl(a·c) = 1 + 2^-26 (the 2^-54 is below half an ulp); fl(b·c) drops its 2^-53 tie to even
    assert bits(out) == [0, f64(2 + 2.0**-25)]


# --------------------------------------------------------------------------- avg

def test_avg_float32_divides_once():
    out = R.all_reduce(ranks("float32", [2], [2], [1]), "avg")
    assert bits(out) == [0x3FD55555]  # 5/3 rounded once
    by_reciprocal = np.float32(5) * (np.float32(1) / np.float32(3))
    assert f32(by_reciprocal) == 0x3FD55556  # the multiply-by-1/N shortcut differs


def test_avg_16bit_divides_the_float32_sum():
    # float16: 2050/3 = 683.33 → 683.5 (0x6157); a float16 sum would give 2048/3 → 682.5
    assert bits(R.all_reduce(ranks("float16", [2048], [1], [1]), "avg")) == [0x6157]
    # bfloat16: 258/3 = 86 exactly (0x42AC); a bfloat16 sum would give 256/3
    assert bits(R.all_reduce(ranks("bfloat16", [256], [1], [1]), "avg")) == [0x42AC]


def test_avg_float64_and_complex():
    assert bits(R.all_reduce(ranks("float64", [2], [2], [1]), "avg")) == [f64(5 / 3)]
    xs = ranks("complex64", [2 + 4j], [2 + 4j], [1 + 1j])
    assert bits(R.all_reduce(xs, "avg")) == [0x3FD55555, f32(3.0)]
    xs = ranks("complex128", [2 + 1j], [2 + 1j], [1 + 0j])
    assert bits(R.all_reduce(xs, "avg")) == [f64(5 / 3), f64(float(Fraction(2, 3)))]


@pytest.mark.parametrize("dtype", INTS)
def test_avg_rejected_for_integers(dtype):
    with pytest.raises(TypeError, match="avg"):
        R.all_reduce(ranks(dtype, [1], [2]), "avg")


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("op", ["min", "max"])
def test_min_max_rejected_for_complex(dtype, op):
    with pytest.raises(TypeError, match=op):
        R.all_reduce(ranks(dtype, [1], [2]), op)


# --------------------------------------------------------------------------- randomized model

F32 = np.float32
TINY32 = F32(2.0**-126)
SPECIALS = {
    "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x0001, 0x83FF, 0x0400, 0x7BFF,
                0xFBFF, 0x3C00, 0xBC00],
    "bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x807F, 0x0080, 0x7F7F,
                 0xFF7F, 0x3F80, 0xBF80, 0x00C0, 0x80A0],
    "float32": [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 1, 0x807FFFFF, 0x00800000,
                0x80800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800000, 0x00C00000,
                0x80A00000],
    "float64": [0, 0x8000000000000000, 0x7FF0000000000000, 0xFFF0000000000000,
                0x7FF8000000000000, 1, 0x800FFFFFFFFFFFFF, 0x0010000000000000,
                0x7FEFFFFFFFFFFFFF, 0xFFEFFFFFFFFFFFFF, 0x3FF0000000000000, 0x0018000000000000,
                0x8014000000000000],
}
EXPONENTS = {"float16": (-26, 17), "bfloat16": (-135, 129), "float32": (-152, 129),
             "float64": (-1077, 1025)}


def random_real(rng, fmt: str, size: int) -> np.ndarray:
    """Random values mixing raw bit patterns, specials, small exact values and wide magnitudes."""
    dt = numpy_dtype(fmt)
    uint = UINT[dt.itemsize]
    raw = np.frombuffer(rng.bytes(size * dt.itemsize), uint)
    special = np.array(SPECIALS[fmt], uint)[rng.integers(0, len(SPECIALS[fmt]), size)]
    with np.errstate(all="ignore"):
        small = (rng.integers(-8, 9, size) / 4).astype(dt).view(uint)
        wide = np.ldexp(rng.standard_normal(size), rng.integers(*EXPONENTS[fmt], size))
        wide = wide.astype(dt).view(uint)
    pick = rng.integers(0, 4, size)
    return np.choose(pick, [raw, special, small, wide]).view(dt)


def random_input(rng, dtype: str, size: int) -> np.ndarray:
    if dtype in COMPLEX:
        comp = "float32" if dtype == "complex64" else "float64"
        parts = np.stack([random_real(rng, comp, size), random_real(rng, comp, size)], axis=1)
        return np.ascontiguousarray(parts).view(numpy_dtype(dtype)).reshape(size)
    if dtype in INTS:
        info = np.iinfo(dtype)
        full = rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True)
        extremes = np.array([info.min, info.max, 0, 1, info.max - 1], dtype)
        small = np.array([0, 1, 2, 3] + ([-1, -2, -3] if info.min < 0 else []), dtype)
        return np.choose(rng.integers(0, 3, size),
                         [full, extremes[rng.integers(0, 5, size)],
                          small[rng.integers(0, len(small), size)]])
    return random_real(rng, dtype, size)


def flush32(v):
    """Value-based flush (independent of the reference's bit trick)."""
    if v != 0 and abs(v) < TINY32:
        return F32(math.copysign(0.0, float(v)))
    return v


def scalar_min(a, b):
    if math.isnan(a) or math.isnan(b):
        return a + b
    if a < b:
        return a
    if b < a:
        return b
    return a if math.copysign(1.0, a) < 0 else b  # equal: the negative zero if there is one


def scalar_max(a, b):
    if math.isnan(a) or math.isnan(b):
        return a + b
    if a > b:
        return a
    if b > a:
        return b
    return b if math.copysign(1.0, a) < 0 else a  # equal: the positive zero if there is one


class Real32:
    """float32 arithmetic with the flush policy on inputs and on every result."""
    conv = staticmethod(lambda v: flush32(F32(v)))
    add = staticmethod(lambda a, b: flush32(a + b))
    sub = staticmethod(lambda a, b: flush32(a - b))
    mul = staticmethod(lambda a, b: flush32(a * b))
    div = staticmethod(lambda a, n: flush32(a / F32(n)))


class Real64:
    """IEEE double arithmetic through Python floats (no numpy involved)."""
    conv = staticmethod(float)
    add = staticmethod(lambda a, b: a + b)
    sub = staticmethod(lambda a, b: a - b)
    mul = staticmethod(lambda a, b: a * b)
    div = staticmethod(lambda a, n: a / n)


def scalar_fold(dtype: str, op: str, column: list):
    """The contract for one element, given the N ranks' values (Python or numpy scalars)."""
    n = len(column)
    if dtype in INTS:
        step = {"sum": lambda a, b: wrap(a + b, dtype), "prod": lambda a, b: wrap(a * b, dtype),
                "min": min, "max": max}[op]
        acc = column[0]
        for v in column[1:]:
            acc = step(acc, v)
        return acc
    ar = Real32 if dtype in ("float16", "bfloat16", "float32", "complex64") else Real64
    if dtype in COMPLEX:
        def cprod(x, y):
            (a, b), (c, d) = x, y
            ac, bd, ad, bc = ar.mul(a, c), ar.mul(b, d), ar.mul(a, d), ar.mul(b, c)
            return ar.sub(ac, bd), ar.add(ad, bc)

        step = cprod if op == "prod" else lambda x, y: (ar.add(x[0], y[0]), ar.add(x[1], y[1]))
        vals = [(ar.conv(v.real), ar.conv(v.imag)) for v in column]
        acc = vals[0]
        for v in vals[1:]:
            acc = step(acc, v)
        return (ar.div(acc[0], n), ar.div(acc[1], n)) if op == "avg" else acc
    step = {"sum": ar.add, "avg": ar.add, "prod": ar.mul, "min": scalar_min,
            "max": scalar_max}[op]
    vals = [ar.conv(v) for v in column]
    acc = vals[0]
    for v in vals[1:]:
        acc = step(acc, v)
    return ar.div(acc, n) if op == "avg" else acc


def decode(dtype: str, a: np.ndarray) -> list:
    """Exact Python/numpy scalars of an input array, decoded without numpy's 16-bit casts."""
    if dtype == "bfloat16":  # a bfloat16 is the top half of a float32
        words = (a.view(np.uint16).astype(np.uint32) << 16).tolist()
        return [struct.unpack("<f", struct.pack("<I", w))[0] for w in words]
    if dtype == "float16":
        return [float(v) for v in a]
    return a.tolist()


def encode(dtype: str, results: list) -> tuple[np.ndarray, np.ndarray]:
    """The model's results as output bits (components for complex) and a NaN mask."""
    if dtype in INTS:
        b = [v % 2 ** (8 * DTYPES[dtype].itemsize) for v in results]
        return np.array(b, np.uint64), np.zeros(len(b), bool)
    if dtype in COMPLEX:
        results = [c for pair in results for c in pair]
    nan = np.array([math.isnan(v) for v in results], bool)
    if dtype in ("float16", "bfloat16"):
        out = rne_to_16(np.array(results, np.float32), dtype).astype(np.uint64)
    elif dtype in ("float32", "complex64"):
        out = np.array([f32(v) for v in results], np.uint64)
    else:
        out = np.array([f64(v) for v in results], np.uint64)
    # The contract's one NaN per type (written out here, not taken from the library).
    out[nan] = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000,
                "complex64": 0x7FC00000}.get(dtype, 0x7FF8000000000000)
    return out, nan


CASES = [(name, op) for name, dt in DTYPES.items() for op in dt.ops]


@pytest.mark.parametrize("dtype,op", CASES)
def test_random_against_scalar_model(dtype, op):
    size = 48
    for n in range(1, 6):
        seed = 20240611 + zlib.crc32(f"{dtype}/{op}/{n}".encode())
        rng = np.random.default_rng(seed)
        inputs = [random_input(rng, dtype, size) for _ in range(n)]
        saved = [x.copy() for x in inputs]
        out = R.all_reduce(inputs, op)
        assert out.dtype == numpy_dtype(dtype) and out.shape == (size,)
        assert all(bits(x) == bits(s) for x, s in zip(inputs, saved)), "inputs modified"
        columns = zip(*[decode(dtype, x) for x in inputs])
        with np.errstate(all="ignore"):
            model = [scalar_fold(dtype, op, list(col)) for col in columns]
        want, want_nan = encode(dtype, model)
        got = np.array(bits(out), np.uint64)
        bad = np.flatnonzero(got != want)  # NaNs included: each must be the canonical one
        if bad.size:
            word = bad[0]
            element = word // 2 if dtype in COMPLEX else word
            pytest.fail(
                f"seed={seed} dtype={dtype} op={op} N={n}: output word {word}: "
                f"got {got[word]:#x}, model {want[word]:#x} (model NaN {want_nan[word]}); "
                f"inputs at element {element}: {[x[element] for x in inputs]}")


# --------------------------------------------------------------------------- other collectives

def test_reduce_scatter():
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((2, 6)).astype(np.float32) for _ in range(3)]
    full = R.all_reduce([x.reshape(-1) for x in xs], "avg")
    parts = R.reduce_scatter(xs, "avg")
    assert len(parts) == 3
    for r, part in enumerate(parts):
        assert part.shape == (4,) and part.dtype == np.float32
        assert bits(part) == bits(full[4 * r:4 * (r + 1)])
    with pytest.raises(ValueError, match="divisible"):
        R.reduce_scatter([np.zeros(10, np.float32)] * 3)


def test_reduce_scatter_raw_bfloat16():
    raw = [np.array([0x3F80, 0x4000, 0x0001, 0x4380], np.uint16),
           np.array([0x3F80, 0x4000, 0x0000, 0x3F80], np.uint16)]
    parts = R.reduce_scatter(raw, dtype="bfloat16")
    assert [p.dtype for p in parts] == [BF16, BF16]
    assert bits(parts[0]) == [0x4000, 0x4080] and bits(parts[1]) == [0x0000, 0x4380]


def test_all_gather():
    xs = [np.arange(4, dtype=np.int16).reshape(2, 2) + 10 * r for r in range(3)]
    out = R.all_gather(xs)
    assert out.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert out.dtype == np.int16
    raw = [np.array([0x3F80, 0x8001], np.uint16), np.array([0x7FC1, 0x0001], np.uint16)]
    gathered = R.all_gather(raw, dtype="bfloat16")
    assert gathered.dtype == BF16
    assert bits(gathered) == [0x3F80, 0x8001, 0x7FC1, 0x0001]  # a copy: nothing flushed
    assert R.all_gather([np.zeros(0, np.float32)] * 2).shape == (0,)
    with pytest.raises(ValueError, match="rank 1"):
        R.all_gather([np.zeros(2, np.float32), np.zeros(3, np.float32)])


def test_broadcast():
    xs = [np.full((2, 3), r, np.float64) for r in range(3)]
    for root in range(3):
        out = R.broadcast(xs, root)
        assert out.shape == (2, 3) and (out == root).all()
        assert not np.shares_memory(out, xs[root])
    assert R.broadcast(xs).tolist() == xs[0].tolist()
    for root in (3, -1):
        with pytest.raises(ValueError, match="root"):
            R.broadcast(xs, root)
    with pytest.raises(ValueError):
        R.broadcast([])


# --------------------------------------------------------------------------- dtype= and errors

def test_raw_buffer_reinterpretation():
    rng = np.random.default_rng(11)
    real = [random_real(rng, "bfloat16", 64) for _ in range(4)]
    raw = [x.view(np.uint16).copy() for x in real]
    saved = [x.copy() for x in raw]
    for op in ("sum", "prod", "min", "max", "avg"):
        out = R.all_reduce(raw, op, dtype="bfloat16")
        assert out.dtype == BF16
        assert R.bits_equal(out, R.all_reduce(real, op))
    assert all((r == s).all() for r, s in zip(raw, saved))
    # raw bytes of float32 values: the last axis shrinks by the itemsize ratio
    b = [np.float32([1.5, 2.5]).view(np.uint8), np.float32([0.25, 1.0]).view(np.uint8)]
    out = R.all_reduce(b, dtype="float32")
    assert out.dtype == np.float32 and out.tolist() == [1.75, 3.5]
    with pytest.raises(ValueError, match="rank 1"):
        R.all_reduce([np.zeros(4, np.uint8), np.zeros(3, np.uint8)], dtype="float32")


def test_validation_errors():
    with pytest.raises(ValueError, match="empty"):
        R.all_reduce([])
    with pytest.raises(ValueError, match=r"rank 2.*shape"):
        R.all_reduce([np.zeros(3, np.float32)] * 2 + [np.zeros(4, np.float32)])
    with pytest.raises(ValueError, match=r"rank 1.*dtype"):
        R.all_reduce([np.zeros(3, np.float32), np.zeros(3, np.float64)])
    with pytest.raises(TypeError, match="bool"):
        R.all_reduce([np.zeros(3, bool)])
    with pytest.raises(TypeError, match="float8"):
        R.all_reduce([np.zeros(3, np.uint8)], dtype="float8")
    with pytest.raises(ValueError, match="op"):
        R.all_reduce([np.zeros(3, np.float32)], "mean")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_zero_size_and_shapes(dtype):
    dt = numpy_dtype(dtype)
    for shape in [(0,), (3, 0)]:
        out = R.all_reduce([np.zeros(shape, dt)] * 2)
        assert out.shape == shape and out.dtype == dt
    assert [p.shape for p in R.reduce_scatter([np.zeros(0, dt)] * 2)] == [(0,), (0,)]
    xs = [np.ones((2, 3), dt)] * 3
    out = R.all_reduce(xs, "prod")
    assert out.shape == (2, 3) and out.dtype == dt and not np.shares_memory(out, xs[0])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_non_contiguous_inputs(dtype):
    rng = np.random.default_rng(5)
    xs = [random_input(rng, dtype, 48).reshape(6, 8) for _ in range(3)]
    for view in (lambda a: a[:, ::2], lambda a: a.T, lambda a: a[::-1, ::-3],
                 np.asfortranarray):
        views = [view(x) for x in xs]
        for op in DTYPES[dtype].ops:
            out = R.all_reduce(views, op)
            assert out.shape == views[0].shape
            assert R.bits_equal(out, R.all_reduce([np.ascontiguousarray(v) for v in views], op))


def test_inputs_not_modified_and_output_fresh():
    x = np.array([1, 0x807FFFFF, 0x3F800000], np.uint32).view(np.float32)
    saved = x.copy()
    for op in ("sum", "prod", "min", "max", "avg"):
        for xs in ([x], [x, x, x]):
            out = R.all_reduce(xs, op)
            assert bits(x) == bits(saved)
            assert not np.shares_memory(out, x)
    c = np.array([1, 0x807FFFFF, 0x3F800000, 5], np.uint32).view(np.complex64)
    saved = c.copy()
    R.all_reduce([c, c], "prod")
    assert bits(c) == bits(saved)


# --------------------------------------------------------------------------- bits_equal

def test_bits_equal():
    a = np.array([1.0, np.nan, -0.0], np.float32)
    assert R.bits_equal(a, a.copy())
    b = a.copy()
    b.view(np.uint32)[1] = 0xFFC00123  # another NaN payload and sign: different bits
    assert not R.bits_equal(a, b)
    assert not R.bits_equal(a, np.array([1.0, 1.0, -0.0], np.float32))
    assert not R.bits_equal(a, np.array([1.0, np.nan, 0.0], np.float32))  # -0 vs +0
    assert not R.bits_equal(a, a.astype(np.float64))
    assert not R.bits_equal(a, a[:2])
    h = from_bits("bfloat16", [0x7FC0, 0x0001])[0]
    assert R.bits_equal(h, from_bits("bfloat16", [0x7FC0, 0x0001])[0])
    assert not R.bits_equal(h, from_bits("bfloat16", [0xFFC1, 0x0001])[0])
    assert R.bits_equal(np.array([5, -1], np.int8), np.array([5, -1], np.int8))
    assert not R.bits_equal(np.array([5], np.int8), np.array([5], np.uint8))
    assert R.bits_equal(np.zeros((0, 2), np.float16), np.zeros((0, 2), np.float16))
    assert R.bits_equal(np.zeros((3, 2), np.float16)[:, 0], np.zeros(3, np.float16))


@pytest.mark.parametrize("dtype,op", [(d, o) for d, o in CASES if d not in INTS])
def test_every_nan_result_is_the_canonical_nan(dtype, op):
    """NaN inputs of any payload and sign, and NaNs made by the fold (inf - inf, 0 * inf), all
    come out as the one canonical NaN of the type: 0x7E00, 0x7FC0, 0x7FC00000,
    0x7FF8000000000000 (per component for complex)."""
    width = {"float16": 16, "bfloat16": 16, "float32": 32, "complex64": 32}.get(dtype, 64)
    canon = {16: 0x7E00 if dtype == "float16" else 0x7FC0, 32: 0x7FC00000,
             64: 0x7FF8000000000000}[width]
    uint = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    exp = {16: 0x7C00 if dtype == "float16" else 0x7F80, 32: 0x7F800000,
           64: 0x7FF0000000000000}[width]
    sign = 1 << (width - 1)
    rng = np.random.default_rng(7)
    n = 64
    parts = 2 if dtype in COMPLEX else 1
    # rank 0: NaNs with random payloads and signs; +inf; rank 1: -inf, 0, ordinary values
    raw0 = rng.integers(1, (1 << min(width - 1, 62)) - 1, n * parts, dtype=np.uint64)
    nan_bits = (exp | (raw0 & (exp ^ (sign - 1))) | 1) | (rng.integers(0, 2, n * parts,
                                                                       dtype=np.uint64) << (width - 1))
    x0 = nan_bits.astype(uint)
    x0[::4] = exp  # +inf
    x1 = np.full(n * parts, exp | sign, dtype=np.uint64).astype(uint)  # -inf
    x1[1::4] = 0  # NaN * 0, NaN + 0
    dt = numpy_dtype(dtype)
    outs = R.all_reduce([x0.view(dt), x1.view(dt)], op)
    words = np.ascontiguousarray(outs).view(uint)
    is_nan = np.isnan(np.ascontiguousarray(outs).view(
        {16: np.float16, 32: np.float32, 64: np.float64}[width])) if dtype != "bfloat16" else (
        (words & 0x7FFF) > 0x7F80)
    assert is_nan.any()
    assert (words[is_nan] == canon).all(), sorted({hex(w) for w in words[is_nan]})


