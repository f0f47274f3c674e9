"""Bad-input checks run inside spawned ranks: each must raise the named exception with a message
naming the problem, before anything is launched, and leave the communicator usable. Also the edge
inputs that must NOT fail: empty arrays (a real, empty meeting of the ranks) and counts at and one
past what one launch holds (chunked); and the set-ups that must fail before any work: two ranks on
one GPU, more ranks than GPUs."""
from __future__ import annotations

import hashlib
import os
import time
import traceback

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


LATE_S = 0.3  # how long ranks > 0 wait before an empty call that rank 0 must wait for


def _empty_meets_peers(comm, results, label, call) -> None:
    """``call()`` on an empty array returns an empty array of the input's dtype without error,
    and is a real meeting: ranks > 0 arrive LATE_S late and rank 0's call must not finish before
    them (a zero-size call that skipped its launch would return at once)."""
    import cupy as cp

    try:  # once untimed: loads the kernel module, so the timed call below is only the meeting
        call()
        comm.synchronize()
    except Exception as exc:
        results.append((label, False, f"raised {type(exc).__name__}: {exc}"))
        return
    comm.exchange(None)  # the ranks leave the host barrier together
    if comm.rank != 0:
        time.sleep(LATE_S)
    start = time.perf_counter()
    try:
        got = call()
        comm.synchronize()
    except Exception as exc:
        results.append((label, False, f"raised {type(exc).__name__}: {exc}"))
        return
    waited = time.perf_counter() - start
    ok = (isinstance(got, cp.ndarray) and got.size == 0 and got.dtype == cp.float32
          and (comm.rank != 0 or waited >= 0.8 * LATE_S))
    results.append((label, ok, f"size {got.size} dtype {got.dtype}, rank {comm.rank} "
                               f"waited {waited:.3f} s for peers {LATE_S} s late"))


def bad_inputs_rank(comm):
    import cupy as cp

    import detar_cupy as dc

    r = []
    x = cp.arange(1000, dtype=cp.float32)
    gpus = cp.cuda.runtime.getDeviceCount()
    if gpus > 1:  # ranks sharing the only GPU (DETAR_SHARE_GPUS) have no other GPU to try
        with cp.cuda.Device((comm.device.id + 1) % gpus):
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
    if gpus > 1:
        _expect(r, "out on another GPU", ValueError, "GPU", lambda: comm.all_reduce(x, elsewhere))
    _expect(r, "out non-contiguous", ValueError, "contiguous",
            lambda: comm.all_reduce(x, cp.empty(2000, cp.float32)[::2]))
    # A partial overlap is not refused (a refusal that depends on pointers could differ between
    # ranks): the input is copied first, and the result is exact.
    buf = cp.arange(1001, dtype=cp.float32)
    try:
        comm.all_reduce(buf[:1000], buf[1:])
        comm.synchronize()
        want = reference.all_reduce([np.arange(1000, dtype=np.float32)] * comm.world_size)
        r.append(("partial overlap is exact", reference.bits_equal(cp.asnumpy(buf[1:]), want), ""))
    except Exception as exc:
        r.append(("partial overlap is exact", False, f"raised {type(exc).__name__}: {exc}"))
    _expect(r, "dtype= with other itemsize", TypeError, "bfloat16",
            lambda: comm.all_reduce(x, dtype="bfloat16"))
    _expect(r, "not an array", TypeError, "GPU array", lambda: comm.all_reduce(np.ones(4)))
    _expect(r, "reduce_scatter indivisible", ValueError, "multiple",
            lambda: comm.reduce_scatter(cp.ones(comm.world_size * 10 + 1, cp.float32)))
    _expect(r, "broadcast root out of range", ValueError, "root",
            lambda: comm.broadcast(x, root=comm.world_size))
    _expect(r, "all_gather count past the input", ValueError, "count",
            lambda: comm.all_gather(x, count=1001))

    def set_timeout(value):
        comm.timeout = value

    _expect(r, "timeout not a positive number", ValueError, "timeout",
            lambda: set_timeout(float("nan")))
    # Empty arrays: an empty result, no error, and the call still meets the peers (rank 0 must
    # wait for the late ones on the device).
    empty = cp.empty(0, cp.float32)
    _empty_meets_peers(comm, r, "empty all_reduce", lambda: comm.all_reduce(empty))
    _empty_meets_peers(comm, r, "empty reduce_scatter", lambda: comm.reduce_scatter(empty))
    _empty_meets_peers(comm, r, "empty all_gather", lambda: comm.all_gather(empty))
    _empty_meets_peers(comm, r, "empty broadcast", lambda: comm.broadcast(empty))
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


