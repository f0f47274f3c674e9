"""The NCCL/RCCL transport: NCCL (``cupy.cuda.nccl``; RCCL on ROCm) moves the bytes between
ranks, our kernels (``hip_src/fold.hip``) fold them in rank order, so the bits are those of the
IPC transport and of :mod:`detar_cupy.reference`. NCCL never reduces.

- flat (``"nccl"``): every byte through one NCCL communicator; any layout of ranks and hosts.
- ``"hierarchical"``: inside each node the IPC transport's buffers and our node carry kernel,
  between nodes NCCL; node k continues the fold where node k-1 left it (accumulator partials
  cross nodes, never results). Chosen by :mod:`.select`; the byte counts per link are worked out
  in bench/NOTES.md.

What each call does is a :mod:`.schedule` (pure data); this module turns a schedule into
prepared launches and NCCL calls once per call shape (:meth:`NcclTransport.plan`) and replays
them per call on the caller's stream (:meth:`NcclTransport.run`), allocating nothing.

Errors, not hangs. Every call opens with a fixed-size header exchange (an all-gather that cannot
itself mismatch) and a check kernel: ranks whose calls differ (collective, algorithm, count, dtype,
op, root) all raise MismatchError, and from that moment every kernel of ours is a no-op, so no
bytes of a mismatched call are folded or written to user memory. NCCL transfers of mismatched
sizes may then hang; a watchdog thread per communicator (started at creation, stopped at close)
aborts the NCCL communicator when

- the report word turns nonzero (a mismatch, or an IPC failure inside a node),
- NCCL reports an asynchronous error (a peer's connection broke), or
- the oldest eagerly enqueued call has been running on the GPU for longer than the timeout
  (events recorded before and after each call),

so the survivors' streams drain and they raise PeerTimeoutError within about the timeout
(naming the peer when its process is seen dead on this host; NCCL does not say which peer it
lost). ``synchronize()`` raises as soon as the failure is recorded, without waiting for NCCL's
abort to drain the stream. An NCCL error waits briefly (``_HEADER_GRACE_S``) for the header
check, which may run after NCCL's proxy has already seen a mismatched transfer fail, so that a
mismatch is raised as a MismatchError. Under graph capture no events are recorded: mismatches and NCCL's asynchronous errors are
still detected during replay, a peer that hangs without breaking its connection is not.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

from .. import _kernels
from .._fold_abi import FOLD_CARRY_IN, FOLD_CARRY_OUT, HEADER_BYTES, PEER_UNKNOWN, FoldArgs
from .._ipc import alloc_report, check_devices, release_all
from .._launch import _driver_launch
from .._plan import Geometry
from .._protocol import AT_TRANSFER, ERR_TIMEOUT, Report, decode_error, launch_text
from .._settings import Settings
from ..errors import PeerTimeoutError, RendezvousTimeout
from . import Call, RankFacts
from . import schedule as S
from .ipc import IpcTransport

_EVENT_PAIRS = 64  # eager calls tracked at once; later ones go untracked until one completes
_POLL_S = 0.02  # the watchdog's period
_ABORT_WAIT_S = 0.2  # how long the watchdog waits for an enqueue in progress before aborting
#: Eager calls a rank may have enqueued and not finished. Beyond it run() waits, in Python and
#: watching the report, for the call this many back to end. NCCL's enqueue can block inside the
#: library behind a stalled peer, and a thread blocked there learns of the failure only once the
#: abort has drained the stream (a survivor on one H200 once raised 7.4 s after a 2 s timeout).
_IN_FLIGHT = 8
#: How long an NCCL error may wait for our header check to report first: NCCL's proxy moves the
#: bytes of a transfer as soon as it is enqueued, so the transfers of a mismatched call can fail
#: (a truncated message) before the GPU has run the check kernel queued ahead of them.
_HEADER_GRACE_S = 0.5
#: _poll_until (wait(), the throttle): how long it polls back to back, then its period (a sleep
#: at least this long).
_WAIT_SPIN_S = 200e-6
_WAIT_POLL_S = 50e-6
_EVENT_DISABLE_TIMING = 0x2
_CHECK_THREADS = 256
_SPACE = {name: i for i, name in enumerate(S.SPACES)}
_Step = Callable[[tuple, int], None]


class _NodeRendezvous:
    """The rendezvous of one node's ranks, on top of the whole group's: each exchange is a global
    one (every rank of every node takes part) of which a rank keeps its node's values."""

    def __init__(self, rendezvous: Any, members: Sequence[int]) -> None:
        self._rdv = rendezvous
        self._members = tuple(members)
        self.rank = self._members.index(rendezvous.rank)
        self.world_size = len(self._members)

    def exchange(self, obj: Any) -> list:
        everyone = self._rdv.exchange(obj)
        return [everyone[m] for m in self._members]


