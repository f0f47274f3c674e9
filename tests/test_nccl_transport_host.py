"""The NCCL transport's host code on a CPU (tests/fake_cupy.py: ranks are threads, NCCL and the
kernels are emulated): the Communicator over transport="nccl" gives the reference's bits for every
collective, allocates nothing per call, raises MismatchError on every rank of a mismatched call
without writing its output, and its watchdog turns a stalled call into PeerTimeoutError (naming
a peer whose process is gone). The GPU tests run the same code on a GPU."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

import fake_cupy as F
from detar_cupy import reference
from detar_cupy._protocol import AT_HEADER, ERR_MISMATCH
from detar_cupy.dtypes import numpy_dtype
from detar_cupy.errors import MismatchError, PeerTimeoutError


class ThreadRendezvous:
    """The rendezvous of ranks that are threads of this process."""

    def __init__(self, shared: dict, rank: int, world: int) -> None:
        self._shared, self.rank, self.world_size = shared, rank, world

    def exchange(self, obj: Any) -> list:
        self._shared["slots"][self.rank] = obj
        self._shared["barrier"].wait()
        out = list(self._shared["slots"])
        self._shared["barrier"].wait()
        return out

    def barrier(self) -> None:
        self.exchange(None)

    def close(self) -> None:
        pass


_THREAD = threading.local()  # the rank a thread plays, for its node label


def run_ranks(world: int, fn: Callable[[Any, F.Memory], Any], monkeypatch: Any,
              nodes: tuple[int, ...] | None = None) -> list:
    """``fn(comm, memory)`` on a Communicator over transport="nccl" in each of ``world`` threads
    (on contiguous simulated ``nodes`` of those sizes, if given); the ranks' results, or the
    first exception raised."""
    from detar_cupy.communicator import Communicator
    from detar_cupy.transports import select

    if nodes is not None:  # DETAR_NODE per rank: the threads share one environment
        starts = np.cumsum((0,) + nodes)
        monkeypatch.setattr(select, "node_label", lambda env=None, hostname=None: (
            f"node{int(np.searchsorted(starts, _THREAD.rank, side='right')) - 1}"))
    fake = F.World(world)
    monkeypatch.setenv("DETAR_SHARE_GPUS", "1")
    monkeypatch.setenv("DETAR_STAGING_BYTES", "512")
    monkeypatch.setenv("DETAR_TIMEOUT", "5")
    monkeypatch.delenv("DETAR_NODE", raising=False)
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world, timeout=F.WAIT_S)}
    results: list = [None] * world
    errors: list = []
    with F.installed(fake, monkeypatch) as (memory, kernels, comms):
        def body(rank: int) -> None:
            _THREAD.rank = rank
            try:
                comm = Communicator._from_rendezvous(ThreadRendezvous(shared, rank, world), 0,
                                                     "nccl")
                try:
                    results[rank] = fn(comm, memory)
                finally:
                    comm.close()
            except BaseException as exc:  # reported to the test below
                errors.append((rank, exc))

        threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    if errors:
        raise errors[0][1]
    return results


def _buffer(memory: F.Memory, data: np.ndarray | bytes) -> int:
    """A 'device' buffer holding ``data`` (counted in ``memory.ours``, not as the library's)."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    ptr = memory.alloc(len(raw))
    memory.ours = getattr(memory, "ours", 0) + 1
    F.write(ptr, raw)
    return ptr


def _values(rank: int, n: int, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rank])
    return (rng.standard_normal(n) * 4).astype(numpy_dtype(dtype))


def _calls(comm: Any, memory: F.Memory) -> dict:
    """A mix of every collective (chunked through 1 KiB of staging), checked against the
    reference; and the number of buffers allocated by calls after the first round (must be 0)."""
    n, r = comm.world_size, comm.rank
    results = {}
    allocs, ours = memory.count, getattr(memory, "ours", 0)
    for _ in range(2):  # the first round makes the plans, the second reuses them
        for i, (alg, dtype, op, count) in enumerate([
                ("one_shot", "float16", "sum", 37), ("two_shot", "bfloat16", "avg", 1001),
                ("auto", "float32", "max", 300), ("two_shot", "int16", "prod", 7)]):
            xs = [_values(q, count, dtype, i) for q in range(n)]
            src, dst = _buffer(memory, xs[r]), _buffer(memory, bytes(xs[r].nbytes))
            comm.all_reduce_buffers(src, dst, count, dtype, op, 0, alg)
            comm.synchronize()
            got = np.frombuffer(F.read(dst, xs[r].nbytes), dtype=xs[r].dtype)
            results[f"all_reduce {alg} {dtype} {op}"] = reference.bits_equal(
                got, reference.all_reduce(xs, op))
        xs = [_values(q, 150 * n, "float32", 9) for q in range(n)]
        src = _buffer(memory, xs[r])
        comm.reduce_scatter_buffers(src, src + 4 * 150 * r, 150, "float32", "min", 0)  # in place
        comm.synchronize()
        got = np.frombuffer(F.read(src + 4 * 150 * r, 600), dtype=np.float32)
        results["reduce_scatter in place"] = reference.bits_equal(
            got, reference.reduce_scatter(xs, "min")[r])
        xs = [_values(q, 333, "float16", 10) for q in range(n)]
        src, dst = _buffer(memory, xs[r]), _buffer(memory, bytes(666 * n))
        comm.all_gather_buffers(src, dst, 333, 2, 0)
        comm.synchronize()
        results["all_gather"] = F.read(dst, 666 * n) == reference.all_gather(xs).tobytes()
        root = n - 1
        x = _values(root, 501, "float64", 11)
        buf = _buffer(memory, x if r == root else bytes(x.nbytes))
        comm.broadcast_buffers(buf, 501, 8, root, 0)
        comm.barrier()
        results["broadcast"] = F.read(buf, x.nbytes) == x.tobytes()
    comm.barrier()  # every rank's allocations are counted (memory is shared by the threads)
    results["allocated by calls"] = (memory.count - allocs) - (memory.ours - ours)
    return results


