"""Device buffers shared between ranks through IPC memory handles.

Raw allocations, not CuPy's pool: an IPC handle covers a whole allocation, and the pool would hand
out pieces of a larger one. Each rank owns (pictured in :mod:`detar_cupy._protocol`)
  - a staging buffer (two halves chosen by epoch parity) that peers store into during a call;
  - a signal buffer (LL area, barrier flags, call descriptors) that peers store into and this
    rank polls;
  - a private state block (error word, per-block epochs), never shared;
  - a mapped, pinned host block for the failure report (error word, the failing launch and the
    peer's), which the host reads without synchronising the device.
On ROCm both shared buffers are fine-grained and uncached (``hipDeviceMallocUncached``, ROCm
>= 5.7), as peer-written memory must be: the local L2 stays coherent with other agents' writes
only on fine-grained pages, and uncached pages keep polling loads from being served stale.
Where the runtime lacks the uncached flag they are fine-grained only (ROCm 5.0-5.6), with a
warning that names what was used. On CUDA they are ordinary device memory (the readers bypass
L1 instead). Peers' staging and signal buffers are opened once and closed by
:meth:`SharedBuffers.close`.
"""
from __future__ import annotations

import ctypes
import functools
import warnings
from typing import Any, Callable, Iterable

from . import _protocol
from ._sharing import SHARE_HINT
from .errors import DetarError, RendezvousError

_CUDA_IPC_LAZY_ENABLE_PEER_ACCESS = 1
_HOST_ALLOC_PORTABLE_MAPPED = 0x1 | 0x2
_HIP_DEVICE_MALLOC_FINEGRAINED = 0x1
_HIP_DEVICE_MALLOC_UNCACHED = 0x3
_warned_fine_grained = False


@functools.lru_cache(maxsize=None)
def _hip_ext_malloc() -> Any:
    """hipExtMallocWithFlags through ctypes (CuPy has no binding), loaded and typed once."""
    for name in ("libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"):
        try:
            fn = ctypes.CDLL(name).hipExtMallocWithFlags
        except OSError:
            continue
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    raise DetarError("cannot load libamdhip64 for fine-grained device memory")


def _hip_peer_written_malloc(size: int) -> int:
    """Fine-grained and uncached device memory; or fine-grained only, with a one-time warning,
    where the runtime lacks the uncached flag."""
    global _warned_fine_grained
    fn = _hip_ext_malloc()
    ptr = ctypes.c_void_p()
    if fn(ctypes.byref(ptr), size, _HIP_DEVICE_MALLOC_UNCACHED) == 0:
        return int(ptr.value)
    status = fn(ctypes.byref(ptr), size, _HIP_DEVICE_MALLOC_FINEGRAINED)
    if status != 0:
        raise DetarError(f"hipExtMallocWithFlags failed for {size} bytes of fine-grained memory "
                         f"(status {status})")
    if not _warned_fine_grained:
        _warned_fine_grained = True
        warnings.warn("this ROCm runtime has no uncached device memory (hipDeviceMallocUncached, "
                      "ROCm >= 5.7): detar_cupy's peer-written buffers are fine-grained "
                      "(hipDeviceMallocFinegrained) but cached", RuntimeWarning, stacklevel=3)
    return int(ptr.value)


def alloc_report(runtime: Any) -> tuple[int, _protocol.Report]:
    """A zeroed failure report in pinned host memory that every GPU maps (the kernels write it,
    the host reads it without synchronising): its address and the Report over it. Freed with
    ``runtime.freeHost``."""
    size = ctypes.sizeof(_protocol.Report)
    ptr = runtime.hostAlloc(size, _HOST_ALLOC_PORTABLE_MAPPED)
    ctypes.memset(ptr, 0, size)
    return ptr, _protocol.Report.from_address(ptr)


def release_all(free: Callable[[int], Any], handles: Iterable[int]) -> None:
    """``free(h)`` for every handle, ignoring failures: at interpreter exit the context may be
    gone already, and then there is nothing left to release."""
    for handle in handles:
        try:
            free(handle)
        except Exception:
            pass


def reaches(device: int, bus: str) -> bool:
    """Whether GPU ``device`` accesses the GPU at PCI ``bus`` peer to peer; one this process
    cannot see counts as reachable (opening its IPC handles decides)."""
    from cupy.cuda import runtime as rt

    try:
        peer = rt.deviceGetByPCIBusId(bus)
    except Exception:
        return True
    return bool(rt.deviceCanAccessPeer(device, peer))


