"""Transports: how a collective's bytes move between ranks, beneath the Communicator.

The :class:`~detar_cupy.communicator.Communicator` is the API: it checks arguments, keys plans by
call shape and hands a transport the buffers. A transport turns a :class:`Call` into a plan once
(pure data, compiled kernels, packed parameters) and runs that plan on a stream per call. Every
transport folds element i over ranks 0..N-1 in rank order with the same arithmetic
(``hip_src/arith.h``), so every transport gives the same bits.

- :mod:`.ipc`: the ranks' kernels move the bytes themselves over NVLink/xGMI/PCIe P2P through
  buffers shared by CUDA/HIP IPC (one host, P2P between every pair of GPUs).
- :mod:`.nccl`: NCCL/RCCL (``cupy.cuda.nccl``) moves the bytes, our kernels fold them in rank
  order: flat (any layout), or hierarchical (IPC inside each node, the fold carried between
  nodes). :mod:`.schedule` holds its schedules as pure data.

:mod:`.select` decides which one from facts every rank exchanged (:func:`create`).
"""
from __future__ import annotations

import os
import socket
from typing import Any, NamedTuple, Protocol, Sequence

#: The collectives every transport implements.
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
#: all_reduce algorithms every transport accepts; all give the same bits.
ALGORITHMS = ("auto", "ll", "one_shot", "two_shot")


class Call(NamedTuple):
    """The shape of one collective call, identical on every rank of a correct program.

    ``dtype`` is a table name (``detar_cupy.dtypes``) for the reducing collectives and None for
    the data-moving ones, which only know ``itemsize``. ``op`` and ``algorithm`` are "-" where
    they do not apply. ``count``: elements per rank (all_reduce, broadcast) or per slice
    (reduce_scatter, all_gather). ``root``: broadcast's root, else 0.
    """

    collective: str
    dtype: str | None
    itemsize: int
    op: str
    count: int
    algorithm: str
    root: int = 0


class Transport(Protocol):
    """What the Communicator needs of a transport.

    ``name`` says which transport it is (a :class:`.select.Choice`: a str with a ``reason``).
    ``report`` is a :class:`detar_cupy._protocol.Report` in host memory that the transport's
    device work (or its watchdog) fills when it fails; its ``word`` is nonzero from then on, and
    the Communicator raises :meth:`failure` (sticky). ``run`` is the hot path: it must not
    allocate, synchronise or call back into Python beyond the launches and enqueues. ``timeout``
    bounds every wait for a peer (seconds; settable). ``geometry`` is the
    :class:`detar_cupy._plan.Geometry` of the staging buffers.
    """

    name: str
    report: Any
    timeout: float
    geometry: Any

    def plan(self, call: Call) -> Any:
        """Everything a call of this shape needs, made once (compiles kernels on first use)."""

    def run(self, plan: Any, stream: int, in_ptr: int, out_ptr: int) -> None:
        """Enqueue ``plan`` on ``stream`` for the given buffers, asynchronously."""

    def wait(self, stream: int) -> None:
        """Block until the work on ``stream`` has finished or this transport has failed (its
        report's word is nonzero), whichever comes first: never longer than about the timeout
        after a peer stops."""

    def failure(self) -> Exception:
        """The error that ``report`` describes (called once its word is nonzero)."""

    def close(self) -> None:
        """Release the transport's buffers and mappings. The caller has synchronised."""


class RankFacts(NamedTuple):
    """What every rank tells the others before a transport is chosen (rendezvous-safe values)."""

    rocm: bool  # a ROCm build of CuPy
    sm_count: int
    bus_id: str  # PCI bus id of the rank's GPU
    node: str  # DETAR_NODE, else the hostname
    host: str  # the hostname, whatever DETAR_NODE says (which processes can see each other)
    pid: int


def local_facts(device: Any) -> RankFacts:
    """This rank's :class:`RankFacts` (``device``: its ``cupy.cuda.Device``)."""
    from cupy.cuda import runtime

    from .select import node_label

    host = socket.gethostname()
    return RankFacts(bool(runtime.is_hip), device.attributes["MultiProcessorCount"],
                     runtime.deviceGetPCIBusId(device.id), node_label(hostname=host), host,
                     os.getpid())


def _nccl_missing() -> str:
    """Why ``cupy.cuda.nccl`` is unusable in this process ("" when it is usable)."""
    try:
        from cupy.cuda import nccl
    except ImportError as exc:  # CuPy built without NCCL/RCCL
        return f"cupy.cuda.nccl cannot be imported ({exc})"
    return "" if getattr(nccl, "available", True) else "cupy.cuda.nccl is unavailable"


def _p2p_row(device: Any, facts: Sequence[RankFacts], me: int) -> tuple[bool, ...]:
    """Whether this rank's GPU reaches each rank's GPU peer to peer (ranks on other nodes, the
    same GPU, and GPUs this process cannot see count as reachable: the IPC mapping decides)."""
    from .._ipc import reaches

    row = []
    for f in facts:
        ok = True
        if f.node == facts[me].node and f.bus_id != facts[me].bus_id:
            try:
                ok = reaches(device.id, f.bus_id)
            except Exception:  # the driver could not say: the IPC mapping decides
                ok = True
        row.append(ok)
    return tuple(row)


def create(requested: str, rendezvous: Any, device: Any, settings: Any,
           facts: Sequence[RankFacts]) -> Transport:
    """The transport every rank agrees on (collective: every rank calls it with the exchanged
    ``facts``). ValueError when the requested transport cannot serve the ranks' layout."""
    from .select import NodeMap, choose, node_p2p

    nodes = NodeMap.of([f.node for f in facts])
    p2p = node_p2p(nodes, rendezvous.exchange(_p2p_row(device, facts, rendezvous.rank)))
    choice = choose(requested, nodes, p2p)
    if choice == "ipc":
        from .ipc import IpcTransport

        return IpcTransport(rendezvous, device, settings, [f.bus_id for f in facts],
                            [f.sm_count for f in facts], choice)
    missing = [(r, why) for r, why in enumerate(rendezvous.exchange(_nccl_missing())) if why]
    if missing:
        from ..errors import DetarError

        ranks = ", ".join(str(r) for r, _ in missing)
        raise DetarError(f"the {choice} transport ({choice.reason}) needs NCCL/RCCL through "
                         f"cupy.cuda.nccl, which rank(s) {ranks} lack ({missing[0][1]}); install "
                         "NCCL for CuPy (e.g. pip install nvidia-nccl-cu13), or run on one node "
                         "with P2P (transport='ipc')")
    from .nccl import NcclTransport

    return NcclTransport(rendezvous, device, settings, choice, facts)
