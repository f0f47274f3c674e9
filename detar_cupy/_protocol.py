"""What the host and the kernels share, defined once: limits, error codes, the ``Ctx`` and
``Report`` layouts, the buffer geometry and the per-call signature.

The kernels (``hip_src/collectives.hip``) spell the structs out for readability; the renderer
prepends :func:`render_constants` (every shared constant as a ``#define``) and appends
:func:`render_layout_asserts` (a ``static_assert`` on the offset of every field and on the size
of every struct), so a layout that drifts on either side fails to compile, in the CI compile
matrix as on a GPU.

Buffers of one rank (peers store into its signal and staging allocations)::

    signal allocation (peers write; polled by this rank)
      LL area      [parity 2][source N][line ll_src_lines]      16-byte lines {d0, f, d1, f}
                     lines 0 .. MAX_BLOCKS-1: headers (one per block: the call's signature)
                     lines MAX_BLOCKS ..    : data (two lines per 16-byte pack)
      start flags  [block MAX_BLOCKS][source MAX_N]             u64 epoch
      mid flags    [block MAX_BLOCKS][source MAX_N]             u64 epoch (two_shot only)
      descriptors  [parity 2][source MAX_N][DESC_LINES]         16-byte lines (mismatch reports)
    staging allocation  [parity 2][stage_half_packs]             16-byte packs (N slots + N
                                                                  gather slots for two_shot)
    state (private)     State: u32 error word, u64 epoch[MAX_BLOCKS] (one per block)
"""
from __future__ import annotations

import ctypes
import hashlib
import struct

from .dtypes import DTYPES, OPS
from .errors import MismatchError, PeerTimeoutError

MAX_WORLD = 8  # ranks per communicator (MAX_N in the kernels)
MAX_BLOCKS = 128  # largest grid; one epoch slot and one flag row per block
THREADS = 512  # __launch_bounds__ of every kernel; barrier kernels launch this many threads
LL_THREADS = 256  # threads per block of the LL kernel
LINE_BYTES = 16  # one line: {data0, flag, data1, flag}, each {data, flag} half one 8-byte atomic
DESC_LINES = 3  # per source and parity: total count, aux, {epoch high word, chunk index}

ERR_TIMEOUT = 1
ERR_MISMATCH = 2
AT_START, AT_MID, AT_LL_HEADER, AT_LL_DATA = 1, 2, 3, 4
AT_HEADER, AT_TRANSFER = 5, 6  # the NCCL transport's: call header exchange, an NCCL transfer
_WHERE = {AT_START: "start barrier", AT_MID: "mid barrier", AT_LL_HEADER: "LL header",
          AT_LL_DATA: "LL data", AT_HEADER: "call header exchange", AT_TRANSFER: "NCCL transfer"}

_PTRS = ctypes.c_void_p * MAX_WORLD


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
        ("reserved", ctypes.c_uint32),
        ("epoch", ctypes.c_uint64),
        ("sig", ctypes.c_uint64),
        ("peer_sig", ctypes.c_uint64),
        ("count", ctypes.c_uint64),  # the call's total count (all chunks)
        ("aux", ctypes.c_uint64),
        ("chunk", ctypes.c_uint64),
        ("peer_count", ctypes.c_uint64),  # the peer's, from its descriptor (mismatch only)
        ("peer_aux", ctypes.c_uint64),
        ("peer_chunk", ctypes.c_uint64),
    ]


class State(ctypes.Structure):
    """This rank's private device state (struct State in collectives.hip)."""

    _fields_ = [
        ("word", ctypes.c_uint32),  # the first error (sticky); 0 while healthy
        ("pad", ctypes.c_uint32 * 3),
        ("epoch", ctypes.c_uint64 * MAX_BLOCKS),  # the last launch number block b has seen
    ]


STATE_BYTES = ctypes.sizeof(State)

SEGMENTS = 64  # buffers one coalescing launch moves


class Segments(ctypes.Structure):
    """The table of a coalescing launch (struct Segments in collectives.hip), passed by value."""

    _fields_ = [
        ("ptr", ctypes.c_uint64 * SEGMENTS),
        ("bytes", ctypes.c_uint64 * SEGMENTS),
        ("off", ctypes.c_uint64 * SEGMENTS),  # byte offset in the contiguous buffer (x16)
        ("n", ctypes.c_uint32),
        ("gather", ctypes.c_uint32),
    ]
