"""Many small buffers through one all-reduce: gather them into one contiguous buffer (one launch
per SEGMENTS buffers), all-reduce it once, scatter the result back. Eager small calls are bound by
the driver's launch cost (about 4.5 us each from Python), so 64 gradients cost three launches
instead of 64. Each element's fold is the same as in a call of its own, so are the bits.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable, Sequence

from . import _kernels
from ._protocol import SEGMENTS, THREADS, Segments


def layout(nbytes: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """(byte offset of each buffer in the contiguous one, its total size): every buffer starts at
    a multiple of 16 bytes, so no 16-byte pack holds parts of two buffers."""
    offsets, at = [], 0
    for n in nbytes:
        offsets.append(at)
        at += -(-n // 16) * 16
    return tuple(offsets), at


class Coalescer:
    """The gather/scatter launches of one communicator (its GPU, its world size's module)."""

    def __init__(self, device: Any, world_size: int, launch_kernel: Callable[..., Any]) -> None:
        self._device = device
        # The segments kernel is the same in every data movers' module; a world larger than the
        # IPC kernels serve (the NCCL transport's) takes the largest module's.
        n = min(world_size, _kernels.MAX_WORLD)
        self._key = _kernels.ModuleKey(None, n)
        self._name = _kernels.segments_name(n)
        self._launch = launch_kernel
        self._f = 0  # the kernel handle, loaded at first use
        self._table = Segments()
        self._buf = ctypes.c_uint64(0)
        self._params = (ctypes.c_void_p * 2)(ctypes.addressof(self._table),
                                             ctypes.addressof(self._buf))

    def _move(self, gather: bool, ptrs: Sequence[int], nbytes: Sequence[int],
              offsets: Sequence[int], buf: int, stream: int) -> None:
        if not self._f:
            self._f = _kernels.function(self._key, self._name, self._device.id).ptr
        t = self._table
        t.gather = int(gather)
        self._buf.value = buf
        for lo in range(0, len(ptrs), SEGMENTS):
            hi = min(lo + SEGMENTS, len(ptrs))
            n = hi - lo
            t.n = n
            t.ptr[:n] = ptrs[lo:hi]
            t.bytes[:n] = nbytes[lo:hi]
            t.off[:n] = offsets[lo:hi]
            end = offsets[hi - 1] + nbytes[hi - 1] - offsets[lo]
            grid = max(1, min(_kernels.MAX_BLOCKS, -(-end // (16 * THREADS))))
            # The driver copies the parameters at launch: the table may be refilled at once.
            self._launch(self._f, grid, 1, 1, THREADS, 1, 1, 0, stream,
                         ctypes.addressof(self._params), 0)

    def run(self, ptrs: Sequence[int], nbytes: Sequence[int], offsets: Sequence[int], buf: int,
            stream: int, reduce: Callable[[], None]) -> None:
        """Gather into ``buf`` (laid out by :func:`layout`), ``reduce()`` it in place, scatter
        back; all on ``stream``."""
        self._move(True, ptrs, nbytes, offsets, buf, stream)
        reduce()
        self._move(False, ptrs, nbytes, offsets, buf, stream)