@pytest.mark.parametrize("world,nodes", [(1, None), (2, None), (3, None), (4, (2, 2)),
                                         (5, (1, 2, 2)), (5, (3, 2))])
def test_every_collective_is_exact_and_allocates_nothing(world: int, nodes, monkeypatch) -> None:
    per_rank = run_ranks(world, lambda comm, memory: (str(comm.transport), _calls(comm, memory)),
                         monkeypatch, nodes)
    for rank, (transport, res) in enumerate(per_rank):
        assert transport == ("nccl" if nodes is None else "hierarchical")
        assert res.pop("allocated by calls") == 0, rank
        assert all(res.values()), (rank, res)


def _mismatch(comm: Any, memory: F.Memory) -> dict:
    n = 1000 + (comm.rank == comm.world_size - 1)
    x = _values(comm.rank, n, "float16", 3)
    src, dst = _buffer(memory, x), _buffer(memory, b"\xa5" * x.nbytes)
    comm.all_reduce_buffers(src, src, 4, "float16", "sum", 0, "two_shot")  # plans warm
    comm.synchronize()
    error = None
    try:
        comm.all_reduce_buffers(src, dst, n, "float16", "sum", 0, "two_shot")
        comm.synchronize()
    except Exception as exc:
        error = exc
    again = None
    try:
        comm.check()
    except Exception as exc:
        again = exc
    return {"error": error, "untouched": F.read(dst, x.nbytes) == b"\xa5" * x.nbytes,
            "sticky": again is error}


@pytest.mark.parametrize("nodes", [None, (2, 2)])
def test_mismatch_raises_on_every_rank_and_writes_nothing(nodes, monkeypatch) -> None:
    world = 3 if nodes is None else sum(nodes)
    per_rank = run_ranks(world, _mismatch, monkeypatch, nodes)
    for rank, res in enumerate(per_rank):
        err = res["error"]
        assert isinstance(err, MismatchError), (rank, err)
        last = world - 1
        assert err.differs == ("count",) and err.peer == (last if rank < last else 0), str(err)
        assert res["untouched"] and res["sticky"], (rank, res)


def _stall(comm: Any, memory: F.Memory) -> dict:
    """One good call, then a call whose end never comes: the watchdog must give up on it."""
    x = _values(0, 64, "float32", 4)
    src = _buffer(memory, x)
    comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")
    comm.synchronize()
    comm.timeout = 0.2
    if comm.rank == 0:
        F.stall_events(1)  # the call's start event completes, its end event never does
    comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")
    error = None
    try:
        for _ in range(100):  # about 2 s: the 0.2 s timeout plus the watchdog's period
            comm.check()
            threading.Event().wait(0.02)
    except Exception as exc:
        error = exc
    return {"error": error, "aborted": comm.rank in comm._transport._nc.world.aborted}


def test_watchdog_turns_a_stalled_call_into_peer_timeout(monkeypatch) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # a process of this host that has exited (and been reaped)

    def body(comm: Any, memory: F.Memory) -> dict:
        facts = comm._transport._facts
        facts[1] = facts[1]._replace(pid=dead_pid)
        return _stall(comm, memory)

    res, other = run_ranks(2, body, monkeypatch)
    assert other["error"] is None and not other["aborted"]  # rank 1's call completed
    err = res["error"]
    assert isinstance(err, PeerTimeoutError), err
    assert err.peer == 1 and "peer rank 1" in str(err) and "has exited" in str(err), str(err)
    assert "more than 0.2 s" in str(err) and "all_reduce" in str(err), str(err)
    assert res["aborted"]


def _captured(comm: Any, memory: F.Memory) -> dict:
    """Calls made while the stream is being captured are not tracked by the watchdog (their
    events could not be queried) and still give the reference's bits."""
    import cupy

    xs = [_values(q, 500, "float16", 12) for q in range(comm.world_size)]
    src = _buffer(memory, xs[comm.rank])
    comm.barrier()
    rt = cupy.cuda.runtime
    capturing, record = rt.streamIsCapturing, rt.eventRecord
    recorded = []
    rt.streamIsCapturing = lambda stream: True
    rt.eventRecord = lambda ev, stream: recorded.append(ev)
    try:
        comm.all_reduce_buffers(src, src, 500, "float16", "sum", 0, "two_shot")
    finally:
        rt.streamIsCapturing, rt.eventRecord = capturing, record
    comm.synchronize()
    got = np.frombuffer(F.read(src, 1000), dtype=np.float16)
    return {"events": len(recorded), "exact": reference.bits_equal(got, reference.all_reduce(xs))}


