"""What the host and the kernels agree on: the Ctx layout, buffer geometry, the error word and the
per-call signature. Mirrors the definitions at the top of hip_src/collectives.hip."""
from __future__ import annotations

import ctypes
import zlib

from ._kernels import MAX_BLOCKS, MAX_WORLD
from .dtypes import DTYPES, OPS
from .errors import MismatchError, PeerTimeoutError

_PTRS = ctypes.c_void_p * MAX_WORLD
LINE_BYTES = 16  # one LL line: 8 data bytes + two 4-byte epoch flags
START_FLAG_BYTES = MAX_BLOCKS * MAX_WORLD * 8
MID_FLAG_BYTES = MAX_BLOCKS * MAX_WORLD * 4
DESC_BYTES = 2 * MAX_WORLD * 2 * LINE_BYTES  # [parity][source] x (count line, aux line)
STATE_BYTES = 4 * (4 + MAX_BLOCKS)  # u32 [error word, 3 spare, epoch of block 0..MAX_BLOCKS-1]


class Ctx(ctypes.Structure):
    """The kernels' first parameter, passed by value (struct Ctx in collectives.hip)."""

    _fields_ = [
        ("stage", _PTRS),
        ("ll", _PTRS),
        ("start_flags", _PTRS),
        ("mid_flags", _PTRS),
        ("desc", _PTRS),
        ("state", ctypes.c_void_p),
        ("report", ctypes.c_void_p),
        ("stage_half_packs", ctypes.c_uint64),
        ("ll_src_lines", ctypes.c_uint64),
        ("timeout_ns", ctypes.c_uint64),
        ("rank", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
    ]


class Report(ctypes.Structure):
    """What a kernel leaves in mapped host memory when it fails (struct Report in collectives.hip).
    ``word`` is written last; zero means no failure."""

    _fields_ = [
        ("word", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("sig", ctypes.c_uint32),
        ("peer_sig", ctypes.c_uint32),
        ("count", ctypes.c_uint64),
        ("aux", ctypes.c_uint64),
        ("peer_count", ctypes.c_uint64),
        ("peer_aux", ctypes.c_uint64),
    ]


def ll_src_lines(ll_bytes: int) -> int:
    """Lines per source and parity for LL calls of up to ``ll_bytes`` bytes: headers, then data."""
    return MAX_BLOCKS + 2 * (ll_bytes // 16)


def ll_area_bytes(world_size: int, ll_bytes: int) -> int:
    """The LL receive area at the start of the signal allocation: [parity][source][lines]."""
    return 2 * world_size * ll_src_lines(ll_bytes) * LINE_BYTES


def signal_bytes(world_size: int, ll_bytes: int) -> int:
    """Size of the shared signal allocation: LL area, start flags, mid flags, call descriptors."""
    return ll_area_bytes(world_size, ll_bytes) + START_FLAG_BYTES + MID_FLAG_BYTES + DESC_BYTES


ERR_TIMEOUT = 1
ERR_MISMATCH = 2
_WHERE = {1: "start barrier", 2: "mid barrier", 3: "LL header", 4: "LL data"}

# The signature peers compare in every flag: kind (3 bits), dtype code or element size (5 bits),
# op code (3 bits) exactly, and a 21-bit hash of count and aux. Differences in the first three
# are always caught; a count/aux difference escapes only on a hash collision (2**-21).
KINDS = ("ll", "one_shot", "two_shot", "reduce_scatter", "all_gather", "broadcast")
_HASH_BITS = 21


def call_signature(kind: str, dtype_code: int, op_code: int, count: int, aux: int) -> int:
    """32-bit signature of what a launch does; peers compare it inside the kernel."""
    digest = zlib.crc32(f"{count}|{aux}".encode()) & ((1 << _HASH_BITS) - 1)
    return ((KINDS.index(kind) + 1) << 29) | (dtype_code << 24) | (op_code << _HASH_BITS) | digest


def describe_launch(sig: int, count: int | None, aux: int | None) -> dict:
    """The fields of a launch from its signature and descriptor (None where unknown)."""
    code = sig >> 29
    kind = KINDS[code - 1] if 1 <= code <= len(KINDS) else f"kind {code}"
    dcode, ocode = (sig >> 24) & 0x1F, (sig >> _HASH_BITS) & 0x7
    reducing = kind in ("ll", "one_shot", "two_shot", "reduce_scatter")
    if reducing:
        dtype = next((d.name for d in DTYPES.values() if d.code == dcode), f"dtype code {dcode}")
        op = OPS[ocode - 1] if 1 <= ocode <= len(OPS) else f"op code {ocode}"
    else:
        dtype, op = f"{dcode}-byte elements", "-"
    is_ar = kind in ("ll", "one_shot", "two_shot")
    return {"collective": "all_reduce" if is_ar else kind, "algorithm": kind if is_ar else "-",
            "dtype": dtype, "op": op, "count": count, "aux": aux}


def launch_text(sig: int, count: int | None, aux: int | None) -> str:
    """``all_reduce(algorithm=two_shot, dtype=float16, op=sum, count=1000)``: a launch in words."""
    return _text(describe_launch(sig, count, aux))


def _text(d: dict) -> str:
    args = [f"{k}={d[k]}" for k in ("algorithm", "dtype", "op", "count", "aux")
            if d[k] not in ("-", None) and not (k == "aux" and d["collective"] == "all_reduce")]
    return f"{d['collective']}({', '.join(args)})"


def decode_error(r: Report, rank: int, timeout_s: float) -> Exception:
    """The exception for a failure report (``r.word`` nonzero)."""
    word = r.word
    code, peer, where = word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF
    place = _WHERE.get(where, f"site {where}")
    mine = describe_launch(r.sig, r.count, r.aux)
    if code == ERR_TIMEOUT:
        err = PeerTimeoutError(
            f"rank {rank}: peer rank {peer} did not arrive at the {place} of launch #{r.epoch} "
            f"({_text(mine)}) within {timeout_s:g} s; it may have died, hung, or skipped a call. "
            "The communicator is unusable: close it and create a new one")
        err.peer = peer
        return err
    if code == ERR_MISMATCH:
        known = r.peer_count != (1 << 64) - 1
        theirs = describe_launch(r.peer_sig, r.peer_count if known else None,
                                 r.peer_aux if known else None)
        differs = tuple(k for k in ("collective", "algorithm", "dtype", "op", "count", "aux")
                        if theirs[k] is not None and theirs[k] != mine[k])
        if not differs:  # descriptor not readable: the signature differs in count or aux
            differs = ("count",) if not known else ("aux",)
        err = MismatchError(
            f"rank {rank}: peer rank {peer} made a different call at launch #{r.epoch}: this rank "
            f"{_text(mine)}, rank {peer} {_text(theirs)}; differs: {', '.join(differs)}. Ranks "
            "must make the same calls (collective, count, dtype, op, algorithm) in the same order. "
            "The communicator is unusable: close it and create a new one")
        err.peer, err.differs, err.mine, err.theirs = peer, differs, mine, theirs
        return err
    return PeerTimeoutError(f"rank {rank}: unknown device error word {word:#x}")
