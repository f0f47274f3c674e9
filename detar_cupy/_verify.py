"""A short determinism check that runs inside spawned ranks (``python -m detar_cupy verify``)."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from . import reference
from .dtypes import numpy_dtype

_ALGS = ("ll", "one_shot", "two_shot", "auto")


def verify_rank(comm: Any, repeats: int = 100) -> list[tuple[str, bool]]:
    """(check, passed) for: every algorithm equals the reference bit for bit, every rank gets
    the same bits, and ``repeats`` repeated calls give the same bits, for a few dtypes/sizes."""
    import cupy as cp

    results = []
    for name in ("float16", "bfloat16", "float32"):
        np_dt = numpy_dtype(name)
        for count in (1, 4097, 300_001):
            rng = [np.random.default_rng([count, r]) for r in range(comm.world_size)]
            inputs = [g.standard_normal(count).astype(np_dt) for g in rng]
            want = reference.all_reduce(inputs)
            x = cp.asarray(inputs[comm.rank])
            for alg in _ALGS:
                if alg == "ll" and count * np_dt.itemsize > comm.geometry.ll_bytes:
                    continue
                out = comm.all_reduce(x, algorithm=alg)
                first = cp.asnumpy(out)
                same = True
                for _ in range(repeats):
                    comm.all_reduce(x, out, algorithm=alg)
                    same &= bool(cp.all(out.view(cp.uint8) == cp.asarray(first).view(cp.uint8)))
                comm.check()
                # A digest, not the bytes: a result can exceed one rendezvous message (1 MiB).
                digests = comm.exchange(hashlib.sha256(first.tobytes()).digest())
                ok = reference.bits_equal(first, want) and same and len(set(digests)) == 1
                results.append((f"{name} n={count} {alg}", ok))
    return results
