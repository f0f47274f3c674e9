"""Bad-input checks run inside spawned ranks: each must raise the named exception with a message
naming the problem, before anything is launched, and leave the communicator usable."""
from __future__ import annotations

import numpy as np

from detar_cupy import reference


def _expect(results, label, exc_type, needle, fn):
    try:
        fn()
    except exc_type as exc:
        ok = needle.lower() in str(exc).lower()
        results.append((label, ok, f"{type(exc).__name__}: {exc}"))
    except Exception as exc:  # the wrong exception type is a failure, with its text
        results.append((label, False, f"wrong exception {type(exc).__name__}: {exc}"))
    else:
        results.append((label, False, "no exception"))


def bad_inputs_rank(comm):
    import cupy as cp

    import detar_cupy as dc

    r = []
    x = cp.arange(1000, dtype=cp.float32)
    other = (comm.device.id + 1) % cp.cuda.runtime.getDeviceCount()
    with cp.cuda.Device(other):
        elsewhere = cp.ones(1000, cp.float32)
    _expect(r, "input on another GPU", ValueError, "GPU", lambda: comm.all_reduce(elsewhere))
    _expect(r, "non-contiguous input", ValueError, "contiguous", lambda: comm.all_reduce(x[::2]))
    _expect(r, "max of complex", TypeError, "complex64",
            lambda: comm.all_reduce(cp.ones(8, cp.complex64), op="max"))
    _expect(r, "avg of int", TypeError, "int32", lambda: comm.all_reduce(cp.ones(8, cp.int32), op="avg"))
    _expect(r, "unknown op", ValueError, "median", lambda: comm.all_reduce(x, op="median"))
    _expect(r, "unknown algorithm", ValueError, "ring", lambda: comm.all_reduce(x, algorithm="ring"))
    _expect(r, "unsupported dtype", TypeError, "bool", lambda: comm.all_reduce(cp.ones(8, cp.bool_)))
    _expect(r, "out wrong size", ValueError, "elements",
            lambda: comm.all_reduce(x, cp.empty(999, cp.float32)))
    _expect(r, "out wrong dtype", TypeError, "dtype",
            lambda: comm.all_reduce(x, cp.empty(1000, cp.float64)))
    _expect(r, "out on another GPU", ValueError, "GPU", lambda: comm.all_reduce(x, elsewhere))
    _expect(r, "out non-contiguous", ValueError, "contiguous",
            lambda: comm.all_reduce(x, cp.empty(2000, cp.float32)[::2]))
    buf = cp.arange(1001, dtype=cp.float32)
    _expect(r, "partial overlap", ValueError, "overlap",
            lambda: comm.all_reduce(buf[:1000], buf[1:]))
    _expect(r, "dtype= with other itemsize", TypeError, "bfloat16",
            lambda: comm.all_reduce(x, dtype="bfloat16"))
    _expect(r, "not an array", TypeError, "GPU array", lambda: comm.all_reduce(np.ones(4)))
    _expect(r, "reduce_scatter indivisible", ValueError, "multiple",
            lambda: comm.reduce_scatter(cp.ones(comm.world_size * 10 + 1, cp.float32)))
    _expect(r, "broadcast root out of range", ValueError, "root",
            lambda: comm.broadcast(x, root=comm.world_size))
    # The communicator still works, bit for bit, after all of that.
    inputs = [np.random.default_rng([5, q]).standard_normal(777).astype(np.float16)
              for q in range(comm.world_size)]
    got = cp.asnumpy(comm.all_reduce(cp.asarray(inputs[comm.rank])))
    r.append(("still works after bad inputs", reference.bits_equal(got, reference.all_reduce(inputs)), ""))
    comm.close()
    _expect(r, "closed communicator", dc.CommunicatorClosedError, "closed",
            lambda: comm.all_reduce(x))
    comm.close()  # a second close is harmless
    r.append(("double close", True, ""))
    return r


def world_one_rank(comm):
    """World size 1 is a copy with the contract's conversions (bf16/f32 denormals flushed)."""
    import cupy as cp

    from detar_cupy.dtypes import numpy_dtype

    out = []
    for name in ("float16", "bfloat16", "float32", "int8", "complex128"):
        dt = numpy_dtype(name)
        host = np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).view(dt)
        for alg in ("auto", "ll", "one_shot", "two_shot"):
            raw = host.view(np.uint16) if name == "bfloat16" else host  # CuPy 13 has no bf16
            got = cp.asnumpy(comm.all_reduce(cp.asarray(raw), algorithm=alg,
                                             dtype=name if name == "bfloat16" else None))
            want = reference.all_reduce([host])
            out.append((f"{name} {alg}", reference.bits_equal(got.view(dt), want), ""))
    return out
