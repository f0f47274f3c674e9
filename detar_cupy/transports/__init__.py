"""Transports: how a collective's bytes move between ranks, beneath the Communicator.

The :class:`~detar_cupy.communicator.Communicator` is the API: it checks arguments, keys plans by
call shape and hands a transport the buffers. A transport turns a :class:`Call` into a plan once
(pure data, compiled kernels, packed parameters) and runs that plan on a stream per call. Every
transport folds element i over ranks 0..N-1 in rank order with the same arithmetic
(``hip_src/arith.h``), so every transport gives the same bits.

- :mod:`.ipc`: the ranks' kernels move the bytes themselves over NVLink/xGMI/PCIe P2P through
  buffers shared by CUDA/HIP IPC (one host, P2P between every pair of GPUs).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol

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

    ``report`` is a :class:`detar_cupy._protocol.Report` in host memory that the transport's
    device work (or its watchdog) fills when it fails; its ``word`` is nonzero from then on, and
    the Communicator raises the decoded error (sticky). ``run`` is the hot path: it must not
    allocate, synchronise or call back into Python beyond the launches.
    """

    name: str
    report: Any
    timeout: float
    #: the driver's kernel launch entry (cuLaunchKernel's arguments), for the Communicator's own
    #: launches beside the plans (coalescing)
    launch_kernel: Any

    def plan(self, call: Call) -> Any:
        """Everything a call of this shape needs, made once (compiles kernels on first use)."""

    def run(self, plan: Any, stream: int, in_ptr: int, out_ptr: int) -> None:
        """Enqueue ``plan`` on ``stream`` for the given buffers, asynchronously."""

    def close(self) -> None:
        """Release the transport's buffers and mappings. The caller has synchronised."""