def test_captured_calls_are_not_tracked(monkeypatch) -> None:
    (res,) = run_ranks(1, _captured, monkeypatch)
    assert res == {"events": 0, "exact": True}


def _stalled_synchronize(comm: Any, memory: F.Memory) -> dict:
    """A call whose end never comes: synchronize() must raise once the watchdog has given up,
    not wait for the stream (which, on a GPU, drains only when NCCL's abort has finished)."""
    x = _values(0, 64, "float32", 5)
    src = _buffer(memory, x)
    comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")
    comm.synchronize()
    comm.timeout = 0.2
    F.stall_events(1)  # the call's start event completes; nothing recorded later ever does
    comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")
    error, start = None, time.monotonic()
    try:
        comm.synchronize()
    except Exception as exc:
        error = exc
    return {"error": error, "seconds": time.monotonic() - start}


def test_synchronize_raises_a_stall_without_waiting_for_the_stream(monkeypatch) -> None:
    (res,) = run_ranks(1, _stalled_synchronize, monkeypatch)
    assert isinstance(res["error"], PeerTimeoutError), res
    assert res["seconds"] < 2.0, res


def _calls_behind_a_stall(comm: Any, memory: F.Memory) -> dict:
    """Calls issued behind a stalled one: at most _IN_FLIGHT reach NCCL (whose enqueue blocks
    in the library once its queue for a stalled peer is full, where no failure can reach the
    caller); the caller waits in Python instead and its next call raises the stall."""
    from detar_cupy.transports import nccl

    x = _values(0, 64, "float32", 7)
    src = _buffer(memory, x)
    before = len(comm._transport._nc.calls)
    comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")
    comm.synchronize()
    comm.timeout = 0.2
    enqueued = len(comm._transport._nc.calls)
    per_call = enqueued - before  # NCCL operations of one such call
    F.stall_events(1)  # the first call's start completes, its end and everything later never do
    error, issued = None, 0
    try:
        for issued in range(1, 4 * nccl._IN_FLIGHT + 1):
            comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")
    except Exception as exc:
        error = exc
    return {"error": error, "issued": issued, "limit": nccl._IN_FLIGHT,
            "calls_in_nccl": (len(comm._transport._nc.calls) - enqueued) / per_call}


def test_calls_behind_a_stall_wait_in_python_and_raise(monkeypatch) -> None:
    (res,) = run_ranks(1, _calls_behind_a_stall, monkeypatch)
    assert isinstance(res["error"], PeerTimeoutError), res
    # Calls 1..limit reach NCCL; the next waits until the watchdog records the stall, then
    # returns without enqueuing (as a launch on a failed IPC communicator is a no-op); the one
    # after it raises.
    assert res["calls_in_nccl"] == res["limit"], res
    assert res["issued"] == res["limit"] + 2, res


def _nccl_error_then(report_mismatch: bool) -> Callable[[Any, F.Memory], dict]:
    def body(comm: Any, memory: F.Memory) -> dict:
        """NCCL reports an error first (a mismatched call's transfer, seen by its proxy before
        the GPU ran our header check); the check's report, if it comes within the grace, is
        what the rank raises. The error names no call that had completed."""
        x = _values(0, 64, "float32", 6)
        src = _buffer(memory, x)
        transport = comm._transport
        transport._nc.async_error = "remote error: message truncated"
        comm.all_reduce_buffers(src, src, 64, "float32", "sum", 0, "one_shot")  # completes
        threading.Event().wait(0.2)  # several watchdog periods, within the grace
        early = None
        try:
            comm.check()
        except Exception as exc:
            early = exc
        if report_mismatch:  # what the header check kernel writes
            r = transport.report
            r.sig, r.peer_sig, r.count, r.peer_count = 1 << 61, 1 << 61, 64, 65
            r.word = ERR_MISMATCH | (AT_HEADER << 16)
        error = None
        for _ in range(100):
            try:
                comm.check()
            except Exception as exc:
                error = exc
                break
            threading.Event().wait(0.02)
        return {"early": early, "error": error}
    return body


def test_an_nccl_error_waits_for_the_header_check(monkeypatch) -> None:
    (res,) = run_ranks(1, _nccl_error_then(True), monkeypatch)
    assert res["early"] is None, res
    assert isinstance(res["error"], MismatchError), res


def test_an_nccl_error_alone_is_a_peer_timeout_naming_no_finished_call(monkeypatch) -> None:
    (res,) = run_ranks(1, _nccl_error_then(False), monkeypatch)
    err = res["error"]
    assert isinstance(err, PeerTimeoutError) and "message truncated" in str(err), err
    assert "call #1" not in str(err), str(err)
