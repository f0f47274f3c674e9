"""Bit-exact CPU model of the collectives (numpy only).

Every GPU path of detar_cupy must produce exactly the bits these functions return. For ranks'
inputs ``x_0 … x_{N-1}``::

    out[i] = cast_out(fold(x_0[i], …, x_{N-1}[i]))
    fold   = left fold in rank order in the accumulator type A:
             acc = A(x_0[i]); acc = op(acc, A(x_1[i])); …

- A is float32 for float16/bfloat16/float32, float64 for float64, complex64/complex128 for the
  complex types and the input type itself for integers (sum and prod wrap modulo 2**bits).
- Denormals, float32 accumulator only (float16, bfloat16, float32, complex64 components): every
  float32 value entering the accumulator and the float32 result of every arithmetic operation is
  flushed to a zero of the same sign. float64 and complex128 keep IEEE subnormals.
- sum/prod: one IEEE round-to-nearest-even operation per step. Complex prod is computed without
  fused multiply-add: ``re = a*c - b*d``, ``im = a*d + b*c`` with every product, difference and
  sum rounded (and, for complex64, flushed) separately.
- min/max (real types only): NaN if either operand is NaN; otherwise the smaller/larger operand,
  and for equal operands the bitwise OR (min) / AND (max) of both, so ``min(-0, +0) = -0`` and
  ``max(-0, +0) = +0``.
- avg (floating types only): the sum fold, then one correctly rounded division by N in A (each
  component by the real N for complex), flushed where the policy applies.
- cast_out: A to the input type, round-to-nearest-even (overflow gives inf).
- NaN: every NaN result is the one canonical quiet NaN of its type (:data:`CANONICAL_NAN`:
  positive, quiet bit only; each component on its own for complex types), whatever NaN the
  inputs held and whatever the hardware produces (inf - inf is 0xFFC00000 on x86, 0x7FFFFFFF on
  NVIDIA): the bits are then the same everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .dtypes import DTYPES, DType, dtype_name, lookup, numpy_dtype

__all__ = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "fold_partial", "finish",
           "flush_denormals_f32", "bits_equal", "CANONICAL_NAN"]

#: The canonical NaN of each floating type, as its bits (complex types: per component).
CANONICAL_NAN = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000,
                 "float64": 0x7FF8000000000000}

_F32_EXPONENT = np.uint32(0x7F800000)
_F32_SIGN = np.uint32(0x80000000)
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# --------------------------------------------------------------------------- public API

def all_reduce(inputs: Sequence[np.ndarray], op: str = "sum",
               dtype: str | None = None) -> np.ndarray:
    """The all-reduce result every rank receives, bit-exact.

    Parameters
    ----------
    inputs:
        One array per rank, in rank order; all of the same shape and dtype. They are not modified.
    op:
        ``"sum"``, ``"prod"``, ``"min"``, ``"max"`` or ``"avg"`` (see the module docstring for
        which dtypes allow which op).
    dtype:
        Optional dtype name (``"bfloat16"``, ``"float16"`` …). When given, each input is
        reinterpreted as that dtype (``ndarray.view``), so raw buffers such as uint16 arrays
        holding bfloat16 bits can be passed; when omitted the arrays' own dtype is used.

    Returns
    -------
    A new array of the inputs' shape and dtype (the reinterpreted dtype when ``dtype`` is given).

    Raises
    ------
    ValueError
        No inputs, ranks whose shapes or dtypes differ, an unknown op, or a buffer that cannot
        be reinterpreted as ``dtype``.
    TypeError
        An unsupported dtype, or an op that is not defined for the dtype.
    """
    dt, arrays = _prepare(inputs, dtype, op)
    shape = arrays[0].shape
    return _reduce(dt, op, [a.reshape(-1) for a in arrays]).reshape(shape)


def reduce_scatter(inputs: Sequence[np.ndarray], op: str = "sum",
                   dtype: str | None = None) -> list[np.ndarray]:
    """The reduce-scatter result of each rank, bit-exact.

    Each input holds ``N * count`` elements (taken flattened, in C order) for N ranks; rank r
    receives elements ``[r*count, (r+1)*count)`` of the all-reduce of the flattened inputs.
    Arguments and errors are those of :func:`all_reduce`; additionally a ``ValueError`` is raised
    when the element count is not divisible by N.

    Returns
    -------
    A list of N one-dimensional arrays of ``count`` elements, rank r's result at index r.
    """
    dt, arrays = _prepare(inputs, dtype, op)
    n = len(arrays)
    size = arrays[0].size
    if size % n:
        raise ValueError(
            f"reduce_scatter needs an element count divisible by the {n} ranks; "
            f"each input has {size} elements")
    reduced = _reduce(dt, op, [a.reshape(-1) for a in arrays])
    count = size // n
    return [reduced[r * count:(r + 1) * count] for r in range(n)]


def all_gather(inputs: Sequence[np.ndarray], dtype: str | None = None) -> np.ndarray:
    """The all-gather result every rank receives: the flattened inputs concatenated in rank order.

    ``dtype`` reinterprets raw buffers as in :func:`all_reduce`. Raises ``ValueError`` for no
    inputs or ranks whose shapes or dtypes differ, ``TypeError`` for an unsupported dtype.

    Returns
    -------
    A new one-dimensional array of ``N * inputs[0].size`` elements.
    """
    _, arrays = _prepare(inputs, dtype, None)
    return np.concatenate([a.reshape(-1) for a in arrays])


def broadcast(inputs: Sequence[np.ndarray], root: int = 0) -> np.ndarray:
    """The broadcast result every rank holds afterwards: a copy of ``inputs[root]``.

    ``inputs`` are the ranks' buffers (all of one shape and dtype, as the collective requires).
    Raises ``ValueError`` for no inputs, mismatched buffers or a root outside ``[0, N)``.
    """
    arrays = _checked_arrays(inputs)
    if not 0 <= root < len(arrays):
        raise ValueError(f"root {root} is not a rank of a world of size {len(arrays)}")
    return arrays[root].copy()


def fold_partial(inputs: Sequence[np.ndarray], op: str = "sum", dtype: str | None = None,
                 partial: np.ndarray | None = None) -> np.ndarray:
    """The fold of :func:`all_reduce` over ``inputs`` (ranks in order), continued from
    ``partial`` if given, and stopped before the op's finish and the rounding to the input type:
    the accumulator-type partial that a hierarchical transport carries from one node to the next.

    ``partial`` is an earlier result of this function (one-dimensional, in the accumulator type of
    the contract), so that ``finish(fold_partial(b, op, partial=fold_partial(a, op)), op, N)``
    equals ``all_reduce(a + b, op)`` bit for bit. ``inputs`` are flattened; may be empty when
    ``partial`` is given. Errors as :func:`all_reduce`.
    """
    if not inputs:
        if partial is None:
            raise ValueError("fold_partial needs inputs or a partial to continue")
        return np.array(partial).reshape(-1)
    dt, arrays = _prepare(inputs, dtype, op)
    start = None if partial is None else np.array(partial, dtype=numpy_dtype(dt.acc)).reshape(-1)
    return _fold(dt, op, [a.reshape(-1) for a in arrays], start)


def finish(partial: np.ndarray, op: str, world_size: int, dtype: str) -> np.ndarray:
    """The end of the fold of :func:`all_reduce` over ``world_size`` ranks from the partial of
    :func:`fold_partial`: avg's division by N, the rounding to ``dtype`` and the canonical NaN
    (a new array)."""
    dt = lookup(dtype, op)
    return _finish(dt, op, np.array(partial, dtype=numpy_dtype(dt.acc)), world_size)


def flush_denormals_f32(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` with every float32 subnormal replaced by a zero of the same sign.

    ``a`` is float32, or complex64 whose real and imaginary parts are flushed independently.
    Zeros, normal numbers, infinities and NaNs are returned unchanged (bit for bit).
    """
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.complex64):
        raise TypeError(f"flush_denormals_f32 takes float32 or complex64, not {a.dtype}")
    out = np.array(a, order="C")  # a fresh C-contiguous copy, so the in-place flush is safe
    _flush_inplace(out)
    return out


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits, element for element (NaNs
    included: the contract gives every NaN result one canonical pattern)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# --------------------------------------------------------------------------- validation

