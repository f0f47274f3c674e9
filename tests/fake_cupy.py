"""A stand-in for CuPy, NCCL and the GPU, enough to run the NCCL transport's host code on a CPU:
ranks are threads of one process, device memory is host memory, every enqueue runs at once (NCCL
operations block until their peers post theirs), and our kernels are emulated from their
parameter block with the reference's arithmetic. What it checks is the host side of
transports/nccl.py — pointers, parameter blocks, the order of steps, the report, the watchdog —
not the kernels themselves (the compile matrix and the GPU tests do that).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
import types
from typing import Any

import numpy as np

from detar_cupy import _fold_abi, _kernels, _launch, reference
from detar_cupy._protocol import AT_HEADER, Ctx, Report
from detar_cupy.dtypes import DTYPES, numpy_dtype

WAIT_S = 10.0  # a peer that does not post within this is a test failure, not a hang


class NcclError(RuntimeError):
    """cupy.cuda.nccl.NcclError."""


class World:
    """What the fake NCCL ranks share: posted collectives and point-to-point mailboxes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.cond = threading.Condition()
        self.rounds: dict[int, dict[int, Any]] = {}  # collective number -> rank -> posting
        self.node_rounds: dict[tuple, dict[int, Any]] = {}  # (node, number) -> node rank -> posting
        self.mail: dict[tuple[int, int], list[bytes]] = {}
        self.aborted: set[int] = set()

    def wait_for(self, rank: int, ready) -> Any:
        end = time.monotonic() + WAIT_S
        with self.cond:
            while True:
                if rank in self.aborted:
                    raise NcclError("the communicator was aborted")
                got = ready()
                if got is not None:
                    return got
                if not self.cond.wait(max(0.0, end - time.monotonic())):
                    raise TimeoutError(f"rank {rank}: peers never posted")


def stall_events(after: int) -> None:
    """On this thread's rank, the next ``after`` events recorded complete and later ones never
    do (a call that starts on the GPU and does not finish)."""
    FakeComm.local.budget = after


class Memory:
    """Host buffers standing in for device and pinned memory, by address."""

    def __init__(self) -> None:
        self.buffers: dict[int, Any] = {}
        self.count = 0  # allocations so far

    def alloc(self, size: int) -> int:
        buf = ctypes.create_string_buffer(max(size, 1))
        self.buffers[ctypes.addressof(buf)] = buf
        self.count += 1
        return ctypes.addressof(buf)

    def free(self, ptr: int) -> None:
        self.buffers.pop(ptr)


def read(ptr: int, n: int) -> bytes:
    return ctypes.string_at(ptr, n)


def write(ptr: int, data: bytes) -> None:
    ctypes.memmove(ptr, data, len(data))


