"""Many small buffers through one all-reduce: gather them into one contiguous buffer (one launch
per SEGMENTS buffers), all-reduce it once, scatter the result back. Eager small calls are bound by
the driver's launch cost (about 4.5 us each from Python), so 64 gradients cost three launches
instead of 64. Each element's fold is the same as in a call of its own, so are the bits.

The tables of a shape (sizes and offsets of its buffers) are filled once, by :meth:`Coalescer.
prepare`; a call writes only the buffers' addresses into them.
"""
from __future__ import annotations

import ctypes
from typing import Any, NamedTuple, Sequence

from . import _kernels, _launch
from ._protocol import SEGMENTS, THREADS, Segments


def layout(nbytes: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """(byte offset of each buffer in the contiguous one, its total size): every buffer starts at
    a multiple of 16 bytes, so no 16-byte pack holds parts of two buffers."""
    offsets, at = [], 0
    for n in nbytes:
        offsets.append(at)
        at += -(-n // 16) * 16
    return tuple(offsets), at


class Shape(NamedTuple):
    """One coalesced shape made ready: a table per SEGMENTS buffers (table i moves buffers
    i*SEGMENTS .. i*SEGMENTS + n - 1) with their sizes and offsets filled, each table's launch
    parameters and grid, and the contiguous buffer's size."""

    tables: tuple[Segments, ...]
    params: tuple[Any, ...]  # per table: the kernel's parameter-pointer array
    grids: tuple[int, ...]
    total: int  # bytes of the contiguous buffer
    buf: ctypes.c_uint64  # its address, rewritten per call (shared by the tables' parameters)


class Coalescer:
    """The gather/scatter launches of one communicator (its GPU, its world size's module)."""

    def __init__(self, device: Any, world_size: int) -> None:
        self._device = device
        # The segments kernel is the same in every data movers' module; a world larger than the
        # IPC kernels serve (the NCCL transport's) takes the largest module's.
        n = min(world_size, _kernels.MAX_WORLD)
        self._key = _kernels.ModuleKey(None, n)
        self._name = _kernels.segments_name(n)
        self._launch: Any = None  # the driver's launch entry and the kernel handle, at first use
        self._f = 0

    def prepare(self, nbytes: Sequence[int]) -> Shape:
        """The tables of buffers of ``nbytes`` bytes each (made once per shape)."""
        offsets, total = layout(nbytes)
        buf = ctypes.c_uint64(0)
        tables, params, grids = [], [], []
        for lo in range(0, len(nbytes), SEGMENTS):
            hi = min(lo + SEGMENTS, len(nbytes))
            t = Segments()
            t.n = hi - lo
            t.bytes[:hi - lo] = nbytes[lo:hi]
            t.off[:hi - lo] = offsets[lo:hi]
            end = offsets[hi - 1] + nbytes[hi - 1] - offsets[lo]
            tables.append(t)
            params.append((ctypes.c_void_p * 2)(ctypes.addressof(t), ctypes.addressof(buf)))
            grids.append(max(1, min(_kernels.MAX_BLOCKS, -(-end // (16 * THREADS)))))
        return Shape(tuple(tables), tuple(params), tuple(grids), total, buf)

    def gather(self, shape: Shape, ptrs: Sequence[int], buf: int, stream: int) -> None:
        """Copy the buffers at ``ptrs`` into ``buf`` (``shape.total`` bytes) on ``stream``. The
        driver copies the parameters at each launch, so the tables may be rewritten as soon as
        a launch returns."""
        if not self._f:
            self._launch = _launch._driver_launch()
            self._f = _kernels.function(self._key, self._name, self._device.id).ptr
        shape.buf.value = buf
        for i, t in enumerate(shape.tables):
            t.ptr[:t.n] = ptrs[i * SEGMENTS:i * SEGMENTS + t.n]
        self._move(shape, 1, stream)

    def scatter(self, shape: Shape, stream: int) -> None:
        """Copy ``buf`` back to the buffers of the last :meth:`gather` of ``shape``."""
        self._move(shape, 0, stream)

    def _move(self, shape: Shape, gather: int, stream: int) -> None:
        launch, f = self._launch, self._f
        for t, p, grid in zip(shape.tables, shape.params, shape.grids):
            t.gather = gather
            launch(f, grid, 1, 1, THREADS, 1, 1, 0, stream, ctypes.addressof(p), 0)