def _checked_arrays(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The inputs as arrays, after checking there is at least one and that all ranks agree."""
    arrays = [np.asarray(x) for x in inputs]
    if not arrays:
        raise ValueError("inputs is empty: pass one array per rank (at least one rank)")
    first = arrays[0]
    for r, a in enumerate(arrays[1:], start=1):
        if a.dtype != first.dtype:
            raise ValueError(
                f"rank {r}'s input has dtype {a.dtype} but rank 0's has {first.dtype}")
        if a.shape != first.shape:
            raise ValueError(
                f"rank {r}'s input has shape {a.shape} but rank 0's has {first.shape}")
    return arrays


def _reinterpret(x: Any, target: np.dtype, rank: int) -> np.ndarray:
    """Rank ``rank``'s raw buffer ``x`` viewed as ``target`` (no copy where possible)."""
    x = np.asarray(x)
    if x.dtype == target:
        return x
    try:
        # A view changing the itemsize needs a contiguous last axis; this copies only if needed.
        return np.ascontiguousarray(x).view(target)
    except ValueError as e:
        raise ValueError(
            f"rank {rank}'s input ({x.dtype}, shape {x.shape}) cannot be reinterpreted as "
            f"{target.name}: {e}") from None


def _prepare(inputs: Sequence[np.ndarray], dtype: str | None,
             op: str | None) -> tuple[DType, list[np.ndarray]]:
    """Validated input arrays of one table dtype, and that dtype (``op`` checked unless None)."""
    if dtype is not None:
        name = dtype_name(dtype)
        target = numpy_dtype(name)
        inputs = [_reinterpret(x, target, r) for r, x in enumerate(inputs)]
    arrays = _checked_arrays(inputs)
    name = dtype_name(arrays[0].dtype)
    return (DTYPES[name] if op is None else lookup(name, op)), arrays


# --------------------------------------------------------------------------- the fold

def _reduce(dt: DType, op: str, flats: list[np.ndarray]) -> np.ndarray:
    """The fold of one-dimensional inputs, cast back to the input dtype (a new array)."""
    return _finish(dt, op, _fold(dt, op, flats, None), len(flats))


def _fold(dt: DType, op: str, flats: list[np.ndarray], partial: np.ndarray | None) -> np.ndarray:
    """The left fold of ``flats`` in the accumulator type, continued from ``partial`` (an
    accumulator array, modified) when given: no finish, no rounding."""
    acc_type = numpy_dtype(dt.acc)
    flush = dt.is_float32_acc
    # Inputs are validated; the warnings numpy would give (integer wrap, inf - inf, overflow to
    # inf, overflow in the 16-bit cast) are all intended behaviour of the contract.
    with np.errstate(all="ignore"):
        if partial is None:
            acc, flats = _to_acc(flats[0], acc_type, flush, copy=True), flats[1:]
        else:
            acc = partial
        for x in flats:
            acc = _step(dt, op, acc, _to_acc(x, acc_type, flush, copy=False), flush)
    return acc


def _finish(dt: DType, op: str, acc: np.ndarray, n: int) -> np.ndarray:
    """avg's division by the ``n`` ranks, the rounding to the element type and the canonical
    NaN: the end of every fold (``acc`` is the accumulator, modified)."""
    with np.errstate(all="ignore"):
        if op == "avg":
            _divide_inplace(acc, n)
            if dt.is_float32_acc:
                _flush_inplace(acc)
        out = acc.astype(numpy_dtype(dt.name), copy=False)
    if dt.kind != "int":
        _canonical_nan_inplace(out, dt)
    return out


def _canonical_nan_inplace(a: np.ndarray, dt: DType) -> None:
    """Replace every NaN of a floating result (each component of a complex one) by the
    canonical NaN of its type."""
    parts = _components(a) if dt.kind == "complex" else a
    bits = parts.view(_UINT_OF_SIZE[parts.dtype.itemsize])
    bits[np.isnan(parts)] = CANONICAL_NAN[parts.dtype.name]


def _to_acc(x: np.ndarray, acc_type: np.dtype, flush: bool, copy: bool) -> np.ndarray:
    """``A(x)``, flushed where the policy applies. Never aliases ``x`` when it will be written."""
    # Flushing writes in place, so it needs a private copy even when x already has type A.
    y = x.astype(acc_type, copy=copy or flush)
    if flush:
        _flush_inplace(y)
    return y


def _step(dt: DType, op: str, acc: np.ndarray, x: np.ndarray, flush: bool) -> np.ndarray:
    """One fold step ``op(acc, x)`` in the accumulator type, flushed where the policy applies."""
    if op in ("min", "max"):
        if dt.kind == "int":
            return np.minimum(acc, x) if op == "min" else np.maximum(acc, x)
        # The result is one of the (already flushed) operands or a bitwise mix of two equal
        # ones, so no flush is needed.
        return _minmax_float(acc, x, op == "min")
    if op == "prod" and dt.kind == "complex":
        return _complex_prod(acc, x, flush)
    out = acc * x if op == "prod" else acc + x  # sum and avg fold with +
    if flush:
        _flush_inplace(out)
    return out


def _minmax_float(a: np.ndarray, b: np.ndarray, is_min: bool) -> np.ndarray:
    """The contract's min/max of two real float arrays (see the module docstring)."""
    uint = _UINT_OF_SIZE[a.dtype.itemsize]
    ua, ub = a.view(uint), b.view(uint)
    if is_min:
        first, second, tie = a < b, b < a, ua | ub
    else:
        first, second, tie = a > b, b > a, ua & ub
    # NaN compares false, so unordered pairs land in the tie branch; they are set explicitly
    # below because the AND of a NaN with another value need not be a NaN.
    out = np.where(first, ua, np.where(second, ub, tie)).view(a.dtype)
    out[np.isnan(a) | np.isnan(b)] = np.nan
    return out


def _complex_prod(acc: np.ndarray, x: np.ndarray, flush: bool) -> np.ndarray:
    """``(a+bi)(c+di)`` with every product, difference and sum rounded separately (no FMA)."""
    # Not numpy's complex multiply: on x86-64 it was seen to fuse a*c - b*d (one rounding), and
    # the complex64 products need flushing in between anyway.
    a, b, c, d = acc.real, acc.imag, x.real, x.imag
    products = [a * c, b * d, a * d, b * c]
    if flush:
        for t in products:
            _flush_inplace(t)
    ac, bd, ad, bc = products
    out = np.empty_like(acc)
    out.real = ac - bd
    out.imag = ad + bc
    if flush:
        _flush_inplace(out)
    return out


def _divide_inplace(acc: np.ndarray, n: int) -> None:
    """``acc /= n`` in A, one correctly rounded division (per component for complex)."""
    # Complex values are divided as their component array: numpy's complex64 / float32 is not
    # two correctly rounded real divisions (it gave 0x3FD55556 for 5/3, not 0x3FD55555).
    target = _components(acc) if acc.dtype.kind == "c" else acc
    target /= target.dtype.type(n)


def _components(a: np.ndarray) -> np.ndarray:
    """A one-dimensional complex array viewed as its interleaved real/imaginary parts."""
    return np.ascontiguousarray(a).view(np.float32 if a.dtype == np.complex64 else np.float64)


def _flush_inplace(a: np.ndarray) -> None:
    """Flush float32 subnormals of a C-contiguous float32/complex64 array to signed zeros."""
    u = a.view(np.uint32)
    # Exponent bits all zero means zero or subnormal; keeping only the sign bit maps both to the
    # zero of the same sign (zeros are unchanged).
    np.bitwise_and(u, _F32_SIGN, out=u, where=(u & _F32_EXPONENT) == 0)