class FakeComm:
    """cupy.cuda.nccl.NcclCommunicator of one rank of a :class:`World`."""

    local = threading.local()

    def __init__(self, world: World, rank: int) -> None:
        self.world, self.rank, self.count = world, rank, 0
        self.calls: list[tuple] = []

    def _collective(self, kind: str, nbytes: int, data: bytes | None, root: int = 0) -> list:
        w, n = self.world, self.count
        self.count += 1
        with w.cond:
            w.rounds.setdefault(n, {})[self.rank] = (kind, nbytes, root, data)
            w.cond.notify_all()

        def ready():
            posts = w.rounds.get(n, {})
            if len(posts) < w.size:
                return None
            shapes = {p[:3] for p in posts.values()}
            return [posts[r][3] for r in range(w.size)] if len(shapes) == 1 else None
        return w.wait_for(self.rank, ready)

    def allGather(self, send, recv, nbytes, dtype, stream) -> None:
        self.calls.append(("allGather", nbytes))
        write(recv, b"".join(self._collective("ag", nbytes, read(send, nbytes))))

    def broadcast(self, send, recv, nbytes, dtype, root, stream) -> None:
        self.calls.append(("broadcast", nbytes, root))
        data = read(send, nbytes) if self.rank == root else None
        write(recv, self._collective("bc", nbytes, data, root)[root])

    def send(self, ptr, nbytes, dtype, peer, stream) -> None:
        FakeComm.local.group.append(("send", ptr, nbytes, peer))

    def recv(self, ptr, nbytes, dtype, peer, stream) -> None:
        FakeComm.local.group.append(("recv", ptr, nbytes, peer))

    def run_group(self, ops: list) -> None:
        self.calls.append(("group", tuple((o[0], o[2], o[3]) for o in ops)))
        w = self.world
        with w.cond:
            for kind, ptr, nbytes, peer in ops:
                if kind == "send":
                    w.mail.setdefault((self.rank, peer), []).append(read(ptr, nbytes))
            w.cond.notify_all()
        for kind, ptr, nbytes, peer in ops:
            if kind == "recv":
                box = w.mail.setdefault((peer, self.rank), [])
                data = w.wait_for(self.rank, lambda: box.pop(0) if box else None)
                if len(data) != nbytes:
                    raise NcclError(f"rank {self.rank}: {len(data)} bytes from {peer}, "
                                    f"{nbytes} expected")
                write(ptr, data)

    def node_meeting(self, node: int, local: int, size: int, posting: Any) -> list:
        """The IPC kernels of one node (``node``: an address all its ranks share): every node
        rank's posting, once all ``size`` have posted theirs."""
        w = self.world
        counts = FakeComm.local.__dict__.setdefault("node_counts", {})
        n = counts[node] = counts.get(node, -1) + 1
        with w.cond:
            w.node_rounds.setdefault((node, n), {})[local] = posting
            w.cond.notify_all()

        def ready():
            posts = w.node_rounds.get((node, n), {})
            return [posts[i] for i in range(size)] if len(posts) == size else None
        return w.wait_for(self.rank, ready)

    #: set by a test: what NCCL's asynchronous error query raises from then on
    async_error: str | None = None

    def check_async_error(self) -> None:
        if self.async_error is not None:
            raise NcclError(self.async_error)

    def abort(self) -> None:
        with self.world.cond:
            self.world.aborted.add(self.rank)
            self.world.cond.notify_all()

    def destroy(self) -> None:
        pass


def _group_start() -> None:
    FakeComm.local.group = []


def _group_end() -> None:
    ops, FakeComm.local.group = FakeComm.local.group, None
    FakeComm.local.comm.run_group(ops)


# ---- kernels ---------------------------------------------------------------------------------

class Kernels:
    """Driver handles of fold.hip's kernels and their emulation from the parameter block."""

    def __init__(self) -> None:
        self.names: dict[int, tuple[Any, str]] = {}
        self.launched: list[str] = []

    def function(self, key: Any, name: str, device: int) -> Any:
        handle = len(self.names) + 1
        self.names[handle] = (key, name)
        return types.SimpleNamespace(ptr=handle)

    def launch(self, f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra) -> None:
        key, name = self.names[f]
        self.launched.append(name)
        if name.endswith("_all_gather"):  # the IPC all-gather (the hierarchical node gather)
            return _ipc_all_gather(name, params)
        if name.endswith("_node_carry"):
            ctx, a = (ctypes.c_void_p * 2).from_address(params)
            return _node_carry(key, name, Ctx.from_address(ctx), _fold_abi.FoldArgs.from_address(a))
        pointers = (ctypes.c_void_p * 1).from_address(params)
        a = _fold_abi.FoldArgs.from_address(pointers[0])
        report = _report(a)
        if name == _kernels.HEADER_STAMP:
            state = ctypes.c_uint64.from_address(a.state)
            state.value += 1
            write(a.dst, _fold_abi.header_bytes(state.value, a.sig, a.count, a.aux))
        elif name == _kernels.HEADER_CHECK:
            _check(a, report)
        elif report.word:
            return  # every other kernel is a no-op once the transport failed
        elif name.endswith("_fold"):
            _fold(key.dtype, name.split("_")[-2], a)
        elif name.endswith("_slots"):
            size = int(name[len("detar_copy"):].split("_")[0])
            for q in range(a.slots):
                write(a.dst + q * a.dst_stride, read(a.src + q * a.src_stride, a.count * size))
        else:
            raise AssertionError(f"no emulation for {name}")


