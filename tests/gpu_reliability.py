"""Workers of the reliability tests (module-level: the spawn start method imports them by name).

- :func:`dead_peer_rank`: a raw process per rank; one rank SIGKILLs itself in the middle of a loop
  of all-reduces, the survivors report what they raised and how the communicator behaved after.
- :func:`mismatch_all_variants`: one spawned group runs every mismatched-call variant, each on a
  fresh communicator, then checks that a fresh communicator is still bit-exact.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
import traceback
from typing import Any

import numpy as np

from detar_cupy import reference

# ---- dead peer --------------------------------------------------------------------------------
TIMEOUT_S = 2.0  # DETAR_TIMEOUT of the dead-peer ranks: the detection bound under test
WARM_CALLS = 10  # compile/load the kernels and fill the launch path before anything is timed
LOOP_CALLS = 20  # calls every rank issues in the loop the victim dies in …
KILL_AT = 5  # … the victim SIGKILLs itself before issuing this one (earlier ones may be in flight)
ALG_COUNT = {"ll": 2048, "one_shot": 1 << 16, "two_shot": 1 << 20}  # float32 elements


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on loopback a moment ago (all held open together,
    so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _raised(fn) -> Any:
    """The exception ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def _same_error(again: Any, first: BaseException) -> dict:
    """How a later raise compares with the first one (the error must be sticky)."""
    if again is None:
        return {"type": None, "same_object": False, "same_text": False, "peer": None}
    return {"type": type(again).__name__, "same_object": again is first,
            "same_text": str(again) == str(first), "peer": getattr(again, "peer", None)}


def process_group(rank: int, world: int, port: int) -> Any:
    """The dead-peer test's communicator: init_process_group on loopback ``port``."""
    import detar_cupy as dc

    return dc.init_process_group(world, rank, port=port, timeout=60)


def dead_peer_rank(rank: int, world: int, port: int, alg: str, victim: int, seed: int,
                   make: Any, conn) -> None:
    """One rank of the dead-peer test; sends one report dict through ``conn``. ``make``: a
    module-level ``(rank, world, port) -> communicator`` (:func:`process_group` by default).

    All ranks warm up, meet on the host, then issue LOOP_CALLS all-reduces without synchronising;
    the victim sends the time and SIGKILLs itself before its KILL_AT-th call. A survivor records
    when and what it raised, whether the next call and check() raise the same error again,
    whether close() works and what a call after close() raises; then it returns (exit code 0)."""
    try:
        import cupy as cp

        comm = (make or process_group)(rank, world, port)
        host = np.random.default_rng([seed, rank]).standard_normal(ALG_COUNT[alg])
        x = cp.asarray(host.astype(np.float32))
        out = cp.empty_like(x)
        for _ in range(WARM_CALLS):
            comm.all_reduce(x, out, algorithm=alg)
        comm.synchronize()
        comm.exchange(None)  # every rank is at the same call count when the loop starts
        # The short bound only from here: a first call that loads kernels must not time out.
        comm.timeout = TIMEOUT_S
        report: dict[str, Any] = {"timeout": comm.timeout, "transport": str(comm.transport)}
        error = None
        try:
            for i in range(LOOP_CALLS):
                if rank == victim and i == KILL_AT:
                    conn.send({"killed_at": time.time()})  # a pipe write: nothing left to flush
                    conn.close()
                    os.kill(os.getpid(), signal.SIGKILL)
                comm.all_reduce(x, out, algorithm=alg)
            comm.synchronize()
            # Not noticed yet: keep calling for a bounded while, then report that nothing came.
            end = time.time() + 5 * TIMEOUT_S
            while time.time() < end:
                comm.all_reduce(x, out, algorithm=alg)
                comm.synchronize()
        except Exception as exc:
            error = exc
            report["raised_at"] = time.time()
        if error is None:
            report["type"] = None
        else:
            report.update(type=type(error).__name__, text=str(error),
                          peer=getattr(error, "peer", None))
            report["again"] = _same_error(
                _raised(lambda: comm.all_reduce(x, out, algorithm=alg)), error)
            report["check"] = _same_error(_raised(comm.check), error)
        close_error = _raised(comm.close)
        report["close"] = "ok" if close_error is None else repr(close_error)
        report["close_again"] = repr(_raised(comm.close))
        after = _raised(lambda: comm.all_reduce(x, out, algorithm=alg))
        report["after_close"] = type(after).__name__ if after is not None else None
        conn.send(report)
    except BaseException:
        conn.send({"crash": traceback.format_exc()})


# ---- mismatched calls -------------------------------------------------------------------------
FIELDS = ("collective", "algorithm", "dtype", "op", "count", "aux", "chunk")
CALL_DEFAULTS = {"n": 1000, "dtype": "float16", "op": "sum", "algorithm": "auto"}

# variant: (calls of ranks 0..N-2, calls of the last rank, fields MismatchError.differs must name,
#           whether differs must be exactly those fields (else: contain them)).
MISMATCHES: dict[str, tuple[list[dict], list[dict], tuple[str, ...], bool]] = {
    "count": ([dict(n=1000)], [dict(n=1001)], ("count",), False),
    "dtype": ([dict(dtype="float16")], [dict(dtype="bfloat16")], ("dtype",), True),
    "op": ([dict(op="sum")], [dict(op="max")], ("op",), True),
    "algorithm_ll_vs_one_shot": ([dict(algorithm="ll")], [dict(algorithm="one_shot")],
                                 ("algorithm",), True),
    "algorithm_one_vs_two_shot": ([dict(algorithm="one_shot")], [dict(algorithm="two_shot")],
                                  ("algorithm",), True),
    "skipped_call": ([dict(n=1000), dict(n=3000)], [dict(n=3000)], ("count",), False),
    # both counts span several chunks whose first launches have the same length: every launch's
    # signature covers the whole call, so the first launch already differs
    "chunked_count": ([dict(n=16 << 20)], [dict(n=24 << 20)], ("count",), False),
}

