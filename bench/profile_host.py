"""Where the host time of one small all_reduce goes: cProfile of 20,000 eager calls on rank 0.

    python bench/profile_host.py [world]
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys


def profile_rank(comm) -> str:
    import cupy as cp

    x = cp.ones(512, cp.float16)
    for _ in range(100):
        comm.all_reduce(x, x)
    comm.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20000):
        comm.all_reduce(x, x)
    prof.disable()
    comm.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


if __name__ == "__main__":
    import detar_cupy as dc

    print(dc.spawn(profile_rank, int(sys.argv[1]) if len(sys.argv) > 1 else 2)[0])
