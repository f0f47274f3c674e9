"""Launch plans: which kernel, how many blocks, and how a call larger than the buffers is cut into
chunks. Pure Python (no GPU), computed once per (collective, dtype, op, count, algorithm) and cached
by the communicator, so the hot path only replays a tuple of launches.

Chunking never changes bits: element i is always folded over ranks 0..N-1 in order, whichever
launch it falls in.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import _kernels
from ._kernels import ModuleKey
from ._protocol import LL_THREADS, THREADS, call_signature
from .dtypes import DTYPES, OP_CODES
from .transports import ALGORITHMS


# Largest message (bytes) for which `auto` picks ll, then one_shot; two_shot above. Measured
# with the fp16/bf16 graph-replay benchmark (bench/NOTES.md). 2 GPUs (v3, H200 NVLink): ll was
# the fastest up to 64 KiB and no faster than one_shot at 256 KiB (128 KiB is interpolated),
# one_shot up to 4 MiB, two_shot from 16 MiB. 4 GPUs (v3, H200): one_shot was the fastest up to
# 256 KiB (ll never: its flag words double the traffic to three peers), two_shot from 1 MiB.
# World sizes not listed use the nearest smaller one; 3 and 8 are interpolated, not measured.
AUTO_THRESHOLDS = {
    2: (128 << 10, 8 << 20),
    3: (0, 2 << 20),
    4: (0, 512 << 10),
    8: (0, 256 << 10),
}


@dataclass(frozen=True)
class Geometry:
    """What a plan depends on besides the call: buffer sizes and the grid cap."""

    world_size: int
    stage_half_bytes: int
    ll_bytes: int
    max_grid: int  # co-resident blocks: at most the SM count and MAX_BLOCKS


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan; offsets are in bytes from the call's in/out pointers.
    ``count`` is this launch's elements; ``total`` the call's and ``chunk`` this launch's index
    in it, both covered by ``sig`` so that peers tell every launch of every call apart."""

    module: ModuleKey
    kernel: str
    grid: int
    block: int
    in_offset: int
    out_offset: int
    count: int
    aux: int
    sig: int
    total: int
    chunk: int


def choose_algorithm(nbytes: int, world_size: int) -> str:
    """The algorithm `auto` uses for a message of ``nbytes`` bytes per rank."""
    if world_size == 1:
        return "one_shot"
    key = max(n for n in AUTO_THRESHOLDS if n <= world_size)
    ll_max, one_shot_max = AUTO_THRESHOLDS[key]
    if nbytes <= ll_max:
        return "ll"
    return "one_shot" if nbytes <= one_shot_max else "two_shot"


def _grid(packs: int, block: int, geom: Geometry) -> int:
    return max(1, min(geom.max_grid, -(-packs // block)))


def _chunks(total: int, cap: int):
    """(index, start, length) of pieces of at most ``cap`` elements; one empty piece for
    total == 0, so a zero-size call still meets its peers (and their mismatch check)."""
    if cap < 1:  # the settings guarantee room for one pack per slot; a plan must never stall
        raise ValueError(f"staging too small for one chunk (capacity {cap} elements)")
    if total == 0:
        yield 0, 0, 0
        return
    for index, start in enumerate(range(0, total, cap)):
        yield index, start, min(cap, total - start)


def all_reduce(geom: Geometry, dtype: str, op: str, count: int, algorithm: str) -> tuple[Launch, ...]:
    """Launches for an all-reduce of ``count`` elements per rank."""
    dt = DTYPES[dtype]
    n = geom.world_size
    k = 16 // dt.itemsize  # elements per 16-byte pack
    if algorithm == "auto":
        algorithm = choose_algorithm(count * dt.itemsize, n)
        if algorithm == "ll" and count * dt.itemsize > geom.ll_bytes:
            algorithm = "one_shot"  # a smaller DETAR_LL_BYTES: one LL launch would not hold it
    if n == 1:
        algorithm = "one_shot"  # a copy (with the contract's conversions); no peer to push to
    half_packs = geom.stage_half_bytes // 16
    if algorithm == "ll":
        cap, block = (geom.ll_bytes // 16) * k, LL_THREADS
    elif algorithm == "one_shot":  # a staging half holds N slots of the whole chunk
        cap, block = (half_packs // n) * k, THREADS
    elif algorithm == "two_shot":  # N slots of a slice, N gather slots of a slice
        cap, block = (half_packs // (2 * n)) * n * k, THREADS
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    key = ModuleKey(dtype, n)
    name = _kernels.reducing_name(dtype, op, n, algorithm)
    out = []
    for index, start, length in _chunks(count, cap):
        packs = -(-length // k)
        if algorithm == "two_shot":
            packs = -(-packs // n)
        sig = call_signature(algorithm, dt.code, OP_CODES[op], count, 0, index, length)
        off = start * dt.itemsize
        out.append(Launch(key, name, _grid(packs, block, geom), block, off, off, length, 0, sig,
                          count, index))
    return tuple(out)


def reduce_scatter(geom: Geometry, dtype: str, op: str, count: int) -> tuple[Launch, ...]:
    """Launches for a reduce-scatter: each rank's input holds N slices of ``count`` elements."""
    dt = DTYPES[dtype]
    n, k = geom.world_size, 16 // dt.itemsize
    cap = (geom.stage_half_bytes // 16 // n) * k
    key = ModuleKey(dtype, n)
    name = _kernels.reducing_name(dtype, op, n, "reduce_scatter")
    out = []
    for index, start, length in _chunks(count, cap):
        sig = call_signature("reduce_scatter", dt.code, OP_CODES[op], count, count, index, length)
        off = start * dt.itemsize
        out.append(Launch(key, name, _grid(-(-length // k), THREADS, geom), THREADS, off, off,
                          length, count, sig, count, index))
    return tuple(out)


def moving(geom: Geometry, kind: str, itemsize: int, count: int, root: int = 0) -> tuple[Launch, ...]:
    """Launches for all_gather (``count`` elements per rank) or broadcast (``count`` elements)."""
    if itemsize not in _kernels.MOVING_SIZES:
        raise TypeError(f"element size {itemsize} bytes is not supported by {kind}")
    n, k = geom.world_size, 16 // itemsize
    slots = n if kind == "all_gather" else 1  # all_gather receives N slots, broadcast one
    cap = (geom.stage_half_bytes // 16 // slots) * k
    key = ModuleKey(None, n)
    name = _kernels.moving_name(itemsize, n, kind)
    out = []
    aux = count if kind == "all_gather" else root
    for index, start, length in _chunks(count, cap):
        sig = call_signature(kind, itemsize, 0, count, aux, index, length)
        off = start * itemsize
        out.append(Launch(key, name, _grid(-(-length // k), THREADS, geom), THREADS, off, off,
                          length, aux, sig, count, index))
    return tuple(out)