# (field, call key) of the fields whose values the test can predict from the calls.
PREDICTABLE = {"count": "n", "dtype": "dtype", "op": "op", "algorithm": "algorithm"}


def first_call(variant: str, side: int) -> dict:
    """The first call of side 0 (ranks 0..N-2) or 1 (last rank), defaults filled in."""
    return {**CALL_DEFAULTS, **MISMATCHES[variant][side][0]}


def _plain(d: Any) -> Any:
    """A picklable copy of a MismatchError field dict (ints, strings and None kept, the rest
    str())."""
    if not isinstance(d, dict):
        return None if d is None else repr(d)
    return {str(k): v if v is None or isinstance(v, (int, str)) else str(v) for k, v in d.items()}


def _device_input(cp, seed: int, rank: int, n: int, dtype: str):
    """Seeded random input of ``n`` elements (bfloat16 as raw uint16: CuPy 13 has no bfloat16)."""
    vals = np.random.default_rng([seed, rank]).standard_normal(n).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return cp.asarray(vals.astype(ml_dtypes.bfloat16).view(np.uint16))
    return cp.asarray(vals.astype(dtype))


def _one_mismatch(comm, variant: str, port: int, seed: int) -> dict:
    """Run one variant on a fresh communicator; what was raised, how fast, and whether sticky."""
    import cupy as cp

    import detar_cupy as dc

    world, rank = comm.world_size, comm.rank
    side = 0 if rank < world - 1 else 1
    c = dc.init_process_group(world, rank, port=port, device=comm.device.id, timeout=60)
    rec: dict[str, Any] = {"side": side}
    try:
        calls = []
        for call in MISMATCHES[variant][side]:
            call = {**CALL_DEFAULTS, **call}
            x = _device_input(cp, seed, rank, call["n"], call["dtype"])
            calls.append((x, dict(op=call["op"], algorithm=call["algorithm"], dtype=call["dtype"])))
        c.barrier()  # aligns the ranks, so the time below is detection, not start-up skew
        start = time.perf_counter()
        error = None
        try:
            for x, kw in calls:
                c.all_reduce(x, **kw)
            c.synchronize()
        except Exception as exc:
            error = exc
        rec["elapsed"] = time.perf_counter() - start
        if error is None:
            rec["type"] = None
            return rec
        rec.update(type=type(error).__name__, text=str(error), peer=getattr(error, "peer", None),
                   differs=getattr(error, "differs", None), mine=_plain(getattr(error, "mine", None)),
                   theirs=_plain(getattr(error, "theirs", None)))
        if rec["differs"] is not None:
            rec["differs"] = tuple(rec["differs"])
        small = cp.ones(4, cp.float32)
        rec["again"] = _same_error(_raised(lambda: c.all_reduce(small)), error)
        rec["check"] = _same_error(_raised(c.check), error)
        return rec
    finally:
        close_error = _raised(c.close)
        rec["close"] = "ok" if close_error is None else repr(close_error)


def _fresh_is_exact(comm, port: int, seed: int) -> list[tuple[str, bool, str]]:
    """A fresh communicator after all the mismatches: every algorithm bit-exact, output poisoned
    first (with the complement of the expected bits, so every element must be written)."""
    import cupy as cp

    import detar_cupy as dc
    from detar_cupy.dtypes import numpy_dtype

    world, rank = comm.world_size, comm.rank
    rows = []
    with dc.init_process_group(world, rank, port=port, device=comm.device.id, timeout=60) as c:
        for i, dtype in enumerate(("float16", "bfloat16", "float32")):
            host = [np.random.default_rng([seed, i, r]).standard_normal(4099)
                    .astype(np.float32).astype(numpy_dtype(dtype)) for r in range(world)]
            want = reference.all_reduce(host)
            raw = np.uint16 if dtype == "bfloat16" else numpy_dtype(dtype)
            x = cp.asarray(host[rank].view(raw))
            for alg in ("ll", "one_shot", "two_shot", "auto"):
                out = cp.asarray(~want.view(f"u{want.itemsize}")).view(raw)
                c.all_reduce(x, out, algorithm=alg, dtype=dtype)
                c.synchronize()
                got = cp.asnumpy(out).view(want.dtype)
                rows.append((f"{dtype} {alg}", reference.bits_equal(got, want),
                             hashlib.sha256(got.tobytes()).hexdigest()[:16]))
    return rows


def mismatch_all_variants(comm, seed: int) -> dict:
    """Every variant of MISMATCHES in turn, each on a fresh communicator on its own agreed port;
    then a fresh communicator must still be bit-exact. Returns {"variants": {variant: record},
    "fresh": rows}."""
    import cupy as cp

    names = list(MISMATCHES)
    # Rank 0 picks the ports; exchange() returns every rank's object, rank 0's first.
    ports = comm.exchange(free_ports(len(names) + 1) if comm.rank == 0 else None)[0]
    # Load every kernel the variants use on the long-lived communicator, so that no timed call
    # below includes a module load (kernel handles are cached per process).
    for dtype in ("float16", "bfloat16"):
        x = _device_input(cp, seed, comm.rank, 1000, dtype)
        for op in ("sum", "max"):
            for alg in ("auto", "ll", "one_shot", "two_shot"):
                comm.all_reduce(x, op=op, algorithm=alg, dtype=dtype)
    comm.synchronize()
    variants = {name: _one_mismatch(comm, name, ports[i], seed + i) for i, name in enumerate(names)}
    return {"variants": variants, "fresh": _fresh_is_exact(comm, ports[-1], seed)}
