"""The coalescing tables on the CPU: the segments kernel is emulated from the very parameter
memory each launch passes (the driver copies it at launch), so the tables' contents, their
split into launches of SEGMENTS buffers and the gather/scatter order are what is checked."""
from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from detar_cupy import _coalesce, _kernels, _launch
from detar_cupy._protocol import SEGMENTS, Segments


class FakeDevice:
    id = 0


def emulated_launch(log: list):
    def launch(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) -> None:
        p = (ctypes.c_void_p * 2).from_address(params)
        t = Segments.from_address(p[0])
        buf = ctypes.c_uint64.from_address(p[1]).value
        log.append(("gather" if t.gather else "scatter", t.n, gx))
        for i in range(t.n):
            if t.gather:
                ctypes.memmove(buf + t.off[i], t.ptr[i], t.bytes[i])
            else:
                ctypes.memmove(t.ptr[i], buf + t.off[i], t.bytes[i])
    return launch


@pytest.mark.parametrize("count", [2, SEGMENTS, SEGMENTS + 1, 3 * SEGMENTS - 5])
def test_gather_reduce_scatter_through_prepared_tables(count: int, monkeypatch) -> None:
    monkeypatch.setattr(_kernels, "function", lambda key, name, dev: types.SimpleNamespace(ptr=1))
    log: list = []
    monkeypatch.setattr(_launch, "_driver_launch", lambda: emulated_launch(log))
    co = _coalesce.Coalescer(FakeDevice(), 2)
    rng = np.random.default_rng(count)
    sizes = [int(n) for n in rng.integers(1, 300, count)]
    shape = co.prepare(sizes)
    assert len(shape.tables) == -(-count // SEGMENTS)
    for call in range(3):  # the tables are reused; only the addresses change
        arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
        want = [a ^ 0x5A for a in arrays]
        buf = np.full(shape.total, 0xEE, np.uint8)
        ptrs = [a.ctypes.data for a in arrays]

        def reduce() -> None:  # the all-reduce's stand-in: sees every buffer at its offset
            offsets, _ = _coalesce.layout(sizes)
            for a, off in zip(arrays, offsets):
                assert bytes(buf[off:off + a.size]) == a.tobytes()
            buf[:] ^= 0x5A

        log.clear()
        co.gather(shape, ptrs, buf.ctypes.data, 0)
        reduce()
        co.scatter(shape, 0)
        assert all(np.array_equal(a, w) for a, w in zip(arrays, want)), call
        n = len(shape.tables)
        assert [k for k, *_ in log] == ["gather"] * n + ["scatter"] * n
        assert sum(m for _, m, _ in log) == 2 * count
