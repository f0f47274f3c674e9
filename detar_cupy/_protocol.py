"""What the host and the kernels agree on: the Ctx layout, buffer geometry, the error word and the
per-call signature. Mirrors the definitions at the top of hip_src/collectives.hip."""
from __future__ import annotations

import ctypes
import zlib

from ._kernels import MAX_BLOCKS, MAX_WORLD
from .errors import MismatchError, PeerTimeoutError

_PTRS = ctypes.c_void_p * MAX_WORLD
LINE_BYTES = 16  # one LL line: 8 data bytes + two 4-byte epoch flags
START_FLAG_BYTES = MAX_BLOCKS * MAX_WORLD * 8
MID_FLAG_BYTES = MAX_BLOCKS * MAX_WORLD * 4
STATE_BYTES = 16  # u32 [epoch, blocks finished, error word, spare]


class Ctx(ctypes.Structure):
    """The kernels' first parameter, passed by value (struct Ctx in collectives.hip)."""

    _fields_ = [
        ("stage", _PTRS),
        ("ll", _PTRS),
        ("start_flags", _PTRS),
        ("mid_flags", _PTRS),
        ("state", ctypes.c_void_p),
        ("host_error", ctypes.c_void_p),
        ("stage_half_packs", ctypes.c_uint64),
        ("ll_src_lines", ctypes.c_uint64),
        ("timeout_ns", ctypes.c_uint64),
        ("rank", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
    ]


def ll_src_lines(ll_bytes: int) -> int:
    """Lines per source and parity for LL calls of up to ``ll_bytes`` bytes: headers, then data."""
    return MAX_BLOCKS + 2 * (ll_bytes // 16)


def signal_bytes(world_size: int, ll_bytes: int) -> int:
    """Size of the shared signal allocation: LL receive area, start flags, mid flags."""
    return 2 * world_size * ll_src_lines(ll_bytes) * LINE_BYTES + START_FLAG_BYTES + MID_FLAG_BYTES


ERR_TIMEOUT = 1
ERR_MISMATCH = 2
_WHERE = {1: "start barrier", 2: "mid barrier", 3: "LL header", 4: "LL data"}


def call_signature(kind: str, dtype_code: int, op_code: int, count: int, aux: int) -> int:
    """32-bit digest of what a launch does; peers compare it inside the kernel."""
    return zlib.crc32(f"{kind}|{dtype_code}|{op_code}|{count}|{aux}".encode())


def decode_error(word: int, rank: int, timeout_s: float, last_call: str) -> Exception:
    """The exception for a nonzero device error word."""
    code, peer, where = word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF
    place = _WHERE.get(where, f"site {where}")
    if code == ERR_TIMEOUT:
        err = PeerTimeoutError(
            f"rank {rank}: peer rank {peer} did not arrive at the {place} within {timeout_s:g} s "
            f"(during {last_call}); it may have died, hung, or skipped a call. The communicator is "
            "unusable: close it and create a new one")
        err.peer = peer
        return err
    if code == ERR_MISMATCH:
        err = MismatchError(
            f"rank {rank}: peer rank {peer} issued a different collective in the same call "
            f"(this rank: {last_call}); ranks must make the same calls with the same count, dtype, "
            "op and algorithm in the same order. The communicator is unusable: close it")
        err.peer = peer
        return err
    return PeerTimeoutError(f"rank {rank}: unknown device error word {word:#x}")
