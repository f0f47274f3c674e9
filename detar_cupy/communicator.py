"""The Communicator: argument checks, plans, launches, sticky device errors."""
from __future__ import annotations

import os
from typing import Any

from . import _kernels, _plan
from ._ipc import SharedBuffers, check_devices
from ._launch import Launcher
from ._protocol import Ctx, decode_error
from ._sharing import SHARE_ENV, ranks_per_gpu, shared_gpus_allowed
from .dtypes import DTYPES, dtype_name, lookup
from .errors import CommunicatorClosedError, CupyMissingError, MismatchError

DEFAULT_STAGING_BYTES = 32 << 20  # per parity half; larger calls are cut into chunks
DEFAULT_LL_BYTES = 256 << 10  # largest message one LL launch carries
DEFAULT_TIMEOUT_S = 300.0  # device-side spin bound; a peer slower than this is declared gone
PLAN_CACHE = 4096  # plans kept per communicator (one per collective, dtype, op, count, algorithm)


# Settings every rank must share, in the order the ranks exchange them (then each rank's SM count
# and PCI bus id).
_SHARED_SETTINGS = ("DETAR_STAGING_BYTES", "DETAR_LL_BYTES", "DETAR_MAX_BLOCKS", "ROCm build",
                    SHARE_ENV)

_DTYPE_NAMES: dict = {}  # array dtype object -> table name: numpy builds dtype.name in Python


def _name_of(dtype: Any) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype_name(dtype)
    return name


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


