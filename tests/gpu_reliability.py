"""Workers of the reliability tests (module-level: the spawn start method imports them by name)."""
from __future__ import annotations

import os
import signal
import time

ALG_COUNT = {"ll": 2048, "one_shot": 1 << 16, "two_shot": 1 << 20}


def dead_peer_rank(rank: int, world: int, port: int, alg: str, victim: int, queue) -> None:
    """All ranks loop all-reduces; ``victim`` SIGKILLs itself; survivors report what they saw."""
    os.environ["DETAR_TIMEOUT"] = "3"
    import cupy as cp

    import detar_cupy as dc

    comm = dc.init_process_group(world, rank, port=port, device=rank, timeout=60)
    x = cp.ones(ALG_COUNT[alg], cp.float32)
    for _ in range(20):
        comm.all_reduce(x, x, algorithm=alg)
    comm.synchronize()
    comm._rdv.barrier()
    if rank == victim:
        queue.put((rank, "killed", time.time(), ""))
        queue.close()
        queue.join_thread()  # the queue's feeder thread must flush before SIGKILL
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.time()
    outcome = ("no error", "")
    try:
        while time.time() - start < 60:
            for _ in range(10):
                comm.all_reduce(x, x, algorithm=alg)
            comm.synchronize()
    except Exception as exc:  # anything but PeerTimeoutError fails the test, with its text
        outcome = (type(exc).__name__, f"peer={getattr(exc, 'peer', None)} {exc}")
    seen = time.time()
    try:
        comm.close()  # the device is idle again: close() synchronises it
    except Exception as exc:
        outcome = (outcome[0], f"{outcome[1]}; close() raised {type(exc).__name__}: {exc}")
    queue.put((rank, outcome[0], seen, outcome[1]))


# Per variant: (kwargs of rank 0, kwargs of the last rank), each a list of calls.
MISMATCHES = {
    "count": ([dict(n=1000)], [dict(n=1001)]),
    "dtype": ([dict(dtype="float16")], [dict(dtype="bfloat16")]),
    "op": ([dict(op="sum")], [dict(op="max")]),
    "algorithm_ll_vs_one_shot": ([dict(algorithm="ll")], [dict(algorithm="one_shot")]),
    "algorithm_one_vs_two_shot": ([dict(algorithm="one_shot")], [dict(algorithm="two_shot")]),
    "skipped_call": ([dict(n=1000), dict(n=3000)], [dict(n=3000)]),
}


def mismatch_rank(comm, variant: str):
    """Make this rank's calls of ``variant``; return what was raised and whether it is sticky."""
    import cupy as cp

    import detar_cupy as dc

    mine = MISMATCHES[variant][0 if comm.rank < comm.world_size - 1 else 1]
    for dtype in (cp.float16, cp.uint16):  # compile first, so the timing below is detection only
        comm.all_reduce(cp.ones(8, dtype), dtype="bfloat16" if dtype == cp.uint16 else None)
    comm.synchronize()
    start = time.time()
    try:
        for call in mine:
            dtype = call.get("dtype", "float16")
            x = cp.ones(call.get("n", 1000), dtype if dtype != "bfloat16" else cp.uint16)
            comm.all_reduce(x, op=call.get("op", "sum"), algorithm=call.get("algorithm", "auto"),
                            dtype=dtype)
        comm.synchronize()
        return ("no error", "", time.time() - start, False)
    except dc.DetarError as exc:
        elapsed = time.time() - start
        try:
            comm.all_reduce(cp.ones(4, cp.float32))
            sticky = False
        except dc.DetarError as again:
            sticky = again is exc or str(again) == str(exc)
        return (type(exc).__name__, str(exc), elapsed, sticky)
