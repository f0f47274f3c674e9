"""The dtype and op tables every layer keys on.

Everything is keyed by dtype *names* (``"bfloat16"``, ``"float32"`` …) rather than by array-library
dtype objects, so raw buffers whose dtype the array library does not know (bfloat16 on CuPy 13,
torch bf16 tensors) can still be reduced by naming the dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OPS: tuple[str, ...] = ("sum", "prod", "min", "max", "avg")


@dataclass(frozen=True)
class DType:
    """One element type: its storage, its accumulator and the C++ spelling of both."""

    name: str
    itemsize: int
    kind: str  # "float", "complex" or "int"
    ctype: str  # C++ storage type in hip_src (see portability.h)
    acc: str  # numpy name of the accumulator type A of the contract
    code: int  # small stable number, part of the call header peers compare

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops defined for this dtype."""
        if self.kind == "complex":
            return ("sum", "prod", "avg")
        if self.kind == "int":
            return ("sum", "prod", "min", "max")
        return OPS

    @property
    def is_float32_acc(self) -> bool:
        """True where the accumulator is float32 (or complex64): the denormal policy applies."""
        return self.acc in ("float32", "complex64")


_TABLE = [
    # name        size kind       ctype        acc          code
    ("float16", 2, "float", "half_t", "float32", 1),
    ("bfloat16", 2, "float", "bf16_t", "float32", 2),
    ("float32", 4, "float", "float", "float32", 3),
    ("float64", 8, "float", "double", "float64", 4),
    ("complex64", 8, "complex", "cfloat_t", "complex64", 5),
    ("complex128", 16, "complex", "cdouble_t", "complex128", 6),
    ("int8", 1, "int", "i8_t", "int8", 7),
    ("int16", 2, "int", "i16_t", "int16", 8),
    ("int32", 4, "int", "i32_t", "int32", 9),
    ("int64", 8, "int", "i64_t", "int64", 10),
    ("uint8", 1, "int", "u8_t", "uint8", 11),
    ("uint16", 2, "int", "u16_t", "uint16", 12),
    ("uint32", 4, "int", "u32_t", "uint32", 13),
    ("uint64", 8, "int", "u64_t", "uint64", 14),
]

DTYPES: dict[str, DType] = {row[0]: DType(*row) for row in _TABLE}
OP_CODES: dict[str, int] = {op: i + 1 for i, op in enumerate(OPS)}


def dtype_name(dtype: Any) -> str:
    """The table name of ``dtype``: a name, a numpy/CuPy/ml_dtypes dtype, or a torch dtype."""
    if isinstance(dtype, str):
        name = dtype
    else:
        name = getattr(dtype, "name", None)
        if name is None:  # torch.dtype has no .name; str() gives "torch.bfloat16"
            name = str(dtype).rsplit(".", 1)[-1]
    if name not in DTYPES:
        raise TypeError(
            f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return name


def lookup(dtype: Any, op: str) -> DType:
    """The DType for ``dtype`` after checking that ``op`` is defined for it."""
    dt = DTYPES[dtype_name(dtype)]
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; supported: {', '.join(OPS)}")
    if op not in dt.ops:
        raise TypeError(
            f"op {op!r} is not defined for dtype {dt.name!r} "
            f"(ops for {dt.name}: {', '.join(dt.ops)})")
    return dt


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a table name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[name].name)