START_FLAG_BYTES = MAX_BLOCKS * MAX_WORLD * 8
MID_FLAG_BYTES = MAX_BLOCKS * MAX_WORLD * 8
DESC_BYTES = 2 * MAX_WORLD * DESC_LINES * LINE_BYTES
#: Largest first epoch a test may choose (DETAR_FIRST_EPOCH): epochs are 64-bit counters that
#: never wrap in practice, compared as unsigned numbers; the setting travels between ranks as a
#: signed 64-bit int.
MAX_FIRST_EPOCH = (1 << 63) - 1

#: Constants the kernels take from here (rendered as #defines ahead of the source).
SHARED_CONSTANTS = {
    "MAX_N": MAX_WORLD, "MAX_BLOCKS": MAX_BLOCKS, "DESC_LINES": DESC_LINES,
    "DETAR_SEGMENTS": SEGMENTS,
    "ERR_TIMEOUT": ERR_TIMEOUT, "ERR_MISMATCH": ERR_MISMATCH, "AT_START": AT_START,
    "AT_MID": AT_MID, "AT_LL_HEADER": AT_LL_HEADER, "AT_LL_DATA": AT_LL_DATA,
    "AT_HEADER": AT_HEADER,
}


def render_constants() -> str:
    """The shared constants as C preprocessor definitions."""
    return "".join(f"#define {k} {v}\n" for k, v in SHARED_CONSTANTS.items())


def render_layout_asserts(structs: dict[str, type] | None = None) -> str:
    """``static_assert``s pinning the size of every struct shared with the kernels, and the
    offset of every field, to the ctypes layouts here (``structs``: C name -> ctypes class).

    The offsets need ``__builtin_offsetof``, which clang (hiprtc) and NVRTC 13.5 have but NVRTC
    13.0 does not (there they are skipped; the CI compile matrix, on NVRTC 13.5 and hiprtc,
    checks them for every build)."""
    structs = structs or {"Ctx": Ctx, "Report": Report, "State": State, "Segments": Segments}
    sizes, offsets = [], []
    for cname, cls in structs.items():
        for name, *_ in cls._fields_:
            off = getattr(cls, name).offset
            offsets.append(f'static_assert(__builtin_offsetof({cname}, {name}) == {off}, '
                           f'"{cname}.{name} must sit at byte {off} (detar_cupy._protocol)");\n')
        sizes.append(f'static_assert(sizeof({cname}) == {ctypes.sizeof(cls)}, '
                     f'"{cname} must be {ctypes.sizeof(cls)} bytes (detar_cupy._protocol)");\n')
    return ("".join(sizes) + "#if defined(__has_builtin)\n#if __has_builtin(__builtin_offsetof)\n"
            + "".join(offsets) + "#endif\n#endif\n")