def _report(a: Any) -> Any:
    return Report.from_address(a.report)


def _ipc_all_gather(name: str, params: int) -> None:
    """collectives.hip's all-gather over a node: out + r * aux elements <- node rank r's in."""
    p = (ctypes.c_void_p * 6).from_address(params)
    ctx = Ctx.from_address(p[0])
    src, dst, count, aux = (ctypes.c_uint64.from_address(p[i]).value for i in range(1, 5))
    size = int(name[len("detar_copy"):].split("_")[0])
    g = int(name.split("_n")[1].split("_")[0])
    comm = FakeComm.local.comm
    posts = comm.node_meeting(ctx.stage[0], ctx.rank, g, read(src, count * size))
    for r, data in enumerate(posts):
        write(dst + r * aux * size, data)


def _node_carry(key: Any, name: str, ctx: Any, a: Any) -> None:
    """fold.hip's node carry: node rank j folds piece j of every node rank's input, in order."""
    from detar_cupy.transports.schedule import pieces, two_shot_slice

    comm = FakeComm.local.comm
    g = key.world_size
    dt = DTYPES[key.dtype]
    s = dt.itemsize
    failed = bool(_report(a).word)
    posts = comm.node_meeting(ctx.stage[0], ctx.rank, g, (failed, read(a.src, a.count * s)))
    if any(f for f, _ in posts):
        return  # a rank that failed skips the kernel; on a GPU its node peers time out
    lo, hi = pieces(a.count, g, 16 // s)[ctx.rank]
    if hi == lo:
        return
    np_dt, acc_dt = numpy_dtype(dt.name), numpy_dtype(dt.acc)
    slots = [np.frombuffer(data[lo * s:hi * s], dtype=np_dt) for _, data in posts]
    assert a.aux == two_shot_slice(a.count, g, 16 // s), "the host's slice is two-shot's"
    partial = None
    if a.flags & _fold_abi.FOLD_CARRY_IN:
        partial = np.frombuffer(read(a.carry, (hi - lo) * acc_dt.itemsize), dtype=acc_dt)
    acc = reference.fold_partial(slots, name.split("_")[-4], key.dtype, partial=partial)
    if a.flags & _fold_abi.FOLD_CARRY_OUT:
        write(a.dst, acc.tobytes())
    else:
        write(a.dst, reference.finish(acc, name.split("_")[-4], a.divisor, key.dtype).tobytes())


def _check(a: Any, report: Any) -> None:
    size = _fold_abi.HEADER_BYTES
    hdrs = [_fold_abi.read_header(read(a.src + q * size, size)) for q in range(a.slots)]
    mine = hdrs[a.rank]
    key = lambda h: (h.epoch, h.sig, h.count, h.aux)  # noqa: E731
    differ = [q for q, h in enumerate(hdrs) if key(h) != key(mine)]
    if differ and not report.word:
        t = hdrs[differ[0]]
        report.epoch, report.sig, report.peer_sig = mine.epoch, mine.sig, t.sig
        report.count, report.aux, report.peer_count, report.peer_aux = (mine.count, mine.aux,
                                                                       t.count, t.aux)
        report.word = 2 | (differ[0] << 8) | (AT_HEADER << 16)


def _fold(dtype: str, op: str, a: Any) -> None:
    dt = DTYPES[dtype]
    np_dt, acc_dt = numpy_dtype(dt.name), numpy_dtype(dt.acc)
    n = a.count
    slots = [np.frombuffer(read(a.src + q * a.src_stride, n * dt.itemsize), dtype=np_dt)
             for q in range(a.slots)]
    partial = None
    if a.flags & _fold_abi.FOLD_CARRY_IN:
        partial = np.frombuffer(read(a.carry, n * acc_dt.itemsize), dtype=acc_dt)
    acc = reference.fold_partial(slots, op, dtype, partial=partial)
    if a.flags & _fold_abi.FOLD_CARRY_OUT:
        write(a.dst, acc.tobytes())
    else:
        write(a.dst, reference.finish(acc, op, a.divisor, dtype).tobytes())


# ---- the modules -----------------------------------------------------------------------------

@contextlib.contextmanager
def installed(world: World, monkeypatch: Any):
    """cupy, cupy.cuda, cupy.cuda.runtime and cupy.cuda.nccl replaced for the ranks of ``world``
    (threads); yields (memory, kernels, comms by rank)."""
    memory, kernels, comms = Memory(), Kernels(), {}
    events: dict[int, bool] = {}  # event -> ready

    rt = types.ModuleType("cupy.cuda.runtime")
    rt.is_hip = False
    rt.malloc = memory.alloc
    rt.free = memory.free
    rt.hostAlloc = lambda size, flags: memory.alloc(size)
    rt.freeHost = memory.free
    rt.memset = lambda ptr, value, size: ctypes.memset(ptr, value, size)
    rt.memcpyHostToDevice = 1
    rt.memcpy = lambda dst, src, size, kind: ctypes.memmove(dst, src, size)
    rt.setDevice = lambda device: None
    rt.deviceGetPCIBusId = lambda device: "0000:00:00.0"
    rt.streamIsCapturing = lambda stream: False
    rt.deviceSynchronize = lambda: None
    rt.streamSynchronize = lambda stream: None
    # IPC inside a node: every rank is a thread of this process, so a handle is the address
    rt.ipcGetMemHandle = lambda ptr: ptr.to_bytes(8, "little")
    rt.ipcOpenMemHandle = lambda handle, flags: int.from_bytes(handle, "little")
    rt.ipcCloseMemHandle = lambda ptr: None

    def event_create(flags: int) -> int:
        ev = len(events) + 1
        events[ev] = True
        return ev

    def event_record(ev: int, stream: int) -> None:
        budget = getattr(FakeComm.local, "budget", None)
        events[ev] = budget is None or budget > 0
        if budget is not None:
            FakeComm.local.budget = budget - 1

    rt.eventCreateWithFlags = event_create
    rt.eventDestroy = lambda ev: None
    rt.eventRecord = event_record
    rt.eventQuery = lambda ev: 0 if events[ev] else 600

    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.NCCL_UINT8 = 1
    nccl.NcclError = NcclError
    nccl.available = True
    # CuPy 14: the unique id is bytes, and NcclCommunicator takes nothing else (CuPy 13 used a
    # tuple of ints both ways); the transport must hand on what get_unique_id gave
    nccl.get_unique_id = lambda: bytes(range(128))

    def make_comm(size: int, uid: bytes, rank: int) -> FakeComm:
        if not isinstance(uid, bytes):
            raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got "
                            f"{type(uid).__name__})")
        comm = comms[rank] = FakeComm(world, rank)
        FakeComm.local.comm = comm
        return comm

    nccl.NcclCommunicator = make_comm
    nccl.groupStart, nccl.groupEnd = _group_start, _group_end

    class Device:
        def __init__(self, device: int = 0) -> None:
            self.id = device
            self.attributes = {"MultiProcessorCount": 4}

        def use(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def __enter__(self) -> "Device":
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

    class Stream:
        def __init__(self, non_blocking: bool = False) -> None:
            self.ptr = 7

        def synchronize(self) -> None:
            pass

    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime, cuda.nccl, cuda.Device, cuda.Stream = rt, nccl, Device, Stream
    cuda.get_current_stream = lambda device=None: Stream()
    cupy = types.ModuleType("cupy")
    cupy.cuda, cupy.ndarray = cuda, type("ndarray", (), {})
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.runtime", rt),
                         ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, module)
    from detar_cupy.transports import nccl as transport

    monkeypatch.setattr(_kernels, "function", kernels.function)
    monkeypatch.setattr(transport, "_driver_launch", lambda: kernels.launch)
    monkeypatch.setattr(_launch, "_driver_launch", lambda: kernels.launch)
    yield memory, kernels, comms
