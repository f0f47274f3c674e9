"""Determinism checks of the contract, run inside spawned ranks (quick tier).

Every comparison is of raw bytes. Inputs come from recorded seeds, so a failure is reproducible.
"""
from __future__ import annotations

import numpy as np

from detar_cupy import reference
from detar_cupy.dtypes import numpy_dtype


def _inputs(seed: int, world: int, shape, name: str) -> list[np.ndarray]:
    dt = numpy_dtype(name)
    return [np.random.default_rng([seed, r]).standard_normal(shape).astype(np.float32).astype(dt)
            for r in range(world)]


def _raw(a):
    """A CuPy array of the same bytes with an integer dtype (CuPy 13 has no bfloat16)."""
    import cupy as cp

    return cp.asarray(a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32))


def _same(cp, a, b) -> bool:
    return a.shape == b.shape and bool(cp.all(a.view(cp.uint8) == b.view(cp.uint8)))


def run_quick(comm, seed: int = 2026) -> dict:
    import cupy as cp

    world, rank = comm.world_size, comm.rank
    res: dict = {}

    # run-to-run: the same inputs 1000 times; differences are counted on the device.
    for name in ("float16", "bfloat16", "float32"):
        host = _inputs(seed, world, 65536, name)
        x = _raw(host[rank])
        first = comm.all_reduce(x, dtype=name)
        out = cp.empty_like(x)
        diffs = cp.zeros((), cp.int64)
        for _ in range(1000):
            comm.all_reduce(x, out, dtype=name)
            diffs += cp.count_nonzero(out != first)
        want = reference.all_reduce(host)
        res[f"run_to_run_1000 {name}"] = (int(diffs) == 0 and
                                          reference.bits_equal(cp.asnumpy(first).view(want.dtype), want))

    # batch invariance: rows of a [B, H] batch never depend on the batch size or offset.
    for name in ("bfloat16", "float16", "float32"):
        for hidden in (4096, 5120):
            host = _inputs(seed + hidden, world, (64, hidden), name)
            x = _raw(host[rank])
            full = comm.all_reduce(x, dtype=name)
            ok = reference.bits_equal(cp.asnumpy(full).view(host[0].dtype), reference.all_reduce(host))
            for b in range(1, 65):
                ok &= _same(cp, comm.all_reduce(x[:b], dtype=name), full[:b])
            rng = np.random.default_rng(seed)
            for _ in range(16):
                lo = int(rng.integers(0, 63))
                hi = int(rng.integers(lo + 1, 65))
                ok &= _same(cp, comm.all_reduce(x[lo:hi], dtype=name), full[lo:hi])
            res[f"batch_invariance B=64 H={hidden} {name}"] = ok

    # algorithm agreement, including calls larger than the staging buffer (chunked).
    for count in (3001, 12_000_001):
        host = _inputs(seed + count, world, count, "float16")
        x = cp.asarray(host[rank])
        want = reference.all_reduce(host)
        outs = {alg: cp.asnumpy(comm.all_reduce(x, algorithm=alg))
                for alg in ("ll", "one_shot", "two_shot", "auto")
                if alg != "ll" or count * 2 <= comm._geom.ll_bytes}
        res[f"algorithms agree with reference n={count}"] = all(
            reference.bits_equal(o, want) for o in outs.values())

    # stream independence: default stream, a non-blocking stream, and next to other work.
    host = _inputs(seed + 7, world, 1 << 20, "float16")
    x = cp.asarray(host[rank])
    ref_out = comm.all_reduce(x)
    side = cp.cuda.Stream(non_blocking=True)
    with side:
        a = comm.all_reduce(x, stream=side)
    side.synchronize()
    busy = cp.cuda.Stream(non_blocking=True)
    m = cp.ones((2048, 2048), cp.float32)
    with busy:
        for _ in range(4):
            m = m @ m / 2048
    b = comm.all_reduce(x, stream=side)
    side.synchronize()
    busy.synchronize()
    res["stream independence"] = _same(cp, a, ref_out) and _same(cp, b, ref_out)

    # graph replay equals eager.
    cap = cp.cuda.Stream(non_blocking=True)
    out_g = cp.empty_like(x)
    try:
        cap.begin_capture()
        for _ in range(10):
            comm.all_reduce(x, out_g, stream=cap)
        graph = cap.end_capture()
    except Exception as exc:  # capture unsupported (CuPy 13 on ROCm): recorded, not faked
        res["graph replay"] = f"skipped: {exc}"
    else:
        ok = True
        for _ in range(100):
            with cap:  # poison on the replay stream, so it is ordered before the replay
                out_g.fill(0)
            graph.launch(cap)
            cap.synchronize()
            ok &= _same(cp, out_g, ref_out)
        res["graph replay x100 == eager"] = ok
    comm.synchronize()
    return res


def nccl_contrast(comm, seed: int = 77) -> dict:
    """Does NCCL's result for the first 4096 elements change with the message size? (Observed,
    not asserted.) Ours is checked to stay put."""
    import cupy as cp
    from cupy.cuda import nccl

    from detar_cupy.benchmark import _nccl_comm

    nc = _nccl_comm(comm)
    total = 1 << 24
    host = _inputs(seed, comm.world_size, total, "float16")
    x = cp.asarray(host[comm.rank])
    stream = cp.cuda.get_current_stream()
    seen_nccl, seen_ours = set(), set()
    for n in (4096, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24):
        out = cp.empty(n, cp.float16)
        nc.allReduce(x.data.ptr, out.data.ptr, n, nccl.NCCL_FLOAT16, nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()
        seen_nccl.add(cp.asnumpy(out[:4096]).tobytes())
        seen_ours.add(cp.asnumpy(comm.all_reduce(x[:n])[:4096]).tobytes())
    want = reference.all_reduce([h[:4096] for h in host]).tobytes()
    return {"nccl distinct prefixes over 7 sizes": len(seen_nccl),
            "nccl prefix equals reference": want in seen_nccl and len(seen_nccl) == 1,
            "ours distinct prefixes": len(seen_ours), "ours equals reference": seen_ours == {want}}
