"""Workers of the lifecycle tests (module-level: the spawn start method imports them by name).

- :func:`create_close_cycles`: many create/close cycles of a communicator in the same processes;
  GPU memory, file descriptors and memory mappings measured before and after.
- :func:`exit_without_close_rank`: a rank that returns without close(); its interpreter must
  still exit cleanly.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any

import numpy as np

from detar_cupy import reference
from gpu_reliability import free_ports

_KEEP: list[Any] = []  # communicators kept alive until interpreter exit, never closed


def _checked_all_reduce(comm, seed: int) -> bool:
    """One small all-reduce with seeded inputs, output poisoned with the complement of the
    expected bits; True when bit-exact."""
    import cupy as cp

    world = comm.world_size
    host = [np.random.default_rng([seed, r]).standard_normal(1001).astype(np.float16)
            for r in range(world)]
    want = reference.all_reduce(host)
    out = cp.asarray(~want.view(np.uint16)).view(cp.float16)
    comm.all_reduce(cp.asarray(host[comm.rank]), out)
    comm.synchronize()
    return reference.bits_equal(cp.asnumpy(out), want)


def _resources(device) -> dict:
    """Free GPU memory (after returning CuPy's cached blocks), open fds, mappings, resident set."""
    import cupy as cp

    device.synchronize()
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
    with device:
        free, _ = cp.cuda.runtime.memGetInfo()
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"free": free, "fds": len(os.listdir("/proc/self/fd")), "maps": maps,
            "rss": rss_kib * 1024}


def create_close_cycles(comm, cycles: int, warm: int, check_every: int) -> dict:
    """``warm`` cycles, a measurement, ``cycles`` more cycles, a measurement. Each cycle creates a
    communicator with init_process_group on one agreed port and closes it; every
    ``check_every``-th cycle also makes one bit-checked all-reduce."""
    import cupy as cp

    import detar_cupy as dc

    world, rank, dev = comm.world_size, comm.rank, comm.device.id
    # One port for every cycle: rank 0's listener is closed once the group is complete, and it
    # binds with SO_REUSEADDR, so the next cycle can listen on the same port.
    port = comm.exchange(free_ports(1)[0] if rank == 0 else None)[0]
    checks: list[tuple[int, bool]] = []

    def cycle(i: int):
        c = dc.init_process_group(world, rank, port=port, device=dev, timeout=60)
        if i % check_every == 0:
            checks.append((i, _checked_all_reduce(c, 7000 + i)))
        c.close()
        return c

    start = time.perf_counter()
    def measure() -> dict:
        # Between barriers: with ranks sharing a GPU (DETAR_SHARE_GPUS) its free memory also
        # counts the other ranks' buffers, so none may be between cycles or past the loop.
        comm.exchange(None)
        got = _resources(comm.device)
        comm.exchange(None)
        return got

    for i in range(warm):
        cycle(i)
    before = measure()
    t0 = time.perf_counter()
    for i in range(warm, warm + cycles):
        last = cycle(i)
    seconds = time.perf_counter() - t0
    after = measure()
    out: dict[str, Any] = {"cycles": cycles, "warm": warm, "seconds": seconds,
                           "total_seconds": time.perf_counter() - start,
                           "before": before, "after": after, "checks": checks}
    try:
        last.close()  # a second close is harmless
        out["double_close"] = "ok"
    except Exception as exc:
        out["double_close"] = repr(exc)
    try:
        last.all_reduce(cp.ones(4, cp.float32))
        out["after_close"] = None
    except Exception as exc:
        out["after_close"] = type(exc).__name__
    return out


def exit_without_close_rank(rank: int, world: int, port: int, seed: int, conn) -> None:
    """Create a communicator, make one bit-checked all-reduce, report, and return without
    close(): the communicator stays referenced until the interpreter exits."""
    try:
        import detar_cupy as dc

        comm = dc.init_process_group(world, rank, port=port, timeout=60)
        ok = _checked_all_reduce(comm, seed)
        _KEEP.append(comm)
        conn.send({"ok": ok, "reported_at": time.time()})
    except BaseException:
        conn.send({"crash": traceback.format_exc()})