def check_devices(rank: int, device: int, bus_ids: list[str], share: bool,
                  p2p: bool = True) -> None:
    """Refuse, before anything is allocated, two ranks on one GPU (unless ``share``: see
    :mod:`detar_cupy._sharing`) and, with ``p2p``, GPUs that cannot reach each other.
    ``bus_ids``: every rank's PCI bus id, in rank order."""
    seen: dict[str, int] = {}
    for r, bus in enumerate(bus_ids):
        if bus in seen and not share:
            raise RendezvousError(f"ranks {seen[bus]} and {r} use the same GPU (PCI {bus}); one "
                                  f"GPU per rank ({SHARE_HINT})")
        seen.setdefault(bus, r)
    for r, bus in enumerate(bus_ids if p2p else ()):
        if bus == bus_ids[rank]:
            continue  # this rank's own GPU (itself, or a rank sharing it)
        if not reaches(device, bus):
            raise RendezvousError(
                f"rank {rank} (GPU {device}) cannot access rank {r}'s GPU (PCI {bus}) peer to "
                "peer; detar_cupy needs P2P (NVLink/xGMI or PCIe P2P) between all GPUs")


class SharedBuffers:
    """This rank's buffers and its mappings of every peer's; fills a :class:`_protocol.Ctx`."""

    def __init__(self, rendezvous: Any, stage_half_bytes: int, ll_bytes: int,
                 first_epoch: int = 1) -> None:
        import cupy
        from cupy.cuda import runtime

        self._runtime = runtime
        self.rank = rendezvous.rank
        self.world_size = n = rendezvous.world_size
        self._own: list[int] = []  # device allocations to free
        self._opened: list[int] = []  # peer mappings to close
        self._host_report = 0
        try:
            is_hip = bool(runtime.is_hip)
            self.stage = self._alloc(2 * stage_half_bytes, peer_written=is_hip)
            sig_bytes = _protocol.signal_offsets(n, ll_bytes)[3]
            self.signal = self._alloc(sig_bytes, peer_written=is_hip)
            runtime.memset(self.signal, 0, sig_bytes)  # every flag 0, every line cleared
            self.state = self._alloc(_protocol.STATE_BYTES)
            image = ctypes.create_string_buffer(_protocol.state_image(first_epoch),
                                                _protocol.STATE_BYTES)
            runtime.memcpy(self.state, ctypes.addressof(image), _protocol.STATE_BYTES,
                           runtime.memcpyHostToDevice)
            self._host_report, self.report = alloc_report(runtime)
            runtime.deviceSynchronize()

            mine = (bytes(runtime.ipcGetMemHandle(self.stage)),
                    bytes(runtime.ipcGetMemHandle(self.signal)))
            everyone = rendezvous.exchange(mine)
            self.stages, self.signals = [], []
            for r, (stage_h, signal_h) in enumerate(everyone):
                if r == self.rank:
                    self.stages.append(self.stage)
                    self.signals.append(self.signal)
                else:
                    self.stages.append(self._open(stage_h, r))
                    self.signals.append(self._open(signal_h, r))
            cupy.cuda.runtime.deviceSynchronize()
        except BaseException:
            self.close()
            raise
        self.ll_bytes = ll_bytes
        self.ll_src_lines = _protocol.ll_src_lines(ll_bytes)
        self.stage_half_bytes = stage_half_bytes

    def _alloc(self, size: int, peer_written: bool = False) -> int:
        ptr = _hip_peer_written_malloc(size) if peer_written else self._runtime.malloc(size)
        self._own.append(ptr)
        return ptr

    def _open(self, handle: bytes, peer: int) -> int:
        try:
            ptr = self._runtime.ipcOpenMemHandle(handle, _CUDA_IPC_LAZY_ENABLE_PEER_ACCESS)
        except Exception as exc:  # CUDARuntimeError; its type differs between CuPy builds
            raise RendezvousError(
                f"rank {self.rank}: cannot map rank {peer}'s buffer ({exc}); the two GPUs may not "
                "be able to reach each other (P2P), or the ranks run on different hosts") from exc
        self._opened.append(ptr)
        return ptr

    def fill(self, ctx: _protocol.Ctx) -> None:
        """Write every pointer and size of this communicator into ``ctx``."""
        start, mid, desc, _ = _protocol.signal_offsets(self.world_size, self.ll_bytes)
        for r in range(self.world_size):
            ctx.stage[r] = self.stages[r]
            ctx.ll[r] = self.signals[r]
            ctx.start_flags[r] = self.signals[r] + start
            ctx.mid_flags[r] = self.signals[r] + mid
            ctx.desc[r] = self.signals[r] + desc
        ctx.state = self.state
        ctx.report = self._host_report
        ctx.stage_half_packs = self.stage_half_bytes // 16
        ctx.ll_src_lines = self.ll_src_lines
        ctx.rank = self.rank

    def close(self) -> None:
        """Unmap peers' buffers and free ours. Idempotent."""
        rt = self._runtime
        release_all(rt.ipcCloseMemHandle, self._opened)
        release_all(rt.free, self._own)
        release_all(rt.freeHost, [self._host_report] if self._host_report else [])
        self._opened, self._own, self._host_report = [], [], 0