def ll_src_lines(ll_bytes: int) -> int:
    """Lines per source and parity for LL calls of up to ``ll_bytes`` bytes: headers, then data."""
    return MAX_BLOCKS + 2 * (ll_bytes // 16)


def ll_area_bytes(world_size: int, ll_bytes: int) -> int:
    """The LL area at the start of the signal allocation: [parity][source][lines]."""
    return 2 * world_size * ll_src_lines(ll_bytes) * LINE_BYTES


def signal_offsets(world_size: int, ll_bytes: int) -> tuple[int, int, int, int]:
    """Byte offsets of the start flags, mid flags and descriptors in the signal allocation, and
    its size (see the module docstring's picture)."""
    start = ll_area_bytes(world_size, ll_bytes)
    mid = start + START_FLAG_BYTES
    desc = mid + MID_FLAG_BYTES
    return start, mid, desc, desc + DESC_BYTES


def state_image(first_epoch: int) -> bytes:
    """The initial state block: no error, every block's epoch one before ``first_epoch`` (the
    first launch's number)."""
    if not 1 <= first_epoch <= MAX_FIRST_EPOCH:
        raise ValueError(f"the first epoch must be in [1, 2**63 - 1], got {first_epoch}")
    state = State()
    for b in range(MAX_BLOCKS):
        state.epoch[b] = first_epoch - 1
    return bytes(state)


# ---- the call signature -----------------------------------------------------------------------
# 64 bits peers compare exactly in every launch: kind (3 bits), dtype code or element size
# (5 bits), op code (3 bits), and a 53-bit hash of the whole call (total count, aux) and of this
# launch's place in it (chunk index, chunk length). Differences in kind, dtype or op are always
# caught; a count/aux/chunk difference escapes only on a hash collision (2**-53).
KINDS = ("ll", "one_shot", "two_shot", "reduce_scatter", "all_gather", "broadcast")
_HASH_BITS = 53
# the op field starts where the hash ends
_KIND_SHIFT, _DTYPE_SHIFT, _OP_SHIFT = 61, 56, _HASH_BITS


def call_signature(kind: str, dtype_code: int, op_code: int, total: int, aux: int,
                   chunk: int = 0, length: int | None = None) -> int:
    """64-bit signature of one launch of a call; peers compare it inside the kernel."""
    length = total if length is None else length
    digest = hashlib.blake2b(struct.pack("<4Q", total, aux, chunk, length),
                             digest_size=8).digest()
    h = int.from_bytes(digest, "little") & ((1 << _HASH_BITS) - 1)
    return (((KINDS.index(kind) + 1) << _KIND_SHIFT) | (dtype_code << _DTYPE_SHIFT)
            | (op_code << _OP_SHIFT) | h)


def describe_launch(sig: int, count: int | None, aux: int | None,
                    chunk: int | None = None) -> dict:
    """The fields of a launch from its signature and descriptor (None where unknown)."""
    code = sig >> _KIND_SHIFT
    kind = KINDS[code - 1] if 1 <= code <= len(KINDS) else f"kind {code}"
    dcode, ocode = (sig >> _DTYPE_SHIFT) & 0x1F, (sig >> _OP_SHIFT) & 0x7
    reducing = kind in ("ll", "one_shot", "two_shot", "reduce_scatter")
    if reducing:
        dtype = next((d.name for d in DTYPES.values() if d.code == dcode), f"dtype code {dcode}")
        op = OPS[ocode - 1] if 1 <= ocode <= len(OPS) else f"op code {ocode}"
    else:
        dtype, op = f"{dcode}-byte elements", "-"
    is_ar = kind in ("ll", "one_shot", "two_shot")
    return {"collective": "all_reduce" if is_ar else kind, "algorithm": kind if is_ar else "-",
            "dtype": dtype, "op": op, "count": count, "aux": aux, "chunk": chunk}


_FIELDS = ("collective", "algorithm", "dtype", "op", "count", "aux", "chunk")


def launch_text(sig: int, count: int | None, aux: int | None) -> str:
    """``all_reduce(algorithm=two_shot, dtype=float16, op=sum, count=1000)``: a launch in words."""
    return _text(describe_launch(sig, count, aux))


def _text(d: dict) -> str:
    args = [f"{k}={d[k]}" for k in _FIELDS[1:]
            if d[k] not in ("-", None) and not (k == "aux" and d["collective"] == "all_reduce")
            and not (k == "chunk" and d[k] == 0)]
    return f"{d['collective']}({', '.join(args)})"


def decode_error(r: Report, rank: int, timeout_s: float) -> Exception:
    """The exception for a failure report (``r.word`` nonzero)."""
    word = r.word
    code, peer, where = word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF
    place = _WHERE.get(where, f"site {where}")
    mine = describe_launch(r.sig, r.count, r.aux, r.chunk)
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
                                 r.peer_aux if known else None, r.peer_chunk if known else None)
        differs = tuple(k for k in _FIELDS if theirs[k] is not None and theirs[k] != mine[k])
        if not differs:  # descriptor not readable: the signature differs in count or aux
            differs = ("count",)
        err = MismatchError(
            f"rank {rank}: peer rank {peer} made a different call at launch #{r.epoch}: this rank "
            f"{_text(mine)}, rank {peer} {_text(theirs)}; differs: {', '.join(differs)}. Ranks "
            "must make the same calls (collective, count, dtype, op, algorithm) in the same order. "
            "The communicator is unusable: close it and create a new one")
        err.peer, err.differs, err.mine, err.theirs = peer, differs, mine, theirs
        return err
    return PeerTimeoutError(f"rank {rank}: unknown device error word {word:#x}")
