"""What the host and the NCCL transport's kernels (``hip_src/fold.hip``) agree on: the kernels'
parameter block, the call header every call exchanges, the fold flags and the report sites.

Defined once here and rendered into the kernel source by :func:`c_source` (every kernel module
carries it, just before ``fold.hip``), with :func:`detar_cupy._protocol.render_layout_asserts`'s
size and offset assertions, so a layout that drifts fails the CPU compile matrix instead of a GPU
run. Pure Python.
"""
from __future__ import annotations

import ctypes

from . import _protocol

#: Fold flags: the first value is the carried partial at ``carry`` (accumulator type) instead
#: of slot 0; the result is written as accumulator partials for a later fold to continue,
#: without the op's finish and without rounding to the element type.
FOLD_CARRY_IN = 1
FOLD_CARRY_OUT = 2

#: The report word's peer byte when no peer can be named.
PEER_UNKNOWN = 0xFF

#: The largest world of the NCCL transport: the report word's peer byte names ranks 0..254.
MAX_NCCL_WORLD = PEER_UNKNOWN


class FoldArgs(ctypes.Structure):
    """The single parameter (by value) of every kernel of ``fold.hip``; the node carry kernel
    takes the IPC ``Ctx`` first. Which fields a kernel reads is said in ``fold.hip``."""

    _fields_ = [
        ("src", ctypes.c_void_p),  # slot 0 (fold, copy), the header slots (check), this rank's input
        ("carry", ctypes.c_void_p),  # carried partials in (FOLD_CARRY_IN)
        ("dst", ctypes.c_void_p),  # results or partials out, copies, this rank's header slot
        ("report", ctypes.c_void_p),  # the transport's Report, in mapped host memory
        ("state", ctypes.c_void_p),  # u64 epoch of the transport, in device memory
        ("count", ctypes.c_uint64),  # elements (header: the call's count)
        ("aux", ctypes.c_uint64),  # header: the call's aux; node carry: the slice in elements
        ("src_stride", ctypes.c_uint64),  # bytes between source slots
        ("dst_stride", ctypes.c_uint64),  # bytes between destination slots
        ("sig", ctypes.c_uint64),  # the call's signature (header), the launch's (node carry)
        ("slots", ctypes.c_uint32),  # source slots (fold, copy); ranks (check)
        ("flags", ctypes.c_uint32),  # FOLD_CARRY_IN | FOLD_CARRY_OUT
        ("divisor", ctypes.c_int32),  # the world size: avg's divisor
        ("rank", ctypes.c_int32),
    ]


#: C spelling of each FoldArgs field (the pointers are typed in C; ctypes only knows void*).
_C_TYPES = {"src": "const char*", "carry": "const char*", "dst": "char*", "report": "Report*",
            "state": "u64_t*", "count": "u64_t", "aux": "u64_t", "src_stride": "u64_t",
            "dst_stride": "u64_t", "sig": "u64_t", "slots": "u32_t", "flags": "u32_t",
            "divisor": "i32_t", "rank": "i32_t"}


class CallHeader(ctypes.Structure):
    """What every rank contributes to the header all-gather that opens each call: fixed size, so
    that the exchange itself can never mismatch. ``epoch`` counts this transport's calls (in
    device memory, advanced by the stamp kernel, so graph replays count too)."""

    _fields_ = [
        ("epoch", ctypes.c_uint64),
        ("sig", ctypes.c_uint64),  # _protocol.call_signature of the whole call
        ("count", ctypes.c_uint64),
        ("aux", ctypes.c_uint64),
    ]


_HEADER_C_TYPES = {"epoch": "u64_t", "sig": "u64_t", "count": "u64_t", "aux": "u64_t"}
HEADER_BYTES = ctypes.sizeof(CallHeader)


def header_bytes(epoch: int, sig: int, count: int, aux: int) -> bytes:
    """One rank's header as it travels (what the stamp kernel writes)."""
    return bytes(CallHeader(epoch, sig, count, aux))


def read_header(raw: bytes) -> CallHeader:
    """The header in ``raw`` (HEADER_BYTES bytes)."""
    return CallHeader.from_buffer_copy(raw)


def _struct(name: str, cls: type[ctypes.Structure], ctypes_of: dict[str, str]) -> str:
    return "\n".join([f"struct {name} {{"] + [f"  {ctypes_of[f[0]]} {f[0]};" for f in cls._fields_]
                     + ["};"])


def c_source() -> str:
    """The C++ definitions of this module, for the kernel source (after ``collectives.hip``,
    whose ``Report`` the parameter block points to)."""
    consts = [("DETAR_FOLD_CARRY_IN", FOLD_CARRY_IN), ("DETAR_FOLD_CARRY_OUT", FOLD_CARRY_OUT)]
    return "\n".join(
        ["// ---- rendered from detar_cupy/_fold_abi.py: do not edit here ----"]
        + [f"#define {name} {value}u" for name, value in consts]
        + [_struct("FoldArgs", FoldArgs, _C_TYPES), _struct("CallHeader", CallHeader,
                                                            _HEADER_C_TYPES),
           _protocol.render_layout_asserts({"FoldArgs": FoldArgs, "CallHeader": CallHeader})])