class Plan(NamedTuple):
    """A call shape made ready: its steps (callables of (bases, stream)) and what the watchdog
    reports about it if it stalls."""

    steps: tuple[_Step, ...]
    sig: int
    count: int
    aux: int


class NcclTransport:
    """This rank's share of the NCCL transport (flat or hierarchical, per ``name``): the NCCL
    communicator, staging and header buffers, the node's IPC transport (hierarchical), the
    failure report and the watchdog."""

    def __init__(self, rendezvous: Any, device: Any, settings: Settings, name: Any,
                 facts: Sequence[RankFacts]) -> None:
        import cupy
        from cupy.cuda import nccl, runtime

        # NVLink multicast (NVLS) stays off, as everywhere in this project; before NCCL starts.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        self.name = name
        self.rank, self.world_size = rendezvous.rank, rendezvous.world_size
        self._device, self._rt, self._nccl = device, runtime, nccl
        self._facts = list(facts)
        check_devices(self.rank, device.id, [f.bus_id for f in facts], settings.share_gpus,
                      p2p=False)
        members = name.nodes.members
        node = members[name.nodes.node_of(self.rank)]
        self._members = node
        self._timeout = settings.timeout
        self._launch = _driver_launch()
        self._fold_grid = 4 * facts[self.rank].sm_count
        self._own: list[int] = []
        self._host_report = 0
        self._events: list[int] = []
        self._node: IpcTransport | None = None
        self._nc: Any = None
        self._aborted = False
        self._diagnosis: tuple[int | None, str] = (None, "")
        self._lock = threading.Lock()  # enqueues (caller) against abort (watchdog)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._capture_query = not runtime.is_hip  # CuPy has no stream capture on ROCm
        self._calls = 0  # eager calls enqueued: the number a stalled one is reported under
        self._nccl_error_since: float | None = None  # when NCCL first reported an error
        self._waits = threading.local()  # wait()'s event, one per calling thread
        try:
            stage = S.stage_bytes(settings.staging_bytes, self.world_size)
            self._stage = self._alloc(stage)
            self._hdr = self._alloc(-(-self.world_size * HEADER_BYTES // 16) * 16)
            self._state = self._alloc(16)  # the u64 epoch of the call headers
            runtime.memset(self._state, 0, 16)
            self._host_report, self.report = alloc_report(runtime)
            hierarchical = name == "hierarchical"
            if hierarchical:
                # Every rank builds its node's IPC transport at once: its exchanges are global.
                node_settings = settings
                if len(node) == 1:  # a node of one rank never uses it: minimal buffers
                    node_settings = dataclasses.replace(
                        settings, staging_bytes=32 * _kernels.MAX_WORLD, ll_bytes=16, max_blocks=1)
                self._node = IpcTransport(_NodeRendezvous(rendezvous, node), device, node_settings,
                                          [facts[m].bus_id for m in node],
                                          [facts[m].sm_count for m in node])
            # The node buffers' size as every rank knows it (a node of one rank has smaller
            # ones, which it never uses): every rank must cut calls into the same chunks.
            half = settings.staging_bytes if hierarchical else 0
            self._topo = S.Topology(self.world_size, self.rank, members, hierarchical, stage, half)
            self.geometry = Geometry(self.world_size, settings.staging_bytes, settings.ll_bytes,
                                     self._node.geometry.max_grid if self._node else 0)
            for _ in range(_EVENT_PAIRS):
                for _ in range(2):
                    self._events.append(runtime.eventCreateWithFlags(_EVENT_DISABLE_TIMING))
            self._free = collections.deque(zip(self._events[0::2], self._events[1::2]))
            self._pending: collections.deque = collections.deque()
            # Handed on as get_unique_id gave it (the wire keeps bytes and tuples apart): CuPy 14
            # gives and takes bytes, CuPy 13 a tuple of ints.
            uid = rendezvous.exchange(nccl.get_unique_id() if self.rank == 0 else None)[0]
            self._nc = nccl.NcclCommunicator(self.world_size, uid, self.rank)
            self._warm_up(cupy)
            rendezvous.barrier()
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name=f"detar_cupy NCCL watchdog rank {self.rank}")
            self._watchdog.start()
        except BaseException:
            self.close()
            raise

    # ---- set-up --------------------------------------------------------------------------------
    def _alloc(self, size: int) -> int:
        ptr = self._rt.malloc(size)
        self._own.append(ptr)
        return ptr

    def _warm_up(self, cupy: Any) -> None:
        """Connect the NCCL channels the schedules use while every rank is known to be here:
        NCCL connects peers lazily, inside the first call that needs them, and a connection
        attempt to a dead peer would block that call on the host, where no watchdog can reach.
        A send/receive with every rank (of a staging slot's size), an all-gather and a
        broadcast; the wait for them is bounded by the timeout (the watchdog is not running
        yet)."""
        nc, nccl, rt, n = self._nc, self._nccl, self._rt, self.world_size
        half = self._topo.stage_bytes // 2
        each = max(16, half // n // 16 * 16)
        stream = cupy.cuda.Stream(non_blocking=True)
        done = self._events[0]
        with self._device:
            nccl.groupStart()
            try:
                for q in range(n):
                    nc.send(self._stage + half, each, nccl.NCCL_UINT8, q, stream.ptr)
                    nc.recv(self._stage + q * each, each, nccl.NCCL_UINT8, q, stream.ptr)
            finally:
                nccl.groupEnd()
            nc.allGather(self._hdr + self.rank * HEADER_BYTES, self._hdr, HEADER_BYTES,
                         nccl.NCCL_UINT8, stream.ptr)
            nc.broadcast(self._stage, self._stage, 16, nccl.NCCL_UINT8, 0, stream.ptr)
            rt.eventRecord(done, stream.ptr)
            deadline = time.monotonic() + self._timeout
            while rt.eventQuery(done) != 0:
                nc.check_async_error()  # NcclError: a peer's connection broke
                if time.monotonic() > deadline:
                    self._nc.abort()
                    raise RendezvousTimeout(
                        f"rank {self.rank}: NCCL's first exchanges with the other ranks did not "
                        f"complete within {self._timeout:g} s (DETAR_TIMEOUT); a rank may have "
                        "failed after joining")
                time.sleep(_POLL_S)

    # ---- the Transport protocol ------------------------------------------------------------
    @property
    def timeout(self) -> float:
        """Seconds a call may run on the GPU before the watchdog declares a peer gone."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._timeout = seconds
        if self._node is not None:
            self._node.timeout = seconds

    def schedule(self, call: Call) -> S.Schedule:
        """The pure-data schedule of ``call`` on this rank (what :meth:`plan` prepares)."""
        return S.plan(self._topo, call)

    def plan(self, call: Call) -> Plan:
        """Prepare every step of the call's schedule: kernels resolved (compiled on first use)
        and their parameters packed, NCCL calls bound."""
        sched = self.schedule(call)
        stamp = sched.steps[0]
        with self._device:
            steps = tuple(self._prepare(sched, step) for step in sched.steps)
        return Plan(steps, stamp.sig, stamp.count, stamp.aux)

    def run(self, plan: Plan, stream: int, in_ptr: int, out_ptr: int) -> None:
        """Enqueue the plan's steps on ``stream``; eager calls are bracketed by events for the
        watchdog (captured ones cannot be: see the module docstring)."""
        eager = not self._capturing(stream)
        if eager:
            self._throttle()
        with self._lock:
            if self._aborted or self.report.word:  # the caller's next check raises the failure
                return
            self._calls += eager
            if eager and not self._free:
                self._retire()
            pair = self._free.popleft() if eager and self._free else None
            if pair is not None:
                self._rt.eventRecord(pair[0], stream)
            bases = (in_ptr, out_ptr, self._stage, self._hdr)
            try:
                for step in plan.steps:
                    step(bases, stream)
            except self._nccl.NcclError as exc:  # an enqueue refused: a peer's connection broke
                # Like a failure found on the GPU: the caller's next call or check raises it.
                self._fail(f"NCCL refused an operation: {exc}", (plan, self._calls))
            finally:
                if pair is not None:
                    self._rt.eventRecord(pair[1], stream)
                    self._pending.append([pair, plan, self._calls, None])

    def _throttle(self) -> None:
        """Wait until fewer than _IN_FLIGHT eager calls are unfinished, or this transport fails."""
        if len(self._pending) >= _IN_FLIGHT:  # else return at once: no poll, no exception
            self._poll_until(self._fewer_in_flight)

    def _fewer_in_flight(self) -> bool:
        # Only this thread appends records and they are retired oldest first, so the record
        # _IN_FLIGHT places from the newest stays that record while older ones are retired.
        try:
            end = self._pending[-_IN_FLIGHT][0][1]
        except IndexError:
            return True
        return self._rt.eventQuery(end) == 0

    def _poll_until(self, done: Callable[[], bool]) -> None:
        """Poll ``done()`` back to back for _WAIT_SPIN_S (a short wait is not lengthened by a
        sleep), then every _WAIT_POLL_S, until it is true or this transport has failed."""
        spin_until = time.perf_counter() + _WAIT_SPIN_S
        while not done():
            if self.report.word:
                return
            if time.perf_counter() > spin_until:
                time.sleep(_WAIT_POLL_S)

    def wait(self, stream: int) -> None:
        """Block until the work on ``stream`` has finished, or until this transport has failed:
        a stalled NCCL transfer holds the stream until the watchdog's abort has drained it,
        which can take NCCL seconds, and the caller learns of the failure without that wait."""
        rt = self._rt
        event = getattr(self._waits, "event", None)
        if event is None:
            event = self._waits.event = rt.eventCreateWithFlags(_EVENT_DISABLE_TIMING)
            with self._lock:
                self._events.append(event)  # destroyed by close()
        rt.eventRecord(event, stream)
        self._poll_until(lambda: rt.eventQuery(event) == 0)

    def failure(self) -> Exception:
        """The error in the report: decoded like the IPC transport's, except a stalled or broken
        NCCL transfer, described from what the watchdog saw."""
        r = self.report
        if (r.word >> 16) & 0xFF != AT_TRANSFER:
            return decode_error(r, self.rank, self._timeout)
        peer, why = self._diagnosis
        call = launch_text(r.sig, r.count, r.aux) if r.sig else "a call"
        number = f"eager call #{r.epoch} " if r.epoch else ""
        err = PeerTimeoutError(
            f"rank {self.rank}: {number}({call}) did not complete: {why}. The communicator is "
            "unusable: close it and create a new one")
        err.peer = peer
        return err

    def close(self) -> None:
        """Stop the watchdog, release NCCL (abort if it failed, else destroy), the node's IPC
        transport and the buffers. The caller has synchronised. Idempotent."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self._nc is not None:
            try:  # a failed communicator's peers may be gone: destroy could wait for them
                if self._aborted or (self._host_report and self.report.word):
                    self._nc.abort()
                else:
                    self._nc.destroy()
            except Exception:
                pass  # a dead context at interpreter exit: nothing left to release
            self._nc = None
        if self._node is not None:
            self._node.close()
            self._node = None
        rt = self._rt
        release_all(rt.eventDestroy, self._events)
        release_all(rt.free, self._own)
        release_all(rt.freeHost, [self._host_report] if self._host_report else [])
        self._events, self._own, self._host_report = [], [], 0

    # ---- plans -------------------------------------------------------------------------------
    def _capturing(self, stream: int) -> bool:
        if not self._capture_query:
            return False
        try:
            return bool(self._rt.streamIsCapturing(stream))
        except Exception:  # an invalidated capture, or the legacy stream during a capture
            return True

    def _prepare(self, sched: S.Schedule, step: S.Step) -> _Step:
        nc, nccl = self._nc, self._nccl
        u8 = nccl.NCCL_UINT8
        if isinstance(step, S.AllGather):
            (si, so), (ri, ro), nbytes = _at(step.send), _at(step.recv), step.nbytes
            return lambda b, st: nc.allGather(b[si] + so, b[ri] + ro, nbytes, u8, st)
        if isinstance(step, S.Broadcast):
            (si, so), (ri, ro), nbytes, root = _at(step.send), _at(step.recv), step.nbytes, step.root
            return lambda b, st: nc.broadcast(b[si] + so, b[ri] + ro, nbytes, u8, root, st)
        if isinstance(step, S.Group):
            ops = tuple((nc.send if isinstance(op, S.Send) else nc.recv,
                         *_at(op.src if isinstance(op, S.Send) else op.dst), op.nbytes, op.peer)
                        for op in step.ops)
            return lambda b, st: _group(nccl, u8, ops, b, st)
        if isinstance(step, S.NodeGather):
            ipc = self._node
            ipc_plan = ipc.plan(Call("all_gather", None, sched.call.itemsize, "-", step.count,
                                     "-"))
            (si, so), (di, do) = _at(step.src), _at(step.dst)
            return lambda b, st: ipc.run(ipc_plan, st, b[si] + so, b[di] + do)
        return self._kernel(sched, step)

    def _kernel(self, sched: S.Schedule, step: S.Step) -> _Step:
        """A prepared launch of one of fold.hip's kernels; the fields that point into the call's
        own buffers are rewritten per call."""
        a = FoldArgs()
        a.report, a.state, a.rank, a.divisor = self._host_report, self._state, self.rank, sched.divisor
        refs: dict[str, S.Ref | None] = {}
        dev, s, dtype = self._device.id, sched.call.itemsize, sched.call.dtype
        fold_key = _kernels.ModuleKey(dtype, 0, "nccl")
        movers = _kernels.ModuleKey(None, 0, "nccl")
        ctx = None
        block = _kernels.THREADS
        if isinstance(step, S.Stamp):
            key, name, grid, block = movers, _kernels.HEADER_STAMP, 1, 32
            a.sig, a.count, a.aux = step.sig, step.count, step.aux
            a.dst = self._hdr + self.rank * HEADER_BYTES
        elif isinstance(step, S.Check):
            key, name, grid, block = movers, _kernels.HEADER_CHECK, 1, _CHECK_THREADS
            a.src, a.slots = self._hdr, self.world_size
        elif isinstance(step, S.Fold):
            key, name = fold_key, _kernels.fold_name(dtype, sched.call.op)
            a.count, a.src_stride, a.slots = step.count, step.stride, step.slots
            a.flags = (FOLD_CARRY_IN if step.carry else 0) | (FOLD_CARRY_OUT if step.carry_out else 0)
            refs = {"src": step.src, "carry": step.carry, "dst": step.dst}
            grid = self._grid(-(-step.count // (16 // s)))
        elif isinstance(step, S.Copy):
            key, name = movers, _kernels.slots_copy_name(s)
            a.count, a.src_stride, a.dst_stride, a.slots = (step.count, step.src_stride,
                                                             step.dst_stride, step.slots)
            refs = {"src": step.src, "dst": step.dst}
            grid = self._grid(-(-step.count // (16 // s)) * step.slots)
        elif isinstance(step, S.NodeCarry):
            g = len(self._members)
            key = _kernels.ModuleKey(dtype, g, "nccl")
            name = _kernels.node_carry_name(dtype, sched.call.op, g)
            a.count, a.aux, a.sig = step.count, step.slice, sched.steps[0].sig
            a.flags = (FOLD_CARRY_IN if step.carry else 0) | (FOLD_CARRY_OUT if step.carry_out else 0)
            refs = {"src": step.src, "carry": step.carry, "dst": step.dst}
            packs = step.slice // (16 // s)  # every node rank's grid must be the same
            grid = max(1, min(self._node.geometry.max_grid, -(-packs // block)))
            ctx = self._node.context
        else:
            raise TypeError(f"no kernel for step {step!r}")
        patch = []
        for field, ref in refs.items():
            if ref is None:
                continue
            if ref.space in ("stage", "hdr"):  # fixed for the communicator's life
                setattr(a, field, (self._stage if ref.space == "stage" else self._hdr) + ref.offset)
            else:
                patch.append((field, _SPACE[ref.space], ref.offset))
        f = _kernels.function(key, name, dev).ptr
        pointers = ([ctypes.addressof(ctx)] if ctx is not None else []) + [ctypes.addressof(a)]
        params = (ctypes.c_void_p * len(pointers))(*pointers)
        return _Launch(self._launch, f, grid, block, a, params, tuple(patch), ctx)

    def _grid(self, units: int) -> int:
        return max(1, min(self._fold_grid, -(-units // _kernels.THREADS)))

    # ---- the watchdog ------------------------------------------------------------------------
    def _watch(self) -> None:
        self._rt.setDevice(self._device.id)
        if not self._rt.is_hip:
            _relaxed_capture_mode()
        while not self._stop.wait(_POLL_S):
            try:
                self._poll()
            except Exception as exc:  # keep watching: a failed poll must not end the watch
                self._fail(f"the watchdog failed to poll ({type(exc).__name__}: {exc})", None)

    def _poll(self) -> None:
        if self._aborted:
            return
        node = self._node
        if node is not None and node.report.word and not self.report.word:
            self._mirror(node.report)
        if self.report.word:
            self._abort()
            return
        with self._lock:  # the caller retires too: the oldest record is read under the lock
            self._retire()  # before anything is blamed on the oldest call still pending
            oldest = self._pending[0] if self._pending else None
            if oldest is not None and oldest[3] is None and self._rt.eventQuery(oldest[0][0]) == 0:
                oldest[3] = time.monotonic()  # running (on the GPU) since about now
        now = time.monotonic()
        try:
            self._nc.check_async_error()
        except self._nccl.NcclError as exc:
            # A mismatched call's transfers may fail before its header check has reported:
            # give the check a moment, so that every rank raises the mismatch, not its symptom.
            if self._nccl_error_since is None:
                self._nccl_error_since = now
            if now - self._nccl_error_since < min(_HEADER_GRACE_S, self._timeout):
                return
            self._fail(f"NCCL reported {exc}", None if oldest is None else (oldest[1], oldest[2]))
            return
        if oldest is not None and oldest[3] is not None and now - oldest[3] > self._timeout:
            self._fail(f"it ran on the GPU for more than {self._timeout:g} s",
                       (oldest[1], oldest[2]))

    def _retire(self) -> None:
        """Drop the records of the calls that have finished (oldest first), freeing their events.
        Under the lock: the caller (out of event pairs) and the watchdog both retire."""
        while self._pending:
            (start, end), *_ = self._pending[0]
            if self._rt.eventQuery(end) != 0:
                return
            self._pending.popleft()
            self._free.append((start, end))

    def _mirror(self, src: Report) -> None:
        """Copy the node IPC transport's report into ours, naming the peer by global rank."""
        r = self.report
        for field in ("epoch", "sig", "peer_sig", "count", "aux", "chunk", "peer_count",
                      "peer_aux", "peer_chunk"):
            setattr(r, field, getattr(src, field))
        peer = self._members[(src.word >> 8) & 0xFF]
        r.word = (src.word & ~0xFF00) | (peer << 8)

    def _fail(self, why: str, call: tuple[Plan, int] | None) -> None:
        """Record a stalled or broken transfer of ``call`` (its plan and eager call number, if
        known) unless a failure is already reported, then abort NCCL."""
        if not self.report.word:
            peer = self._dead_peer()
            if peer is not None:
                f = self._facts[peer]
                why = f"peer rank {peer} (process {f.pid} on {f.host}) has exited; {why}"
            else:
                why += ("; a peer may have died, hung or skipped a call (NCCL does not say which "
                        "peer; look for the rank that failed first)")
            self._diagnosis = (peer, why)
            r = self.report
            if call is not None:
                plan, r.epoch = call
                r.sig, r.count, r.aux = plan.sig, plan.count, plan.aux
            r.word = ERR_TIMEOUT | ((PEER_UNKNOWN if peer is None else peer) << 8) | (AT_TRANSFER << 16)
        self._abort()

    def _dead_peer(self) -> int | None:
        """The lowest rank whose process is on this host and has exited (or is a zombie)."""
        me = self._facts[self.rank]
        for q, f in enumerate(self._facts):
            if q != self.rank and f.host == me.host and not _alive(f.pid):
                return q
        return None

    def _abort(self) -> None:
        """Abort the NCCL communicator, so that its kernels stop waiting and the streams drain;
        our kernels behind them see the report word and do nothing. Waits (bounded) for an
        enqueue in progress, so that no NCCL call runs on a communicator being torn down."""
        if self._aborted:
            return
        # Under the lock, so that no enqueue starts after this; NCCL's abort outside it, so that
        # a caller entering run() meanwhile returns at once instead of waiting out the abort.
        locked = self._lock.acquire(timeout=_ABORT_WAIT_S)
        self._aborted = True
        if locked:
            self._lock.release()
        self._nc.abort()


def _at(ref: S.Ref) -> tuple[int, int]:
    return _SPACE[ref.space], ref.offset


def _group(nccl: Any, u8: int, ops: tuple, bases: tuple, stream: int) -> None:
    nccl.groupStart()
    try:
        for fn, space, offset, nbytes, peer in ops:
            fn(bases[space] + offset, nbytes, u8, peer, stream)
    finally:
        nccl.groupEnd()


def _relaxed_capture_mode() -> None:
    """Let this thread query events while another thread captures a CUDA graph in global mode
    (torch.cuda.graph's default), which otherwise forbids such calls from every thread and
    invalidates the capture (torch's NCCL watchdog does the same). The mode is the driver's, per
    thread: set through the driver API, the one CUDA library every process shares."""
    try:
        mode = ctypes.c_int(2)  # CU_STREAM_CAPTURE_MODE_RELAXED
        ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))
    except (OSError, AttributeError):  # no driver library by that name: leave the default
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (of this host) still runs: a zombie has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class _Launch:
    """A prepared kernel launch: per call, the parameter fields that point into the call's
    buffers are rewritten, then one driver launch (the driver copies the parameters)."""

    __slots__ = ("launch", "f", "grid", "block", "args", "params", "address", "patch", "keep")

    def __init__(self, launch: Callable, f: int, grid: int, block: int, args: FoldArgs,
                 params: Any, patch: tuple, keep: Any) -> None:
        self.launch, self.f, self.grid, self.block = launch, f, grid, block
        self.args, self.params, self.patch, self.keep = args, params, patch, keep
        self.address = ctypes.addressof(params)

    def __call__(self, bases: tuple, stream: int) -> None:
        args = self.args
        for field, space, offset in self.patch:
            setattr(args, field, bases[space] + offset)
        self.launch(self.f, self.grid, 1, 1, self.block, 1, 1, 0, stream, self.address, 0)