class Communicator:
    """One rank of a group of GPUs that reduce together, bit for bit deterministically.

    Made by :func:`detar_cupy.spawn` or :func:`detar_cupy.init_process_group`, not directly.
    Every rank must make the same calls, in the same order, with the same counts, dtypes, ops and
    algorithms (a difference raises :class:`~detar_cupy.MismatchError` on every rank). Calls are
    asynchronous on the given stream (default: CuPy's current stream on this rank's GPU), like
    CuPy kernels; calls on one communicator must be ordered (one stream, or streams the caller
    synchronises).

    Device-side waits are bounded by :attr:`timeout` (seconds; env ``DETAR_TIMEOUT``, default
    300): a peer that never arrives makes every waiting rank raise
    :class:`~detar_cupy.PeerTimeoutError` on its next call or :meth:`check`, instead of hanging.
    Buffer sizes come from ``DETAR_STAGING_BYTES`` (per half, default 32 MiB) and
    ``DETAR_LL_BYTES`` (default 256 KiB), the largest grid from ``DETAR_MAX_BLOCKS`` (default
    128, and never more than the smallest GPU's SM count); ``DETAR_SHARE_GPUS=1`` lets ranks
    share GPUs (for testing: slow calls). Every rank must use the same values.
    """

    def __init__(self) -> None:
        raise TypeError("create communicators with detar_cupy.spawn() or "
                        "detar_cupy.init_process_group()")

    @classmethod
    def _from_rendezvous(cls, rendezvous: Any, device: int) -> "Communicator":
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
        if self.world_size > _kernels.MAX_WORLD:
            raise ValueError(f"world size {self.world_size} exceeds the maximum of "
                             f"{_kernels.MAX_WORLD}")
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self._cupy = cupy
        self._ndarray = cupy.ndarray
        self._device_id = self.device.id
        stage = _env_int("DETAR_STAGING_BYTES", DEFAULT_STAGING_BYTES) // 16 * 16
        ll = _env_int("DETAR_LL_BYTES", DEFAULT_LL_BYTES) // 16 * 16
        timeout = float(os.environ.get("DETAR_TIMEOUT", DEFAULT_TIMEOUT_S))
        max_blocks = _env_int("DETAR_MAX_BLOCKS", _kernels.MAX_BLOCKS)
        if stage < 16 * _kernels.MAX_WORLD or ll < 16:
            raise ValueError("DETAR_STAGING_BYTES and DETAR_LL_BYTES are too small")
        if not 1 <= max_blocks <= _kernels.MAX_BLOCKS:
            raise ValueError(f"DETAR_MAX_BLOCKS={max_blocks} is outside 1..{_kernels.MAX_BLOCKS}")
        share = shared_gpus_allowed()
        sms = self.device.attributes["MultiProcessorCount"]
        runtime = cupy.cuda.runtime
        # Plain bool/int/str: the rendezvous carries only those (and bytes, tuples, lists).
        configs = rendezvous.exchange((stage, ll, max_blocks, bool(runtime.is_hip), int(share),
                                       int(sms), runtime.deviceGetPCIBusId(self._device_id)))
        differ = [f"{what}: " + ", ".join(f"rank {r} {c[i]}" for r, c in enumerate(configs))
                  for i, what in enumerate(_SHARED_SETTINGS)
                  if any(c[i] != configs[0][i] for c in configs)]
        if differ:
            raise MismatchError("ranks must agree on these settings: " + "; ".join(differ))
        bus_ids = [c[-1] for c in configs]
        check_devices(self.rank, self._device_id, bus_ids, share)
        # Block b of every rank handles the same packs, so all ranks must launch the same grid.
        # Blocks spin while they wait, so every rank's grid must fit on its GPU at once: at most
        # the smallest SM count, divided among the ranks that share a GPU (DETAR_SHARE_GPUS).
        per_gpu = ranks_per_gpu(bus_ids)
        grid_cap = min(max_blocks, *(c[-2] // per_gpu for c in configs))
        self._buffers = SharedBuffers(rendezvous, stage, ll)
        self._closed = False
        self._report = self._buffers.report
        self._ctx = Ctx()
        self._buffers.fill(self._ctx)
        self._launcher = Launcher(self._ctx)
        self._run = self._launcher.run
        # With this rank's device id: no cudaGetDevice per call, and never another GPU's stream.
        self._current_stream = cupy.cuda.get_current_stream
        self.timeout = timeout
        self._geom = _plan.Geometry(self.world_size, stage, ll, grid_cap)
        self._plans: dict[tuple, tuple] = {}
        self._failure: Exception | None = None
        rendezvous.barrier()
        self._stopped = False
        return self

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def timeout(self) -> float:
        """Seconds a device-side wait for a peer may last before PeerTimeoutError."""
        return self._ctx.timeout_ns / 1e9

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError("timeout must be positive seconds")
        self._ctx.timeout_ns = int(seconds * 1e9)

    def close(self) -> None:
        """Release the peers' mappings and this rank's buffers. Safe to call twice."""
        if self._closed:
            return
        self._closed = self._stopped = True
        try:
            self.device.synchronize()  # no kernel of ours may still use the buffers
        finally:
            self._buffers.close()
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
            self._failure = decode_error(self._report, self.rank, self.timeout)
            self._stopped = True
        raise self._failure

    def synchronize(self, stream: Any = None) -> None:
        """Wait for this rank's work on ``stream`` (default: current), then :meth:`check`."""
        if stream is None:
            self._current_stream(self._device_id).synchronize()
        elif hasattr(stream, "synchronize"):  # CuPy or torch stream
            stream.synchronize()
        else:  # a raw handle
            self._cupy.cuda.ExternalStream(self._stream(stream)).synchronize()
        self.check()

    def barrier(self) -> None:
        """Block until every rank has reached this barrier (a device-side zero-size call)."""
        self.all_reduce(self._cupy.empty(0, self._cupy.float32), algorithm="one_shot")
        self.synchronize()

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
        """(array, pointer): ``a`` as a CuPy array on this rank's GPU, C-contiguous. Its dtype is
        checked where a plan is made (plans are keyed by it)."""
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
    def _element_type(a: Any, dtype: str | None) -> str:
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

    def _output(self, out: Any, like: Any, size: int, dtype: str | None):
        """(out, pointer) after the input checks, plus: ``size`` elements of ``like``'s dtype
        (with ``dtype`` naming a raw buffer's type: of its element size)."""
        out, ptr = self._array(out, "out_array")
        if out.dtype != like.dtype and (dtype is None or out.itemsize != like.itemsize):
            named = "" if dtype is None else f" ({dtype_name(dtype)} elements)"
            raise TypeError(f"out_array has dtype {out.dtype}, expected {like.dtype}{named}")
        if out.size != size:
            raise ValueError(f"out_array has {out.size} elements, expected {size}")
        return out, ptr

    def _result(self, out_array: Any, x: Any, in_ptr: int, in_count: int, size: int,
                dtype: str | None):
        """(out, pointer) for a call that reads ``in_count`` elements of ``x``: a new array of
        ``size`` elements of its dtype, or ``out_array`` after :meth:`_output`'s checks and a
        test that it does not overlap the elements read."""
        if out_array is None:
            out = self._cupy.empty(size, dtype=x.dtype)
            return out, out.data.ptr
        out, ptr = self._output(out_array, x, size, dtype)
        self._check_overlap(in_ptr, in_count * x.itemsize, ptr, size * x.itemsize)
        return out, ptr

    def _refuse(self, desc: str) -> None:
        """Raise why this communicator takes no more calls (closed, or its sticky failure).
        Callers test ``_stopped or _report.word`` inline first."""
        if self._closed:
            raise CommunicatorClosedError(f"{desc}: the communicator is closed")
        self.check()

    def _compile(self, launches: tuple) -> tuple:
        """Resolve a plan's kernels to driver handles (compiling a module on first use) and pack
        each launch's parameters."""
        with self.device:
            return tuple(self._launcher.prepare(_kernels.function(l.module, l.kernel).ptr, l.grid,
                                                l.block, l.in_offset, l.out_offset, l.count,
                                                l.aux, l.sig) for l in launches)

    def _remember(self, key: tuple, launches: tuple) -> tuple:
        """Compile and cache a plan; past PLAN_CACHE entries the oldest goes (workloads with
        ever-new batch sizes would otherwise grow the cache without bound)."""
        plan = self._compile(launches)
        if len(self._plans) >= PLAN_CACHE:
            del self._plans[next(iter(self._plans))]
        self._plans[key] = plan
        return plan

    @staticmethod
    def _check_overlap(a_ptr: int, a_bytes: int, b_ptr: int, b_bytes: int) -> None:
        if a_ptr != b_ptr and a_ptr < b_ptr + b_bytes and b_ptr < a_ptr + a_bytes:
            raise ValueError("in_array and out_array overlap without being the same buffer; "
                             "use out_array=in_array for in place, or separate buffers")

    # ---- collectives ---------------------------------------------------------------------------
    # The hot path of every call: one sticky-state test, the array checks, one plan lookup keyed
    # by what the plan depends on (dtype objects, not names: numpy builds dtype.name per call),
    # the stream, and the prepared launches. Everything else happens once per plan.
    def all_reduce(self, in_array: Any, out_array: Any = None, op: str = "sum", stream: Any = None,
                   *, algorithm: str = "auto", dtype: str | None = None) -> Any:
        """Reduce ``in_array`` over all ranks into ``out_array`` (new array if None; may be
        ``in_array`` itself). Every rank gets the same bits: element i is the left fold over
        ranks 0..N-1 (see detar_cupy.reference). ``algorithm``: auto, ll, one_shot, two_shot —
        all give identical bits. ``dtype`` names the element type of a raw buffer (e.g.
        ``"bfloat16"`` for a uint16/int16 view)."""
        if self._stopped or self._report.word:
            self._refuse("all_reduce")
        x, in_ptr = self._array(in_array, "in_array")
        count = x.size
        key = ("ar", x.dtype, dtype, op, algorithm, count)
        plan = self._plans.get(key)
        if plan is None:
            name = self._element_type(x, dtype)
            lookup(name, op)
            if algorithm not in _plan.ALGORITHMS:
                raise ValueError(f"unknown algorithm {algorithm!r}; one of "
                                 f"{', '.join(_plan.ALGORITHMS)}")
            plan = self._remember(key, _plan.all_reduce(self._geom, name, op, count, algorithm))
        if out_array is in_array:  # in place: already checked
            out, out_ptr = x, in_ptr
        elif out_array is None:
            out = self._cupy.empty_like(x)
            out_ptr = out.data.ptr
        else:
            out, out_ptr = self._output(out_array, x, count, dtype)
            self._check_overlap(in_ptr, count * x.itemsize, out_ptr, count * x.itemsize)
        self._run(plan, self._current_stream(self._device_id).ptr if stream is None
                  else self._stream(stream), in_ptr, out_ptr)
        return out

    def reduce_scatter(self, in_array: Any, out_array: Any = None, count: int | None = None,
                       op: str = "sum", stream: Any = None, *, dtype: str | None = None) -> Any:
        """Rank r receives elements [r*count, (r+1)*count) of the all-reduce of the ranks'
        ``in_array`` (N*count elements each), with the same bits as all_reduce gives them."""
        if self._stopped or self._report.word:
            self._refuse("reduce_scatter")
        x, in_ptr = self._array(in_array, "in_array")
        total, n = x.size, self.world_size
        if count is None:
            if total % n:
                raise ValueError(f"in_array has {total} elements, not a multiple of the world "
                                 f"size {n}; pass count")
            count = total // n
        if count * n > total:
            raise ValueError(f"in_array has {total} elements, fewer than count*world_size = "
                             f"{count * n}")
        key = ("rs", x.dtype, dtype, op, count)
        plan = self._plans.get(key)
        if plan is None:
            name = self._element_type(x, dtype)
            lookup(name, op)
            plan = self._remember(key, _plan.reduce_scatter(self._geom, name, op, count))
        out, out_ptr = self._result(out_array, x, in_ptr, total, count, dtype)
        self._run(plan, self._stream(stream), in_ptr, out_ptr)
        return out

    def all_gather(self, in_array: Any, out_array: Any = None, count: int | None = None,
                   stream: Any = None) -> Any:
        """Every rank receives the concatenation of all ranks' ``in_array`` (``count`` elements
        each, default in_array.size) in rank order."""
        if self._stopped or self._report.word:
            self._refuse("all_gather")
        x, in_ptr = self._array(in_array, "in_array")
        size = x.size
        count = size if count is None else count
        if count > size:
            raise ValueError(f"count={count} exceeds in_array's {size} elements")
        total = count * self.world_size
        key = ("ag", x.itemsize, count)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._remember(key, _plan.moving(self._geom, "all_gather", x.itemsize, count))
        out, out_ptr = self._result(out_array, x, in_ptr, count, total, None)
        self._run(plan, self._stream(stream), in_ptr, out_ptr)
        return out

    def broadcast(self, in_out_array: Any, root: int = 0, stream: Any = None) -> Any:
        """Copy rank ``root``'s ``in_out_array`` into every rank's ``in_out_array``."""
        if self._stopped or self._report.word:
            self._refuse("broadcast")
        if not 0 <= root < self.world_size:
            raise ValueError(f"root {root} is not a rank of this world of {self.world_size}")
        x, ptr = self._array(in_out_array, "in_out_array")
        key = ("bc", x.itemsize, x.size, root)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._remember(key, _plan.moving(self._geom, "broadcast", x.itemsize, x.size,
                                                    root))
        self._run(plan, self._stream(stream), ptr, ptr)
        return x
