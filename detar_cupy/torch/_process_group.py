"""Communicators for the ranks of an existing torch.distributed group, set up THROUGH that group:
no extra port, no key. Nothing received is unpickled: the setup values travel in the library's
wire codec (:mod:`detar_cupy._wire`)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import _wire
from ..communicator import Communicator
from ..errors import RendezvousError
from ._group import DetarGroup


def _talks_on_cpu(group: Any) -> bool:
    """Whether ``group`` has a backend for CPU tensors. The setup then never touches the GPU's
    backend: with "cpu:gloo,cuda:nccl" it does not even create an NCCL communicator. The backend
    configuration says it per device ("cuda:nccl", "cpu:gloo,cuda:gloo"), also for groups made
    without naming a backend, whose backend reads "undefined"."""
    get_config = getattr(dist, "get_backend_config", None)
    if get_config is not None:
        return "cpu:" in str(get_config(group)).lower()
    return str(dist.get_backend(group)).lower() in ("gloo", "mpi")


class ProcessGroupRendezvous:
    """What the Communicator's setup talks through (``rank``, ``world_size``, ``exchange``,
    ``barrier``, ``close``), built on all-gathers of uint8 tensors over a torch.distributed group:
    first every rank's length, then the payloads padded to the longest. The tensors are on the
    CPU when the group has a backend for CPU tensors (gloo, mpi), else on GPU ``device`` (default:
    torch's current device; NCCL/RCCL).

    Waits are bounded by the group's own timeout (``init_process_group(timeout=...)``). The
    group stays the caller's: :meth:`close` only stops this object.
    """

    def __init__(self, group: Any = None, *, device: int | None = None) -> None:
        self._group = dist.group.WORLD if group is None else group
        self.rank: int = _member_rank(self._group)
        self.world_size: int = dist.get_world_size(self._group)
        if _talks_on_cpu(self._group):
            self._device = torch.device("cpu")
        else:
            self._device = torch.device("cuda", torch.cuda.current_device() if device is None
                                        else device)
        self._closed = False

    def exchange(self, obj: Any) -> list[Any]:
        """Collective over the group: every rank passes a value of the wire codec (None, bool,
        int, str, bytes, tuples/lists of those) and receives every rank's, in rank order."""
        if self._closed:
            raise RendezvousError(f"rank {self.rank}: the rendezvous is closed")
        data = _wire.encode(obj)
        if self.world_size == 1:  # the same codec round trip as with peers
            return [_wire.decode(data, "rank 0")]
        lengths = self._all_gather(torch.tensor([len(data)], dtype=torch.int64))
        sizes = [int(n) for n in lengths]
        payload = torch.zeros(max(1, *sizes), dtype=torch.uint8)
        payload[:len(data)] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        parts = self._all_gather(payload)
        return [_wire.decode(part[:n].numpy().tobytes(), f"rank {r}")
                for r, (part, n) in enumerate(zip(parts, sizes))]

    def barrier(self) -> None:
        self.exchange(None)

    def close(self) -> None:
        self._closed = True

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.to(self._device)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self._group)
        return [p.cpu() for p in parts]


def from_process_group(group: Any = None, *, device: int | torch.device | None = None,
                       transport: str = "auto") -> DetarGroup:
    """Collective over ``group``: a :class:`DetarGroup` for its ranks, set up through it.

    ``group``: a torch.distributed process group (default: the default group); any subgroup
    works, e.g. each tensor-parallel group of a TP x DP layout, and every member calls this with
    its own group. The detar rank is the group rank; ``device`` defaults to torch's current CUDA
    device (``torch.cuda.set_device``). Ranks sharing a GPU need ``DETAR_SHARE_GPUS=1``.
    ``transport``: ``"auto"``, ``"ipc"`` or ``"nccl"`` (see ``Communicator.transport``).

    Raises ValueError when torch.distributed is not initialized, this process is not a member of
    ``group``, or torch sees no GPU; the Communicator's errors (mismatched settings, ranks on one
    GPU) on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("from_process_group needs an initialized torch.distributed: call "
                         "torch.distributed.init_process_group() first (or build a "
                         "Communicator with detar_cupy.init_process_group())")
    pg = dist.group.WORLD if group is None else group
    _member_rank(pg)  # before anything that needs a GPU
    index = _device_index(device)
    rendezvous = ProcessGroupRendezvous(pg, device=index)
    try:
        comm = Communicator._from_rendezvous(rendezvous, index, transport)
    except BaseException:
        rendezvous.close()
        raise
    return DetarGroup(comm, process_group=pg)


def _member_rank(group: Any) -> int:
    """This process's rank in ``group``; ValueError if it is not a member."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the "
                         "group; only the group's members take part in its setup")
    return rank


def _device_index(device: int | torch.device | None) -> int:
    if device is None or (isinstance(device, torch.device) and device.index is None):
        if not torch.cuda.is_available():
            raise ValueError("from_process_group needs a GPU that torch can use, but "
                             "torch.cuda.is_available() is False (a CPU-only torch, or no GPU)")
        return torch.cuda.current_device()
    if isinstance(device, torch.device) and device.type == "cuda":
        return device.index
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    raise ValueError(f"device must be a GPU index or a torch.device('cuda', i), got {device!r}")
