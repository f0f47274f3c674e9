"""The Communicator: the API. Argument checks, plans keyed by call shape, sticky device errors;
the bytes move through a transport beneath it (:mod:`detar_cupy.transports`)."""
from __future__ import annotations

from typing import Any, Sequence

from . import _coalesce, transports
from ._settings import Settings, agree, check_timeout
from .dtypes import DTYPES, dtype_name, lookup
from .errors import CommunicatorClosedError, CupyMissingError
from .transports import ALGORITHMS, Call
from .transports.select import check_transport

PLAN_CACHE = 4096  # plans kept per communicator (one per collective, dtype, op, count, algorithm)

_DTYPE_NAMES: dict = {}  # array dtype object -> table name: numpy builds dtype.name in Python


def _name_of(dtype: Any) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype_name(dtype)
    return name



def _bounded_put(cache: dict, key: Any, value: Any) -> Any:
    """``cache[key] = value``, dropping the oldest entry past PLAN_CACHE (ever-new shapes, e.g.
    batch sizes, would grow it unbounded); returns ``value``."""
    if len(cache) >= PLAN_CACHE:
        del cache[next(iter(cache))]
    cache[key] = value
    return value

class Communicator:
    """One rank of a group of GPUs that reduce together, bit for bit deterministically.

    Made by :func:`detar_cupy.spawn` or :func:`detar_cupy.init_process_group`, not directly.

    Every collective method is collective: every rank must call it, in the same order, with the
    same counts, dtypes, ops and algorithms (a difference raises
    :class:`~detar_cupy.MismatchError` on every rank). Calls are enqueued on ``stream`` (default:
    CuPy's current stream on this rank's GPU) and return without waiting, like CuPy kernels;
    calls on one communicator must be ordered (one stream, or streams the caller synchronises)
    and made from one thread at a time.

    The bytes move through a transport (:attr:`transport`): ``"ipc"`` (one node, P2P between
    every pair of GPUs: the kernels move them), ``"nccl"`` (NCCL/RCCL moves them, our kernels fold
    them) or ``"hierarchical"`` (IPC inside nodes, NCCL between them). Every transport gives the
    same bits for the same world size.

    Waits for peers are bounded by :attr:`timeout` (seconds; env ``DETAR_TIMEOUT``, default
    300): a peer that never arrives makes every waiting rank raise
    :class:`~detar_cupy.PeerTimeoutError` on its next call or :meth:`check`, instead of hanging.
    Buffer sizes come from ``DETAR_STAGING_BYTES`` (per half, default 32 MiB) and
    ``DETAR_LL_BYTES`` (default 256 KiB), the largest grid from ``DETAR_MAX_BLOCKS`` (default
    128, and never more than the smallest GPU's SM count); ``DETAR_SHARE_GPUS=1`` lets ranks
    share GPUs (for testing: slow calls). Every rank must use the same values.

    Buffers may be any C-contiguous arrays on this rank's GPU, at any address (also views not
    aligned to their element size). ``out_array`` may be ``in_array`` (in place), or, as in
    NCCL, this rank's own part of the output may be the input (``all_gather(out[r*c:(r+1)*c],
    out)``, ``reduce_scatter(x, x[r*c:(r+1)*c])``); other overlaps are allowed too and cost a
    private copy of the input.
    """

    def __init__(self) -> None:
        raise TypeError("create communicators with detar_cupy.spawn() or "
                        "detar_cupy.init_process_group()")

    @classmethod
    def _from_rendezvous(cls, rendezvous: Any, device: int,
                         transport: str = "auto") -> "Communicator":
        """Build this rank's communicator (collective). ``transport``: ``"auto"`` (IPC where every
        rank shares a node and every pair of GPUs has P2P, else NCCL: hierarchical where nodes
        hold several GPUs with P2P), ``"ipc"`` or ``"nccl"``; every rank must pass the same."""
        check_transport(transport)
        try:
            import cupy
        except ImportError as exc:
            raise CupyMissingError(str(exc)) from exc
        self = object.__new__(cls)
        self._closed = True  # until fully built, close() has nothing of ours to release
        self._stopped = True  # closed or failed: the one flag the hot path tests
        self._rdv = rendezvous
        self.rank = rendezvous.rank
        self.world_size = rendezvous.world_size
        settings = Settings.from_env()
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self._cupy = cupy
        self._ndarray = cupy.ndarray
        self._device_id = self.device.id
        facts = transports.local_facts(self.device)
        views = rendezvous.exchange((settings.shared() + (("ROCm build", facts.rocm),
                                                          ("transport", transport)),
                                     tuple(facts)))
        agree([v[0] for v in views])
        self._transport = transports.create(transport, rendezvous, self.device, settings,
                                            [transports.RankFacts(*v[1]) for v in views])
        try:
            self._report = self._transport.report
            self._run = self._transport.run
            self._transport.timeout = settings.timeout
            # With this rank's device id: no cudaGetDevice per call, never another GPU's stream.
            self._current_stream = cupy.cuda.get_current_stream
            self._plans: dict[tuple, tuple] = {}
            # (dtype, op, counts) -> (the coalescing tables of that shape, its all-reduce's plan)
            self._coalesced: dict[tuple, tuple] = {}
            self._failure: Exception | None = None
            self._busy = False  # a launch is in progress (see _launch)
            self._coalescer = _coalesce.Coalescer(self.device, self.world_size)
            rendezvous.barrier()
        except BaseException:
            self._transport.close()
            raise
        self._closed = self._stopped = False
        return self

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """The transport that moves this communicator's bytes: ``"ipc"``, ``"nccl"`` (flat) or
        ``"hierarchical"``; a str whose ``reason`` says why it was chosen (e.g. why a
        multi-node layout is flat: ranks of a node that are not contiguous)."""
        return self._transport.name

    @property
    def geometry(self) -> Any:
        """The buffer sizes and grid cap in use (read-only; the same on every rank)."""
        return self._transport.geometry

    @property
    def timeout(self) -> float:
        """Seconds a device-side wait for a peer may last before PeerTimeoutError; settable per
        communicator (applies from the next call)."""
        return self._transport.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._transport.timeout = check_timeout(seconds)

    def close(self) -> None:
        """Release the peers' mappings and this rank's buffers. Safe to call twice."""
        if self._closed:
            return
        self._closed = self._stopped = True
        try:
            self.device.synchronize()  # no kernel of ours may still use the buffers
        finally:
            self._transport.close()
            self._rdv.close()

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> None:
        """Raise the communicator's sticky error (peer timeout, mismatch) if one happened.

        Reads a host-mapped report the kernels write: no device synchronisation."""
        if self._closed:
            raise CommunicatorClosedError("the communicator is closed")
        if self._failure is None:
            if self._report.word == 0:
                return
            self._failure = self._transport.failure()
            self._stopped = True
        raise self._failure

    def synchronize(self, stream: Any = None) -> None:
        """Wait for this rank's work on ``stream`` (default: current), then :meth:`check`. A
        failed communicator raises as soon as the failure is known, without waiting for the
        stream (whose work ends once the transport has torn its transfers down)."""
        self._transport.wait(self._stream(stream))
        self.check()

    def barrier(self) -> None:
        """Collective: block until every rank has reached this barrier (a device-side zero-size
        call on the current stream, then :meth:`synchronize`)."""
        self.all_reduce_buffers(0, 0, 0, "float32", "sum", None, "one_shot")
        self.synchronize()

    def _beside(self, transport: str) -> "Communicator":
        """Collective: another communicator of the same ranks and GPUs whose bytes move over
        ``transport``, set up through this one's rendezvous (which it borrows: closing it leaves
        this one's open). For the benchmark and the tests, which compare transports."""
        return Communicator._from_rendezvous(_Borrowed(self._rdv), self._device_id, transport)

    def exchange(self, obj: Any) -> list:
        """Collective, host-side: every rank passes a small value (None, bool, int, str, bytes,
        or tuples/lists of those) and receives every rank's, in rank order. For setting up what
        lives beside the communicator (an NCCL id, a port); never on a hot path."""
        if self._closed:
            raise CommunicatorClosedError("exchange: the communicator is closed")
        return self._rdv.exchange(obj)

    # ---- argument handling ---------------------------------------------------------------------
    def _stream(self, stream: Any) -> int:
        """The handle of ``stream``; None: CuPy's current stream on this rank's GPU."""
        if stream is None:
            return self._current_stream(self._device_id).ptr
        if isinstance(stream, int):
            return stream
        ptr = getattr(stream, "ptr", None)
        if ptr is None:
            ptr = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream
        if ptr is None:
            raise TypeError(f"stream must be a CuPy stream, a torch stream or a handle, not "
                            f"{type(stream).__name__}")
        return ptr

    def _array(self, a: Any, what: str):
        """(array, pointer): ``a`` as a CuPy array on this rank's GPU, C-contiguous."""
        if type(a) is not self._ndarray and not isinstance(a, self._ndarray):
            a = self._import_array(a, what)
        mem = a.data
        if mem.device_id != self._device_id:
            raise ValueError(f"{what} is on GPU {mem.device_id} but this rank's communicator "
                             f"uses GPU {self._device_id}")
        if not a._c_contiguous:  # a.flags builds a Flags object per call
            raise ValueError(f"{what} must be C-contiguous (got strides {a.strides}); pass "
                             "cupy.ascontiguousarray(x)")
        return a, mem.ptr

    @staticmethod
    def _element_type(a: Any, dtype: Any) -> str:
        """The table name of ``a``'s elements: its dtype's, or ``dtype`` (same element size)."""
        if dtype is None:
            return _name_of(a.dtype)
        name = dtype_name(dtype)
        if DTYPES[name].itemsize != a.itemsize:
            raise TypeError(f"dtype={name!r} has {DTYPES[name].itemsize}-byte elements but "
                            f"in_array has {a.itemsize}-byte elements ({a.dtype})")
        return name

    def _import_array(self, a: Any, what: str) -> Any:
        """A CuPy view of a foreign GPU array (torch, numba, …), zero copy."""
        cp = self._cupy
        try:
            if hasattr(a, "__cuda_array_interface__"):
                return cp.asarray(a)
            if hasattr(a, "__dlpack__"):
                return cp.from_dlpack(a)
        except (TypeError, ValueError, BufferError) as exc:  # a CPU array, an unknown dtype …
            raise TypeError(f"{what} must be a GPU array on this rank's GPU; converting "
                            f"{type(a).__name__} failed: {exc}") from exc
        raise TypeError(f"{what} must be a GPU array (CuPy, or an object with "
                        f"__cuda_array_interface__ or __dlpack__), not {type(a).__name__}")

    def _result(self, out_array: Any, x: Any, size: int, dtype: Any):
        """(out, pointer): a new array of ``size`` elements of ``x``'s dtype, or ``out_array``
        after the input checks plus its element type and size."""
        if out_array is None:
            out = self._fresh(size, x.dtype)
            return out, out.data.ptr
        out, ptr = self._array(out_array, "out_array")
        if out.dtype != x.dtype and (dtype is None or out.itemsize != x.itemsize):
            named = "" if dtype is None else f" ({dtype_name(dtype)} elements)"
            raise TypeError(f"out_array has dtype {out.dtype}, expected {x.dtype}{named}")
        if out.size != size:
            raise ValueError(f"out_array has {out.size} elements, expected {size}")
        return out, ptr

    def _fresh(self, shape: Any, dtype: Any) -> Any:
        """A new array on this rank's GPU (``cupy.ndarray``: cheaper than ``empty_like``)."""
        out = self._ndarray(shape, dtype)
        if out.data.device_id != self._device_id:  # the caller made another GPU current
            with self.device:
                out = self._ndarray(shape, dtype)
        return out

    def _refuse(self, desc: str) -> None:
        """Raise why this communicator takes no more calls (closed, or its sticky failure).
        Callers test ``_stopped or _report.word`` inline first."""
        if self._closed:
            raise CommunicatorClosedError(f"{desc}: the communicator is closed")
        self.check()

    def _remember(self, key: tuple, call: Call, in_bytes: int, out_bytes: int,
                  alias: int) -> tuple:
        """Make and cache the plan of a call shape: (transport plan, bytes read from the input,
        bytes written to the output, the input-minus-output offset at which the two may alias).
        Past PLAN_CACHE entries the oldest goes (ever-new batch sizes would grow it unbounded)."""
        return _bounded_put(self._plans, key, (self._transport.plan(call), in_bytes, out_bytes,
                                               alias))

    def _launch(self, plan: tuple, stream: Any, in_ptr: int, out_ptr: int) -> None:
        """Enqueue ``plan``. Overlapping buffers that are not the call's supported aliasing get
        a private copy of the input first, so every rank makes the same call whatever its
        pointers are (a layout check that raised on one rank would leave its peers waiting)."""
        tplan, in_bytes, out_bytes, alias = plan
        if (in_ptr - out_ptr != alias and in_ptr < out_ptr + out_bytes
                and out_ptr < in_ptr + in_bytes):
            return self._launch_with_copy(tplan, stream, in_ptr, in_bytes, out_ptr)
        if stream is None:
            stream = self._current_stream(self._device_id).ptr
        elif type(stream) is not int:
            stream = self._stream(stream)
        # Launches rewrite the plan's packed parameters: two threads at once would mix them. A
        # flag, not a lock (a lock costs 0.2 us per call): it catches calls that overlap, which
        # is what a correct program never does.
        if self._busy:
            raise RuntimeError("collectives were called on one communicator from two threads at "
                               "once; calls on a communicator must be ordered (one thread at a "
                               "time, one stream or streams the caller synchronises)")
        self._busy = True
        try:
            self._run(tplan, stream, in_ptr, out_ptr)
        finally:
            self._busy = False

    def _launch_with_copy(self, tplan: Any, stream: Any, in_ptr: int, in_bytes: int,
                          out_ptr: int) -> None:
        runtime = self._cupy.cuda.runtime
        handle = self._stream(stream)
        copy = self._scratch(in_bytes, handle)
        runtime.memcpyAsync(copy.ptr, in_ptr, in_bytes, runtime.memcpyDeviceToDevice, handle)
        self._launch((tplan, in_bytes, 0, 0), handle, copy.ptr, out_ptr)

    def _scratch(self, nbytes: int, handle: int) -> Any:
        """Device memory for one call, allocated while the call's stream is current: CuPy's pool
        then reuses the block only in that stream's order, after the kernels that use it."""
        with self.device, self._cupy.cuda.ExternalStream(handle):
            return self._cupy.cuda.alloc(nbytes)

    # ---- collectives on arrays -----------------------------------------------------------------
    def all_reduce(self, in_array: Any, out_array: Any = None, op: str = "sum", stream: Any = None,
                   *, algorithm: str = "auto", dtype: Any = None) -> Any:
        """Collective: reduce ``in_array`` over all ranks into ``out_array`` (a new array if
        None; may be ``in_array`` itself) and return it. Every rank gets the same bits: element
        i is the left fold over ranks 0..N-1 (see :mod:`detar_cupy.reference`). ``algorithm``:
        auto, ll, one_shot, two_shot — all give identical bits. ``dtype`` names the element
        type of a raw buffer (e.g. ``"bfloat16"`` for a uint16/int16 view). Enqueued on
        ``stream``; raises TypeError/ValueError for bad arguments (before anything is enqueued)
        and the communicator's sticky error, if any."""
        if self._stopped or self._report.word:
            self._refuse("all_reduce")
        x, in_ptr = self._array(in_array, "in_array")
        name = _DTYPE_NAMES.get(x.dtype) if dtype is None else None
        if name is None:
            name = self._element_type(x, dtype)
        count = x.size
        if out_array is in_array:  # in place: already checked
            out, out_ptr = x, in_ptr
        elif out_array is None:
            out = self._fresh(x.shape, x.dtype)
            out_ptr = out.data.ptr
        else:
            out, out_ptr = self._result(out_array, x, count, dtype)
        # all_reduce_buffers inlined: this is the hottest path
        plan = self._plans.get(("ar", name, op, algorithm, count))
        if plan is None:
            plan = self._all_reduce_plan(name, op, algorithm, count)
        self._launch(plan, stream, in_ptr, out_ptr)
        return out

    def reduce_scatter(self, in_array: Any, out_array: Any = None, count: int | None = None,
                       op: str = "sum", stream: Any = None, *, dtype: Any = None) -> Any:
        """Collective: rank r receives elements [r*count, (r+1)*count) of the all-reduce of the
        ranks' ``in_array`` (N*count elements each, default count = in_array.size // N), with
        the same bits as all_reduce gives them. Returns ``out_array`` (a new array if None)."""
        if self._stopped or self._report.word:
            self._refuse("reduce_scatter")
        x, in_ptr = self._array(in_array, "in_array")
        total, n = x.size, self.world_size
        if count is None:
            if total % n:
                raise ValueError(f"in_array has {total} elements, not a multiple of the world "
                                 f"size {n}; pass count")
            count = total // n
        elif not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        if count * n > total:
            raise ValueError(f"in_array has {total} elements, fewer than count*world_size = "
                             f"{count * n}")
        name = self._element_type(x, dtype)
        out, out_ptr = self._result(out_array, x, count, dtype)
        self.reduce_scatter_buffers(in_ptr, out_ptr, count, name, op, stream)
        return out

    def all_gather(self, in_array: Any, out_array: Any = None, count: int | None = None,
                   stream: Any = None) -> Any:
        """Collective: every rank receives the concatenation of all ranks' ``in_array``
        (``count`` elements each, default in_array.size) in rank order. Returns ``out_array``
        (a new array of N*count elements if None)."""
        if self._stopped or self._report.word:
            self._refuse("all_gather")
        x, in_ptr = self._array(in_array, "in_array")
        count = x.size if count is None else count
        if not isinstance(count, int) or not 0 <= count <= x.size:
            raise ValueError(f"count must be an int in [0, {x.size}] (in_array's elements), "
                             f"got {count!r}")
        out, out_ptr = self._result(out_array, x, count * self.world_size, None)
        self.all_gather_buffers(in_ptr, out_ptr, count, x.itemsize, stream)
        return out

    def broadcast(self, in_out_array: Any, root: int = 0, stream: Any = None) -> Any:
        """Collective: copy rank ``root``'s ``in_out_array`` into every rank's and return it."""
        if self._stopped or self._report.word:
            self._refuse("broadcast")
        x, ptr = self._array(in_out_array, "in_out_array")
        self.broadcast_buffers(ptr, x.size, x.itemsize, root, stream)
        return x

    def all_reduce_coalesced(self, arrays: Sequence[Any], op: str = "sum", stream: Any = None,
                             *, dtype: Any = None) -> list:
        """Collective: all-reduce every array of ``arrays`` in place, with the same bits as one
        :meth:`all_reduce` per array, and return them. All must have one element type."""
        if self._stopped or self._report.word:
            self._refuse("all_reduce_coalesced")
        ptrs, counts, name = [], [], None
        for i, a in enumerate(arrays):
            x, ptr = self._array(a, f"arrays[{i}]")
            this = self._element_type(x, dtype)
            if name is not None and this != name:
                raise TypeError(f"arrays[{i}] has elements of {this}, arrays[0] of {name}: "
                                "coalesce arrays of one dtype")
            name = this
            ptrs.append(ptr)
            counts.append(x.size)
        if name is not None:
            self.all_reduce_coalesced_buffers(ptrs, counts, name, op, stream)
        return list(arrays)

    # ---- collectives on raw device pointers ----------------------------------------------------
    # For layers above the Communicator that hold their own tensors (detar_cupy.torch): the same
    # calls on pointers into this rank's GPU memory, with the same plans, checks and errors.
    # ``stream``: a handle (int), a CuPy or torch stream, or None (CuPy's current stream).
    def all_reduce_buffers(self, in_ptr: int, out_ptr: int, count: int, dtype: str,
                           op: str = "sum", stream: Any = None, algorithm: str = "auto") -> None:
        """Collective: :meth:`all_reduce` of ``count`` elements of table dtype ``dtype``."""
        if self._stopped or self._report.word:
            self._refuse("all_reduce")
        plan = self._plans.get(("ar", dtype, op, algorithm, count))
        if plan is None:
            plan = self._all_reduce_plan(dtype, op, algorithm, count)
        self._launch(plan, stream, in_ptr, out_ptr)

    def _all_reduce_plan(self, dtype: str, op: str, algorithm: str, count: int) -> tuple:
        dt = lookup(dtype, op)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        nbytes = count * dt.itemsize
        return self._remember(("ar", dtype, op, algorithm, count),
                              Call("all_reduce", dt.name, dt.itemsize, op, count, algorithm),
                              nbytes, nbytes, 0)

    def all_reduce_coalesced_buffers(self, ptrs: Sequence[int], counts: Sequence[int],
                                     dtype: str, op: str = "sum", stream: Any = None) -> None:
        """Collective: all-reduce ``counts[i]`` elements at ``ptrs[i]`` in place, for every i,
        with the same bits as one :meth:`all_reduce_buffers` per buffer."""
        if len(ptrs) != len(counts):
            raise ValueError(f"{len(ptrs)} pointers but {len(counts)} counts")
        if len(ptrs) < 2:
            for ptr, count in zip(ptrs, counts):
                self.all_reduce_buffers(ptr, ptr, count, dtype, op, stream)
            return
        if self._stopped or self._report.word:
            self._refuse("all_reduce_coalesced")
        key = (dtype, op, tuple(counts))
        cached = self._coalesced.get(key)
        if cached is None:
            itemsize = lookup(dtype, op).itemsize
            shape = self._coalescer.prepare([c * itemsize for c in counts])
            cached = _bounded_put(self._coalesced, key, (shape, self._all_reduce_plan(
                dtype, op, "auto", shape.total // itemsize)))
        shape, plan = cached
        handle = self._stream(stream)
        buf = self._scratch(max(shape.total, 16), handle).ptr
        self._coalescer.gather(shape, ptrs, buf, handle)
        self._launch(plan, handle, buf, buf)
        self._coalescer.scatter(shape, handle)

    def reduce_scatter_buffers(self, in_ptr: int, out_ptr: int, count: int, dtype: str,
                               op: str = "sum", stream: Any = None) -> None:
        """Collective: :meth:`reduce_scatter` reading N*count elements, writing count."""
        if self._stopped or self._report.word:
            self._refuse("reduce_scatter")
        key = ("rs", dtype, op, count)
        plan = self._plans.get(key)
        if plan is None:
            dt = lookup(dtype, op)
            nbytes = count * dt.itemsize
            plan = self._remember(key, Call("reduce_scatter", dt.name, dt.itemsize, op, count,
                                            "-"), nbytes * self.world_size, nbytes,
                                  -self.rank * nbytes)
        self._launch(plan, stream, in_ptr, out_ptr)

    def all_gather_buffers(self, in_ptr: int, out_ptr: int, count: int, itemsize: int,
                           stream: Any = None) -> None:
        """Collective: :meth:`all_gather` of ``count`` elements of ``itemsize`` bytes each."""
        if self._stopped or self._report.word:
            self._refuse("all_gather")
        key = ("ag", itemsize, count)
        plan = self._plans.get(key)
        if plan is None:
            nbytes = count * itemsize
            plan = self._remember(key, Call("all_gather", None, itemsize, "-", count, "-"),
                                  nbytes, nbytes * self.world_size, self.rank * nbytes)
        self._launch(plan, stream, in_ptr, out_ptr)

    def broadcast_buffers(self, ptr: int, count: int, itemsize: int, root: int = 0,
                          stream: Any = None) -> None:
        """Collective: :meth:`broadcast` of ``count`` elements of ``itemsize`` bytes each."""
        if self._stopped or self._report.word:
            self._refuse("broadcast")
        key = ("bc", itemsize, count, root)
        plan = self._plans.get(key)
        if plan is None:
            if not isinstance(root, int) or not 0 <= root < self.world_size:
                raise ValueError(f"root {root!r} is not a rank of this world of "
                                 f"{self.world_size}")
            plan = self._remember(key, Call("broadcast", None, itemsize, "-", count, "-", root),
                                  0, 0, 0)
        self._launch(plan, stream, ptr, ptr)


class _Borrowed:
    """Another communicator's rendezvous, lent: exchanges go through it, close() leaves it open."""

    def __init__(self, rendezvous: Any) -> None:
        self._rdv = rendezvous
        self.rank, self.world_size = rendezvous.rank, rendezvous.world_size

    def exchange(self, obj: Any) -> list:
        return self._rdv.exchange(obj)

    def barrier(self) -> None:
        self._rdv.exchange(None)

    def close(self) -> None:
        """Nothing: the owner closes the rendezvous."""
