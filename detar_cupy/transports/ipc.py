"""The IPC transport: every rank's kernels store their data straight into the peers' staging
buffers over NVLink/xGMI/PCIe P2P (buffers shared by CUDA/HIP IPC handles), meet at device-side
barriers and fold locally. One host; P2P between every pair of GPUs.

A plan is a tuple of pre-packed launches (:mod:`detar_cupy._launch`), made once per call shape
from the pure-data launch list of :mod:`detar_cupy._plan`.
"""
from __future__ import annotations

from typing import Any, Sequence

from .. import _kernels, _plan
from .._ipc import SharedBuffers, check_devices
from .._launch import Launcher
from .._protocol import Ctx, decode_error
from .._settings import Settings
from .._sharing import ranks_per_gpu
from . import Call


def _launches(geom: _plan.Geometry, call: Call) -> tuple[_plan.Launch, ...]:
    if call.collective == "all_reduce":
        return _plan.all_reduce(geom, call.dtype, call.op, call.count, call.algorithm)
    if call.collective == "reduce_scatter":
        return _plan.reduce_scatter(geom, call.dtype, call.op, call.count)
    return _plan.moving(geom, call.collective, call.itemsize, call.count, call.root)


class IpcTransport:
    """This rank's share of the IPC transport: its buffers, the peers' mapped buffers, the
    kernels' context and the launcher. ``name``: what the communicator reports (``"ipc"``, with
    the reason it was chosen)."""

    def __init__(self, rendezvous: Any, device: Any, settings: Settings, bus_ids: Sequence[str],
                 sm_counts: Sequence[int], name: str = "ipc") -> None:
        from cupy.cuda import runtime

        self.name = name
        self._device = device
        check_devices(rendezvous.rank, device.id, list(bus_ids), settings.share_gpus)
        # Block b of every rank handles the same packs, so all ranks must launch the same grid.
        # Blocks spin while they wait, so every rank's grid must fit on its GPU at once: at most
        # the smallest SM count, divided among the ranks that share a GPU (DETAR_SHARE_GPUS).
        per_gpu = ranks_per_gpu(bus_ids)
        grid_cap = min(settings.max_blocks, *(sms // per_gpu for sms in sm_counts))
        self.geometry = _plan.Geometry(rendezvous.world_size, settings.staging_bytes,
                                       settings.ll_bytes, max(1, grid_cap))
        self._ctx = Ctx()
        self._launcher = Launcher(self._ctx)
        #: The hot path: launch a plan's prepared launches (see :meth:`Launcher.run`).
        self.run = self._launcher.run
        #: Block until the stream's work has finished: the kernels bound every wait for a peer
        #: themselves, so a plain stream synchronisation is bounded too.
        self.wait = runtime.streamSynchronize
        # Last, so that nothing after the allocations can fail (SharedBuffers releases what it
        # allocated if one of its own steps fails).
        self._buffers = SharedBuffers(rendezvous, settings.staging_bytes, settings.ll_bytes,
                                      settings.first_epoch)
        self.report = self._buffers.report
        self._buffers.fill(self._ctx)

    @property
    def context(self) -> Ctx:
        """The kernels' context (buffers, peers' mappings, epochs): for kernels that run beside
        the IPC collectives on the same buffers (the hierarchical transport's node carry)."""
        return self._ctx

    @property
    def timeout(self) -> float:
        """Seconds a device-side wait for a peer may last before PeerTimeoutError."""
        return self._ctx.timeout_ns / 1e9

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._ctx.timeout_ns = int(seconds * 1e9)

    def launches(self, call: Call) -> tuple[_plan.Launch, ...]:
        """The launch list of ``call`` (pure data; what :meth:`plan` compiles)."""
        return _launches(self.geometry, call)

    def plan(self, call: Call) -> tuple:
        """Resolve the call's kernels to driver handles on this rank's GPU (compiling a module on
        first use) and pack each launch's parameters."""
        dev = self._device.id
        with self._device:
            return tuple(self._launcher.prepare(_kernels.function(l.module, l.kernel, dev).ptr,
                                                l.grid, l.block, l.in_offset, l.out_offset,
                                                l.count, l.aux, l.sig, l.total, l.chunk)
                         for l in self.launches(call))

    def failure(self) -> Exception:
        """The error the kernels reported."""
        return decode_error(self.report, self._ctx.rank, self.timeout)

    def close(self) -> None:
        self._buffers.close()