# ---- capacity boundaries ----------------------------------------------------------------------
BOUNDARY_DTYPES = ("float16", "bfloat16", "float32", "float64", "uint8")


def capacities(world: int, itemsize: int, stage_half_bytes: int, ll_bytes: int) -> dict[str, int]:
    """Elements one launch of each all-reduce algorithm holds, from the documented buffer layout
    (one_shot: N slots of the chunk in a staging half; two_shot: N slots of a slice plus N gather
    slots; ll: the LL area), written out here rather than taken from the library's plan code."""
    k = 16 // itemsize  # elements per 16-byte pack
    return {"one_shot": (stage_half_bytes // 16 // world) * k,
            "two_shot": (stage_half_bytes // 16 // (2 * world)) * world * k,
            "ll": (ll_bytes // 16) * k}


def capacity_boundaries_rank(comm, stage_half_bytes: int, ll_bytes: int, seed: int):
    """For every algorithm and dtype: the largest count one launch holds (one launch) and one
    element more (two launches, i.e. chunked, not a failure), out of place and in place, bit for
    bit against the reference. Rows: (label, ok, detail, digest of the output)."""
    import cupy as cp

    from detar_cupy import _plan
    from detar_cupy.dtypes import numpy_dtype
    from gpu_cases import random_values

    world, rank = comm.world_size, comm.rank
    rows = []
    case = 0
    for name in BOUNDARY_DTYPES:
        dt = numpy_dtype(name)
        raw = np.uint16 if name == "bfloat16" else dt  # CuPy 13 has no bfloat16
        for alg, cap in capacities(world, dt.itemsize, stage_half_bytes, ll_bytes).items():
            for count, launches in ((cap, 1), (cap + 1, 2)):
                case += 1
                host = [random_values(np.random.default_rng([seed, case, q]), name, count)
                        for q in range(world)]
                want = reference.all_reduce(host)
                poison = ~want.view(f"u{dt.itemsize}")  # differs from the answer in every bit
                x = cp.asarray(host[rank].view(raw))
                out = cp.asarray(poison).view(raw)
                label = f"{name} {alg} n={count} ({'cap' if launches == 1 else 'cap+1'})"
                try:
                    # The launches the planner makes for this call with the communicator's
                    # geometry (checked against the documented capacities above).
                    n_launches = len(_plan.all_reduce(comm.geometry, name, "sum", count, alg))
                    comm.all_reduce(x, out, algorithm=alg, dtype=name)
                    comm.all_reduce(x, x, algorithm=alg, dtype=name)  # in place, same plan
                    comm.synchronize()
                except Exception as exc:
                    rows.append((label, False, f"raised {type(exc).__name__}: {exc}", ""))
                    continue
                got = cp.asnumpy(out).view(dt)
                got_in_place = cp.asnumpy(x).view(dt)
                ok = (reference.bits_equal(got, want) and reference.bits_equal(got_in_place, want)
                      and n_launches == launches)
                rows.append((label, ok, f"{n_launches} launch(es), expected {launches}",
                             hashlib.sha256(got.tobytes()).hexdigest()[:16]))
    return rows


# ---- set-ups refused at start: two ranks on one GPU, disagreeing settings ---------------------
def _report_start(conn, world: int, rank: int, port: int, device: int | None) -> None:
    """init_process_group (``device`` None: its default, rank % GPUs), then send {"type",
    "text"}: the exception it raised ("crash" for a failure outside it), or None when it
    started."""
    try:
        import detar_cupy as dc

        try:
            comm = dc.init_process_group(world, rank, port=port, device=device, timeout=30)
        except Exception as exc:
            conn.send({"type": type(exc).__name__, "text": str(exc)})
            return
        comm.close()
        conn.send({"type": None, "text": "no error"})
    except BaseException:
        conn.send({"type": "crash", "text": traceback.format_exc()})


def same_gpu_rank(rank: int, world: int, port: int, conn) -> None:
    """init_process_group with device 0 on every rank: must raise (RendezvousError expected)."""
    _report_start(conn, world, rank, port, 0)


def settings_rank(rank: int, world: int, port: int, name: str, value: str, conn) -> None:
    """init_process_group where only rank 1 sets ``name`` to ``value``: every rank must refuse
    (MismatchError naming the setting) instead of running with disagreeing buffers or grids."""
    if rank == 1:
        os.environ[name] = value
    _report_start(conn, world, rank, port, None)


def never_runs(comm) -> None:
    """The fn of spawn calls that must be refused before any process starts."""
    raise AssertionError("this rank should never have been started")
